"""DAVIS label propagation: the reader on a synthetic DAVIS root, and the J / F / J&F scores by hand."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from datamodules.davis import (
    DAVISDataset,
    collate_davis,
    davis_palette,
    read_davis_annotation,
    write_synthetic_davis,
)
from lightning_modules.segmentation_metrics import (
    JAndF,
    boundary_f_measure,
    boundary_precision_recall,
    frame_scores,
    j_and_f,
    region_similarity,
    seg2bmap,
)


@pytest.fixture()
def davis_root(tmp_path):
    return write_synthetic_davis(tmp_path / "DAVIS", sequences=("blob", "bars"), num_frames=4, size=(96, 64))


def _save_annotation(path, labels: np.ndarray) -> None:
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    image.putpalette(davis_palette())
    image.save(path)


# --------------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------------
def test_reader_items_first_frame_source_and_shapes(davis_root) -> None:
    dataset = DAVISDataset(davis_root)
    assert dataset.categories == ["bars", "blob"]
    assert len(dataset) == 6  # 2 sequences x frames 1, 2, 3
    assert dataset.pair_ids == [f"{s}/{t:05d}" for s in ("bars", "blob") for t in (1, 2, 3)]
    assert dataset.objects_per_sequence == {"bars": 2, "blob": 2}
    assert dataset.sequence_lengths == {"bars": 4, "blob": 4}
    first_labels = read_davis_annotation(davis_root / "Annotations/480p/blob/00000.png")
    assert sorted(torch.unique(first_labels).tolist()) == [0, 1, 2]
    items = [dataset[i] for i in range(len(dataset))]
    for item, (category, src, trg) in zip(items, dataset.pair_images()):
        seq, frame = item["pair_id"].split("/")
        assert item["category"] == category == seq and item["dataset"] == "davis" and item["num_objects"] == 2
        assert item["frame_index"] == int(frame)
        assert item["src_image"].dtype == torch.uint8 and item["src_image"].shape == (3, 64, 96)
        assert item["trg_image"].shape == (3, 64, 96)
        assert item["src_labels"].dtype == item["trg_labels"].dtype == torch.int64
        assert item["src_labels"].shape == item["trg_labels"].shape == (64, 96)
        # the source is always frame 0 with its annotation; the target annotation is frame t's
        assert item["src_image_path"] == src == str(davis_root / f"JPEGImages/480p/{seq}/00000.jpg")
        assert item["trg_image_path"] == trg == str(davis_root / f"JPEGImages/480p/{seq}/{frame}.jpg")
        assert torch.equal(item["src_labels"], read_davis_annotation(davis_root / f"Annotations/480p/{seq}/00000.png"))
        assert torch.equal(item["trg_labels"], read_davis_annotation(davis_root / f"Annotations/480p/{seq}/{frame}.png"))
    # the objects move: a target's ground truth is not the first frame's
    assert not torch.equal(items[0]["trg_labels"], items[0]["src_labels"])
    assert collate_davis(items[:2]) == items[:2]


def test_reader_split_sequence_filter_stride_max_frames_and_skip_last(tmp_path) -> None:
    root = write_synthetic_davis(tmp_path / "DAVIS", sequences=("blob", "bars", "cows"), num_frames=7)
    (root / "ImageSets/2017/val.txt").write_text("blob\nbars\n")
    assert DAVISDataset(root, split="val").categories == ["bars", "blob"]  # the split, not every folder
    assert DAVISDataset(root).categories == ["bars", "blob", "cows"]
    assert DAVISDataset(root, sequences="cows").categories == ["cows"]

    def frames(**kwargs):
        return [int(p.split("/")[1]) for p in DAVISDataset(root, sequences=["blob"], **kwargs).pair_ids]

    assert frames() == [1, 2, 3, 4, 5, 6]
    assert frames(frame_stride=2) == [2, 4, 6]
    assert frames(frame_stride=2, max_frames=2) == [2, 4]
    assert frames(skip_last_frame=True) == [1, 2, 3, 4, 5]  # the toolkit's frames 1 .. T-2
    with pytest.raises(ValueError, match="frame_stride"):
        DAVISDataset(root, frame_stride=0)


def test_reader_num_objects_ignores_the_void_label(davis_root) -> None:
    path = davis_root / "Annotations/480p/blob/00000.png"
    labels = read_davis_annotation(path).numpy()
    labels[:3, :3] = 255
    _save_annotation(path, labels)
    assert DAVISDataset(davis_root, sequences="blob").objects_per_sequence == {"blob": 2}


def test_reader_errors_name_the_file_or_folder(davis_root, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="DAVIS root not found: .*nowhere"):
        DAVISDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="JPEGImages/Full-Resolution"):
        DAVISDataset(davis_root, resolution="Full-Resolution")
    with pytest.raises(FileNotFoundError, match="ImageSets/2017/test-dev.txt"):
        DAVISDataset(davis_root, split="test-dev")
    with pytest.raises(ValueError, match=r"Unknown DAVIS sequence \['dog'\].*available: \['bars', 'blob'\]"):
        DAVISDataset(davis_root, sequences=["blob", "dog"])
    with pytest.raises(ValueError, match=r"Unknown DAVIS sequence \['dog'\].*val.txt"):
        DAVISDataset(davis_root, sequences="dog", split="val")

    (davis_root / "Annotations/480p/bars/00002.png").unlink()
    with pytest.raises(ValueError, match=r"'bars': 4 frames in .*bars but 3 annotations in .*bars.*00002.jpg"):
        DAVISDataset(davis_root)
    shutil.rmtree(davis_root / "Annotations/480p/bars")
    with pytest.raises(FileNotFoundError, match="Annotations/480p/bars"):
        DAVISDataset(davis_root, sequences="bars")

    blob = davis_root / "Annotations/480p/blob"
    _save_annotation(blob / "00000.png", np.zeros((64, 96), np.uint8))
    with pytest.raises(ValueError, match="00000.png holds no object"):
        DAVISDataset(davis_root, sequences="blob")
    Image.new("RGB", (96, 64)).save(blob / "00000.png")
    with pytest.raises(ValueError, match="00000.png is a 'RGB' image"):
        DAVISDataset(davis_root, sequences="blob")
    # a size mismatch surfaces lazily, naming both files
    labels = np.zeros((64, 96), np.uint8)
    labels[10:20, 10:20] = 1
    _save_annotation(blob / "00000.png", labels)
    _save_annotation(blob / "00002.png", labels[:32])
    dataset = DAVISDataset(davis_root, sequences="blob")
    dataset[0]
    with pytest.raises(ValueError, match=r"00002.png is 96x32 but its frame .*00002.jpg is 96x64"):
        dataset[1]


def test_synthetic_writer_is_deterministic_and_uses_the_davis_palette(tmp_path) -> None:
    a = write_synthetic_davis(tmp_path / "a", sequences=("blob",), num_frames=3, num_objects=3, seed=4)
    b = write_synthetic_davis(tmp_path / "b", sequences=("blob",), num_frames=3, num_objects=3, seed=4)
    c = write_synthetic_davis(tmp_path / "c", sequences=("blob",), num_frames=3, num_objects=3, seed=5)
    for rel in ("Annotations/480p/blob/00002.png", "JPEGImages/480p/blob/00002.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    with Image.open(a / "Annotations/480p/blob/00000.png") as image:
        assert image.mode == "P" and image.size == (96, 64)
        assert image.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert (a / "ImageSets/2017/val.txt").read_text() == "blob\n"
    assert DAVISDataset(a, split="val").objects_per_sequence == {"blob": 3}
    write_synthetic_davis(a, sequences=("blob",), num_frames=2)  # rewriting a synthetic root drops stale frames
    assert len(DAVISDataset(a)) == 1
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="Refusing"):
        write_synthetic_davis(tmp_path / "real")


# --------------------------------------------------------------------------------------------------
# J and F, functional
# --------------------------------------------------------------------------------------------------
def _mask(shape, *boxes) -> np.ndarray:
    out = np.zeros(shape, bool)
    for top, bottom, left, right in boxes:
        out[top:bottom, left:right] = True
    return out


def test_region_similarity_by_hand() -> None:
    gt = _mask((6, 6), (0, 2, 0, 2))  # 4 pixels
    assert region_similarity(gt, gt) == 1.0
    assert region_similarity(_mask((6, 6), (4, 6, 4, 6)), gt) == 0.0
    pred = _mask((6, 6), (0, 3, 1, 3))  # 6 pixels, 2 shared with gt: IoU 2 / 8
    assert region_similarity(pred, gt) == pytest.approx(2 / 8)
    pred = _mask((6, 6), (0, 2, 1, 3), (0, 1, 0, 1))  # 5 pixels, 3 shared -> 3 / 6
    assert region_similarity(pred, gt) == pytest.approx(3 / 6)
    empty = np.zeros((6, 6), bool)
    assert region_similarity(empty, empty) == 1.0  # both empty: the toolkit's 1
    assert region_similarity(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(0.5)
    void = _mask((6, 6), (0, 2, 2, 3))  # removes the 2 prediction-only pixels -> 3 / 4
    assert region_similarity(pred, gt, void) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="same shape"):
        region_similarity(pred, gt[:5])


def _reference_bmap(seg: np.ndarray) -> np.ndarray:
    """seg2bmap pixel by pixel, straight from the toolkit's rules."""
    h, w = seg.shape
    at = lambda y, x: bool(seg[y, x]) if y < h and x < w else False  # noqa: E731
    out = np.zeros_like(seg, bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = at(y, x) != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = at(y, x) != at(y + 1, x)
            else:
                out[y, x] = any(at(y, x) != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
    return out


def _reference_f(pred: np.ndarray, gt: np.ndarray, void=None, bound_th: float = 0.008) -> float:
    """The toolkit's f_measure transcribed literally (scipy binary_dilation with a disk instead of cv2)."""
    void = np.zeros_like(gt, bool) if void is None else void
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    offsets = np.arange(-radius, radius + 1)
    disk = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2
    fg, gb = _reference_bmap(pred & ~void), _reference_bmap(gt & ~void)
    fg_dil, gt_dil = ndimage.binary_dilation(fg, disk), ndimage.binary_dilation(gb, disk)
    n_fg, n_gt = fg.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, r = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        p, r = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        p, r = 1.0, 1.0
    else:
        p, r = (fg & gt_dil).sum() / n_fg, (gb & fg_dil).sum() / n_gt
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_seg2bmap_by_hand_and_against_the_pixel_rules() -> None:
    single = _mask((5, 5), (2, 3, 2, 3))
    # half a pixel towards the origin: the pixel, its west, north and north-west neighbours
    assert sorted(zip(*np.nonzero(seg2bmap(single)))) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert not seg2bmap(np.ones((5, 7), bool)).any()  # the image border is no boundary
    rng = np.random.default_rng(0)
    for _ in range(20):
        seg = rng.uniform(size=tuple(rng.integers(1, 9, 2))) < 0.4
        assert np.array_equal(seg2bmap(seg), _reference_bmap(seg))


def test_boundary_f_identical_one_pixel_shift_and_large_shift() -> None:
    shape = (64, 96)  # diagonal 115.4 -> tolerance ceil(0.92) = 1 pixel
    gt = _mask(shape, (20, 40, 30, 50))
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(np.roll(gt, 1, axis=1), gt) == 1.0  # every boundary pixel moved by 1
    assert boundary_f_measure(np.roll(gt, 1, axis=0), gt) == 1.0
    # moved by 5: each boundary is the outline of a 21 x 21 square (80 pixels, half a pixel towards the origin);
    # within 1 pixel of the other outline are 17 pixels of its top row, 17 of its bottom row and the 2 side
    # pixels next to the other's top and bottom rows: 36 of 80, both ways
    shifted = np.roll(gt, 5, axis=1)
    precision, recall = boundary_precision_recall(shifted, gt)
    assert precision == recall == pytest.approx(36 / 80)
    f_value = boundary_f_measure(shifted, gt)
    assert f_value < 1.0 and f_value == pytest.approx(36 / 80)
    assert boundary_f_measure(np.roll(gt, 40, axis=1), gt) == 0.0


def test_boundary_f_extra_blob_and_tolerance_radius() -> None:
    gt = _mask((10, 40), (0, 10, 0, 10))  # boundary: column 9, 10 pixels
    pred = gt | _mask((10, 40), (5, 6, 30, 31))  # + a far pixel: 4 unmatched boundary pixels
    precision, recall = boundary_precision_recall(pred, gt)
    assert (precision, recall) == (pytest.approx(10 / 14), 1.0)
    assert boundary_f_measure(pred, gt) == pytest.approx(2 * (10 / 14) / (10 / 14 + 1))  # 5 / 6
    # a 150 x 200 image: tolerance ceil(0.008 * 250) = 2 pixels; a half plane's edge moved by 2 / 3 pixels
    half = _mask((150, 200), (0, 150, 0, 100))
    assert boundary_f_measure(_mask((150, 200), (0, 150, 0, 102)), half) == 1.0
    assert boundary_f_measure(_mask((150, 200), (0, 150, 0, 103)), half) == 0.0
    assert boundary_f_measure(_mask((150, 200), (0, 150, 0, 103)), half, bound_th=3) == 1.0  # >= 1: in pixels


def test_boundary_f_empty_conventions() -> None:
    empty, blob = np.zeros((8, 8), bool), _mask((8, 8), (2, 5, 2, 5))
    assert boundary_precision_recall(empty, empty) == (1.0, 1.0) and boundary_f_measure(empty, empty) == 1.0
    assert boundary_precision_recall(empty, blob) == (1.0, 0.0) and boundary_f_measure(empty, blob) == 0.0
    assert boundary_precision_recall(blob, empty) == (0.0, 1.0) and boundary_f_measure(blob, empty) == 0.0
    full = np.ones((8, 8), bool)  # a mask covering the image has no boundary either
    assert boundary_f_measure(full, empty) == 1.0
    # void pixels are removed from both masks before their boundaries are taken
    assert boundary_f_measure(blob, empty, void=blob) == 1.0


def test_boundary_f_matches_the_toolkit_transcription() -> None:
    rng = np.random.default_rng(1)
    for i in range(40):
        shape = tuple(int(v) for v in rng.integers(8, 70, 2))
        a = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.7, 3)) > rng.uniform(-0.2, 0.2)
        b = np.roll(a, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2))) if i % 2 else (
            ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0
        )
        void = rng.uniform(size=shape) < 0.05 if i % 3 == 0 else None
        bound_th = (0.008, 0.04, 2)[i % 3]
        assert boundary_f_measure(a, b, void, bound_th) == pytest.approx(_reference_f(a, b, void, bound_th), abs=1e-12)


