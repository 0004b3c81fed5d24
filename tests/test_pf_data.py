"""PF-PASCAL and PF-WILLOW: readers on real-format fixtures, their DataModules, and end-to-end runs.

Fixtures are generated in the datasets' own formats (csv with a header row, JPEG/PNG images of different
sizes, PF-PASCAL annotation .mat files) by ``write_synthetic_pfpascal`` / ``write_synthetic_pfwillow``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

import evaluate
from datamodules import PFPascalDataModule, PFPascalDataset, PFWillowDataModule, PFWillowDataset
from datamodules.pfpascal import (
    PF_PASCAL_CATEGORIES,
    SYNTHETIC_PASCAL_IMAGES as PASCAL_IMAGES,
    SYNTHETIC_PASCAL_PAIRS as PASCAL_PAIRS,
    write_csv_rows as _write_csv,
    write_synthetic_pfpascal,
)
from datamodules.pfwillow import (
    SYNTHETIC_WILLOW_IMAGES as WILLOW_IMAGES,
    SYNTHETIC_WILLOW_PAIRS as WILLOW_PAIRS,
    write_synthetic_pfwillow,
)
from datamodules.protocols import get_protocol

from conftest import CONFIGS, TINY_OVERLAY as TINY
PFPASCAL_CFG, PFWILLOW_CFG = str(CONFIGS / "pfpascal.yaml"), str(CONFIGS / "pfwillow.yaml")

PASCAL_CSV = "test_pairs_pf_pascal.csv"

# ------------------------------------------------------------------------------------- fixtures

def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def pascal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A read-only PF-PASCAL root (do not modify in tests)."""
    return write_synthetic_pfpascal(tmp_path_factory.mktemp("pascal"))


