"""The CLI's config callback: writes ``config.yaml`` as before and sends the resolved config to the loggers."""

from __future__ import annotations

from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback

__all__ = ["LoggerSaveConfigCallback"]


class LoggerSaveConfigCallback(SaveConfigCallback):
    """``SaveConfigCallback`` that also logs the resolved config with every logger's ``log_hyperparams``.

    The config sent is exactly what ``config.yaml`` holds (every default filled in, interpolations resolved), as
    a nested dictionary: in W&B it becomes the run config (``model.init_args.alpha``, ``data.class_path``,
    ...). Lightning later logs the module's own hyperparameters next to it; the keys do not collide (the
    config's top level is ``model`` / ``data`` / ``trainer`` / ``seed_everything``). Runs on rank 0 only.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            return
        config: dict[str, Any] = yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
