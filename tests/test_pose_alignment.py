"""Test-time pose alignment beyond the paper: match from the mirrored source too, with left/right ids swapped."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate
from datamodules import SPairDataset, write_synthetic_spair
from lightning_modules.components import FusedCorrespondence, PadResize
from lightning_modules.components.pose_alignment import (
    SPAIR_FLIP_PAIRS,
    PoseAlignment,
    box_cells,
    instance_nn_distance,
    mirror_box,
    mirror_points,
    partner_positions,
)

from conftest import CONFIGS

#: the 18 SPair-71k categories
SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)

#: Independent facts to check the flip table against: each SPair keypoint id's side (0 none, 1 left, 2 right),
#: GeoAware-SC's SPAIR_LR.
SPAIR_SIDES = {
    "aeroplane": [0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 0],
    "bicycle": [0, 0, 2, 1, 0, 0, 2, 1, 0, 2, 1, 0, 0, 0],
    "bird": [0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 2, 1, 2, 1, 0],
    "boat": [0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0],
    "bottle": [1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
    "bus": [2, 1, 2, 1, 0, 2, 1, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1],
    "car": [2, 1, 2, 1, 0, 0, 2, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1],
    "cat": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0],
    "chair": [2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1],
    "cow": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1],
    "dog": [2, 1, 2, 1, 2, 1, 0, 0, 0, 2, 1, 2, 1, 0, 0, 0],
    "horse": [2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1],
    "motorbike": [2, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "person": [2, 1, 2, 1, 0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1],
    "pottedplant": [2, 0, 1, 0, 2, 1, 2, 0, 1],
    "sheep": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1],
    "train": [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
    "tvmonitor": [2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 2, 2, 0, 1, 1],
}


def test_partner_positions_map_each_keypoint_to_its_mirror_partner() -> None:
    partners = PoseAlignment({"cat": [[0, 1], [4, 5]]}).partners("cat")
    assert partners == {0: 1, 1: 0, 4: 5, 5: 4}
    # id 8 is self-symmetric; id 4's partner 5 is not annotated in this pair
    assert partner_positions([1, 8, 0, 4], partners).tolist() == [2, 1, 0, -1]


def test_partners_that_are_not_valid_are_not_used_and_the_wildcard_covers_other_categories() -> None:
    alignment = PoseAlignment("cub")  # every class: eyes 7/11, legs 8/12, wings 9/13
    partners = alignment.partners("any bird")
    assert partners == {7: 11, 11: 7, 8: 12, 12: 8, 9: 13, 13: 9}
    valid = torch.ones(15, dtype=torch.bool)
    valid[10] = False  # the right eye (id 11, position 10) is not visible in both images
    positions = partner_positions(list(range(1, 16)), partners, valid)
    assert positions[6] == -1 and positions[7] == 11 and positions[0] == 0  # left eye unusable; leg; back itself
    assert PoseAlignment({"cat": [[0, 1]], "*": []}).partners("dog") == {}
    with pytest.raises(ValueError, match="unknown flip table 'pascal'"):
        PoseAlignment("pascal")


def test_the_benchmark_decides_the_table_and_refuses_what_has_none() -> None:
    from datamodules import get_protocol
    from lightning_modules.components.pipeline import benchmark_pose_alignment

    assert benchmark_pose_alignment(None, get_protocol("spair")).partners("car")[10] == 20
    assert benchmark_pose_alignment(None, get_protocol("cub")).partners("x")[7] == 11
    assert benchmark_pose_alignment({"*": [[0, 1]]}, get_protocol("pfpascal")).partners("car") == {0: 1, 1: 0}
    with pytest.raises(ValueError, match="PF-Pascal has no semantic keypoint ids; a dataset whose samples carry"):
        benchmark_pose_alignment(None, get_protocol("pfpascal"))
    with pytest.raises(ValueError, match="TSS is scored on flow_pck"):
        benchmark_pose_alignment(None, get_protocol("tss"))


def test_spair_table_covers_every_category_with_disjoint_pairs() -> None:
    alignment = PoseAlignment()  # validates that no id is in two pairs
    assert sorted(SPAIR_FLIP_PAIRS) == sorted(SPAIR_CATEGORIES)
    assert alignment.partners("cat")[0] == 1 and 8 not in alignment.partners("cat")  # eyes swap, the nose stays
    assert alignment.partners("car")[10] == 20  # the table is in SPair's ids (car wheels 10 <-> 20)
    assert alignment.partners("bus")[10] == 20 and 8 not in alignment.partners("bus")  # bus ids 8, 9 are unused
    # every pair joins a left and a right part, and every sided part has a partner
    for category, pairs in SPAIR_FLIP_PAIRS.items():
        sides = SPAIR_SIDES[category]
        assert all({sides[a], sides[b]} == {1, 2} for a, b in pairs), category
        paired = {i for pair in pairs for i in pair}
        assert {i for i, side in enumerate(sides) if side} == paired, category


def test_bad_flip_tables_are_refused_with_the_category_named() -> None:
    with pytest.raises(ValueError, match=r"flip_pairs\['cat'\]: keypoint id 1 is in two pairs"):
        PoseAlignment({"cat": [[0, 1], [1, 2]]})
    with pytest.raises(ValueError, match=r"flip_pairs\['dog'\]: \[3\] is not a pair"):
        PoseAlignment({"dog": [[3]]})
    with pytest.raises(ValueError, match="no flip pairs for category 'zebra'"):
        PoseAlignment().partners("zebra")


def test_mirroring_points_and_boxes() -> None:
    points = torch.tensor([[0.0, 5.0], [9.0, 1.0], [2.5, 0.0]])
    torch.testing.assert_close(mirror_points(points, 10), torch.tensor([[9.0, 5.0], [0.0, 1.0], [6.5, 0.0]]))
    torch.testing.assert_close(mirror_box(torch.tensor([1.0, 2.0, 3.0, 8.0]), 10), torch.tensor([6.0, 2.0, 8.0, 8.0]))


def test_box_cells_are_the_cells_whose_centres_lie_in_the_box() -> None:
    # 100 x 50 image in a 100 px square: offset (0, 25); 4 x 4 cells of 25 px, centres 12, 37, 62, 87
    geometry = PadResize(100, 50, 100)
    assert sorted(box_cells(geometry, torch.tensor([0.0, 0.0, 49.0, 49.0]), 4).tolist()) == [4, 5, 8, 9]
    assert sorted(box_cells(geometry, None, 4).tolist()) == [4, 5, 6, 7, 8, 9, 10, 11]
    # a box smaller than a cell: the cell holding its centre
    assert box_cells(geometry, torch.tensor([80.0, 1.0, 82.0, 3.0]), 4).tolist() == [7]


def test_instance_distance_is_the_mean_nearest_neighbour_distance_over_the_instance() -> None:
    descriptors = torch.zeros(2, 1, 2, 2)
    descriptors[0, 0] = torch.tensor([[0.0, 1.0], [5.0, 9.0]])
    descriptors[1, 0] = torch.tensor([[0.5, 3.0], [100.0, 100.0]])
    # source cells 0, 1, 2 against target cells 0, 1: nearest distances 0.5, 0.5, 2.0
    got = instance_nn_distance(descriptors, torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    torch.testing.assert_close(got, torch.tensor(1.0))


def _mirrored_pair(category: str = "cat") -> tuple[dict, torch.Tensor]:
    """A random-texture source, its exact mirror as target, and the target keypoints the mirror implies."""
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 256, (3, 6, 8), generator=generator, dtype=torch.uint8)
    source = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 64 x 48, 8 px blocks
    width = source.shape[-1]
    kps_ids = [0, 1, 8, 4]  # eyes 0/1 swap, the nose 8 is self-symmetric, 4's partner 5 is not annotated
    src_kps = torch.tensor([[12.0, 10.0], [52.0, 14.0], [30.0, 30.0], [20.0, 40.0]])
    partners = {0: 1, 1: 0, 8: 8, 4: 5}
    index = {k: i for i, k in enumerate(kps_ids)}
    # on the mirrored object, keypoint k is where the original's partner of k was, mirrored
    trg_kps = torch.stack([
        mirror_points(src_kps[index[partners[k]]][None], width)[0] if partners[k] in index else src_kps[i]
        for i, k in enumerate(kps_ids)
    ])
    sample = {
        "pair_id": "mirrored", "category": category, "kps_ids": kps_ids,
        "src_image": source, "trg_image": source.flip(-1), "src_image_path": "src.png", "trg_image_path": "trg.png",
        "src_kps": src_kps, "trg_kps": trg_kps, "src_instance_box": torch.tensor([4.0, 2.0, 60.0, 45.0]),
        "trg_instance_box": torch.tensor([3.0, 2.0, 59.0, 45.0]),
    }
    return sample, trg_kps


def test_pose_alignment_picks_the_mirror_and_maps_the_ids_back(tiny_sd, tiny_dino) -> None:
    sample, trg_kps = _mirrored_pair()
    # no cache: the mirrored source has the target's pixels here, and a cache would serve it
    aligned = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), feature_cache_gb=0, pose_alignment=True,
                                  flip_pairs="spair")
    plain = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8))
    out, = aligned.predict_pairs([sample])
    base, = plain.predict_pairs([sample])
    # the mirrored source IS the target: its instance distance is ~0, far below the original orientation's
    assert bool(out["flipped"]) and out["pose_distances"][1] < 1e-2 < out["pose_distances"][0]
    # keypoints with an annotated partner come from the mirror: the target's own cells (14 px cells at the DINO
    # 224 px square, 64 px wide image: 4 px cells, so within half a cell diagonal of the truth)
    error = (out["pred_kps"] - trg_kps).norm(dim=1)
    assert (error[:3] <= 2.9).all(), error
    # the eye predictions swapped sides: id 0 lands on the mirror of the original's id 1, not of id 0
    assert (out["pred_kps"][0] - mirror_points(sample["src_kps"][:1], 64)[0]).norm() > 20
    # keypoint 4's partner is not in the pair: it keeps the original orientation's prediction
    torch.testing.assert_close(out["pred_kps"][3], base["pred_kps"][3])
    torch.testing.assert_close(out["distance"][3], base["distance"][3])
    # the mirrors cost one extraction per source image
    assert aligned.extraction_passes == {"sd": 3, "dino": 3} and plain.extraction_passes == {"sd": 2, "dino": 2}


def test_pose_alignment_keeps_the_original_when_it_agrees_better(tiny_sd, tiny_dino) -> None:
    sample, _ = _mirrored_pair()
    same = {**sample, "trg_image": sample["src_image"], "trg_image_path": "copy.png", "trg_instance_box": sample["src_instance_box"]}
    out, = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), pose_alignment=True, flip_pairs="spair").predict_pairs(
        [same]
    )
    base, = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8)).predict_pairs([same])
    assert not bool(out["flipped"]) and out["pose_distances"][0] < out["pose_distances"][1]
    torch.testing.assert_close(out["pred_kps"], base["pred_kps"])


def test_pose_alignment_needs_keypoint_ids_and_a_known_category(tiny_dino) -> None:
    sample, _ = _mirrored_pair()
    pipeline = FusedCorrespondence(None, tiny_dino, alpha=0.0, pose_alignment=True, flip_pairs="spair")
    with pytest.raises(ValueError, match="pose alignment needs keypoint ids"):
        pipeline.predict_pairs([{k: v for k, v in sample.items() if k != "kps_ids"}])
    with pytest.raises(ValueError, match="no flip pairs for category 'zebra'"):
        pipeline.predict_pairs([{**sample, "category": "zebra"}])


def test_pose_alignment_runs_through_evaluate_and_records_the_orientation(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=3, image_size=(96, 72))
    evaluate.main(["test", "--config", str(CONFIGS / "spair.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
                   "--data.root", str(root), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   "--model.pipeline.pose_alignment", "true", "--trainer.default_root_dir", str(tmp_path / "run")])
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert isinstance(record["flipped"], bool) and len(record["pose_distances"]) == 2
        assert record["flipped"] == (record["pose_distances"][1] < record["pose_distances"][0])
    dataset = SPairDataset(root)
    sources = {r.src_image_path for r in dataset.records}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # every distinct image once, plus one mirror per distinct source image
    expected = len(dataset.image_paths) + len(sources)
    assert results["extraction_passes"] == {"sd": expected, "dino": expected}