def test_frame_scores_per_object_and_void_label() -> None:
    gt = torch.zeros(6, 6, dtype=torch.long)
    gt[0:2, 0:2] = 1
    gt[4:6, 4:6] = 2
    gt[0:2, 4:6] = 255
    pred = gt.clone()
    pred[pred == 255] = 0
    pred[0, 4] = 1  # object 1 spills onto a void pixel
    js, fs = frame_scores(pred, gt, num_objects=2)
    assert js == [pytest.approx(4 / 5), 1.0] and fs[1] == 1.0
    js, _ = frame_scores(pred, gt, num_objects=2, void_label=255)
    assert js == [1.0, 1.0]
    js, fs = frame_scores(pred, gt, num_objects=3)  # object 3 absent from both: perfect, as in the toolkit
    assert js[2] == fs[2] == 1.0


# --------------------------------------------------------------------------------------------------
# JAndF
# --------------------------------------------------------------------------------------------------
def _labels(*pixels_by_object, shape=(4, 4)) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.long)
    for obj, pixels in enumerate(pixels_by_object, start=1):
        for y, x in pixels:
            out[y, x] = obj
    return out


def _tiny_frames():
    """Sequence a (1 object): J 1/2 then 1, F 1 and 1. Sequence b (2 objects), one frame: object 1 exact,
    object 2 missed (J 0, F 0: an empty predicted boundary against a non-empty one)."""
    return [
        # (pred, gt, sequence, pair id, num objects)
        (_labels([(0, 0)]), _labels([(0, 0), (0, 1)]), "a", "a/00001", 1),
        (_labels([(2, 2)]), _labels([(2, 2)]), "a", "a/00002", 1),
        (_labels([(1, 1)], []), _labels([(1, 1)], [(3, 3)]), "b", "b/00001", 2),
    ]


