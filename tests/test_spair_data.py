"""Tests of the SPair-71k reader, its DataModule and the synthetic SPair generator."""

from __future__ import annotations

import json
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import SPairDataModule, SyntheticSPairDataModule
from datamodules.samplers import collate_pairs
from datamodules.spair import SPairDataset
from lightning_modules.metrics import PCK
from datamodules.synthetic import (
    MARKER_NAME,
    read_synthetic_marker,
    write_synthetic_spair,
)

PAIR_KEYS = {
    "pair_id", "category", "src_image", "trg_image", "src_image_path", "trg_image_path",
    "src_kps", "trg_kps", "kps_valid", "kps_ids", "threshold", "src_instance_box", "trg_instance_box", "variations",
}  # fmt: skip


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic root: 2 categories x 6 pairs (do not modify in tests)."""
    return write_synthetic_spair(tmp_path_factory.mktemp("spair"), seed=0)


@pytest.fixture
def fresh_root(tmp_path: Path) -> Path:
    """A synthetic root that a test may corrupt."""
    return write_synthetic_spair(tmp_path / "spair", seed=0)


def _pair_files(root: Path, split: str = "test") -> list[Path]:
    return sorted((root / "PairAnnotation" / split).glob("*.json"), key=lambda p: p.name)


def _all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# --------------------------------------------------------------------------------------- reader


def test_reader_counts_categories_and_ids(spair_root: Path) -> None:
    ds = SPairDataset(spair_root, split="test")
    files = _pair_files(spair_root)
    assert len(ds) == len(files) == 12
    assert ds.categories == ["cat", "dog"]
    assert ds.pair_ids == [p.stem for p in files]
    layout = (spair_root / "Layout" / "large" / "test.txt").read_text().split()
    assert ds.pair_ids == layout
    assert ds[0]["pair_id"] == files[0].stem
    assert ds[0]["pair_id"].endswith(":cat") and ds[-1]["pair_id"].endswith(":dog")


def test_samples_match_annotation_json(spair_root: Path) -> None:
    ds = SPairDataset(spair_root)
    for sample, path in zip(ds, _pair_files(spair_root)):
        ann = json.loads(path.read_text())
        assert set(sample) == PAIR_KEYS
        assert sample["pair_id"] == path.stem
        assert sample["category"] == ann["category"]
        for side in ("src", "trg"):
            kps = sample[f"{side}_kps"]
            assert kps.dtype == torch.float32 and kps.shape == (len(ann["kps_ids"]), 2)
            assert torch.equal(kps, torch.tensor(ann[f"{side}_kps"], dtype=torch.float32))
            bbox = sample[f"{side}_instance_box"]
            assert bbox.dtype == torch.float32
            assert torch.equal(bbox, torch.tensor(ann[f"{side}_bndbox"], dtype=torch.float32))
            image = sample[f"{side}_image"]
            width, height, _ = ann[f"{side}_imsize"]
            assert image.dtype == torch.uint8 and image.shape == (3, height, width)
            expected_path = spair_root / "JPEGImages" / ann["category"] / ann[f"{side}_imname"]
            assert sample[f"{side}_image_path"] == str(expected_path)
        assert sample["kps_ids"] == [int(k) for k in ann["kps_ids"]]
        assert sample["kps_valid"].dtype == torch.bool and bool(sample["kps_valid"].all())
        assert sample["kps_valid"].shape == (len(ann["kps_ids"]),)


def test_threshold_is_max_side_of_target_bbox(spair_root: Path) -> None:
    ds = SPairDataset(spair_root)
    path = _pair_files(spair_root)[3]
    x1, y1, x2, y2 = json.loads(path.read_text())["trg_bndbox"]
    sample = ds[3]
    assert sample["pair_id"] == path.stem
    assert sample["threshold"] == pytest.approx(max(x2 - x1, y2 - y1))
    # Different from the source bbox side in general: make sure the TARGET is used everywhere.
    for record, p in zip(ds.records, _pair_files(spair_root)):
        t = json.loads(p.read_text())["trg_bndbox"]
        assert record.threshold == pytest.approx(max(t[2] - t[0], t[3] - t[1]))
    src_sides = [max(b[2] - b[0], b[3] - b[1]) for b in (r.src_bbox.tolist() for r in ds.records)]
    assert src_sides != [r.threshold for r in ds.records]


def test_train_alias_and_keypoint_ids_subset(tmp_path: Path) -> None:
    root = write_synthetic_spair(tmp_path / "trn", split="train", num_keypoints=5, seed=3)
    ds = SPairDataset(root, split="train")
    assert ds.split == "trn" and len(ds) == 12
    assert all(set(r.kps_ids) <= set(range(5)) for r in ds.records)
    assert any(len(r.kps_ids) > 0 for r in ds.records)


def test_pairs_per_category_is_deterministic_subset(tmp_path: Path) -> None:
    root = write_synthetic_spair(tmp_path / "big", images_per_category=5, pairs_per_category=12)
    full = SPairDataset(root)
    a = SPairDataset(root, pairs_per_category=3, seed=0)
    b = SPairDataset(root, pairs_per_category=3, seed=0)
    assert a.pair_ids == b.pair_ids
    assert len(a) == 6
    assert [pid.rsplit(":", 1)[1] for pid in a.pair_ids].count("cat") == 3
    assert set(a.pair_ids) <= set(full.pair_ids)
    assert a.pair_ids == sorted(a.pair_ids)  # global sorted order is kept
    others = [SPairDataset(root, pairs_per_category=3, seed=s).pair_ids for s in range(1, 6)]
    assert any(ids != a.pair_ids for ids in others)
    # A category's subset does not depend on the category filter.
    dog_only = SPairDataset(root, categories=["dog"], pairs_per_category=3, seed=0)
    assert dog_only.pair_ids == [pid for pid in a.pair_ids if pid.endswith(":dog")]
    # Asking for more pairs than exist keeps them all.
    assert SPairDataset(root, pairs_per_category=100).pair_ids == full.pair_ids


def _reference_draw(root: Path, category: str, sample: int, seed: int = 42) -> list[str]:
    """The reference's ``load_spair_data`` subset (pck_spair_pascal.py), line for line: file stems in draw order."""
    np.random.seed(seed)
    pairs = sorted(glob(f"{root}/PairAnnotation/test/*:{category}.json"))
    pairs = [pairs[ix] for ix in np.random.choice(len(pairs), sample)]
    return [Path(p).stem for p in pairs]


