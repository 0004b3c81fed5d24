"""Tests of the CUB-200-2011 reader with the ASIC protocol, its DataModule, protocol and config.

The fixture is a tiny ``CUB_200_2011`` tree in the real formats: ``images/<class>/*.jpg``,
``images.txt``, ``parts/part_locs.txt`` and ACSM's ``cachedir/cub/data/test_cub_cleaned.mat`` written
with ``scipy.io.savemat`` as the MATLAB struct array ``images`` (fields of CMR/ACSM's file: id,
rel_path, train, test, class, bbox{x1,y1,x2,y2}, width, height, mask, parts), read back with ASIC's own
indexing idioms to prove the structure.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

import evaluate
from datamodules import CUBASICDataset, CUBDataModule, get_protocol
from datamodules.cub import (
    DEFAULT_TEST_LIST,
    SYNTHETIC_CUB_CLASSES as CLASSES,
    SYNTHETIC_CUB_IMAGES as IMAGES,
    SYNTHETIC_CUB_INVISIBLE as INVISIBLE,
    SYNTHETIC_CUB_NOT_IN_TEST as NOT_IN_TEST,
    asic_crop_box,
    crop_square,
    map_keypoints,
    perturb_bbox,
    python2_round,
    read_part_locs,
    read_test_list,
    square_bbox,
    synthetic_cub_parts as _parts,
    synthetic_cub_rel_path as _rel_path,
    write_synthetic_cub,
)

from conftest import REPO, TINY_OVERLAY as TINY
CUB_CONFIG = str(REPO / "configs" / "cub.yaml")

# --------------------------------------------------------------------------- ASIC, transcribed
# kampta/asic @ 7124b93, datasets/cub.py (python2_round, perturb_bbox with jf=0, square_bbox, acsm_crop
# with border=True, preprocess_kps_box_crop, cub_crop): the reference the reader must reproduce exactly.


def _asic_round(n):
    with localcontext() as ctx:
        ctx.rounding = ROUND_HALF_UP
        return Decimal(n).to_integral_value()


def _asic_perturb_bbox(bbox, pf=0.0):
    pet_bbox = [coord for coord in bbox]
    bwidth = bbox[2] - bbox[0] + 1
    bheight = bbox[3] - bbox[1] + 1
    pet_bbox[0] -= (pf * bwidth) + 0.0
    pet_bbox[1] -= (pf * bheight) + 0.0
    pet_bbox[2] += (pf * bwidth) + 0.0
    pet_bbox[3] += (pf * bheight) + 0.0
    return pet_bbox


def _asic_square_bbox(bbox):
    sq_bbox = [int(_asic_round(coord)) for coord in bbox]
    bwidth = sq_bbox[2] - sq_bbox[0] + 1
    bheight = sq_bbox[3] - sq_bbox[1] + 1
    maxdim = float(max(bwidth, bheight))
    dw_b_2 = int(_asic_round((maxdim - bwidth) / 2.0))
    dh_b_2 = int(_asic_round((maxdim - bheight) / 2.0))
    sq_bbox[0] -= dw_b_2
    sq_bbox[1] -= dh_b_2
    sq_bbox[2] = sq_bbox[0] + maxdim - 1
    sq_bbox[3] = sq_bbox[1] + maxdim - 1
    return sq_bbox


def _asic_acsm_crop(img, bbox):
    bbox = [int(_asic_round(c)) for c in bbox]
    bwidth = bbox[2] - bbox[0] + 1
    bheight = bbox[3] - bbox[1] + 1
    im_h, im_w = img.shape[0], img.shape[1]
    x_min_src, x_max_src = max(0, bbox[0]), min(im_w, bbox[2] + 1)
    y_min_src, y_max_src = max(0, bbox[1]), min(im_h, bbox[3] + 1)
    x_min_trg = x_min_src - bbox[0]
    x_max_trg = x_max_src - x_min_src + x_min_trg
    y_min_trg = y_min_src - bbox[1]
    y_max_trg = y_max_src - y_min_src + y_min_trg
    img_out = img[y_min_src:y_max_src, x_min_src:x_max_src, :]
    pad = [(y_min_trg, bheight - y_max_trg), (x_min_trg, bwidth - x_max_trg), (0, 0)]
    return np.pad(img_out, mode="edge", pad_width=pad)


def _asic_cub_crop(img, target_res, bbox):
    img = _asic_acsm_crop(np.asarray(img), bbox)
    return Image.fromarray(np.squeeze(img)).resize((target_res, target_res), Image.Resampling.LANCZOS)


def _asic_preprocess_kps_box_crop(kps, bbox, size):
    kps = kps.clone()
    kps[:, 0] -= bbox[0] + 1
    kps[:, 1] -= bbox[1] + 1
    w = 1 + bbox[2] - bbox[0]
    kps[:, [0, 1]] *= size / float(w)
    return kps


def _asic_box(x1, y1, x2, y2):
    bbox = np.array([x1, y1, x2, y2]) - 1
    return _asic_square_bbox(_asic_perturb_bbox(bbox, 0.05))


# --------------------------------------------------------------------------- fixture

@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny CUB root (do not modify in tests)."""
    return write_synthetic_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