def _update(metric: JAndF, frames) -> None:
    names = ("pred_labels", "gt_labels", "sequences", "pair_ids", "num_objects")
    metric.update(**{name: list(column) for name, column in zip(names, zip(*frames))})


def test_j_and_f_compute_keys_and_means_by_hand() -> None:
    metric = JAndF(sequences=["a", "b"])
    _update(metric, _tiny_frames())
    out = metric.compute()
    assert set(out) == {"J_mean", "F_mean", "JF_mean", "per_sequence", "per_object", "num_frames", "num_objects"}
    assert out["per_object"] == {
        "a_1": {"J_mean": pytest.approx(0.75), "F_mean": 1.0},
        "b_1": {"J_mean": 1.0, "F_mean": 1.0},
        "b_2": {"J_mean": 0.0, "F_mean": 0.0},
    }
    assert out["per_sequence"] == {
        "a": {"J_mean": 0.75, "F_mean": 1.0, "JF_mean": 0.875, "num_objects": 1, "num_frames": 2},
        "b": {"J_mean": 0.5, "F_mean": 0.5, "JF_mean": 0.5, "num_objects": 2, "num_frames": 1},
    }
    # the mean over the 3 (sequence, object) means -- not over the 4 (frame, object) scores (0.625)
    assert out["J_mean"] == pytest.approx((0.75 + 1 + 0) / 3)
    assert out["F_mean"] == pytest.approx(2 / 3)
    assert out["JF_mean"] == pytest.approx((out["J_mean"] + out["F_mean"]) / 2)
    assert (out["num_frames"], out["num_objects"]) == (3, 3)
    # the functional twin agrees
    preds, gts, seqs, _, nums = zip(*_tiny_frames())
    assert j_and_f(list(preds), list(gts), list(seqs), list(nums)) == out


