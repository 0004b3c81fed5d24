"""SIGTERM to multi-process runs (2 CPU DDP processes, gloo): every process stops within seconds with status
143, whatever it is doing, and the printed resume command finishes the run on any number of processes with
exactly the files of an uninterrupted run.

The runs are ``evaluate.py`` subprocesses, each in its own session (a failure kills the whole session, never
hangs the suite). The signal is timed by file handshakes (``tests/scripts/preemption_hooks.py``), not sleeps.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
from callbacks.prediction_writer import PARTIAL_GLOB, read_partial_records
from callbacks.run_folder import LOCK_FILE
from cli import SIGTERM_EXIT, resume_command
from datamodules import write_synthetic_spair

from conftest import REPO, SPAIR_CONFIG, TINY_OVERLAY
from test_distributed import _free_port, _results

HOOKS = REPO / "tests" / "scripts"
#: How long a handshake or a run may take before the test gives up (and kills the run's session).
RUN_TIMEOUT = 180.0
#: "Within seconds": from the SIGTERM to the exit of every process.
STOP_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """15 pairs: 8 for rank 0 and 7 for rank 1, one pair per batch."""
    return write_synthetic_spair(tmp_path_factory.mktemp("preemption") / "spair", categories=("cat", "dog", "bus"),
                                 images_per_category=4, pairs_per_category=5)


def _argv(root: Path, out: Path, devices: int, hooks: bool = True, batch_size: int = 1) -> list[str]:
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"] if devices == 2 else []
    return [str(REPO / "evaluate.py"), "test", "--config", SPAIR_CONFIG, "--config", TINY_OVERLAY,
            "--data.root", str(root), "--data.batch_size", str(batch_size), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out), *ddp,
            *(["--trainer.callbacks+=preemption_hooks.Handshake"] if hooks else [])]


def _env(handshake: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO)])}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PREEMPTION_HANDSHAKE"):
        env.pop(key, None)  # never inherit a process group's identity, nor a handshake
    if handshake is not None:
        env["PREEMPTION_HANDSHAKE"] = handshake
    return env


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python argv`` in its own session, its output in ``log``."""
    with open(log, "w") as handle:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=log.parent, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """End every process of the run's session (rank 0 and the ranks it launched) if any is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _session_alive(proc: subprocess.Popen) -> bool:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(paths: list[Path], proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"the run ended before the handshake:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no handshake within {RUN_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def _interrupt(argv: list[str], handshake: Path, scenario: str, ready: list[str], log: Path,
               every_process: bool = False) -> tuple[float, str]:
    """Run ``argv`` until the handshake's ``ready`` files exist, SIGTERM rank 0 (``every_process``: all of the
    run's processes, as a scheduler signalling the whole job), and wait for the whole session to end. Returns the
    seconds from the signal to the end of the last process, and the run's output."""
    handshake.mkdir()
    proc = _start(argv, _env(f"{handshake}:{scenario}"), log)
    try:
        _wait_for([handshake / name for name in ready], proc, log)
        signalled = time.monotonic()
        if every_process:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        while (proc.poll() is None or _session_alive(proc)) and time.monotonic() - signalled < STOP_TIMEOUT:
            time.sleep(0.05)
        seconds = time.monotonic() - signalled
        output = log.read_text()
        assert not _session_alive(proc), f"processes left {seconds:.0f} s after the SIGTERM:\n{output[-4000:]}"
        assert proc.returncode == SIGTERM_EXIT, output[-4000:]
        return seconds, output
    finally:
        _kill_session(proc)


def _flushed(out: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted(out.glob(PARTIAL_GLOB))}


@pytest.mark.parametrize("scenario,every_process", [("peer_in_sync", False), ("waiting_rank", False),
                                                    ("peer_in_sync", True)],
                         ids=["peer_in_sync", "waiting_rank", "peer_in_sync-every_process"])
