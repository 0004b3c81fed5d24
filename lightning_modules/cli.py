"""The LightningCLI shared by ``evaluate.py`` and ``train.py``: configs drive every object."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

__all__ = ["build_cli"]


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI.

    Model and datamodule are given by ``class_path`` in the configs, so any LightningModule or
    LightningDataModule of this collection (or a user's) can be selected from YAML. omegaconf mode makes
    ``${...}`` interpolation available in configs.
    """
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
