"""Pictures a predict run returns (dense colour maps, instance swaps): PNG files, and W&B images when W&B logs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from lightning_modules.components.files import save_image_atomically
from lightning_modules.distributed import gather_from_ranks

from .visualization import UniqueNames, _pad_width

__all__ = ["PictureWriter"]


class PictureWriter(L.Callback):
    """Saves the ``picture`` of every record ``predict_step`` returns, and logs the first ones to W&B.

    A record is a dict with ``pair_id`` and ``picture`` (a ``PIL.Image``); ``<output_dir>/<pair_id>.png`` is
    written for each (the id made file-safe by :func:`callbacks.visualization.safe_filename`: one file per
    pair, two ids never share a name). With several
    processes each rank writes its own pairs. When a trainer logger is a ``WandbLogger``, the first
    ``num_logged`` pictures (about ``num_logged / world_size`` per rank, gathered) are logged under ``key`` at the
    end of the run, captioned with the pair id (and the record's ``caption`` when it has one). A module's
    ``predict_results`` (a :class:`lightning_modules.results.RunResults`, e.g. the swap metrics) is written to
    the run folder and printed at the end of the run (rank zero).

    Args:
        subdir: Folder under ``<trainer.log_dir or default_root_dir>`` when ``output_dir`` is None.
        output_dir: Where the PNGs go.
        key: W&B key of the logged images.
        num_logged: How many pictures go to W&B (0: none).
    """

    def __init__(self, subdir: str = "pictures", output_dir: str | None = None, key: str = "pictures",
                 num_logged: int = 8) -> None:
        if num_logged < 0:
            raise ValueError(f"num_logged must be >= 0, got {num_logged}")
        self.subdir, self.output_dir, self.key, self.num_logged = subdir, output_dir, key, int(num_logged)
        self.saved: list[Path] = []
        self._logged: list[tuple[str, Image.Image, str]] = []
        self._limit = self.num_logged
        self._dir = Path(output_dir or ".")
        self._root = Path(".")
        self._names = UniqueNames()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved, self._logged, self._names = [], [], UniqueNames()
        self._limit = math.ceil(self.num_logged / max(1, trainer.world_size))
        # resolved once on every rank: trainer.log_dir is a collective under DDP
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self._dir = Path(self.output_dir) if self.output_dir is not None else root / self.subdir
        self._root = root

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for record in outputs or []:
            if not isinstance(record, dict) or not isinstance(record.get("picture"), Image.Image):
                continue
            self._dir.mkdir(parents=True, exist_ok=True)
            path = self._dir / f"{self._names(record['pair_id'])}.png"
            save_image_atomically(record["picture"], path)
            self.saved.append(path)
            if len(self._logged) < self._limit:
                caption = str(record.get("caption", record["pair_id"]))
                self._logged.append((str(record["pair_id"]), record["picture"], caption))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = getattr(pl_module, "predict_results", None)  # a lightning_modules.results.RunResults, if any
        if results is not None and trainer.is_global_zero:
            self._root.mkdir(parents=True, exist_ok=True)
            text = results.write(self._root)
            print("\n" + text + f"written to {self._root / results.filename}", flush=True)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.num_logged:
            return
        items = [i for part in gather_from_ranks(self._logged) for i in part]  # a collective: every rank
        if not trainer.is_global_zero or not items:
            return
        width = max(i[1].width for i in items)
        for logger in loggers:
            logger.log_image(key=self.key, images=[_pad_width(i[1], width) for i in items],
                             caption=[i[2] for i in items])