def test_reference_subset_draw_is_the_reference_code(tmp_path: Path) -> None:
    root = write_synthetic_spair(tmp_path / "big", images_per_category=5, pairs_per_category=12)
    ds = SPairDataset(root, pairs_per_category=20, seed=42, subset_draw="reference")
    assert len(ds) == 40  # 20 draws per category, with replacement, from 12 pairs each
    assert len(set(ds.pair_ids)) == 40  # pair ids stay unique
    for category in ("cat", "dog"):
        drawn = _reference_draw(root, category, 20)
        assert len(set(drawn)) < 20  # with replacement: some pairs come more than once
        records = [r for r in ds.records if r.category == category]
        assert sorted(r.annotation_path.stem for r in records) == sorted(drawn)
        for stem in set(drawn):  # the k-th draw of a pair is '<stem>#k'
            ids = sorted(r.pair_id for r in records if r.annotation_path.stem == stem)
            assert ids == sorted([stem] + [f"{stem}#{k}" for k in range(2, drawn.count(stem) + 1)])
    # another seed, another draw; the category filter does not change a category's draw
    assert SPairDataset(root, pairs_per_category=20, seed=0, subset_draw="reference").pair_ids != ds.pair_ids
    dog = SPairDataset(root, categories=["dog"], pairs_per_category=20, seed=42, subset_draw="reference")
    assert dog.pair_ids == [pid for pid in ds.pair_ids if pid.split("#")[0].endswith(":dog")]
    with pytest.raises(ValueError, match="unknown subset_draw 'numpy'"):
        SPairDataset(root, pairs_per_category=20, subset_draw="numpy")