def test_j_and_f_deduplicates_pair_ids_and_ignores_arrival_order() -> None:
    frames = _tiny_frames()
    reference = JAndF(sequences=["a", "b"])
    _update(reference, frames)
    padded = JAndF(sequences=["a", "b"])
    _update(padded, frames[:2])
    _update(padded, [frames[2], frames[0]])  # a/00001 again, as a padded DistributedSampler would send it
    assert padded.compute() == reference.compute()
    assert padded.compute()["per_object"]["a_1"]["J_mean"] == pytest.approx(0.75)  # not (0.5 + 1 + 0.5) / 3

    # J = 1/10, 2/10, 3/10: float sums in arrival order differ ((0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3))
    row = [(0, x) for x in range(10)]
    seq = [(_labels(row[:k], shape=(4, 12)), _labels(row, shape=(4, 12)), "a", f"a/{k:05d}", 1) for k in (1, 2, 3)]
    results = []
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        metric = JAndF(sequences=["a"])
        for i in order:
            _update(metric, [seq[i]])
        results.append(metric.compute())
    assert results[0] == results[1] == results[2]
    assert results[0]["J_mean"] == pytest.approx(0.2)


def test_j_and_f_syncs_with_cat_and_typed_empty_states() -> None:
    gathered = []

    def gather_two_ranks(tensor, group=None):  # both "ranks" hold the same rows: all duplicates
        gathered.append(tensor.dtype)
        return [tensor, tensor]

    kwargs = {"dist_sync_fn": gather_two_ranks, "distributed_available_fn": lambda: True}
    metric = JAndF(sequences=["a", "b"], **kwargs)
    _update(metric, _tiny_frames())
    local = JAndF(sequences=["a", "b"])
    _update(local, _tiny_frames())
    assert metric.compute() == local.compute()
    assert sorted(map(str, gathered)) == ["torch.float64"] * 2 + ["torch.int64"] * 3
    # a rank that saw no frame sends empty states of the right dtypes (torchmetrics' placeholder is float32)
    gathered.clear()
    empty = JAndF(sequences=["a"], **kwargs)
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = empty.compute()
    assert sorted(map(str, gathered)) == ["torch.float64"] * 2 + ["torch.int64"] * 3
    assert math.isnan(out["JF_mean"]) and out["per_sequence"] == {} and out["num_frames"] == 0


def test_j_and_f_validation_and_reset() -> None:
    metric = JAndF(sequences=["a", "b"])
    pred, gt, _, _, _ = _tiny_frames()[0]
    with pytest.raises(ValueError, match=r"Unknown sequence \['z'\]"):
        metric.update(pred_labels=[pred], gt_labels=[gt], sequences=["z"], pair_ids=["z/00001"], num_objects=[1])
    with pytest.raises(ValueError, match="same length"):
        metric.update(
            pred_labels=[pred], gt_labels=[gt], sequences=["a"], pair_ids=["a/00001", "a/00002"], num_objects=[1],
        )
    with pytest.raises(ValueError, match="same shape"):
        metric.update(pred_labels=[pred], gt_labels=[gt[:3]], sequences=["a"], pair_ids=["a/00001"], num_objects=[1])
    with pytest.raises(ValueError, match="duplicates"):
        JAndF(sequences=["a", "a"])
    _update(metric, _tiny_frames())
    assert metric.compute()["num_frames"] == 3
    metric.reset()
    assert metric.pair_key == [] and metric.j == []