@pytest.fixture
def fresh_root(tmp_path: Path) -> Path:
    """A tiny CUB root that a test may corrupt."""
    return write_synthetic_cub(tmp_path / "CUB_200_2011")


# --------------------------------------------------------------------------- crop arithmetic


def test_python2_rounding_is_half_away_from_zero() -> None:
    assert [python2_round(v) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 2.4999, 17.5)] == [1, 2, 3, -1, -3, 2, 18]


def test_crop_box_by_hand() -> None:
    # 1-based (11, 21, 110, 70) -> zero-based (10, 20, 109, 69): 100 x 50, padded by 5 / 2.5 px.
    padded = perturb_bbox([10, 20, 109, 69], 0.05)
    assert padded == pytest.approx([5.0, 17.5, 114.0, 71.5])
    # Rounded half up: 5, 18, 114, 72 -> 110 x 55; (110 - 55) / 2 = 27.5 -> 28 rows added on top.
    assert square_bbox(padded) == [5, -10, 114, 99]
    assert asic_crop_box((11, 21, 110, 70)) == [5, -10, 114, 99]
    # Python 2 rounding where Python 3 would differ: a 0.5 tie goes up (Python 3: 0, banker's).
    assert square_bbox([0, 0, 99, 98]) == [0, -1, 99, 98]
    # 1-based (40, 30, 190, 149) -> (39, 29, 189, 148): 151 x 120 -> pad 7.55 / 6.0.
    assert perturb_bbox([39, 29, 189, 148]) == pytest.approx([31.45, 23.0, 196.55, 154.0])
    assert asic_crop_box((40, 30, 190, 149)) == [31, 5, 197, 171]  # 167 x 132 -> 35 / 2 = 17.5 -> 18


def test_keypoint_mapping_by_hand() -> None:
    box = [5, -10, 114, 99]  # side 110
    kps = np.array([[60.0, 45.0], [6.0, -9.0], [116.0, 101.0]])  # 1-based pixels
    mapped = map_keypoints(kps, box, 256)
    assert mapped.dtype == np.float32
    scale = 256 / 110
    expected = np.array([[54 * scale, 54 * scale], [0.0, 0.0], [110 * scale, 110 * scale]])
    np.testing.assert_allclose(mapped, expected, rtol=1e-6)


def test_crop_and_keypoints_reproduce_asic_exactly() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for _ in range(200):
        x1, y1 = rng.integers(1, 60), rng.integers(1, 50)
        bbox = (x1, y1, x1 + rng.integers(2, 90 - x1 + 1), y1 + rng.integers(2, 70 - y1 + 1))
        ours, theirs = asic_crop_box(bbox), _asic_box(*bbox)
        assert ours == [int(c) for c in theirs] and theirs[2] == float(ours[2])
        kps = rng.uniform(0, 100, (15, 2)).astype(np.float32)
        expected = _asic_preprocess_kps_box_crop(torch.from_numpy(kps), theirs, 256).numpy()
        assert np.array_equal(map_keypoints(kps, ours, 256), expected)
    for bbox in [(11, 21, 80, 60), (1, 1, 30, 70), (40, 2, 90, 69)]:
        box = asic_crop_box(bbox)
        assert np.array_equal(crop_square(image, box, 256), np.asarray(_asic_cub_crop(image, 256, _asic_box(*bbox))))


def test_crop_pads_with_edge_pixels() -> None:
    image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
    box = [-3, -2, 6, 7]  # 10 x 10, sticks out left/top/bottom
    crop = crop_square(image, box, 10)  # same size: no resampling
    rows = np.clip(np.arange(-2, 8), 0, 4)
    cols = np.clip(np.arange(-3, 7), 0, 7)
    assert np.array_equal(crop, image[rows][:, cols])
    with pytest.raises(ValueError, match="does not overlap"):
        crop_square(image, [20, 20, 29, 29], 10)
    with pytest.raises(ValueError, match="square"):
        crop_square(image, [0, 0, 4, 6], 10)


