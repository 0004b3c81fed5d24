"""SIGTERM (a scheduler's preemption) in one or many processes: every process stops within seconds, status 143.

Lightning's own SIGTERM handler broadcasts a tensor *inside the signal handler*. Under DDP that collective meets
whatever the other processes are doing (one waiting in the end-of-epoch metric sync, say) and every process
hangs; and a process blocked in a collective never runs a Python signal handler at all, so it can neither stop
nor pass the signal on. Here instead:

- The C-level signal handler wakes a watcher thread (:func:`signal.set_wakeup_fd`), which acts even while the
  main thread is blocked in a collective. It passes the SIGTERM on to the processes Lightning launched (ranks
  > 0 of a ``--trainer.devices N --trainer.strategy ddp`` run) and then, depending on where the run is:

  * **while batches run** (test, predict, validate; the whole of fit): the loop stops after the current batch
    (:class:`PreemptionGuard` raises Lightning's ``SIGTERMException`` once every callback has flushed it; fit
    stops the Lightning way, all processes together after the current step);
  * **anywhere else** (loading models, claiming the run folder, the end-of-epoch metric sync, the gathering
    of predictions): nothing is left to finish, so the process stops at once, collectives or not. A process
    waiting in a collective for one that stopped is stopped by its own SIGTERM (or by the peer's closed
    connection, which then counts as the stop);
  * **while rank 0 writes the run's final files** (:func:`deferred`): it finishes them, and the run, complete,
    ends normally (a second SIGTERM after that stops it at once).

- No collective runs in a signal handler or on the way out. Rank 0 waits (at most :data:`CHILD_WAIT_S`) for
  the processes it launched, names how each ended, prints the stop message (``cli.run_script`` gives the
  resume command) and exits with :data:`SIGTERM_EXIT`; every other process exits with it too. A process still
  running :data:`STOP_DEADLINE_S` after the SIGTERM (stuck in a collective on a backend that does not notice a
  peer that stopped) stops anyway.

``cli.run_script`` installs the handler (:func:`install`) in every process of a script; the CLI's trainers get a
:class:`PreemptionGuard` and a signal connector without Lightning's broadcast (:func:`attach`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SIGTERM_EXIT", "Preemption", "PreemptionGuard", "attach", "current", "deferred", "install", "on_stop"]

#: The exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it).
SIGTERM_EXIT = 143
#: How long rank 0 waits for the processes it launched to stop before it kills them.
CHILD_WAIT_S = 30.0
#: How long a process may take to reach the end of its current batch (or step) after a SIGTERM before it
#: stops anyway (a process stuck in a collective whose peers are gone, on a backend that never notices).
STOP_DEADLINE_S = 120.0

_STOP_AT_ONCE, _STOP_AFTER_BATCH = "at once", "after the batch"
_current: Preemption | None = None


def current() -> Preemption | None:
    """This process's installed handler, if any."""
    return _current if _current is not None and _current.pid == os.getpid() else None


def install(is_rank_zero: bool, message: str, resume_hint: str | None = None) -> Preemption:
    """Install the SIGTERM handling of this process (once; from the main thread). See the module docstring.

    Args:
        is_rank_zero: Whether this process prints the stop message (rank 0, or the only process).
        message: The first lines of the stop message.
        resume_hint: The command that resumes the run, printed after the message.
    """
    global _current
    if current() is None:
        _current = Preemption(is_rank_zero, message, resume_hint)
        _current._install()
    _current.is_rank_zero, _current.message, _current.resume_hint = is_rank_zero, message, resume_hint
    return _current


def attach(trainer: L.Trainer) -> None:
    """Make ``trainer`` stop the way this module describes: a signal connector that never broadcasts, and a
    :class:`PreemptionGuard` (appended: it runs after every other callback of a batch, which has then been
    written). Without :func:`install` a SIGTERM only sets ``trainer.received_sigterm`` and is passed on to the
    processes Lightning launched (Lightning's behaviour, without the collective in the handler)."""
    trainer._signal_connector = _NoCollectiveSignalConnector(trainer)
    if not any(isinstance(c, PreemptionGuard) for c in trainer.callbacks):
        trainer.callbacks.append(PreemptionGuard())
    preemption = current()
    launcher = getattr(trainer.strategy, "launcher", None)
    if preemption is not None and launcher is not None and all(launcher is not known for known in preemption.launchers):
        preemption.launchers.append(launcher)


