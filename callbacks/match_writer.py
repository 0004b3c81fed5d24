"""The output lines of a predict run on own images: ``matches.jsonl`` (one strict-JSON line per pair)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import lightning as L

from datamodules.samplers import dataset_pair_ids
from lightning_modules.components.files import OutputWriteError, write_atomically
from lightning_modules.components.strict_json import dumps

from .prediction_writer import sort_records

__all__ = ["MatchWriter"]


class MatchWriter(L.Callback):
    """Writes the ``line`` of every record ``predict_step`` returns (:class:`lightning_modules.PointTransfer`)
    to ``<trainer.log_dir or default_root_dir>/<filename>``.

    The lines go to ``<filename>.partial`` beside it, flushed after every batch (a stopped run keeps the pairs it
    finished there); when the run ends they are put in the input's order (one process) and the file is written
    whole through a temporary name, so a reader never finds a torn one (a full disk leaves the previous run's
    file, or none). Under DDP rank ``r > 0`` writes ``<stem>.rank<r>.jsonl`` beside it (each process its own
    pairs).

    Args:
        filename: The file's name in the run folder.
    """

    def __init__(self, filename: str = "matches.jsonl") -> None:
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self.path: Path | None = None
        self._partial: Path | None = None
        self.lines = 0
        self._file: TextIO | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        name = self.filename
        if trainer.global_rank > 0:
            stem, dot, suffix = name.rpartition(".")
            name = f"{stem}.rank{trainer.global_rank}.{suffix}" if dot else f"{name}.rank{trainer.global_rank}"
        root.mkdir(parents=True, exist_ok=True)
        self.path, self.lines = root / name, 0
        self._partial = root / f"{name}.partial"
        self._file = self._partial.open("w", encoding="utf-8")

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._file is not None
        try:
            for record in outputs or []:
                if isinstance(record, dict) and isinstance(record.get("line"), dict):
                    self._file.write(dumps(record["line"]) + "\n")
                    self.lines += 1
            self._file.flush()
        except OSError as err:
            raise OutputWriteError(err.errno, f"could not write {self._partial}: {err.strerror or err} (the pairs "
                                   f"matched before are in it; {self.path} is written when the run ends)") from err

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        order = dataset_pair_ids(getattr(getattr(trainer, "datamodule", None), "test_dataset", None))
        if self.path is None or self._partial is None:
            return
        lines = [json.loads(line) for line in self._partial.read_text(encoding="utf-8").splitlines()]
        if trainer.world_size == 1 and order is not None:
            # the run goes image by image (cache hits); the file lists the pairs in the input's order
            lines = sort_records(lines, order)
        write_atomically(self.path, "".join(dumps(line) + "\n" for line in lines))
        self._partial.unlink(missing_ok=True)
        print(f"{self.lines} pairs matched: {self.path}", flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
