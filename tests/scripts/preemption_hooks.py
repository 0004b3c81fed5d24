"""A test callback that times a SIGTERM to a precise point of a (multi-process) test run, by file handshakes.

Added to a run with ``--trainer.callbacks+=preemption_hooks.Handshake`` (``tests/scripts`` on ``PYTHONPATH``);
inert unless ``PREEMPTION_HANDSHAKE`` is set, so a printed resume command that repeats the flag runs plainly.

``PREEMPTION_HANDSHAKE=<folder>:<scenario>``:

- ``peer_in_sync``: rank 1 writes ``<folder>/at_sync.rank1`` when it enters the end-of-epoch metric sync (the
  module's ``on_test_epoch_end`` runs right after the callbacks'); rank 0, after its first batch, waits for that
  file, writes ``<folder>/ready`` and waits until it has received SIGTERM. Signal rank 0 once ``ready`` exists:
  it is running while rank 1 waits in the sync.
- ``waiting_rank``: the other way round: rank 0 writes ``at_sync.rank0`` on entering the sync; rank 1, after its
  first batch, waits for that file, writes ``ready`` and waits for SIGTERM (which reaches it only if rank 0
  forwards it). Signal rank 0 once ``ready`` exists: it is blocked in the sync.
- ``after:<N>``: every rank, after its N-th batch, writes ``ready.rank<R>`` and waits for SIGTERM. Signal once
  every rank's file exists: each has flushed exactly N batches.

Every wait is bounded (:data:`TIMEOUT`); a wait that runs out raises, so a broken handshake fails the run instead
of hanging it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L

ENV = "PREEMPTION_HANDSHAKE"
TIMEOUT = 120.0


def _wait(what: str, done) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"preemption handshake: waited {TIMEOUT:.0f} s for {what}")
        time.sleep(0.02)  # Python code between sleeps: the signal handlers run


class Handshake(L.Callback):
    """See the module docstring."""

    def __init__(self) -> None:
        spec = os.environ.get(ENV, "")
        folder, _, self.scenario = spec.partition(":")
        self.folder = Path(folder) if spec else None

    def _mark(self, name: str) -> None:
        assert self.folder is not None
        (self.folder / name).write_text(str(os.getpid()))

    def _wait_for_sigterm(self, trainer: L.Trainer) -> None:
        _wait("SIGTERM", lambda: trainer.received_sigterm)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.folder is None:
            return
        rank = trainer.global_rank
        if self.scenario.startswith("after:") and batch_idx + 1 == int(self.scenario[6:]):
            self._mark(f"ready.rank{rank}")
            self._wait_for_sigterm(trainer)
        elif batch_idx == 0 and (self.scenario, rank) in (("peer_in_sync", 0), ("waiting_rank", 1)):
            other = f"at_sync.rank{1 - rank}"
            _wait(other, (self.folder / other).exists)
            self._mark("ready")
            self._wait_for_sigterm(trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.folder is not None and (self.scenario, trainer.global_rank) in (("peer_in_sync", 1), ("waiting_rank", 0)):
            self._mark(f"at_sync.rank{trainer.global_rank}")
