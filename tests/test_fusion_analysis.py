"""Supplementary A.10 tables on crafted per-keypoint outcomes and distances, counted by hand."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.analysis import relative_distance, summarize_fusion_analysis


def test_relative_distance_is_min_max_normalised() -> None:
    d = torch.tensor([[2.0, 4.0, 6.0, 10.0], [1.0, 1.0, 1.0, 1.0]])
    assert relative_distance(d, torch.tensor([1, 2])).tolist() == [0.25, 0.0]
    assert relative_distance(d, torch.tensor([3, 0])).tolist() == [1.0, 0.0]


def test_outcomes_conditionals_and_relative_distances_by_hand() -> None:
    # 8 keypoints with outcomes (SD, DINO, Fused): 000, 001, 011, 011, 101, 111, 111, 110
    codes = ["000", "001", "011", "011", "101", "111", "111", "110"]
    sd_ok = torch.tensor([c[0] == "1" for c in codes])
    dino_ok = torch.tensor([c[1] == "1" for c in codes])
    fused_ok = torch.tensor([c[2] == "1" for c in codes])
    sd_rel_correct = torch.tensor([0.8, 0.6, 0.2, 0.4, 0.0, 0.0, 0.0, 0.0])
    dino_rel_correct = torch.tensor([0.9, 0.7, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0])
    sd_rel_at_dino = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.6, 0.0, 0.0, 0.0])
    dino_rel_at_sd = torch.tensor([0.2, 0.4, 0.7, 0.9, 0.1, 0.0, 0.0, 0.0])
    out = summarize_fusion_analysis(sd_ok, dino_ok, fused_ok, sd_rel_correct, dino_rel_correct,
                                    sd_rel_at_dino, dino_rel_at_sd)
    assert out["num_keypoints"] == 8
    assert out["outcomes"] == {"000": 12.5, "001": 12.5, "010": 0.0, "011": 25.0,
                               "100": 0.0, "101": 12.5, "110": 12.5, "111": 25.0}
    assert out["conditional"] == {"SD wrong, DINO wrong": 50.0, "SD wrong, DINO right": 100.0,
                                  "SD right, DINO wrong": 100.0, "SD right, DINO right": pytest.approx(200 / 3)}
    rel = out["relative_distance"]
    assert rel["011"]["sd_correct"] == pytest.approx(0.3) and rel["011"]["dino_false"] == pytest.approx(0.8)
    assert rel["101"]["sd_false"] == pytest.approx(0.6) and rel["101"]["dino_correct"] == pytest.approx(0.3)
    assert rel["011"]["sd_false"] is None and rel["101"]["sd_correct"] is None
    assert rel["average"]["sd_correct"] == pytest.approx(2.0 / 8)
    assert rel["average"]["dino_correct"] == pytest.approx(1.9 / 8)
    assert rel["average"]["sd_false"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)  # where DINO is wrong: 000 001 101
    assert rel["average"]["dino_false"] == pytest.approx((0.2 + 0.4 + 0.7 + 0.9) / 4)  # where SD is wrong
