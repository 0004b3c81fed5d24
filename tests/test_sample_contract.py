"""One contract over every reader: its samples are PairSamples of its kind (keys, types, shapes, no stray key)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from datamodules import (
    CUBASICDataset,
    DAVISDataset,
    DAVISInstancePairs,
    MaskedPairsDataset,
    PFPascalDataset,
    PFWillowDataset,
    SPairDataset,
    TSSDataset,
    write_synthetic_davis,
    write_synthetic_masked_pairs,
    write_synthetic_spair,
)
from datamodules.cub import write_synthetic_cub
from datamodules.own_images import ImagePairsDataset, read_image_pairs, write_example_photos
from datamodules.pfpascal import write_synthetic_pfpascal
from datamodules.pfwillow import write_synthetic_pfwillow
from datamodules.tss import write_synthetic_tss
from lightning_modules.components.samples import COMMON_KEYS, KIND_KEYS, PairSample, sample_kind

def _declared(dataset: object) -> set[str]:
    """The keys a reader's samples may hold: :class:`PairSample`'s, and its benchmark's own where the reader
    declares them (``sample_type``, a TypedDict extending PairSample beside the reader)."""
    sample_type = getattr(dataset, "sample_type", PairSample)
    assert issubclass(sample_type, dict) and set(typing.get_type_hints(PairSample)) <= set(typing.get_type_hints(sample_type))
    return set(typing.get_type_hints(sample_type))


def _spair(tmp: Path):
    return SPairDataset(write_synthetic_spair(tmp, categories=("cat", "dog"), pairs_per_category=2, image_size=(96, 72)),
                        split="test")


def _tss(tmp: Path):
    return TSSDataset(write_synthetic_tss(tmp, {"FG3DCar": [("001", (48, 32), (48, 36))],
                                             "JODS": [("horse_1", (40, 30), (36, 44))],
                                             "PASCAL": [("bike_1", (30, 30), (30, 30))]}))


#: reader name -> (kind, builder of the reader over a generated root in the real on-disk layout)
READERS = {
    "spair": ("keypoints", _spair),
    "pfpascal": ("keypoints", lambda tmp: PFPascalDataset(write_synthetic_pfpascal(tmp)[0])),
    "pfwillow": ("keypoints", lambda tmp: PFWillowDataset(write_synthetic_pfwillow(tmp)[0])),
    "cub": ("keypoints", lambda tmp: CUBASICDataset(write_synthetic_cub(tmp), categories=[1, 2])),
    "tss": ("flow", _tss),
    "davis": ("labels", lambda tmp: DAVISDataset(write_synthetic_davis(tmp, sequences=("blob", "bars"), num_frames=3))),
    "davis_instances": ("masks", lambda tmp: DAVISInstancePairs(write_synthetic_davis(tmp, sequences=("a", "b"),
                                                                                          num_frames=2))),
    "masked_pairs": ("masks", lambda tmp: MaskedPairsDataset(write_synthetic_masked_pairs(tmp, num_pairs=2))),
    "own_images": ("points", lambda tmp: ImagePairsDataset(read_image_pairs(pairs=str(write_example_photos(tmp))))),
}


def _image(value: object, name: str) -> tuple[int, int]:
    assert isinstance(value, torch.Tensor) and value.dtype == torch.uint8, name
    assert value.ndim == 3 and value.shape[0] == 3, f"{name}: {tuple(value.shape)}"
    return int(value.shape[1]), int(value.shape[2])


def _check_keypoints(sample: PairSample) -> None:
    n = sample["src_kps"].shape[0]
    for key in ("src_kps", "trg_kps"):
        assert sample[key].dtype == torch.float32 and tuple(sample[key].shape) == (n, 2), key
        assert torch.isfinite(sample[key]).all(), key
    assert sample["kps_valid"].dtype == torch.bool and tuple(sample["kps_valid"].shape) == (n,)
    assert isinstance(sample["threshold"], float) and sample["threshold"] > 0
    if "kps_ids" in sample:
        assert len(sample["kps_ids"]) == n and all(isinstance(i, int) for i in sample["kps_ids"])
    for side, image in (("src", "src_image"), ("trg", "trg_image")):
        box = sample.get(f"{side}_instance_box")
        if box is not None:  # in the sample image's pixels
            height, width = _image(sample[image], image)
            assert box.dtype == torch.float32 and tuple(box.shape) == (4,)
            assert -1 <= float(box[0]) <= float(box[2]) <= width and -1 <= float(box[1]) <= float(box[3]) <= height


def _check_flow(sample: PairSample) -> None:
    height, width = _image(sample["trg_image"], "trg_image")
    assert sample["flow"].dtype == torch.float32 and tuple(sample["flow"].shape) == (2, height, width)
    assert sample["mask"].dtype == torch.bool and tuple(sample["mask"].shape) == (height, width)
    assert isinstance(sample["threshold"], float) and isinstance(sample["dataset"], str)


def _check_labels(sample: PairSample) -> None:
    for side in ("src", "trg"):
        assert tuple(sample[f"{side}_labels"].shape) == _image(sample[f"{side}_image"], side)
    assert isinstance(sample["num_objects"], int) and sample["num_objects"] >= 1


def _check_masks(sample: PairSample) -> None:
    for side in ("src", "trg"):
        mask = sample[f"{side}_mask"]
        assert mask.dtype == torch.bool and tuple(mask.shape) == _image(sample[f"{side}_image"], side)


def _check_points(sample: PairSample) -> None:
    points = sample["src_kps"]
    height, width = _image(sample["src_image"], "src_image")
    assert points.dtype == torch.float32 and points.ndim == 2 and points.shape[1] == 2 and len(points) > 0
    assert (points >= 0).all() and (points[:, 0] < width).all() and (points[:, 1] < height).all()
    assert "trg_kps" not in sample  # no ground truth: nothing may score it as a benchmark


CHECKS = {"keypoints": _check_keypoints, "flow": _check_flow, "labels": _check_labels, "masks": _check_masks,
          "points": _check_points}


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_reader_returns_pair_samples_of_its_kind(name, tmp_path) -> None:
    kind, build = READERS[name]
    dataset = build(tmp_path / name)
    assert len(dataset) > 0
    for index in range(min(len(dataset), 3)):
        sample = dataset[index]
        undeclared = sorted(set(sample) - _declared(dataset))
        assert not undeclared, f"{name} returns keys neither PairSample nor its sample_type declares: {undeclared}"
        assert sample_kind(sample) == kind
        assert all(key in sample for key in COMMON_KEYS + KIND_KEYS[kind])
        assert isinstance(sample["pair_id"], str) and isinstance(sample["category"], str)
        assert isinstance(sample["src_image_path"], str) and isinstance(sample["trg_image_path"], str)
        _image(sample["src_image"], "src_image")
        _image(sample["trg_image"], "trg_image")
        CHECKS[kind](sample)


def test_a_sample_of_no_kind_is_named() -> None:
    with pytest.raises(ValueError, match="lacks"):
        sample_kind({"pair_id": "p"})
    with pytest.raises(ValueError, match="no kind"):
        sample_kind({key: None for key in COMMON_KEYS})


def test_the_core_sample_holds_no_benchmarks_own_fields() -> None:
    """PairSample is the base every reader shares (its required keys and those of each kind); CUB's crops,
    DAVIS's annotation files, PF-Willow's folder and the own-images files' frame are declared beside their
    readers."""
    from datamodules.cub import CUBSample
    from datamodules.davis import DAVISFrameSample
    from datamodules.own_images import PhotoPairSample
    from datamodules.pfwillow import PFWillowSample

    core = set(typing.get_type_hints(PairSample))
    assert set(COMMON_KEYS) <= core and PairSample.__required_keys__ == frozenset(COMMON_KEYS)
    for own, keys in ((CUBSample, {"class_index", "class_folder", "src_file_bbox", "trg_file_bbox", "src_crop_box",
                                   "trg_crop_box"}),
                      (DAVISFrameSample, {"frame_index", "src_annotation_path", "trg_annotation_path"}),
                      (PFWillowSample, {"subclass"}),
                      (PhotoPairSample, {"src_file_size", "trg_file_size", "src_file_kps"})):
        assert not keys & core and set(typing.get_type_hints(own)) == core | keys