# --------------------------------------------------------------------------- files


def test_fixture_has_the_structure_asic_reads(cub_root: Path) -> None:
    """ASIC's load_acsm_data idioms on our .mat give what read_test_list gives."""
    path = cub_root / DEFAULT_TEST_LIST
    mat = loadmat(str(path))
    files = [file[0] for file in mat["images"]["rel_path"][0]]
    indices = [i[0, 0] - 1 for i in mat["images"]["id"][0]]
    boxes = []
    for row in mat["images"]["bbox"][0]:
        x1, y1, x2, y2 = row[0, 0]
        boxes.append(tuple(float(v) for v in np.array([x1[0, 0], y1[0, 0], x2[0, 0], y2[0, 0]])))
    entries = read_test_list(path)
    assert [e[1] for e in entries] == files
    assert [e[0] - 1 for e in entries] == indices
    assert [e[2] for e in entries] == boxes
    assert len(entries) == 6 and not {e[0] for e in entries} & NOT_IN_TEST


def test_part_locs_rows_match_asic_reshape(cub_root: Path) -> None:
    """Our id -> rows equals ASIC's ``reshape((num_images, 15, 5))[id - 1]`` on an image-major file."""
    raw = np.loadtxt(cub_root / "parts" / "part_locs.txt").reshape(-1, 15, 5)[..., [2, 3, 4]]
    parts = read_part_locs(cub_root / "parts" / "part_locs.txt")
    assert sorted(parts) == list(range(1, 9))
    for image_id, rows in parts.items():
        assert np.array_equal(rows, raw[image_id - 1].astype(np.float32))


# --------------------------------------------------------------------------- dataset


def test_pairs_are_all_ordered_pairs_per_class(cub_root: Path) -> None:
    ds = CUBASICDataset(cub_root, categories=[2, 1])
    assert ds.class_indices == [1, 2]
    assert ds.categories == ["Black footed Albatross", "Laysan Albatross"]
    assert len(ds) == 2 * 3 * 2
    assert ds.pairs == list(itertools.permutations(range(3), 2)) + [
        (3 + i, 3 + j) for i, j in itertools.permutations(range(3), 2)
    ]
    assert [r.image_id for r in ds.images] == [1, 2, 3, 5, 6, 7]
    assert ds.pair_ids[0] == "cub001-Black_footed_Albatross_0001_100001-Black_footed_Albatross_0002_100002"
    assert len(set(ds.pair_ids)) == len(ds)
    only = CUBASICDataset(cub_root, categories=[2])
    assert len(only) == 6 and only.categories == ["Laysan Albatross"]


def test_samples_are_the_asic_crops(cub_root: Path) -> None:
    ds = CUBASICDataset(cub_root, categories=[1, 2])
    for index in range(len(ds)):
        s = ds[index]
        src, trg = (ds.images[i] for i in ds.pairs[index])
        assert s["pair_id"] == ds.pair_ids[index]
        assert s["category"] == src.category == trg.category
        assert s["class_folder"] == CLASSES[s["class_index"]]
        assert s["threshold"] == 256.0
        assert s["src_image_path"] == f"{src.path}#asic-crop256" and s["src_file"] == str(src.path)
        assert s["kps_ids"] == list(range(1, 16))
        for side, rec in (("src", src), ("trg", trg)):
            members = {m[0]: m for m in IMAGES[rec.class_index]}
            _, (w, h), bbox, _ = members[rec.image_id]
            theirs = _asic_box(*bbox)
            image = s[f"{side}_image"]
            assert image.dtype == torch.uint8 and image.shape == (3, 256, 256)
            pil = Image.open(rec.path).convert("RGB")
            expected = np.asarray(_asic_cub_crop(pil, 256, theirs))
            assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
            parts = _parts(rec.image_id, (w, h), bbox)
            kps = _asic_preprocess_kps_box_crop(torch.tensor(parts, dtype=torch.float32), theirs, 256)[:, :2]
            assert torch.equal(s[f"{side}_kps"], kps)
            assert s[f"{side}_kps"].dtype == torch.float32
            assert s[f"{side}_crop_box"].tolist() == [float(c) for c in theirs]
            assert s[f"{side}_file_bbox"].tolist() == [float(c - 1) for c in bbox]
            # the tight box in crop pixels (pose alignment's instance): its corners mapped like keypoints
            corners = torch.tensor([[bbox[0], bbox[1], 1.0], [bbox[2], bbox[3], 1.0]])
            expected_box = _asic_preprocess_kps_box_crop(corners, theirs, 256)[:, :2].flatten()
            torch.testing.assert_close(s[f"{side}_instance_box"], expected_box)
        visible = [set(range(15)) - INVISIBLE.get(r.image_id, set()) for r in (src, trg)]
        assert s["kps_valid"].dtype == torch.bool
        assert set(torch.nonzero(s["kps_valid"]).flatten().tolist()) == visible[0] & visible[1]


