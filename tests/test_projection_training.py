"""Training the projection head: the LightningModule, ``train.py fit``, checkpoints, resume and evaluation.

Tiny random featurizers on generated SPair-format roots (trn / val / test); every run is seconds on a CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

import evaluate
import train
from datamodules import SPairDataModule, SPairDataset, write_synthetic_spair
from lightning_modules import ProjectionHeadTraining, ZeroShotCorrespondence
from cli import build_cli
from lightning_modules.components import FusedCorrespondence, GatedProjectionHead
from lightning_modules.projection import check_head_config

from conftest import CONFIGS, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY
PRESETS = sorted((CONFIGS / "projection").glob("*.yaml"))
PRESET = str(CONFIGS / "projection" / "sd_dinov2_b.yaml")


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    """One generated root holding the three SPair splits (shared images, different pairs)."""
    root = tmp_path_factory.mktemp("spair")
    for split, pairs in (("trn", 8), ("val", 3), ("test", 3)):
        write_synthetic_spair(root, categories=("cat", "dog"), images_per_category=4, pairs_per_category=pairs,
                              split=split, image_size=(96, 72))
    return root


def _fit_args(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", PRESET, "--config", TINY, "--data.root", str(root), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.val_pairs_per_category", "null",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "1.0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(run), "--model.init_args.out_dim", "16", "--model.init_args.hidden_dim", "16",
        "--model.init_args.lr", "0.01", "--model.pipeline.feature_cache_dir", "null", *extra,
    ]


def _head_state(module: ProjectionHeadTraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.head.state_dict().items()}


# --- configuration errors -----------------------------------------------------------------------------


def test_unknown_source_and_missing_featurizer_are_clear_errors(tiny_sd, tiny_dino) -> None:
    with pytest.raises(ValueError, match=r"sources must be distinct names out of \['sd', 'dino'\], got \['sd', 'clip'\]"):
        ProjectionHeadTraining(FusedCorrespondence(tiny_sd, tiny_dino), sources=["sd", "clip"])
    with pytest.raises(ValueError, match="need a dino featurizer"):
        ProjectionHeadTraining(FusedCorrespondence(tiny_sd, None, alpha=1.0), sources=["sd", "dino"])
    with pytest.raises(ValueError, match="temperature must be positive"):
        ProjectionHeadTraining(FusedCorrespondence(tiny_sd, tiny_dino), temperature=0.0)
    with pytest.raises(ValueError, match=r"out_dim: stored 16, configured 8"):
        check_head_config({"sources": {"sd": 4}, "out_dim": 16}, {"sources": {"sd": 4}, "out_dim": 8}, "x.ckpt")


def test_every_projection_preset_composes_with_the_tiny_models(spair_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert [p.stem for p in PRESETS] == ["dino_only", "sd_dinov1_b16", "sd_dinov2_b", "sd_ibot_b16"]
    for preset in PRESETS:
        cli = build_cli(["--config", str(preset), "--config", TINY, "--data.root", str(spair_root)], run=False,
                        defaults_of="fit")
        model = cli.model
        assert isinstance(model, ProjectionHeadTraining), preset
        expected = ("dino",) if preset.stem == "dino_only" else ("sd", "dino")
        assert model.sources == expected
        assert (model.pipeline.sd is None) == (preset.stem == "dino_only")
        assert model.pipeline.dino.model_id is None  # the tiny random DINO replaced the preset's
        checkpoint = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
        assert checkpoint and checkpoint[0].monitor == "val/pck@0.1" and checkpoint[0].mode == "max"


def test_presets_name_the_intended_featurizers() -> None:
    from omegaconf import OmegaConf

    def dino_of(name: str) -> str:
        return OmegaConf.load(CONFIGS / "projection" / f"{name}.yaml").model.init_args.pipeline.dino

    assert dino_of("sd_dinov2_b") == dino_of("dino_only") == "../featurizers/dinov2_b14.yaml"
    assert dino_of("sd_dinov1_b16") == "../featurizers/dinov1_b16.yaml"
    assert dino_of("sd_ibot_b16") == "../featurizers/ibot_b16.yaml"
    ibot = OmegaConf.load(CONFIGS / "featurizers" / "ibot_b16.yaml").init_args
    assert (ibot.model_id, ibot.layer, ibot.facet, ibot.image_size) == ("facebook/dino-vitb16", 9, "key", 960)
    paper = OmegaConf.load(PRESET).model.init_args
    assert (paper.out_dim, paper.hidden_dim) == (768, 768)  # GatedProjectionHead.paper_bottleneck


# --- the module without the CLI ---------------------------------------------------------------------------


def test_training_lowers_the_loss_and_extracts_each_image_once(spair_root, tiny_sd, tiny_dino) -> None:
    torch.manual_seed(0)
    dataset = SPairDataset(spair_root, split="trn")
    module = ProjectionHeadTraining(FusedCorrespondence(tiny_sd, tiny_dino), out_dim=16, lr=0.01)
    module.pipeline.head = GatedProjectionHead(module.source_channels(dataset[0]), out_dim=16)
    # read from the tiny featurizers' features: SD layers 2/5/8 have 32 + 32 + 16 channels
    assert module.head.sources == {"sd": 80, "dino": tiny_dino.model.config.hidden_size}
    optimizer = module.configure_optimizers()
    batch = [dataset[i] for i in range(len(dataset))]
    losses = []
    for _ in range(25):
        loss = module.batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    images = {s["src_image_path"] for s in batch} | {s["trg_image_path"] for s in batch}
    # 25 steps over the same pairs: every distinct image went through each featurizer exactly once
    assert module.pipeline.extraction_passes == {"sd": len(images), "dino": len(images)}
    # the featurizers stay frozen and in eval mode while the head trains
    module.train()
    assert module.head.training and not module.pipeline.sd.training and not module.pipeline.dino.training
    assert not any(p.requires_grad for p in module.pipeline.dino.parameters())


def test_gate_learning_rate_is_its_own_parameter_group(tiny_sd, tiny_dino) -> None:
    module = ProjectionHeadTraining(FusedCorrespondence(tiny_sd, tiny_dino), lr=0.001, gate_lr=0.1, weight_decay=0.5)
    module.pipeline.head = GatedProjectionHead({"sd": 80, "dino": 32}, out_dim=8)
    projections, gates = module.configure_optimizers().param_groups
    assert (projections["lr"], projections["weight_decay"]) == (0.001, 0.5)
    assert (gates["lr"], gates["weight_decay"]) == (0.1, 0.0)
    assert len(gates["params"]) == 2 and sum(p.numel() for p in projections["params"]) == (80 + 1) * 8 + (32 + 1) * 8


# --- train.py fit, checkpoints, evaluate.py ---------------------------------------------------------------


def test_fit_checkpoints_the_head_only_and_evaluate_uses_it(spair_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    logger = tmp_path / "logger.yaml"
    logger.write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: {tmp_path / 'logs'}, name: run, version: 0}}\n"
    )
    cli = train.main([*_fit_args(spair_root, tmp_path / "run"), "--config", str(logger)])
    checkpoint_cb = cli.trainer.checkpoint_callback
    best = Path(checkpoint_cb.best_model_path)
    assert best.name.startswith("best-epoch") and (best.parent / "last.ckpt").is_file()

    # the head and its config only: no featurizer weight in the file
    payload = torch.load(best, map_location="cpu", weights_only=True)
    assert payload["state_dict"] and all(k.startswith("pipeline.head.") for k in payload["state_dict"])
    assert payload["projection_head"]["config"] == cli.model.head.config
    assert payload["projection_head"]["config"]["sources"] == {"sd": 80, "dino": 80}  # tiny_dino.yaml: 80 wide
    assert best.stat().st_size < 200_000

    # W&B or any logger gets loss, gates over time and val PCK; the best checkpoint is the best val PCK
    rows = list(csv.DictReader((tmp_path / "logs" / "run" / "version_0" / "metrics.csv").open()))
    gates = [float(r["gate/sd"]) for r in rows if r.get("gate/sd")]
    assert len(gates) == 8 and all(0 < g < 1 for g in gates)  # 2 epochs x 4 steps (16 trn pairs, batch 4)
    assert sum(1 for r in rows if r.get("train/loss")) == 8
    val = [float(r["val/pck@0.1"]) for r in rows if r.get("val/pck@0.1")]
    assert len(val) == 2 and float(checkpoint_cb.best_model_score) == pytest.approx(max(val))
    assert all(r.get("val/pck@0.1/per_point") for r in rows if r.get("val/pck@0.1"))

    # evaluate.py with the checkpoint: the head replaces co-PCA, predictions are the head's
    out = tmp_path / "eval"
    eval_cli = evaluate.main([
        "test", "--config", SPAIR, "--config", TINY, "--data.root", str(spair_root), "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out),
        "--model.pipeline.projection_ckpt", str(best), "--model.pipeline.feature_cache_gb", "0",
    ])
    assert isinstance(eval_cli.model, ZeroShotCorrespondence) and eval_cli.model.pipeline.head is not None
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test = SPairDataset(spair_root, split="test")
    assert results["num_pairs"] == len(records) == len(test) == 6
    expected = FusedCorrespondence(
        eval_cli.model.pipeline.sd, eval_cli.model.pipeline.dino, projection_ckpt=str(best), feature_cache_gb=0
    )
    by_id = {r["pair_id"]: r for r in records}
    for i in range(len(test)):  # one pair per call, as evaluate.py's batch_size 1 without a cache
        sample = test[i]
        prediction = expected.predict_pairs([sample])[0]
        assert by_id[sample["pair_id"]]["pred_kps"] == prediction["pred_kps"][sample["kps_valid"]].tolist()


def test_projection_ckpt_that_does_not_fit_the_featurizers_is_a_clear_error(spair_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "head.pt"
    GatedProjectionHead({"sd": 80, "dino": 64}, out_dim=8).save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"source 'dino': expected \[B, 64, H, W\] features, got \(2, 80, 16, 16\)"):
        evaluate.main([
            "test", "--config", SPAIR, "--config", TINY, "--data.root", str(spair_root), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "eval"),
            "--model.pipeline.projection_ckpt", str(ckpt),
        ])
    with pytest.raises(ValueError, match="could not read the head checkpoint"):
        FusedCorrespondence(dino=None, sd=None, projection_ckpt=str(tmp_path / "missing.ckpt"))


def test_resumed_training_ends_where_an_uninterrupted_run_ends(spair_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    whole = train.main(_fit_args(spair_root, tmp_path / "whole"))
    first = train.main([*_fit_args(spair_root, tmp_path / "split"), "--trainer.max_epochs", "1"])
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert first.trainer.global_step == 4 and last.is_file()
    epoch1 = tmp_path / "epoch1.ckpt"
    epoch1.write_bytes(last.read_bytes())
    resumed = train.main([*_fit_args(spair_root, tmp_path / "split"), "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == whole.trainer.global_step == 8
    for key, value in _head_state(whole.model).items():
        torch.testing.assert_close(_head_state(resumed.model)[key], value, rtol=1e-5, atol=1e-6)

    # (through the CLI, Lightning re-applies the checkpoint's hyperparameters; a Trainer takes the module as built)
    module = ProjectionHeadTraining(
        FusedCorrespondence(resumed.model.pipeline.sd, resumed.model.pipeline.dino), out_dim=8, hidden_dim=16
    )
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path / "bad")
    datamodule = SPairDataModule(root=str(spair_root), batch_size=4)
    with pytest.raises(ValueError, match=r"does not match this configuration \(out_dim: stored 16, configured 8\)"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=epoch1)
