"""Shared constants and fixtures: tiny random models built from configs and never a network call."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: tests never reach a model hub
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_modules.components import DinoFeaturizer, SDFeaturizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: The repository and its configs, as the tests name them.
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: The paper's SPair-71k run and the overlay with the tiny random models (README: smoke runs).
SPAIR_CONFIG = str(CONFIGS / "spair.yaml")
TINY_OVERLAY = str(CONFIGS / "overlays" / "tiny.yaml")
#: Command-line arguments every CLI run of the tests adds: no worker processes, the CPU.
CPU_ARGS = ["--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu"]


def tiny_overlay_args(name: str) -> dict:
    """The ``init_args`` of the tiny overlay's featurizer ``name`` (``sd`` or ``dino``), to build it by hand."""
    import yaml

    return yaml.safe_load((CONFIGS / "featurizers" / f"tiny_{name}.yaml").read_text())["init_args"]


@pytest.fixture(scope="session")
def tiny_sd() -> SDFeaturizer:
    """Tiny random SD featurizer (192 px, 2x2 sliding window of 128 px crops)."""
    return SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=192, crop_size=128)


@pytest.fixture(scope="session")
def tiny_dino() -> DinoFeaturizer:
    """Tiny random DINOv2 featurizer (224 px, 16 x 16 patches, last of 4 blocks)."""
    return DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=224)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest's hook
    """Say plainly when the browser tests did not run (no Chromium), so that a local run is not mistaken for CI's."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "browser" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_line(
            f"NOTE: {len(skipped)} browser test(s) SKIPPED: no Chromium found (apt-get install chromium, or set "
            "CHROMIUM=/path/to/chrome); .ci/run installs it, so CI runs them.", yellow=True, bold=True)