def on_stop(cleanup: Callable[[], None]) -> None:
    """Call ``cleanup`` when a SIGTERM stops this process, whichever thread stops it (once per callable)."""
    preemption = current()
    if preemption is not None and cleanup not in [ref() for ref in preemption.cleanups]:
        preemption.cleanups.append(weakref.WeakMethod(cleanup))  # type: ignore[arg-type]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a SIGTERM does not cut short (rank 0 writing the run's final files): the process goes on
    after it; only a SIGTERM after the block stops it (at once, where no batch runs)."""
    preemption = current()
    if preemption is None:
        yield
        return
    with preemption.lock:
        preemption.deferring += 1
    try:
        yield
    finally:
        with preemption.lock:
            preemption.deferring -= 1


def _launched_processes(launchers: list[Any]) -> list[Any]:
    """The processes Lightning's launchers started from this one (``subprocess.Popen``; none in other ranks)."""
    return [proc for launcher in launchers for proc in getattr(launcher, "procs", None) or []]


def _disarm_child_observer() -> None:
    """Lightning's observer SIGKILLs every process 5 s after a child exits non-zero: after a SIGTERM the
    children exit with 143 on purpose, and rank 0 waits for them itself (:meth:`Preemption.stop`)."""
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._run = lambda: True  # type: ignore[method-assign] # its loop ends at its next look
            thread._terminate_all = lambda: None  # type: ignore[method-assign]