def test_a_repeated_draw_is_scored_once_per_draw(tmp_path: Path) -> None:
    """The reference counts a pair drawn twice twice; the PCK metric de-duplicates by pair id, so the
    repeat's own id ('#2') is what makes it count."""
    root = write_synthetic_spair(tmp_path / "big", images_per_category=5, pairs_per_category=12)
    ds = SPairDataset(root, categories=["cat"], pairs_per_category=20, seed=42, subset_draw="reference")
    repeat = next(i for i, pid in enumerate(ds.pair_ids) if "#" in pid)
    first = ds.pair_ids.index(ds.pair_ids[repeat].split("#")[0])
    other = next(i for i, pid in enumerate(ds.pair_ids) if pid.split("#")[0] != ds.pair_ids[first])
    metric = PCK(alphas=(0.1,), categories=["cat", "dog"])
    # the pair, its repeat (both right), the pair again under its own id (a sampler duplicate: dropped), another (wrong)
    for index, correct in ((first, True), (repeat, True), (first, False), (other, False)):
        sample = ds[index]
        pred = sample["trg_kps"] if correct else sample["trg_kps"] + 1e4
        metric.update(
            preds=[pred], gts=[sample["trg_kps"]], thresholds=[sample["threshold"]], categories=[sample["category"]],
            pair_ids=[sample["pair_id"]], valids=[sample["kps_valid"]],
        )
    result = metric.compute()
    assert result["num_pairs"] == 3
    assert result["pck"]["0.1"]["per_image"] == pytest.approx(200 / 3)


def test_datamodule_subset_draw_reaches_the_dataset_and_is_checked(tmp_path: Path) -> None:
    root = write_synthetic_spair(tmp_path / "big", images_per_category=5, pairs_per_category=12)
    dm = SPairDataModule(str(root), pairs_per_category=20, seed=42, subset_draw="reference")
    dm.setup("test")
    assert dm.test_dataset.pair_ids == SPairDataset(root, pairs_per_category=20, seed=42, subset_draw="reference").pair_ids
    with pytest.raises(ValueError, match="unknown subset_draw"):
        SPairDataModule(str(root), subset_draw="numpy")


def test_category_filter(spair_root: Path) -> None:
    ds = SPairDataset(spair_root, categories=["dog"])
    assert ds.categories == ["dog"]
    assert len(ds) == 6
    assert all(s["category"] == "dog" for s in ds)
    assert all(pid.endswith(":dog") for pid in ds.pair_ids)


def test_grayscale_and_rgba_images_become_rgb(fresh_root: Path) -> None:
    ds = SPairDataset(fresh_root)
    src_path = Path(ds[0]["src_image_path"])
    trg_path = Path(ds[0]["trg_image_path"])
    with Image.open(src_path) as img:
        size = img.size
        img.convert("L").save(src_path, format="JPEG")
    with Image.open(trg_path) as img:
        trg_size = img.size
        img.convert("RGBA").save(trg_path, format="PNG")  # a PNG with a .jpg name, as in the wild
    sample = SPairDataset(fresh_root)[0]
    assert sample["src_image"].shape == (3, size[1], size[0])
    assert torch.equal(sample["src_image"][0], sample["src_image"][1])
    assert sample["trg_image"].shape == (3, trg_size[1], trg_size[0])


# --------------------------------------------------------------------------------------- errors


