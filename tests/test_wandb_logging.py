"""W&B: the offline/online decision, the results as W&B data, and an offline run through configs/overlays/wandb.yaml.

Never online: every test that may start a run sets ``WANDB_MODE=offline`` and keeps all W&B files in tmp.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import evaluate
from callbacks import (
    AutoWandbLogger,
    CorrespondenceVisualizer,
    CorrespondenceWriter,
    LoggerSaveConfigCallback,
    PairProgressBar,
    WandbResults,
)
from callbacks.wandb_logging import resolve_wandb_mode, results_to_wandb, wandb_api_key_available
from datamodules import write_synthetic_spair
from cli import build_cli

from conftest import CONFIGS, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY
TRAINER_CONFIGS = [CONFIGS / "overlays" / "visualize.yaml", CONFIGS / "overlays" / "wandb.yaml"]

FAST_MODEL = CONFIGS / "overlays" / "smoke_dino.yaml"  # one random DINO block: runs in seconds


@pytest.fixture
def wandb_sandbox(tmp_path, monkeypatch):
    """Offline W&B with every file under tmp; no key, no netrc; any run left open is finished."""
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_env" / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    import wandb

    if wandb.run is not None:
        wandb.finish()


# --------------------------------------------------------------------------- offline / online decision


def _netrc(tmp_path: Path, host: str, password: str = "secret-not-a-key") -> Path:
    path = tmp_path / "netrc"
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    path.chmod(0o600)
    return path


def test_no_key_means_offline_and_a_key_means_online(tmp_path) -> None:
    empty = {"HOME": str(tmp_path)}  # no ~/.netrc there
    assert not wandb_api_key_available(empty)
    assert resolve_wandb_mode(None, empty) == "offline"
    assert resolve_wandb_mode(None, {**empty, "WANDB_API_KEY": "0123"}) == "online"
    assert resolve_wandb_mode(None, {**empty, "WANDB_API_KEY": "  "}) == "offline"
    netrc = _netrc(tmp_path, "api.wandb.ai")
    assert resolve_wandb_mode(None, empty, netrc_path=netrc) == "online"  # `wandb login`
    assert resolve_wandb_mode(None, {**empty, "NETRC": str(netrc)}) == "online"
    (tmp_path / ".netrc").write_text(netrc.read_text())
    assert resolve_wandb_mode(None, empty) == "online"  # ~/.netrc
    home2 = tmp_path / "home2"
    home2.mkdir()
    other = _netrc(home2, "example.com")
    assert resolve_wandb_mode(None, {"HOME": str(home2)}, netrc_path=other) == "offline"  # another host's login
    server = {"HOME": str(home2), "WANDB_BASE_URL": "https://example.com:8080"}
    assert resolve_wandb_mode(None, server, netrc_path=other) == "online"  # a private W&B server
    broken = tmp_path / "broken_netrc"
    broken.write_text("machine\n")
    assert resolve_wandb_mode(None, {"HOME": str(home2)}, netrc_path=broken) == "offline"


def test_explicit_choices_and_wandb_mode_override_the_key() -> None:
    key = {"WANDB_API_KEY": "0123"}
    assert resolve_wandb_mode(True, key) == "offline"
    assert resolve_wandb_mode(False, {}) == "online"
    assert resolve_wandb_mode(None, {**key, "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode(None, {**key, "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "online"}) == "online"
    assert resolve_wandb_mode(False, {**key, "WANDB_MODE": "disabled"}) == "disabled"  # the kill switch wins


def test_auto_logger_picks_the_mode_without_starting_a_run(tmp_path, monkeypatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    logger = AutoWandbLogger()
    assert logger.mode == "offline" and logger._wandb_init["mode"] == "offline"
    assert logger._project == "sd-dino-lightning" and logger.save_dir is None
    logger.use_default_save_dir(tmp_path / "run")
    assert logger.save_dir == str(tmp_path / "run") and logger._wandb_init["dir"] == str(tmp_path / "run")
    with pytest.warns(UserWarning, match="log_model"):
        assert AutoWandbLogger(log_model=True)._log_model is False
    with pytest.raises(ValueError, match="offline"):
        AutoWandbLogger(offline=True, log_model=True)
    monkeypatch.setenv("WANDB_API_KEY", "0123")
    online = AutoWandbLogger(save_dir=str(tmp_path / "given"), tags=["a"])
    assert online.mode == "online" and online._wandb_init["mode"] == "online" and online._wandb_init["tags"] == ["a"]
    online.use_default_save_dir(tmp_path / "other")  # an explicit save_dir is kept
    assert online.save_dir == str(tmp_path / "given")
    assert online._experiment is None and logger._experiment is None  # nothing was started
    assert "WANDB_MODE" not in os.environ  # unlike WandbLogger(offline=True), no global side effect


# --------------------------------------------------------------------------- results as W&B data


def test_results_to_wandb_for_keypoints_dense_flow_and_ablations() -> None:
    sparse = {"pck": {"0.1": {"per_point": 50.0, "category_mean": 40.0, "per_category": {"dog": 30.0, "cat": 50.0},
                              "per_variation": {"truncation": {"0": {"per_image": 1.0}}}},
                      "0.05": {"per_point": 20.0, "category_mean": 10.0, "per_category": {"dog": 0.0, "cat": 20.0}}},
              "protocol": {"group_label": "per_category"}, "num_pairs": 3}
    metrics, tables = results_to_wandb(sparse)
    assert metrics == {"pck@0.1/per_point": 50.0, "pck@0.1/category_mean": 40.0,
                       "pck@0.05/per_point": 20.0, "pck@0.05/category_mean": 10.0}
    assert tables == {"pck_per_category": (["category", "pck@0.1", "pck@0.05"],
                                           [["cat", 50.0, 20.0], ["dog", 30.0, 0.0]])}
    dense = {"pck": {"0.05": {"per_image": 70.0, "per_pixel": 60.0, "dataset_mean": 65.0,
                              "per_dataset": {"JODS": 65.0}}},
             "aepe": {"per_image": 3.0, "per_dataset": {"JODS": 3.0}}, "protocol": {"group_label": "per_dataset"}}
    metrics, tables = results_to_wandb(dense)
    assert metrics["pck@0.05/per_pixel"] == 60.0 and metrics["aepe/per_image"] == 3.0
    assert tables == {"pck_per_dataset": (["dataset", "pck@0.05"], [["JODS", 65.0]])}
    row = {"pck": {"0.1": {"category_mean": 40.0, "per_category": {"cat": 40.0}}}, "num_pairs": 2}
    ablation = {"table": {"SD": {"0.1": 40.0}, "Fuse": {"0.1": 55.0}}, "average": "category_mean",
                "rows": {"SD": row, "Fuse": row}, "protocol": {"group_label": "per_category"}}
    metrics, tables = results_to_wandb(ablation)
    assert metrics == {"ablation/SD/pck@0.1": 40.0, "ablation/Fuse/pck@0.1": 55.0}
    assert tables["ablation"] == (["setting", "pck@0.1"], [["SD", 40.0], ["Fuse", 55.0]])
    assert tables["pck_per_category"] == (["setting", "category", "pck@0.1"], [["SD", "cat", 40.0], ["Fuse", "cat", 40.0]])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("fragment", TRAINER_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", ["spair", "demo"])
def test_trainer_configs_compose_after_a_benchmark_config(fragment, base, wandb_sandbox, monkeypatch) -> None:
    monkeypatch.chdir(wandb_sandbox)
    configs = [SPAIR, TINY] if base == "spair" else [str(CONFIGS / "demo.yaml")]
    args = [a for c in [*configs, str(fragment)] for a in ("--config", c)]
    if base == "spair":
        args += ["--data.root", str(wandb_sandbox)]
    cli = build_cli([*args, "--trainer.default_root_dir", str(wandb_sandbox / "run")], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert CorrespondenceWriter in kinds and LoggerSaveConfigCallback in kinds  # appended, not replaced
    assert cli.trainer.progress_bar_callback.__class__ is PairProgressBar  # the benchmark configs' pairs/s bar
    if fragment.stem == "wandb":
        assert {CorrespondenceVisualizer, WandbResults, PairProgressBar} <= set(kinds)
        assert isinstance(cli.trainer.logger, AutoWandbLogger) and cli.trainer.logger.mode == "offline"
        assert cli.trainer.logger.save_dir == str(wandb_sandbox / "run")  # filled in by the CLI
        assert cli.trainer.log_dir == str(wandb_sandbox / "run")
        assert cli.trainer.logger._experiment is None  # parsing starts no run
    elif fragment.stem == "visualize":
        assert CorrespondenceVisualizer in kinds and cli.trainer.logger is None


# --------------------------------------------------------------------------- an offline run end to end


def test_offline_run_logs_config_results_tables_and_images(wandb_sandbox, monkeypatch) -> None:
    tmp_path = wandb_sandbox
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=2)
    model = FAST_MODEL
    out = tmp_path / "out"
    cli = evaluate.main(["test", "--config", SPAIR, "--config", str(model),
                         "--config", str(CONFIGS / "overlays" / "wandb.yaml"), "--data.root", str(root),
                         "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                         "--trainer.default_root_dir", str(out)])
    results = json.loads((out / "results.json").read_text())  # the run dir is unchanged by W&B
    assert (out / "config.yaml").is_file() and (out / "predictions.jsonl").is_file()
    assert len(list((out / "correspondences").glob("*.png"))) == 4  # min(8 pairs asked, 4 pairs)
    logger = cli.trainer.logger
    assert isinstance(logger, AutoWandbLogger) and logger.mode == "offline"
    run = logger.experiment
    assert Path(run.dir).resolve().is_relative_to((out / "wandb").resolve())

    config = run.config  # the resolved config, as in config.yaml
    assert config["model"]["class_path"] == "lightning_modules.ZeroShotCorrespondence"
    assert config["model"]["init_args"]["pipeline"]["init_args"]["alpha"] == 0.0
    assert config["data"]["init_args"]["root"] == str(root) and config["seed_everything"] == 42

    summary = run.summary
    for alpha, values in results["pck"].items():
        for average in ("per_point", "per_image", "category_mean", "weighted"):
            assert summary[f"pck@{alpha}/{average}"] == pytest.approx(values[average], abs=1e-4), (alpha, average)
    assert summary["num_pairs"] == results["num_pairs"] == 4 and summary["num_points"] == results["num_points"]
    assert summary["num_images"] == 6  # the generated pairs share images
    assert summary["extraction_passes/dino"] == results["extraction_passes"]["dino"]
    assert summary["pairs_per_s"] == pytest.approx(4 / summary["test_time_s"])
    assert summary["images_per_s"] == pytest.approx(6 / summary["test_time_s"])
    assert summary["correspondences"]["count"] == 4
    assert summary["pck_per_category"]["_type"] == "table-file"
    results_callback = next(c for c in cli.trainer.callbacks if isinstance(c, WandbResults))
    assert results_callback.summary["pck@0.1/per_point"] == pytest.approx(results["pck"]["0.1"]["per_point"])
    assert cli.trainer.progress_bar_metrics["pairs/s"] > 0

    run_dir = Path(run.dir).parent
    import wandb

    wandb.finish()
    media = run_dir / "files" / "media"
    assert len(list((media / "images").glob("correspondences_*.png"))) == 4
    table = json.loads(next((media / "table").glob("pck_per_category_*.table.json")).read_text())
    assert table["columns"] == ["category", "pck@0.01", "pck@0.05", "pck@0.1"]
    assert [row[0] for row in table["data"]] == ["cat", "dog"]
    assert table["data"][0][3] == pytest.approx(results["pck"]["0.1"]["per_category"]["cat"])
    # The offline transaction log that `wandb sync` uploads; wandb-core may still be flushing it after finish().
    keys = (b"pck@0.1/category_mean", b"pairs_per_s", b"extraction_passes/dino", b"seed_everything")
    deadline = time.monotonic() + 20
    while True:
        log = next(run_dir.glob("*.wandb")).read_bytes()
        if all(key in log for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [key for key in keys if key not in log] == []