@pytest.fixture(scope="module")
def willow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A read-only PF-WILLOW root in the Proposal Flow layout (do not modify in tests)."""
    return write_synthetic_pfwillow(tmp_path_factory.mktemp("willow"))


SAMPLE_KEYS = {"pair_id", "category", "src_image", "trg_image", "src_image_path", "trg_image_path",
               "src_kps", "trg_kps", "kps_valid", "threshold"}

# ------------------------------------------------------------------------------------- PF-PASCAL


def test_pascal_samples_equal_the_csv(pascal) -> None:
    root, info = pascal
    ds = PFPascalDataset(root)
    assert len(ds) == len(PASCAL_PAIRS) and ds.split == "test"
    assert ds.categories == ["aeroplane", "cat", "dog"]
    for i, (sample, row) in enumerate(zip(ds, info["rows"])):
        assert set(sample) == SAMPLE_KEYS | {"src_instance_box", "trg_instance_box"}
        assert sample["pair_id"] == f"{i:04d}-{row['src']}-{row['trg']}:{row['category']}"
        assert sample["category"] == row["category"]
        assert sample["src_image_path"] == str(root / "JPEGImages" / f"{row['src']}.jpg")
        assert sample["trg_image_path"] == str(root / "JPEGImages" / f"{row['trg']}.jpg")
        for side, xs, ys in (("src", row["xa"], row["ya"]), ("trg", row["xb"], row["yb"])):
            kps = sample[f"{side}_kps"]
            assert kps.dtype == torch.float32
            assert kps.tolist() == [[x, y] for x, y in zip(xs, ys)]
            w, h = PASCAL_IMAGES[row[side]][1]
            image = sample[f"{side}_image"]
            assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        assert sample["kps_valid"].dtype == torch.bool and sample["kps_valid"].all()
        assert sample["kps_valid"].shape == (len(row["xa"]),)
    assert ds.pair_ids == [ds[i]["pair_id"] for i in range(len(ds))]
    assert len(ds.image_paths) == len(PASCAL_IMAGES)


def test_pascal_class_index_maps_to_the_voc_names(pascal) -> None:
    assert PF_PASCAL_CATEGORIES[8 - 1] == "cat" and PF_PASCAL_CATEGORIES[12 - 1] == "dog"
    assert PF_PASCAL_CATEGORIES[0] == "aeroplane" and PF_PASCAL_CATEGORIES[-1] == "tvmonitor"
    assert len(PF_PASCAL_CATEGORIES) == 20
    root, _ = pascal
    rows = _read_csv(root / PASCAL_CSV)
    ds = PFPascalDataset(root)
    for row, record in zip(rows[1:], ds.records):
        assert record.category == {"8": "cat", "12": "dog", "1": "aeroplane"}[row[2]]


def test_pascal_threshold_is_the_max_side_of_the_target_image(pascal) -> None:
    root, info = pascal
    ds = PFPascalDataset(root)
    for sample, row in zip(ds, info["rows"]):
        w, h = PASCAL_IMAGES[row["trg"]][1]
        assert sample["threshold"] == float(max(w, h))
        assert sample["threshold"] == max(sample["trg_image"].shape[-2:])
    # by hand, for the first two pairs: targets 112x150 and 160x120
    assert [r.threshold for r in ds.records[:2]] == [150.0, 160.0]


def test_pascal_bbox_from_the_mat_and_the_bbox_threshold(pascal) -> None:
    root, info = pascal
    image_thr = PFPascalDataset(root)
    bbox_thr = PFPascalDataset(root, threshold="bbox")
    assert bbox_thr.threshold_mode == "bbox"
    for a, b, row in zip(image_thr, bbox_thr, info["rows"]):
        for side in ("src", "trg"):
            expected = info["mat"][row[side]][1]
            assert a[f"{side}_instance_box"].dtype == torch.float32
            assert a[f"{side}_instance_box"].tolist() == expected.tolist()
        x1, y1, x2, y2 = info["mat"][row["trg"]][1].tolist()
        assert b["threshold"] == max(x2 - x1, y2 - y1)
        assert torch.equal(a["trg_kps"], b["trg_kps"])  # keypoints still come from the csv


def test_pascal_without_annotations(tmp_path) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path, with_mat=False)
    sample = PFPascalDataset(root)[0]
    assert "src_instance_box" not in sample and "trg_instance_box" not in sample
    with pytest.raises(FileNotFoundError) as err:
        PFPascalDataset(root, threshold="bbox")
    msg = str(err.value)
    assert "Annotations" in msg and "2008_000202.mat" in msg and "row 0" in msg and PASCAL_CSV in msg


def test_pascal_val_and_trn_splits(tmp_path) -> None:
    root, info = write_synthetic_pfpascal(tmp_path)
    (root / PASCAL_CSV).rename(root / "val_pairs_pf_pascal.csv")
    assert PFPascalDataset(root, split="val").split == "val"
    assert len(PFPascalDataset(root, split="val")) == len(PASCAL_PAIRS)
    # the training csv has no keypoint columns: keypoints come from the .mat files (visible in both)
    _write_csv(root / "trn_pairs_pf_pascal.csv", [
        ["source_image", "target_image", "class", "flip"],
        ["PF-dataset-PASCAL/JPEGImages/2008_000101.jpg", "PF-dataset-PASCAL/JPEGImages/2008_000202.jpg", "8", "0"],
    ])  # fmt: skip
    for split in ("trn", "train"):
        ds = PFPascalDataset(root, split=split)
        assert ds.split == "trn"
        sample = ds[0]
        src_mat, trg_mat = info["mat"]["2008_000101"][0], info["mat"]["2008_000202"][0]
        both = np.isfinite(src_mat).all(1) & np.isfinite(trg_mat).all(1)
        assert sample["src_kps"].tolist() == src_mat[both].tolist()
        assert sample["trg_kps"].tolist() == trg_mat[both].tolist()
        assert sample["kps_valid"].shape == (int(both.sum()),) and int(both.sum()) == 5
    with pytest.raises(ValueError, match="Unknown PF-PASCAL split"):
        PFPascalDataset(root, split="training")
    with pytest.raises(ValueError, match="Unknown PF-PASCAL threshold"):
        PFPascalDataset(root, split="val", threshold="box")


def test_pascal_category_filter(pascal) -> None:
    root, _ = pascal
    ds = PFPascalDataset(root, categories=["cat"])
    assert ds.categories == ["cat"] and len(ds) == 2
    assert all(pid.endswith(":cat") for pid in ds.pair_ids)
    assert ds.pair_ids[1].startswith("0001-")  # pair ids keep the csv row index
    with pytest.raises(ValueError, match="Unknown PF-PASCAL categories"):
        PFPascalDataset(root, categories=["kitten"])
    with pytest.raises(ValueError, match="no pairs") as err:
        PFPascalDataset(root, categories=["sofa"])
    assert "available" in str(err.value)


def test_pascal_missing_root_and_csv(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        PFPascalDataset(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and PASCAL_CSV.replace("test", "{test,val,trn}") in str(err.value)
    (tmp_path / "PF-dataset-PASCAL").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PFPascalDataset(tmp_path / "PF-dataset-PASCAL")
    msg = str(err.value)
    assert all(name in msg for name in (PASCAL_CSV, "val_pairs_pf_pascal.csv", "trn_pairs_pf_pascal.csv"))


def _edit_row(row: int, column: int, value: str) -> Callable[[list[list[str]]], None]:
    def edit(rows: list[list[str]]) -> None:
        rows[row + 1][column] = value
    return edit


PASCAL_CSV_ERRORS = {
    "extra column": (lambda rows: rows[3].append("1"), "row 2 (line 4)", "expected 7 columns, got 8"),
    "missing column": (lambda rows: rows[2].pop(), "row 1 (line 3)", "expected 7 columns, got 6"),
    "unparsable number": (_edit_row(1, 3, "12.5;abc;3"), "row 1 (line 3)", "'abc', not a number"),
    "empty list": (_edit_row(0, 4, ""), "row 0 (line 2)", "column 'YA' is empty"),
    "non-finite": (_edit_row(0, 5, "1;2;nan;4"), "row 0 (line 2)", "non-finite"),
    "XA/YA lengths": (_edit_row(2, 3, "1;2;3;4;5;6"), "row 2 (line 4)", "'XA' has 6 values but 'YA' has 5"),
    "XB/YB lengths": (_edit_row(2, 6, "1;2"), "row 2 (line 4)", "'XB' has 5 values but 'YB' has 2"),
    "point counts": (
        lambda rows: rows[1].__setitem__(slice(5, 7), ["1;2;3", "4;5;6"]), "row 0 (line 2)",
        "the source has 4 keypoints but the target has 3",
    ),
    "class 21": (_edit_row(4, 2, "21"), "row 4 (line 6)", "class 21 is out of range 1..20"),
    "class 0": (_edit_row(4, 2, "0"), "row 4 (line 6)", "class 0 is out of range 1..20"),
    "class text": (_edit_row(3, 2, "dog"), "row 3 (line 5)", "'dog', not an integer"),
    "header": (lambda rows: rows[0].pop(), "header (line 1)", "got 6"),
}


@pytest.mark.parametrize("case", list(PASCAL_CSV_ERRORS))
def test_pascal_malformed_csv_names_the_file_and_row(tmp_path, case) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path, with_mat=False)
    edit, where, what = PASCAL_CSV_ERRORS[case]
    rows = _read_csv(root / PASCAL_CSV)
    edit(rows)
    _write_csv(root / PASCAL_CSV, rows)
    with pytest.raises(ValueError) as err:
        PFPascalDataset(root)
    msg = str(err.value)
    assert str(root / PASCAL_CSV) in msg and where in msg and what in msg, msg


def test_pascal_missing_and_corrupt_images_name_the_file(tmp_path) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path, with_mat=False)
    image = root / "JPEGImages" / "2009_000404.jpg"  # target of row 2, source of row 3
    data = image.read_bytes()
    image.unlink()
    with pytest.raises(FileNotFoundError) as err:
        PFPascalDataset(root)
    assert "2009_000404.jpg" in str(err.value) and "row 2" in str(err.value) and PASCAL_CSV in str(err.value)
    image.write_bytes(b"\x00not an image" * 10)
    with pytest.raises(ValueError) as err:
        PFPascalDataset(root)
    assert "2009_000404.jpg" in str(err.value) and "row 2" in str(err.value)
    image.write_bytes(data[: len(data) // 3])  # truncated: the header reads, the pixels do not
    ds = PFPascalDataset(root)
    with pytest.raises(ValueError) as err:
        ds[2]
    assert "2009_000404.jpg" in str(err.value)


def test_pascal_corrupt_mat_names_the_file(tmp_path) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path)
    mat = root / "Annotations" / "dog" / "2009_000303.mat"
    mat.write_bytes(b"not a mat file" * 20)
    with pytest.raises(ValueError) as err:
        PFPascalDataset(root)
    assert str(mat) in str(err.value) and "row 2" in str(err.value)
    savemat(str(mat), {"kps": np.zeros((3, 2))})  # no bbox
    with pytest.raises(ValueError, match="missing variable 'bbox'") as err:
        PFPascalDataset(root)
    assert str(mat) in str(err.value)


def test_pascal_renamed_root_resolves_under_root(tmp_path) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path, with_mat=False)
    renamed = root.rename(tmp_path / "PF-PASCAL")  # csv paths still say PF-dataset-PASCAL/...
    ds = PFPascalDataset(renamed)
    assert ds[0]["src_image_path"] == str(renamed / "JPEGImages" / "2008_000101.jpg")


# ------------------------------------------------------------------------------------- PF-WILLOW


def test_willow_samples_equal_the_csv(willow) -> None:
    root, info = willow
    ds = PFWillowDataset(root)
    assert ds.csv_path == root / "test_pairs_pf.csv"
    assert len(ds) == len(WILLOW_PAIRS)
    assert ds.categories == ["car", "duck", "winebottle"]
    assert ds.subclasses == ["car(G)", "duck(S)", "winebottle(M)"]
    for i, (sample, row) in enumerate(zip(ds, info)):
        assert set(sample) == SAMPLE_KEYS | {"subclass"}
        assert sample["pair_id"] == f"{i:04d}-{row['src']}-{row['trg']}:{row['subclass']}"
        assert sample["subclass"] == row["subclass"]
        assert sample["src_image_path"] == str(root / row["subclass"] / f"{row['src']}.png")
        for side, xs, ys in (("src", row["xa"], row["ya"]), ("trg", row["xb"], row["yb"])):
            kps = sample[f"{side}_kps"]
            assert kps.dtype == torch.float32 and kps.shape == (10, 2)
            assert kps.tolist() == [[x, y] for x, y in zip(xs, ys)]
            w, h = WILLOW_IMAGES[(row["subclass"], row[side])]
            assert sample[f"{side}_image"].shape == (3, h, w)
        assert sample["kps_valid"].all() and sample["kps_valid"].shape == (10,)


def test_willow_category_is_the_subclass_prefix(willow) -> None:
    root, _ = willow
    ds = PFWillowDataset(root)
    by_subclass = {r.subclass: r.category for r in ds.records}
    assert by_subclass == {"car(G)": "car", "winebottle(M)": "winebottle", "duck(S)": "duck"}
    sub = PFWillowDataset(root, categories=["winebottle"])
    assert [r.subclass for r in sub.records] == ["winebottle(M)"] and sub.categories == ["winebottle"]
    assert len(PFWillowDataset(root, categories=["car(G)", "duck"])) == 4
    with pytest.raises(ValueError, match="Unknown PF-WILLOW categories") as err:
        PFWillowDataset(root, categories=["bottle"])
    assert "winebottle" in str(err.value)


def test_willow_threshold_is_the_target_keypoint_box(willow) -> None:
    root, info = willow
    for sample, row in zip(PFWillowDataset(root), info):
        box_w, box_h = max(row["xb"]) - min(row["xb"]), max(row["yb"]) - min(row["yb"])
        assert sample["threshold"] == max(box_w, box_h)  # no +1
        w, h = WILLOW_IMAGES[(row["subclass"], row["trg"])]
        assert sample["threshold"] == max(w - 20, h - 20)  # the anchors at (10, 10) and (w-10, h-10)


def test_willow_hpf_layout_and_csv_name_order(tmp_path) -> None:
    root, info = write_synthetic_pfwillow(tmp_path, layout="hpf", csv_name="test_pairs.csv")
    ds = PFWillowDataset(root)  # csv says PF-dataset/car(G)/...: first component dropped, resolved under root
    assert not (tmp_path / "PF-dataset").exists()
    assert ds.csv_path.name == "test_pairs.csv"
    assert ds[0]["src_image_path"] == str(root / "car(G)" / "Cars_001a.png")
    assert ds[0]["src_kps"].tolist() == [[x, y] for x, y in zip(info[0]["xa"], info[0]["ya"])]
    # test_pairs_pf_willow.csv wins over the others
    rows = _read_csv(root / "test_pairs.csv")
    _write_csv(root / "test_pairs_pf_willow.csv", rows[:2])
    _write_csv(root / "test_pairs_pf.csv", rows[:3])
    assert PFWillowDataset(root).csv_path.name == "test_pairs_pf_willow.csv" and len(PFWillowDataset(root)) == 1
    (root / "test_pairs_pf_willow.csv").unlink()
    assert len(PFWillowDataset(root)) == 2


def test_willow_missing_root_and_csv(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PFWillowDataset(tmp_path / "nowhere")
    (tmp_path / "PF-dataset").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        PFWillowDataset(tmp_path / "PF-dataset")
    assert all(n in str(err.value) for n in ("test_pairs_pf_willow.csv", "test_pairs_pf.csv", "test_pairs.csv"))


WILLOW_CSV_ERRORS = {
    "short row": (lambda rows: rows[2].pop(), "row 1 (line 3)", "expected 42 columns, got 41"),
    "unparsable": (_edit_row(3, 25, "x12"), "row 3 (line 5)", "column 25 ('XB4') holds 'x12', not a number"),
    "non-finite": (_edit_row(0, 2, "inf"), "row 0 (line 2)", "non-finite"),
    "no subclass folder": (_edit_row(4, 1, "Duck_001a.png"), "row 4 (line 6)", "expected '<folder>/<subclass>"),
    "coinciding targets": (
        lambda rows: rows[1].__setitem__(slice(22, 42), ["5"] * 20), "row 0 (line 2)", "must be positive",
    ),
    "header": (lambda rows: rows[0].pop(), "header (line 1)", "got 41"),
}


@pytest.mark.parametrize("case", list(WILLOW_CSV_ERRORS))
def test_willow_malformed_csv_names_the_file_and_row(tmp_path, case) -> None:
    root, _ = write_synthetic_pfwillow(tmp_path)
    edit, where, what = WILLOW_CSV_ERRORS[case]
    rows = _read_csv(root / "test_pairs_pf.csv")
    edit(rows)
    _write_csv(root / "test_pairs_pf.csv", rows)
    with pytest.raises(ValueError) as err:
        PFWillowDataset(root)
    msg = str(err.value)
    assert str(root / "test_pairs_pf.csv") in msg and where in msg and what in msg, msg


def test_willow_missing_and_corrupt_images_name_the_file(tmp_path) -> None:
    root, _ = write_synthetic_pfwillow(tmp_path)
    image = root / "winebottle(M)" / "Bottle_M_002a.png"
    data = image.read_bytes()
    image.unlink()
    with pytest.raises(FileNotFoundError) as err:
        PFWillowDataset(root)
    msg = str(err.value)
    assert "PF-dataset/winebottle(M)/Bottle_M_002a.png" in msg and "row 2" in msg and "test_pairs_pf.csv" in msg
    assert str(tmp_path / "PF-dataset" / "winebottle(M)" / "Bottle_M_002a.png") in msg
    image.write_bytes(b"garbage" * 30)
    with pytest.raises(ValueError) as err:
        PFWillowDataset(root)
    assert "Bottle_M_002a.png" in str(err.value) and "row 2" in str(err.value)
    image.write_bytes(data[: len(data) // 3])
    ds = PFWillowDataset(root)
    with pytest.raises(ValueError, match="Bottle_M_002a.png"):
        ds[2]


# ------------------------------------------------------------------------------------ datamodules


def test_datamodules_expose_the_protocols_and_categories(pascal, willow) -> None:
    dm = PFPascalDataModule(str(pascal[0]), categories=["dog", "cat"], threshold="bbox", batch_size=3)
    assert dm.alphas == (0.05, 0.1, 0.15) and dm.protocol.inclusive is False
    assert dm.protocol.threshold == "max(w, h) of the target image"
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.categories
    dm.setup("test")
    assert dm.categories == ["cat", "dog"] and dm.test_dataset.threshold_mode == "bbox"
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [3, 1] and all(isinstance(s, dict) for b in batches for s in b)
    assert [s["pair_id"] for b in dm.predict_dataloader() for s in b] == dm.test_dataset.pair_ids

    dw = PFWillowDataModule(str(willow[0]), batch_size=2)
    assert dw.alphas == (0.05, 0.1, 0.15)
    assert dw.protocol.inclusive is True and dw.protocol.averages[0] == "per_image"
    assert "target keypoints" in dw.protocol.threshold
    dw.setup("test")
    assert dw.categories == ["car", "duck", "winebottle"]
    assert [len(b) for b in dw.test_dataloader()] == [2, 2, 1]
    with pytest.raises(ValueError, match="--data.root"):
        PFWillowDataModule().setup("test")
    assert get_protocol("pfpascal").alphas == get_protocol("pfwillow").alphas == (0.05, 0.1, 0.15)


# ------------------------------------------------------------------------------------ end to end


def recompute_pck(predictions: list[dict], alphas: list[float], inclusive: bool) -> dict[str, dict[str, float]]:
    """PCK from scratch in plain Python: ``error < alpha * threshold`` (``<=`` when inclusive)."""
    out: dict[str, dict[str, float]] = {}
    for alpha in alphas:
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # hits, points, pairs
        per_image, hits_all, n_all = [], 0, 0
        for rec in predictions:
            bound = alpha * rec["threshold"]
            errors = [math.dist(p, g) for p, g in zip(rec["pred_kps"], rec["trg_kps"])]
            hits = sum((e <= bound) if inclusive else (e < bound) for e in errors)
            n = len(rec["trg_kps"])
            per_cat[rec["category"]][0] += hits
            per_cat[rec["category"]][1] += n
            per_cat[rec["category"]][2] += 1
            hits_all, n_all = hits_all + hits, n_all + n
            per_image.append(100 * hits / n)
        cats = {c: 100 * h / n for c, (h, n, _) in per_cat.items()}
        out[str(alpha)] = {
            "per_point": 100 * hits_all / n_all,
            "per_image": sum(per_image) / len(per_image),
            "category_mean": sum(cats.values()) / len(cats),
            "weighted": sum(cats[c] * per_cat[c][2] for c in cats) / sum(v[2] for v in per_cat.values()),
            **{f"cat:{c}": v for c, v in cats.items()},
        }
    return out


def _run(config: str, root: Path, out: Path) -> tuple[list[dict], dict]:
    evaluate.main(["test", "--config", config, "--config", TINY, "--data.root", str(root),
                   "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(out)])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return predictions, json.loads((out / "results.json").read_text())


def _check_results(predictions: list[dict], results: dict, inclusive: bool, categories: list[str]) -> None:
    assert set(results["pck"]) == {"0.05", "0.1", "0.15"}
    assert results["num_pairs"] == len(predictions)
    assert results["num_points"] == sum(len(p["trg_kps"]) for p in predictions)
    assert results["protocol"]["inclusive"] is inclusive
    expected = recompute_pck(predictions, [0.05, 0.1, 0.15], inclusive)
    for alpha, got in results["pck"].items():
        for average in ("per_point", "per_image", "category_mean", "weighted"):
            assert got[average] == pytest.approx(expected[alpha][average], abs=1e-9), (alpha, average)
        assert sorted(got["per_category"]) == categories
        for cat, value in got["per_category"].items():
            assert value == pytest.approx(expected[alpha][f"cat:{cat}"], abs=1e-9), (alpha, cat)


def _boundary_point(predictions: list[dict], alpha: float, inside: Callable[[dict, int, float, float], bool]):
    """A (pair, point, new target) whose new target lies exactly ``alpha * threshold`` from the prediction."""
    for p, rec in enumerate(predictions):
        bound = alpha * rec["threshold"]
        for k, (px, py) in enumerate(rec["pred_kps"]):
            for dx, dy in ((bound, 0.0), (-bound, 0.0), (0.0, bound), (0.0, -bound)):
                tx, ty = float(np.float32(px + dx)), float(np.float32(py + dy))
                if math.dist((px, py), (tx, ty)) == bound and inside(rec, k, tx, ty):
                    return p, k, tx, ty
    raise AssertionError("no prediction admits an exactly representable boundary target")


def test_pfpascal_end_to_end_matches_a_strict_recomputation(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root, info = write_synthetic_pfpascal(tmp_path / "data")
    predictions, results = _run(PFPASCAL_CFG, root, tmp_path / "run1")
    assert [p["pair_id"] for p in predictions] == PFPascalDataset(root).pair_ids
    for rec, row in zip(predictions, info["rows"]):
        assert rec["trg_kps"] == [[x, y] for x, y in zip(row["xb"], row["yb"])]
        assert rec["threshold"] == max(PASCAL_IMAGES[row["trg"]][1])
    _check_results(predictions, results, inclusive=False, categories=["aeroplane", "cat", "dog"])
    assert results["protocol"]["averages"][0] == "weighted"

    # Move one target keypoint exactly alpha * threshold away from its prediction: strict `<` says wrong.
    p, k, tx, ty = _boundary_point(predictions, 0.1, lambda rec, k, x, y: True)
    rows = _read_csv(root / PASCAL_CSV)
    xb, yb = rows[p + 1][5].split(";"), rows[p + 1][6].split(";")
    xb[k], yb[k] = repr(tx), repr(ty)
    rows[p + 1][5], rows[p + 1][6] = ";".join(xb), ";".join(yb)
    _write_csv(root / PASCAL_CSV, rows)
    again, results2 = _run(PFPASCAL_CFG, root, tmp_path / "run2")
    assert [r["pred_kps"] for r in again] == [r["pred_kps"] for r in predictions]  # only a target moved
    assert again[p]["trg_kps"][k] == [tx, ty] and again[p]["threshold"] == predictions[p]["threshold"]
    assert math.dist(again[p]["pred_kps"][k], again[p]["trg_kps"][k]) == 0.1 * again[p]["threshold"]
    _check_results(again, results2, inclusive=False, categories=["aeroplane", "cat", "dog"])
    strict = recompute_pck(again, [0.1], inclusive=False)["0.1"]["per_point"]
    assert strict != pytest.approx(recompute_pck(again, [0.1], inclusive=True)["0.1"]["per_point"])


def test_pfwillow_end_to_end_matches_an_inclusive_recomputation(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root, info = write_synthetic_pfwillow(tmp_path / "data", layout="hpf", csv_name="test_pairs.csv")
    predictions, results = _run(PFWILLOW_CFG, root, tmp_path / "run1")
    assert [p["pair_id"] for p in predictions] == PFWillowDataset(root).pair_ids
    for rec, row in zip(predictions, info):
        assert rec["category"] == row["subclass"].split("(")[0]
        assert rec["threshold"] == max(max(row["xb"]) - min(row["xb"]), max(row["yb"]) - min(row["yb"]))
    _check_results(predictions, results, inclusive=True, categories=["car", "duck", "winebottle"])
    assert results["protocol"]["averages"][0] == "per_image"

    def box_side(points: list[list[float]]) -> float:
        xs, ys = [pt[0] for pt in points], [pt[1] for pt in points]
        return max(max(xs) - min(xs), max(ys) - min(ys))

    def inside_box(rec: dict, k: int, x: float, y: float) -> bool:  # the keypoint box (threshold) must not change
        moved = [[x, y] if i == k else pt for i, pt in enumerate(rec["trg_kps"])]
        return box_side(moved) == rec["threshold"]

    # Move one target keypoint exactly alpha * threshold away from its prediction: inclusive `<=` says right.
    p, k, tx, ty = _boundary_point(predictions, 0.1, inside_box)
    rows = _read_csv(root / "test_pairs.csv")
    rows[p + 1][22 + k], rows[p + 1][32 + k] = repr(tx), repr(ty)
    _write_csv(root / "test_pairs.csv", rows)
    again, results2 = _run(PFWILLOW_CFG, root, tmp_path / "run2")
    assert [r["pred_kps"] for r in again] == [r["pred_kps"] for r in predictions]
    assert again[p]["trg_kps"][k] == [tx, ty] and again[p]["threshold"] == predictions[p]["threshold"]
    assert math.dist(again[p]["pred_kps"][k], again[p]["trg_kps"][k]) == 0.1 * again[p]["threshold"]
    _check_results(again, results2, inclusive=True, categories=["car", "duck", "winebottle"])
    inclusive = recompute_pck(again, [0.1], inclusive=True)["0.1"]["per_point"]
    assert inclusive != pytest.approx(recompute_pck(again, [0.1], inclusive=False)["0.1"]["per_point"])


def test_pfpascal_keypoints_outside_the_image_are_scored_and_counted(tmp_path, caplog) -> None:
    root, _ = write_synthetic_pfpascal(tmp_path)
    csv_path = root / PASCAL_CSV
    rows = list(csv.reader(csv_path.open()))
    rows[1][5] = "100000;" + rows[1][5].split(";", 1)[1]  # the first target keypoint far right of its image
    _write_csv(csv_path, rows)
    with caplog.at_level("WARNING"):
        dataset = PFPascalDataset(root)
    assert "PF-PASCAL: 1 keypoints of 1 pairs lie outside their image" in caplog.text
    assert dataset.records[0].trg_kps[0, 0] == 100000  # scored as annotated