def test_missing_root_explains_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        SPairDataset(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "PairAnnotation/<split>/*.json" in msg and "JPEGImages" in msg


def test_missing_and_empty_split(spair_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="val"):
        SPairDataset(spair_root, split="val")
    (tmp_path / "PairAnnotation" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        SPairDataset(tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        SPairDataset(spair_root, split="testing")


def test_unknown_category_lists_available(spair_root: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        SPairDataset(spair_root, categories=[])
    with pytest.raises(ValueError) as err:
        SPairDataset(spair_root, categories=["cat", "zebra"])
    msg = str(err.value)
    assert "zebra" in msg and "'cat'" in msg and "'dog'" in msg


def test_invalid_pairs_per_category(spair_root: Path) -> None:
    with pytest.raises(ValueError, match="pairs_per_category"):
        SPairDataset(spair_root, pairs_per_category=0)


def test_invalid_json_names_the_file(fresh_root: Path) -> None:
    path = _pair_files(fresh_root)[2]
    path.write_text('{"src_imname": ')
    with pytest.raises(ValueError, match="invalid JSON") as err:
        SPairDataset(fresh_root)
    assert path.name in str(err.value)


@pytest.mark.parametrize("key", ["trg_kps", "kps_ids", "src_bndbox", "trg_imname"])
def test_missing_key_names_file_and_key(fresh_root: Path, key: str) -> None:
    path = _pair_files(fresh_root)[4]
    ann = json.loads(path.read_text())
    del ann[key]
    path.write_text(json.dumps(ann))
    with pytest.raises(ValueError) as err:
        SPairDataset(fresh_root)
    assert path.name in str(err.value) and f"'{key}'" in str(err.value)


def test_malformed_files_outside_the_selection_are_not_read(fresh_root: Path) -> None:
    path = _pair_files(fresh_root)[0]  # a "cat" pair
    path.write_text("not json")
    assert SPairDataset(fresh_root, categories=["dog"]).categories == ["dog"]


def test_keypoint_length_mismatch_names_the_file(fresh_root: Path) -> None:
    path = _pair_files(fresh_root)[1]
    ann = json.loads(path.read_text())
    ann["trg_kps"] = ann["trg_kps"][:-1]
    path.write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="src_kps") as err:
        SPairDataset(fresh_root)
    assert path.name in str(err.value)


def test_missing_image_names_the_file(fresh_root: Path) -> None:
    ann = json.loads(_pair_files(fresh_root)[0].read_text())
    image = fresh_root / "JPEGImages" / ann["category"] / ann["trg_imname"]
    image.unlink()
    with pytest.raises(FileNotFoundError) as err:
        SPairDataset(fresh_root)
    assert ann["trg_imname"] in str(err.value)


def test_image_removed_after_construction_names_the_file(fresh_root: Path) -> None:
    ds = SPairDataset(fresh_root)
    Path(ds[0]["src_image_path"]).unlink()
    with pytest.raises(FileNotFoundError) as err:
        ds[0]
    assert Path(ds.records[0].src_image_path).name in str(err.value)


@pytest.mark.parametrize("mode", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(fresh_root: Path, mode: str) -> None:
    ds = SPairDataset(fresh_root)
    path = Path(ds.records[0].src_image_path)
    data = path.read_bytes()
    path.write_bytes(b"\x00not an image" * 10 if mode == "garbage" else data[: len(data) // 3])
    with pytest.raises(ValueError) as err:
        ds[0]
    assert path.name in str(err.value)


# ----------------------------------------------------------------------------------- datamodule


def test_collate_is_identity(spair_root: Path) -> None:
    ds = SPairDataset(spair_root)
    samples = [ds[0], ds[1]]
    out = collate_pairs(samples)
    assert isinstance(out, list) and len(out) == 2
    assert out[0] is samples[0] and out[1] is samples[1]


def test_datamodule_test_dataloader_yields_lists_of_dicts(spair_root: Path) -> None:
    dm = SPairDataModule(str(spair_root), batch_size=5, categories=["cat"], pairs_per_category=4)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.categories
    dm.setup("test")
    assert dm.categories == ["cat"]
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [4]
    assert all(isinstance(b, list) and all(isinstance(s, dict) for s in b) for b in batches)
    ids = [s["pair_id"] for b in batches for s in b]
    assert ids == SPairDataset(spair_root, categories=["cat"], pairs_per_category=4).pair_ids
    predict_ids = [s["pair_id"] for b in dm.predict_dataloader() for s in b]
    assert predict_ids == ids
    assert set(batches[0][0]) == PAIR_KEYS


def test_datamodule_runs_under_trainer_test(tmp_path: Path) -> None:
    import lightning as L

    class Collect(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def test_step(self, batch: list[dict], batch_idx: int) -> None:
            self.seen.extend(s["pair_id"] for s in batch)

    dm = SyntheticSPairDataModule(str(tmp_path / "syn"), batch_size=4, num_categories=3)
    model = Collect()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    assert dm.categories == ["aeroplane", "bicycle", "bird"]
    assert model.seen == [dm.test_dataset.pair_ids[i] for i in dm.evaluation_order()]  # image-grouped order
    assert sorted(model.seen) == sorted(dm.test_dataset.pair_ids) and len(model.seen) == 18


# ------------------------------------------------------------------------------------ synthetic


def test_synthetic_generator_is_deterministic(tmp_path: Path) -> None:
    a = _all_files(write_synthetic_spair(tmp_path / "a", seed=7))
    b = _all_files(write_synthetic_spair(tmp_path / "b", seed=7))
    c = _all_files(write_synthetic_spair(tmp_path / "c", seed=8))
    assert any(k.startswith("ImageAnnotation/") for k in a)
    assert a == b  # every byte: annotations, JPEGs, layout and marker
    annotation_keys = [k for k in a if k.startswith(("PairAnnotation/", "ImageAnnotation/"))]
    assert annotation_keys
    assert any(a[k] != c.get(k) for k in annotation_keys)  # another seed gives other data


def test_synthetic_layout_and_keypoints_inside_images(spair_root: Path) -> None:
    portrait = 0
    for ann_path in sorted((spair_root / "ImageAnnotation").glob("*/*.json")):
        ann = json.loads(ann_path.read_text())
        image_path = spair_root / "JPEGImages" / ann["category"] / ann["filename"]
        with Image.open(image_path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (ann["image_width"], ann["image_height"])
        w, h = ann["image_width"], ann["image_height"]
        portrait += h > w
        x1, y1, x2, y2 = ann["bndbox"]
        assert 0 <= x1 < x2 <= w - 1 and 0 <= y1 < y2 <= h - 1
        assert set(ann["kps"]) == {str(i) for i in range(8)}
        for xy in ann["kps"].values():
            if xy is not None:
                assert 0 <= xy[0] <= w - 1 and 0 <= xy[1] <= h - 1
                assert x1 <= xy[0] <= x2 and y1 <= xy[1] <= y2
    assert portrait >= 1

    for path in _pair_files(spair_root):
        pair = json.loads(path.read_text())
        assert path.stem == f"{path.stem.split('-')[0]}-{Path(pair['src_imname']).stem}-" + (
            f"{Path(pair['trg_imname']).stem}:{pair['category']}"
        )
        assert all(isinstance(k, str) and k.isdigit() for k in pair["kps_ids"])
        for side in ("src", "trg"):
            image_ann = json.loads(
                (
                    spair_root / "ImageAnnotation" / pair["category"]
                    / f"{Path(pair[f'{side}_imname']).stem}.json"
                ).read_text()
            )  # fmt: skip
            assert pair[f"{side}_bndbox"] == image_ann["bndbox"]
            assert [image_ann["kps"][k] for k in pair["kps_ids"]] == pair[f"{side}_kps"]
            w, h, _ = pair[f"{side}_imsize"]
            assert all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in pair[f"{side}_kps"])


def test_synthetic_correspondences_are_exact(tmp_path: Path) -> None:
    """Pixel colours at corresponding keypoints agree far better than at shuffled keypoints."""
    root = write_synthetic_spair(tmp_path / "s", images_per_category=5, pairs_per_category=12)
    ds = SPairDataset(root)
    gen = torch.Generator().manual_seed(0)
    matched, shuffled = [], []
    for s in ds:
        sx, sy = s["src_kps"].round().long().T
        tx, ty = s["trg_kps"].round().long().T
        src = s["src_image"][:, sy, sx].T.float()
        trg = s["trg_image"][:, ty, tx].T.float()
        matched.append((src - trg).abs().mean(1))
        shuffled.append((src - trg[torch.randperm(len(trg), generator=gen)]).abs().mean(1))
    assert torch.cat(matched).median() < 20 < torch.cat(shuffled).median()


def test_synthetic_writer_refuses_foreign_directories(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "precious.txt").write_text("data")
    with pytest.raises(ValueError, match="marker"):
        write_synthetic_spair(tmp_path / "real")
    assert (tmp_path / "real" / "precious.txt").read_text() == "data"
    with pytest.raises(ValueError, match="pairs_per_category"):
        write_synthetic_spair(tmp_path / "x", images_per_category=2, pairs_per_category=3)
    with pytest.raises(ValueError, match="category"):
        write_synthetic_spair(tmp_path / "y", categories=("a-b",))


def test_synthetic_datamodule_generates_once_and_regenerates_on_new_args(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    dm = SyntheticSPairDataModule(str(root), synthetic_categories=["cat", "dog"], generator_seed=1)
    dm.prepare_data()
    marker = root / MARKER_NAME
    assert read_synthetic_marker(root)["complete"] is True
    stamp = marker.stat().st_mtime_ns
    dm.prepare_data()  # identical args: skipped
    assert marker.stat().st_mtime_ns == stamp
    dm.setup("test")
    assert dm.categories == ["cat", "dog"] and len(dm.test_dataset) == 12

    dm2 = SyntheticSPairDataModule(
        str(root), synthetic_categories=["cow"], synthetic_pairs_per_category=3, generator_seed=1
    )
    dm2.setup("test")  # setup alone (no prepare_data) regenerates with the new args
    assert dm2.categories == ["cow"] and len(dm2.test_dataset) == 3
    assert not (root / "JPEGImages" / "cat").exists()


def test_warps_carry_the_keypoints_with_the_image() -> None:
    """The demo's scene: a bright dot at a source keypoint lands where the warped keypoint says (within a pixel)."""
    from datamodules.synthetic import _warp_image

    source = np.zeros((96, 128, 3), np.uint8)
    source[38:41, 69:72] = 255  # a 3 x 3 dot centred on (70, 39)
    annotation = {"kps": {"0": [70.0, 39.0], "1": None}, "bndbox": [20, 10, 100, 80], "filename": "x.jpg"}
    for k in range(1, 6):
        warped, target = _warp_image([0, 1], k, source, annotation, f"w{k}")
        assert warped.shape == source.shape and target["kps"]["1"] is None
        x, y = target["kps"]["0"]
        brightest = np.unravel_index(np.argmax(warped.astype(int).sum(-1)), warped.shape[:2])
        assert abs(brightest[1] - x) <= 1.5 and abs(brightest[0] - y) <= 1.5, (k, (x, y), brightest)
        assert (x, y) != (70.0, 39.0)  # it really moved
        x1, y1, x2, y2 = target["bndbox"]
        assert x1 <= x <= x2 and y1 <= y <= y2


def test_chance_predictions_are_random_points_in_the_target_fixed_by_the_pair_id() -> None:
    from lightning_modules.zero_shot import chance_predictions

    sample = {"pair_id": "p1", "trg_image": torch.zeros(3, 50, 80, dtype=torch.uint8), "src_kps": torch.zeros(200, 2)}
    points = chance_predictions(sample)
    assert points.shape == (200, 2) and torch.equal(points, chance_predictions(sample))
    assert 0 <= float(points[:, 0].min()) and float(points[:, 0].max()) <= 80 and float(points[:, 1].max()) <= 50
    assert float(points[:, 0].std()) > 15  # spread over the image, not a constant
    assert not torch.equal(points, chance_predictions({**sample, "pair_id": "p2"}))