def test_sigterm_while_a_rank_waits_in_the_metric_sync_stops_every_rank(scenario, every_process, root, tmp_path) -> None:
    """``peer_in_sync``: rank 0 (still scoring) is signalled while rank 1 waits in the end-of-epoch metric sync.
    ``waiting_rank``: rank 0 is signalled while it waits in the sync (blocked in gloo's all_gather) and rank 1
    is still scoring. ``every_process``: both get the SIGTERM. Before: both processes hung (Lightning broadcasts
    inside its SIGTERM handler; a process blocked in a collective runs no Python handler)."""
    out = tmp_path / "run"
    seconds, output = _interrupt(_argv(root, out, devices=2), tmp_path / "handshake", scenario, ["ready"],
                                 tmp_path / "run.log", every_process)
    assert seconds < STOP_TIMEOUT
    assert "the other processes stopped too: local rank 1 (exit status 143)" in output
    assert f"resume with:\n  {resume_command(_argv(root, out, devices=2))}" in output
    # what each rank had finished is kept: one batch of the rank that was scoring, the whole chunk of the other
    expected = {"peer_in_sync": [1, 7], "waiting_rank": [8, 1]}[scenario]
    assert _flushed(out) == {f"predictions.partial.rank{r}.jsonl": n for r, n in enumerate(expected)}
    assert len(read_partial_records(out)) == sum(expected)
    assert not (out / "results.json").exists() and not (out / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    """The reference of a batch size: the same run, one process, never stopped (in-process: the fastest)."""
    made: dict[int, Path] = {}

    def run(batch_size: int) -> Path:
        if batch_size not in made:
            made[batch_size] = tmp_path_factory.mktemp("uninterrupted") / "run"
            evaluate.main(_argv(root, made[batch_size], devices=1, hooks=False, batch_size=batch_size)[1:])
        return made[batch_size]

    return run


@pytest.mark.parametrize("before,after,batch_size,batches", [(2, 2, 4, 1), (2, 1, 1, 3), (1, 2, 1, 3)],
                         ids=["2-to-2", "2-to-1", "1-to-2"])
def test_the_printed_resume_command_finishes_the_run_on_any_number_of_processes(
    before, after, batch_size, batches, root, uninterrupted, tmp_path
) -> None:
    """SIGTERM to rank 0 after every rank flushed ``batches`` batches, then the printed command (with another
    ``--trainer.devices`` where the process count changes). 2-to-2 in batches of 4 (the benchmark configs'
    size): the resumed batches hold other pairs than the uninterrupted run's. Before: the 2-process resume
    failed with ``order must be a permutation of range(15), got 7 indices``."""
    reference = uninterrupted(batch_size)
    out = tmp_path / "run"
    argv = _argv(root, out, devices=before, batch_size=batch_size)
    _, output = _interrupt(argv, tmp_path / "handshake", f"after:{batches}",
                           [f"ready.rank{r}" for r in range(before)], tmp_path / "run.log")
    assert sum(_flushed(out).values()) == batches * batch_size * before
    command = output.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert command == resume_command(argv)
    devices = {1: ["--trainer.devices", "1", "--trainer.strategy", "auto"],
               2: ["--trainer.devices", "2", "--trainer.strategy", "ddp"]}[after] if after != before else []
    log = tmp_path / "resumed.log"
    proc = _start([*shlex.split(command)[1:], *devices], _env(), log)
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert (out / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert _results(out) == _results(reference)
    assert json.loads((out / "results.json").read_text())["num_pairs"] == 15
    assert not list(out.glob(PARTIAL_GLOB)) and not (out / LOCK_FILE).exists()


def test_the_distributed_sampler_splits_a_resumed_runs_unfinished_pairs() -> None:
    """A resumed run evaluates some pairs of the dataset: its order holds distinct indices, not all of them."""
    from datamodules.samplers import ContiguousDistributedSampler

    dataset, order = list(range(15)), [14, 3, 7, 0, 9, 12, 5, 1, 10]
    chunks = [list(ContiguousDistributedSampler(dataset, order=order, num_replicas=2, rank=r)) for r in range(2)]
    assert chunks == [order[:5], order[5:]]
    for bad in ([1, 1, 2], [0, 15]):
        with pytest.raises(ValueError, match=r"permutation of range\(15\) or of part of it"):
            ContiguousDistributedSampler(dataset, order=bad, num_replicas=2, rank=0)


def test_a_sigterm_outside_any_batch_stops_at_once_but_never_cuts_the_final_write(tmp_path) -> None:
    """Where no batch runs (here: no trainer at all) a SIGTERM ends the process at once, with 143 and the stop
    message; inside ``deferred()`` (rank 0 writing the run's final files) the block is finished first."""
    script = tmp_path / "stop.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from callbacks import preemption\n"
        "stop = preemption.install(True, 'stopped by SIGTERM.', 'python resume.py')\n"
        "with preemption.deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    while not stop.requested:\n"
        "        time.sleep(0.01)\n"
        "    print('the final files are written', flush=True)\n"
        "if sys.argv[1] == 'again':\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('went on', flush=True)\n"
    )
    env = {**_env(), "PYTHONPATH": str(REPO)}
    for again, status in ((False, 0), (True, SIGTERM_EXIT)):
        done = subprocess.run([sys.executable, str(script), "again" if again else "once"], env=env,
                              capture_output=True, text=True, timeout=25)
        assert done.returncode == status, done.stderr
        assert "the final files are written" in done.stdout
        assert ("went on" in done.stdout) is not again
        assert ("stopped by SIGTERM.\nresume with:\n  python resume.py" in done.stderr) is again


def test_one_sigterm_seen_late_by_the_watcher_is_acted_on_once(tmp_path) -> None:
    """One SIGTERM reaches the process on two paths (the Python handler on the main thread and the watcher
    thread, woken through the wakeup fd) in either order. When the handler sees it inside ``deferred()`` and the
    watcher only after the block, the process goes on and exits 0 with no stop message (CI once saw the late
    watcher stop a run that had finished its final files: the stop message with exit 0). A second SIGTERM,
    on whichever path, still stops it."""
    script = tmp_path / "late.py"
    script.write_text(
        "import sys\n"
        "from callbacks import preemption\n"
        "stop = preemption.install(True, 'stopped by SIGTERM.', 'python resume.py')\n"
        "with preemption.deferred():\n"
        "    stop.on_sigterm('handler')\n"
        "    print('the final files are written', flush=True)\n"
        "stop.on_sigterm('watcher')\n"
        "print('went on', flush=True)\n"
        "if sys.argv[1] == 'again':\n"
        "    stop.on_sigterm('watcher')\n"
        "    print('not stopped', flush=True)\n"
    )
    env = {**_env(), "PYTHONPATH": str(REPO)}
    for again, status in ((False, 0), (True, SIGTERM_EXIT)):
        done = subprocess.run([sys.executable, str(script), "again" if again else "once"], env=env,
                              capture_output=True, text=True, timeout=25)
        assert done.returncode == status, done.stderr
        assert "went on" in done.stdout and "not stopped" not in done.stdout
        assert ("stopped by SIGTERM." in done.stderr) is again