def test_grayscale_images_become_rgb(cub_root: Path) -> None:
    ds = CUBASICDataset(cub_root, categories=[1])
    s = ds[ds.pairs.index((1, 0))]  # image id 2 is grayscale
    assert s["src_image"].shape == (3, 256, 256)
    assert torch.equal(s["src_image"][0], s["src_image"][1])


def test_crop_size_sets_threshold_and_scale(cub_root: Path) -> None:
    ds = CUBASICDataset(cub_root, categories=[1], crop_size=128)
    s = ds[0]
    assert s["threshold"] == 128.0 and s["src_image"].shape == (3, 128, 128)
    assert s["src_image_path"].endswith("#asic-crop128")
    big = CUBASICDataset(cub_root, categories=[1])[0]
    assert torch.allclose(s["src_kps"] * 2, big["src_kps"], atol=1e-4)


# --------------------------------------------------------------------------- errors


def test_missing_root_and_test_list(tmp_path: Path, fresh_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="CUB-200-2011 root not found.*nope"):
        CUBASICDataset(tmp_path / "nope")
    (fresh_root / DEFAULT_TEST_LIST).unlink()
    with pytest.raises(FileNotFoundError, match=r"test_cub_cleaned\.mat.*cachedir\.tar\.gz"):
        CUBASICDataset(fresh_root, categories=[1])


def test_explicit_test_list_and_bad_mat(tmp_path: Path, fresh_root: Path) -> None:
    moved = tmp_path / "elsewhere.mat"
    (fresh_root / DEFAULT_TEST_LIST).rename(moved)
    assert len(CUBASICDataset(fresh_root, categories=[1], test_list=moved)) == 6
    bad = tmp_path / "bad.mat"
    savemat(str(bad), {"something": np.zeros(3)})
    with pytest.raises(ValueError, match=r"bad\.mat.*no 'images'"):
        CUBASICDataset(fresh_root, test_list=bad)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.mat"):
        CUBASICDataset(fresh_root, test_list=junk)


def test_malformed_part_locs_line_is_named(fresh_root: Path) -> None:
    path = fresh_root / "parts" / "part_locs.txt"
    lines = path.read_text().splitlines()
    lines[6] = "1 7 12.0 oops 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"part_locs\.txt line 7.*oops"):
        CUBASICDataset(fresh_root, categories=[1])
    path.write_text("\n".join(lines[:3]) + "\n")  # image 1 with only 3 parts
    with pytest.raises(ValueError, match=r"part_locs\.txt lacks some of the 15 parts of image id 1"):
        CUBASICDataset(fresh_root, categories=[1])
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"part_locs\.txt"):
        CUBASICDataset(fresh_root, categories=[1])


def test_missing_or_corrupt_image_is_named(fresh_root: Path) -> None:
    target = fresh_root / "images" / _rel_path(2, 6)
    target.unlink()
    with pytest.raises(FileNotFoundError, match=r"CUB image file not found: .*Laysan_Albatross_0006_100006\.jpg"):
        CUBASICDataset(fresh_root, categories=[1, 2])
    assert len(CUBASICDataset(fresh_root, categories=[1])) == 6  # other classes still load
    target.write_bytes(b"not a jpeg")
    ds = CUBASICDataset(fresh_root, categories=[2])
    with pytest.raises(ValueError, match=r"Could not read image .*0006_100006\.jpg"):
        ds[0]


def test_inconsistent_images_txt_and_unknown_class(fresh_root: Path) -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \[3\]"):
        CUBASICDataset(fresh_root, categories=[1, 3])
    path = fresh_root / "images.txt"
    path.write_text(path.read_text().replace("1 001.", "1 009.", 1))
    with pytest.raises(ValueError, match=r"images\.txt gives '009\."):
        CUBASICDataset(fresh_root, categories=[1])
    path.unlink()  # images.txt is optional
    assert len(CUBASICDataset(fresh_root, categories=[1])) == 6


# --------------------------------------------------------------------------- datamodule, protocol, CLI


def test_protocol_entry() -> None:
    protocol = get_protocol("cub")
    assert protocol.alphas == (0.1, 0.05, 0.01)
    assert not protocol.inclusive and protocol.metric == "keypoint_pck"
    assert protocol.averages[:2] == ("category_mean", "per_point") and "per_image" in protocol.averages
    assert "256" in protocol.threshold


