"""Names that explain themselves (issue 27): the options renamed, and their old spellings, which users type in
commands and configs, keep working for a while with a one-line notice.

- ``pck_alphas`` (the PCK@alpha levels of a run) was ``alphas``, beside the fusion weight ``pipeline.alpha``;
- ``annotation_size`` (the paper's "annotation resolution", Table 8) was ``eval_size``;
- a row's ``layer_projection`` (a fixed per-layer map, Table 3) was ``projection`` (tests/test_ablation.py);
- the pipeline's pose-alignment object is ``pose_aligner`` beside its ``pose_alignment`` flag.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import evaluate
from datamodules import write_synthetic_spair
from lightning_modules import ZeroShotCorrespondence
from lightning_modules.components import FusedCorrespondence
from lightning_modules.components.pose_alignment import PoseAlignment

from conftest import SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY


def test_the_pipelines_annotation_size_was_eval_size(tiny_sd, tiny_dino) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = FusedCorrespondence(tiny_sd, tiny_dino, annotation_size=256)
    with pytest.warns(FutureWarning, match="eval_size is now annotation_size"):
        old = FusedCorrespondence(tiny_sd, tiny_dino, eval_size=256)
    assert new.annotation_size == old.annotation_size == 256
    assert FusedCorrespondence(tiny_sd, tiny_dino).annotation_size == tiny_dino.image_size  # the default stays
    with pytest.raises(ValueError, match="give annotation_size only"):
        FusedCorrespondence(tiny_sd, tiny_dino, annotation_size=256, eval_size=128)


def test_the_pose_alignment_flag_builds_the_pose_aligner(tiny_sd, tiny_dino) -> None:
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, pose_alignment=True, flip_pairs="spair")
    assert pipeline.align_poses is True and isinstance(pipeline.pose_aligner, PoseAlignment)
    assert pipeline.settings.pose_aligner is pipeline.pose_aligner
    assert FusedCorrespondence(tiny_sd, tiny_dino).settings.pose_aligner is None


def test_a_modules_pck_alphas_were_alphas(tiny_sd, tiny_dino) -> None:
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino)
    assert ZeroShotCorrespondence(pipeline, pck_alphas=[0.1, 0.2]).pck_alphas == [0.1, 0.2]
    with pytest.warns(UserWarning, match=r"model\.alphas is now model\.pck_alphas \(the fusion weight is "
                                         r"model\.pipeline\.alpha\)"):
        assert ZeroShotCorrespondence(pipeline, alphas=[0.1, 0.2]).pck_alphas == [0.1, 0.2]
    with pytest.raises(ValueError, match="give model.pck_alphas only"):
        ZeroShotCorrespondence(pipeline, pck_alphas=[0.1], alphas=[0.2])


def _levels(root: Path, out: Path, flag: str) -> dict:
    evaluate.main(["test", "--config", SPAIR, "--config", TINY, "--data.root", str(root), "--data.num_workers", "0",
                   "--trainer.accelerator", "cpu", flag, "[0.1, 0.5]", "--trainer.default_root_dir", str(out),
                   "--trainer.enable_progress_bar", "false"])
    return json.loads((out / "results.json").read_text())["pck"]


def test_the_old_alphas_flag_still_scores_at_the_levels_given(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2)
    new = _levels(root, tmp_path / "new", "--model.pck_alphas")
    with pytest.warns(UserWarning, match="model.alphas is now model.pck_alphas"):
        old = _levels(root, tmp_path / "old", "--model.alphas")
    assert list(new) == list(old) == ["0.1", "0.5"] and new == old
