"""The pipeline from plain Python (typed single-pair call) and a matcher swapped in by one class / one config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import SPairDataset, write_synthetic_spair
from cli import build_cli
from lightning_modules.components import FusedCorrespondence, KeypointMatcher, NearestNeighbours, PairMatch

from conftest import CONFIGS, SPAIR_CONFIG, TINY_OVERLAY


class ShiftedNeighbours(KeypointMatcher):
    """A stand-in for a user's matcher: the paper's matches, moved by a fixed offset in the padded square."""

    def __init__(self, dx: float = 7.0) -> None:
        self.dx = dx

    def __call__(self, source, target, points, source_size, target_size):  # noqa: ANN001, ANN204
        predicted, distance, extras = NearestNeighbours()(source, target, points, source_size, target_size)
        return predicted + torch.tensor([self.dx, 0.0]), distance, extras


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = write_synthetic_spair(tmp_path_factory.mktemp("spair"), categories=("cat",), pairs_per_category=1,
                                 image_size=(96, 72))
    return SPairDataset(root, split="test")[0]


def test_match_on_two_pil_images_is_the_pipelines_prediction(tiny_sd, tiny_dino, pair) -> None:
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), mutual_check=True)
    source = Image.fromarray(pair["src_image"].permute(1, 2, 0).numpy())
    target = np.ascontiguousarray(pair["trg_image"].permute(1, 2, 0).numpy())  # an [H, W, 3] array works too
    result = pipeline.match(source, target, pair["src_kps"].tolist(), category=pair["category"])
    assert isinstance(result, PairMatch)
    expected = pipeline.predict_pairs([pair])[0]
    assert torch.equal(result.points, expected["pred_kps"]) and result.points.shape == pair["src_kps"].shape
    assert torch.equal(result.distance, expected["distance"])
    assert torch.equal(result.mutual, expected["mutual"]) and result.confidence is not None
    assert result.flipped is None  # no pose alignment configured
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        pipeline.match(pair["src_image"].float(), target, pair["src_kps"])


def test_a_matcher_is_one_class_and_one_config_key(tiny_sd, tiny_dino, pair, tmp_path, monkeypatch) -> None:
    plain = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8)).predict_pairs([pair])[0]
    shifted = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), matcher=ShiftedNeighbours())
    out = shifted.predict_pairs([pair])[0]
    # the same 7 padded pixels to the right for every point, back in original target pixels
    shift = out["pred_kps"] - plain["pred_kps"]
    assert torch.allclose(shift[:, 1], torch.zeros(len(shift))) and torch.allclose(shift[:, 0], shift[0, 0])
    assert 0 < float(shift[0, 0]) < 7.0  # the target is smaller than the padded square it is matched in
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SPAIR_CONFIG, "--config", TINY_OVERLAY, "--data.root", str(tmp_path),
                     "--model.pipeline.matcher", f"{__name__}.ShiftedNeighbours", "--model.pipeline.matcher.dx", "3"],
                    run=False)
    assert isinstance(cli.model.pipeline.matcher, ShiftedNeighbours) and cli.model.pipeline.matcher.dx == 3.0
    default = build_cli(["--config", SPAIR_CONFIG, "--config", TINY_OVERLAY, "--data.root", str(tmp_path)], run=False)
    assert isinstance(default.model.pipeline.matcher, NearestNeighbours)
    assert (CONFIGS / "model" / "sd_dino.yaml").is_file()


def test_pose_alignment_without_a_table_is_refused_not_skipped(tiny_sd, tiny_dino, pair) -> None:
    """Outside a benchmark (no protocol) pose alignment needs flip_pairs: a plain run instead would be silent."""
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), pose_alignment=True)
    with pytest.raises(ValueError, match="pose_alignment needs its left/right table"):
        pipeline.predict_pairs([pair])
    from datamodules import get_protocol

    pipeline.use_protocol(get_protocol("spair"))
    assert "flipped" in pipeline.predict_pairs([pair])[0]


def test_the_chance_baseline_refuses_a_benchmark_without_keypoints(tmp_path, monkeypatch) -> None:
    import evaluate
    from datamodules.tss import write_synthetic_tss

    root = write_synthetic_tss(tmp_path / "tss", {"FG3DCar": [("001", (48, 32), (48, 36))]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="chance_baseline scores keypoints; TSS is scored with flow_pck"):
        evaluate.main(["test", "--config", str(CONFIGS / "tss.yaml"), "--config", TINY_OVERLAY, "--data.root", str(root),
                       "--data.datasets", "[FG3DCar]", "--model.chance_baseline", "true", "--data.num_workers", "0",
                       "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run")])


def test_the_matcher_holds_its_refinements(tiny_sd, tiny_dino, pair) -> None:
    """One object travels from the config to the transfer: the refinement flags configure the matcher
    (``KeypointMatcher.refined``), so ``NearestNeighbours(soft_argmax_window=1, mutual_check=True)`` given as
    the matcher equals the same flags on the pipeline; a matcher that cannot refine says so when a flag is set."""
    from lightning_modules.components.matchers import Matches
    from lightning_modules.components.refinements import MatchRefinement

    flags = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), soft_argmax_window=1, mutual_check=True)
    assert isinstance(flags.matcher, NearestNeighbours) and flags.refinement == flags.matcher.refinement == \
        MatchRefinement(soft_argmax_window=1, mutual_check=True)
    given = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8),
                                matcher=NearestNeighbours(soft_argmax_window=1, mutual_check=True))
    a, b = flags.predict_pairs([pair])[0], given.predict_pairs([pair])[0]
    assert torch.equal(a["pred_kps"], b["pred_kps"]) and torch.equal(a["mutual"], b["mutual"])
    assert torch.equal(a["confidence"], b["confidence"])
    assert FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8)).refinement is None
    out = NearestNeighbours(mutual_check=True)(torch.randn(4, 3, 3), torch.randn(4, 3, 3), torch.tensor([[1.0, 1.0]]),
                                               42, 42)
    assert isinstance(out, Matches) and set(out.extras) == {"confidence", "mutual"}
    with pytest.raises(ValueError, match="ShiftedNeighbours takes no test-time refinements"):
        FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), matcher=ShiftedNeighbours(), mutual_check=True)


class ScoredNeighbours(KeypointMatcher):
    """A user's matcher that records a per-point extra of its own."""

    def __call__(self, source, target, points, source_size, target_size):  # noqa: ANN001, ANN204
        predicted, distance, _ = NearestNeighbours()(source, target, points, source_size, target_size)
        return predicted, distance, {"score": -distance}


def test_a_matchers_own_extras_are_written_as_they_come(tiny_sd, tiny_dino, pair, tmp_path) -> None:
    """The writers write every per-point extra a matcher returns, under its name (before: only the names
    ``confidence`` and ``mutual`` were kept)."""
    from lightning_modules.zero_shot import keypoint_record

    out = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), matcher=ScoredNeighbours()).predict_pairs([pair])[0]
    record = keypoint_record(pair, out["pred_kps"], pair["kps_valid"], out)
    valid = pair["kps_valid"]
    assert record["score"] == pytest.approx((-out["distance"][valid]).tolist())
    assert "confidence" not in record and "distance" not in record
