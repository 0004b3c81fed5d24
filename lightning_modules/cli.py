"""The LightningCLI shared by ``evaluate.py`` and ``train.py``: configs drive every object."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from callbacks.config_logging import LoggerSaveConfigCallback
from callbacks.prediction_writer import CorrespondenceWriter

__all__ = ["SDDinoCLI", "build_cli"]


class SDDinoCLI(LightningCLI):
    """``LightningCLI`` that points loggers without a ``save_dir`` at the trainer's ``default_root_dir``.

    Loggers offering ``use_default_save_dir(path)`` (:class:`callbacks.AutoWandbLogger`) get
    ``trainer.default_root_dir`` after the trainer is built and before any run starts, so that a W&B run keeps
    ``results.json``, ``config.yaml``, the PNGs and its own files in the run directory however
    ``--trainer.default_root_dir`` was given (a YAML interpolation could not see a command-line override).
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--resume",
            type=bool,
            default=False,
            help="Continue an interrupted test run in the same output directory: pairs whose predictions it "
            "flushed are restored, not evaluated again (see callbacks.CorrespondenceWriter).",
        )

    def before_test(self) -> None:
        """Hand ``--resume`` to the run's prediction writers."""
        resume = bool(self.config_init[self.subcommand].get("resume", False))
        writers = [c for c in self.trainer.callbacks if isinstance(c, CorrespondenceWriter)]
        if resume and not writers:
            raise ValueError("--resume needs a callbacks.CorrespondenceWriter in trainer.callbacks")
        for writer in writers:
            writer.resume = writer.resume or resume

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:
            use_default = getattr(logger, "use_default_save_dir", None)
            if callable(use_default):
                use_default(trainer.default_root_dir)
        return trainer


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI.

    Model and datamodule are given by ``class_path`` in the configs, so any LightningModule or
    LightningDataModule of this collection (or a user's) can be selected from YAML. omegaconf mode makes
    ``${...}`` interpolation available in configs. ``config.yaml`` is written to the log dir as usual, and
    the resolved config is also sent to every logger (the W&B run config; see
    :class:`callbacks.config_logging.LoggerSaveConfigCallback`).
    """
    return SDDinoCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=LoggerSaveConfigCallback,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