def test_datamodule(cub_root: Path) -> None:
    dm = CUBDataModule(root=str(cub_root), categories=[1, 2])
    assert dm.protocol_name == "cub" and dm.alphas == (0.1, 0.05, 0.01)
    dm.setup("test")
    assert dm.categories == ["Black footed Albatross", "Laysan Albatross"]
    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch, list) and batch[0]["pair_id"] == dm.test_dataset.pair_ids[0]
    with pytest.raises(ValueError, match="--data.root"):
        CUBDataModule().setup("test")


def _recompute(predictions: list[dict], alphas: list[float]) -> dict[str, dict[str, float]]:
    """ASIC's PCK in plain Python: error < alpha * 256, pooled per point; per class and their mean."""
    out = {}
    for alpha in alphas:
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        per_image = []
        for rec in predictions:
            hits = sum(math.dist(p, g) < alpha * 256 for p, g in zip(rec["pred_kps"], rec["trg_kps"]))
            per_cat[rec["category"]][0] += hits
            per_cat[rec["category"]][1] += len(rec["trg_kps"])
            if rec["trg_kps"]:
                per_image.append(100 * hits / len(rec["trg_kps"]))
        hits_all = sum(h for h, _ in per_cat.values())
        n_all = sum(n for _, n in per_cat.values())
        cats = {c: 100 * h / n for c, (h, n) in per_cat.items()}
        out[str(alpha)] = {
            "per_point": 100 * hits_all / n_all,
            "per_image": sum(per_image) / len(per_image),
            "category_mean": sum(cats.values()) / len(cats),
            "per_category": cats,
        }
    return out


def test_cub_config_end_to_end_with_tiny_models(cub_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    evaluate.main(["test", "--config", CUB_CONFIG, "--config", TINY, "--data.root", str(cub_root),
                   "--data.categories", "[1, 2]", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(out)])  # fmt: skip
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    ds = CUBASICDataset(cub_root, categories=[1, 2])
    assert results["num_pairs"] == len(predictions) == 12
    assert sorted(p["pair_id"] for p in predictions) == sorted(ds.pair_ids)
    assert set(results["pck"]) == {"0.1", "0.05", "0.01"}
    for rec in predictions:
        sample = ds[ds.pair_ids.index(rec["pair_id"])]
        valid = sample["kps_valid"]
        assert rec["threshold"] == 256.0
        assert rec["trg_kps"] == sample["trg_kps"][valid].tolist()
        assert rec["src_kps"] == sample["src_kps"][valid].tolist()
        assert len(rec["pred_kps"]) == int(valid.sum())
        for x, y in rec["pred_kps"]:  # predictions are crop pixels
            assert -1 <= x <= 257 and -1 <= y <= 257
    assert results["num_points"] == sum(len(p["trg_kps"]) for p in predictions)
    expected = _recompute(predictions, [0.1, 0.05, 0.01])
    for alpha, got in results["pck"].items():
        for average in ("per_point", "per_image", "category_mean"):
            assert got[average] == pytest.approx(expected[alpha][average], abs=1e-6), (alpha, average)
        assert got["per_category"] == pytest.approx(expected[alpha]["per_category"], abs=1e-6)
    assert sorted(results["pck"]["0.1"]["per_category"]) == ["Black footed Albatross", "Laysan Albatross"]


def test_cub_pose_alignment_uses_the_cub_table_and_crop_boxes(cub_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    cli = evaluate.main(["test", "--config", CUB_CONFIG, "--config", TINY, "--data.root", str(cub_root),
                         "--data.categories", "[1]", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                         "--model.pipeline.pose_alignment", "true", "--trainer.default_root_dir", str(out)])  # fmt: skip
    # the protocol's table: CUB's left/right parts for every class
    assert cli.model.pipeline.pose_aligner.partners("Black footed Albatross") == {7: 11, 11: 7, 8: 12, 12: 8, 9: 13,
                                                                                    13: 9}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    for rec in predictions:
        assert isinstance(rec["flipped"], bool) and rec["flipped"] == (rec["pose_distances"][1] < rec["pose_distances"][0])


def test_cub_config_defaults() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CUB_CONFIG)
    assert cfg.model == "model/sd_dino.yaml"
    assert cfg.data.class_path == "datamodules.CUBDataModule"
    assert list(cfg.data.init_args.categories) == [1, 2, 3] and cfg.data.init_args.crop_size == 256
