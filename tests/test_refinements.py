"""Test-time refinements beyond the paper: window soft-argmax, mutual nearest neighbours, confidence."""

from __future__ import annotations

import json
import math

import pytest
import torch

import evaluate
from datamodules import write_synthetic_spair
from lightning_modules.components.matching import transfer_keypoints
from lightning_modules.components.refinements import (
    MatchRefinement,
    match_confidence,
    mutual_matches,
    refined_transfer,
    window_soft_argmax,
)

from conftest import CONFIGS


def _scores(grid: int, cells: dict[tuple[int, int], float], floor: float = -10.0) -> torch.Tensor:
    scores = torch.full((1, grid * grid), floor)
    for (row, col), value in cells.items():
        scores[0, row * grid + col] = value
    return scores


def test_window_soft_argmax_finds_the_exact_sub_cell_location() -> None:
    # two equal peaks side by side: the soft-argmax is exactly between them
    col_row = window_soft_argmax(_scores(8, {(3, 5): 1.0, (3, 6): 1.0}), 8, window=2, temperature=0.04)
    torch.testing.assert_close(col_row, torch.tensor([[5.5, 3.0]]))
    # weights 3 : 1 (a score gap of T ln 3): a quarter of the way towards the weaker cell
    gap = 0.04 * math.log(3.0)
    col_row = window_soft_argmax(_scores(8, {(2, 2): 1.0, (3, 2): 1.0 - gap}), 8, window=1, temperature=0.04)
    torch.testing.assert_close(col_row, torch.tensor([[2.0, 2.25]]))
    # a high cell outside the window does not pull; window 0 is the arg-max cell
    col_row = window_soft_argmax(_scores(8, {(0, 0): 1.0, (0, 4): 0.999}), 8, window=1, temperature=0.04)
    torch.testing.assert_close(col_row, torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(window_soft_argmax(_scores(8, {(7, 1): 1.0}), 8, 0, 0.04), torch.tensor([[1.0, 7.0]]))


def test_mutual_check_drops_a_many_to_one_match() -> None:
    grid = 2
    source = torch.zeros(3, grid, grid)
    target = torch.zeros(3, grid, grid)
    source[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # cell 0: exactly target cell 0
    source[:, 0, 1] = torch.tensor([0.9, 0.1, 0.0])  # cell 1: also nearest to target cell 0 (many-to-one)
    source[:, 1, 0] = torch.tensor([0.0, 0.0, 1.0])  # cell 2: target cell 3
    source[:, 1, 1] = torch.tensor([0.0, -1.0, 0.0])
    target[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    target[:, 0, 1] = torch.tensor([0.0, -5.0, 0.0])
    target[:, 1, 0] = torch.tensor([0.0, 0.0, -5.0])
    target[:, 1, 1] = torch.tensor([0.0, 0.0, 1.0])
    mutual = mutual_matches(source, target, torch.tensor([0, 1, 2]))
    assert mutual.tolist() == [True, False, True]


def test_refined_transfer_without_a_window_is_the_plain_transfer_plus_extras() -> None:
    generator = torch.Generator().manual_seed(0)
    source, target = torch.randn(16, 6, 6, generator=generator), torch.randn(16, 6, 6, generator=generator)
    source, target = source / source.norm(dim=0), target / target.norm(dim=0)  # unit tokens, as concat_l2 gives
    points = torch.rand(10, 2, generator=generator) * 84
    plain, distance = transfer_keypoints(source, target, points, 84, 84)
    refined, refined_distance, extras = refined_transfer(source, target, points, 84, 84, MatchRefinement(mutual_check=True))
    torch.testing.assert_close(refined, plain)
    torch.testing.assert_close(refined_distance, distance)
    assert extras["mutual"].dtype == torch.bool and extras["mutual"].shape == (10,)
    assert ((extras["confidence"] > 0) & (extras["confidence"] <= 1)).all()
    windowed, _, _ = refined_transfer(source, target, points, 84, 84, MatchRefinement(soft_argmax_window=1))
    assert (windowed - plain).abs().max() <= 14 + 1e-4  # within one cell of the arg-max centre
    assert not torch.equal(windowed, plain)  # and sub-cell


def test_confidence_and_settings() -> None:
    scores = torch.tensor([[1.0, 1.0, -9.0], [5.0, -5.0, -5.0]])
    torch.testing.assert_close(match_confidence(scores, 0.04), torch.tensor([0.5, 1.0]))
    assert not MatchRefinement().active and MatchRefinement(soft_argmax_window=0).active
    with pytest.raises(ValueError, match="soft_argmax_window must be >= 0"):
        MatchRefinement(soft_argmax_window=-1)
    with pytest.raises(ValueError, match="soft_argmax_temperature must be positive"):
        MatchRefinement(soft_argmax_temperature=0.0)


def test_refinement_knobs_run_through_evaluate_and_keep_their_extras(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    common = ["--config", str(CONFIGS / "spair.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
              "--data.root", str(root), "--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    evaluate.main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "plain")])
    evaluate.main(["test", *common, "--model.pipeline.soft_argmax_window", "1", "--model.pipeline.mutual_check",
                   "true", "--trainer.default_root_dir", str(tmp_path / "refined")])
    plain = [json.loads(line) for line in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    refined = [json.loads(line) for line in (tmp_path / "refined" / "predictions.jsonl").read_text().splitlines()]
    assert "confidence" not in plain[0] and "mutual" not in plain[0]  # off by default: the paper's records
    for a, b in zip(plain, refined):
        assert a["pair_id"] == b["pair_id"] and len(b["confidence"]) == len(b["mutual"]) == len(b["pred_kps"])
        assert all(isinstance(m, bool) for m in b["mutual"])
    assert any(p != q for a, b in zip(plain, refined) for p, q in zip(a["pred_kps"], b["pred_kps"]))


def test_refinement_ablation_rows_keep_their_own_extras(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    ablations = CONFIGS / "ablations"
    evaluate.main(["test", "--config", str(ablations / "beyond_refinements.yaml"), "--config", str(ablations / "tiny.yaml"),
                   "--config", str(ablations / "tiny_beyond_refinements.yaml"), "--data.root", str(root),
                   "--data.num_workers", "0",
                   "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run")])
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    by_row: dict[str, list[dict]] = {}
    for record in records:
        by_row.setdefault(record["row"], []).append(record)
    assert all("confidence" not in r and "mutual" not in r for r in by_row["Fused (paper)"])
    assert all("mutual" not in r and len(r["confidence"]) == len(r["pred_kps"])
               for r in by_row["+ window soft-argmax (w=1)"])
    mutual = by_row["+ mutual-NN check (recorded)"]
    assert all(len(r["mutual"]) == len(r["pred_kps"]) for r in mutual)
    # recording mutual matches changes no prediction
    assert [r["pred_kps"] for r in mutual] == [r["pred_kps"] for r in by_row["Fused (paper)"]]
    # pose alignment: a pair keeps the paper row's predictions exactly when the original orientation wins
    posed = by_row["+ pose alignment"]
    assert all(isinstance(r["flipped"], bool) and len(r["pose_distances"]) == 2 for r in posed)
    assert all("flipped" not in r for r in by_row["Fused (paper)"])
    for r, paper in zip(posed, by_row["Fused (paper)"]):
        assert r["pair_id"] == paper["pair_id"]
        if not r["flipped"]:
            assert r["pred_kps"] == paper["pred_kps"]