class Preemption:
    """The SIGTERM state of one process (see the module docstring); made by :func:`install`."""

    def __init__(self, is_rank_zero: bool, message: str, resume_hint: str | None) -> None:
        self.pid = os.getpid()
        self.is_rank_zero = is_rank_zero
        self.message = message
        self.resume_hint = resume_hint
        self.lock = threading.RLock()
        #: A SIGTERM arrived.
        self.requested = False
        #: What a SIGTERM does now: stop at once, or let the current batch (or step) finish.
        self.mode = _STOP_AT_ONCE
        #: Depth of :func:`deferred` blocks.
        self.deferring = 0
        #: Called once on the way out, whichever thread stops the process (give the run folder back); weak
        #: references, so that an object is not kept alive by being registered.
        self.cleanups: list[weakref.WeakMethod] = []
        #: The launchers of the CLI's trainers (rank 0 of a Lightning-launched run: the other ranks' processes).
        self.launchers: list[Any] = []
        self._stopping = False
        #: SIGTERMs seen by each of the two paths one signal takes (the watcher thread, woken through the
        #: wakeup fd, and the Python-level handler on the main thread), and how many have been acted on: one
        #: signal is acted on once, whichever path sees it first.
        self._seen = {"watcher": 0, "handler": 0}
        self._acted = 0

    # ------------------------------------------------------------------------------------ signal plumbing
    def _install(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGTERM, _python_handler)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        os.register_at_fork(after_in_child=_reset_in_forked_child)
        threading.Thread(target=self._watch, args=(read_fd,), name="sigterm-watcher", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum == signal.SIGTERM:
                    self.on_sigterm("watcher")

    def on_sigterm(self, path: str = "watcher") -> None:
        """A SIGTERM arrived, seen on ``path`` ("watcher" or "handler"): pass it on, then stop at once or let
        the batch finish. Each signal reaches this twice (once on each path, in either order); the second sight
        of the same signal does nothing, or a SIGTERM inside :func:`deferred` would stop the process after the
        block, when the later path catches up."""
        with self.lock:
            self._seen[path] += 1
            if self._seen[path] <= self._acted:
                return  # the other path has acted on this signal already
            self._acted = self._seen[path]
            first = not self.requested
            self.requested = True
            if first:
                for proc in _launched_processes(self.launchers):
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                _disarm_child_observer()
                deadline = threading.Timer(STOP_DEADLINE_S, self.stop_now)
                deadline.daemon = True
                deadline.start()
            if self.mode == _STOP_AFTER_BATCH or self.deferring:
                return
        self.stop_now()

    # ----------------------------------------------------------------------------------- modes (guard)
    def running_batches(self) -> None:
        """Batches are running: a SIGTERM lets the current one finish."""
        with self.lock:
            self.mode = _STOP_AFTER_BATCH

    def batches_done(self, last: bool) -> None:
        """A batch (``last``: the last one) has been written: stop now if a SIGTERM came, else go on."""
        with self.lock:
            if self.requested:
                raise SIGTERMException()
            if last:
                self.mode = _STOP_AT_ONCE

    def nothing_to_finish(self) -> None:
        with self.lock:
            self.mode = _STOP_AT_ONCE

    # ---------------------------------------------------------------------------------------- stopping
    def stop_now(self) -> None:
        """Stop this process now (from the watcher thread: the main thread may be blocked in a collective)."""
        if self._begin_stop(from_watcher=True):
            self._finish()
            os._exit(SIGTERM_EXIT)

    def stop(self) -> None:
        """Stop this process, from the main thread (``SIGTERMException`` reached ``cli.run_script``)."""
        if not self._begin_stop(from_watcher=False):
            while True:  # the watcher is on its way out and ends the process
                time.sleep(1)
        self._finish()
        raise SystemExit(SIGTERM_EXIT)

    def _begin_stop(self, from_watcher: bool) -> bool:
        """Whether this thread stops the process (not if another one does, nor inside a :func:`deferred` block)."""
        with self.lock:
            if self._stopping or (from_watcher and self.deferring):
                return False
            self._stopping = True
            return True

    def _finish(self) -> None:
        """Give the run folder back, wait for the launched processes and print the stop message (rank 0)."""
        for ref in self.cleanups:
            cleanup = ref()
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
        ended = self._wait_for_launched()
        if self.is_rank_zero:
            lines = [self.message]
            if ended:
                lines.append("the other processes stopped too: " + ", ".join(ended))
            if self.resume_hint:
                lines.append(f"resume with:\n  {self.resume_hint}")
            print("\n" + "\n".join(lines), file=sys.stderr, flush=True)
        sys.stdout.flush()

    def _wait_for_launched(self) -> list[str]:
        deadline = time.monotonic() + CHILD_WAIT_S
        ended = []
        procs = _launched_processes(self.launchers)
        for rank, proc in enumerate(procs, start=1):
            try:
                status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                ended.append(f"local rank {rank} (exit status {status})" if status >= 0
                             else f"local rank {rank} (killed by signal {-status})")
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: it does not stop; make sure it does
                proc.kill()
                proc.wait()
                ended.append(f"local rank {rank} (did not stop within {CHILD_WAIT_S:.0f} s: killed)")
        return ended


def _python_handler(signum: int, frame: Any) -> None:
    """The Python-level SIGTERM handler. The watcher thread, woken by the C-level handler, has usually acted
    already (this runs only when the main thread is between bytecodes); it acts here in case something else
    took the wakeup fd (:meth:`Preemption.on_sigterm` acts once per signal)."""
    preemption = current()
    if preemption is not None:
        preemption.on_sigterm("handler")


def _reset_in_forked_child() -> None:
    """A forked child (a DataLoader worker) gets the default SIGTERM back and no wakeup fd: its signals must
    neither reach the parent's watcher through the shared pipe nor be ignored."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _NoCollectiveSignalConnector(_SignalConnector):
    """Lightning's signal connector without the broadcast in the SIGTERM handler; ``received_sigterm`` is also
    true once this process's :class:`Preemption` has seen a SIGTERM (even one from before the run started)."""

    @property  # type: ignore[override]
    def received_sigterm(self) -> bool:
        preemption = current()
        return self._received or (preemption is not None and preemption.requested)

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:
        self._received = value

    def _sigterm_notifier_fn(self, signum: Any, _: Any) -> None:
        if current() is not None:
            return  # the watcher thread passed it on and acts on it
        if not self._received:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self._received = True


class PreemptionGuard(L.Callback):
    """Tells this process's :class:`Preemption` where the run is, and stops the loop after a batch once a
    SIGTERM came (every callback before it, the prediction writer included, has then written the batch).

    Appended to the CLI's trainers by :func:`attach`; does nothing without :func:`install`.
    """

    @staticmethod
    def _running() -> None:
        preemption = current()
        if preemption is not None:
            preemption.running_batches()

    @staticmethod
    def _batch_done(loop: Any) -> None:
        preemption = current()
        if preemption is not None:
            preemption.batches_done(last=bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False)))

    @staticmethod
    def _done() -> None:
        preemption = current()
        if preemption is not None:
            preemption.batches_done(last=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._running()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running()  # Lightning's loop stops all processes together after the current step

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_done(trainer.test_loop)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_done(trainer.predict_loop)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "validate":
            self._batch_done(trainer.validate_loop)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._done()

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._done()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._done()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preemption = current()
        if preemption is not None:
            preemption.nothing_to_finish()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        preemption = current()
        if preemption is not None:
            preemption.nothing_to_finish()
