"""A test progress bar that shows pairs per second next to tqdm's elapsed / remaining time (the ETA)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["PairProgressBar"]


def _num_pairs(batch: Any) -> int:
    """Pairs in a batch: the pair datamodules collate to a list of sample dicts."""
    return len(batch) if isinstance(batch, (list, tuple)) else 1


class PairProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose test bar shows ``pairs/s`` (and any other ``prog_bar`` metric).

    Lightning's test bars count batches (``it/s``) and show no metrics; this one logs ``pairs/s`` (pairs
    since the start of the test divided by the elapsed time, times the number of processes: under DDP it is
    rank 0's rate extrapolated to all ranks) as a progress-bar metric (``logger=False``: the final throughput
    reaches the loggers through :class:`callbacks.WandbResults`) and puts the progress-bar metrics in the
    test bar's postfix. tqdm's ``[elapsed<remaining]`` is the ETA.

    Args:
        refresh_rate: Update the bar every this many batches.
        process_position: Bar position (several trainers in one process).
        leave: Leave the finished bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.pairs_per_second: float | None = None
        self._start = 0.0
        self._pairs = 0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._start, self._pairs, self.pairs_per_second = time.perf_counter(), 0, None

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        n = _num_pairs(batch)
        self._pairs += n
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            self.pairs_per_second = self._pairs * max(1, trainer.world_size) / elapsed
            pl_module.log("pairs/s", self.pairs_per_second, prog_bar=True, logger=False, on_step=True,
                          on_epoch=False, batch_size=n)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.test_progress_bar is not None and not self.is_disabled:
            metrics = self.get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # the logger's run id: noise in a test bar
            self.test_progress_bar.set_postfix(metrics, refresh=False)
