"""One run per folder: a lock while a run writes, the settings that made its predictions, and refusals.

A test run writes into one folder (``--trainer.default_root_dir``). While it runs it holds ``run.lock``
(process id, host, start time); it records the settings its predictions depend on in ``run.json``. From that:

- a second run started into a folder whose lock a live process holds is refused (a lock left by a process
  that died is taken over, with a warning);
- a fresh run into a folder holding a finished run's files is refused unless ``overwrite`` is set (then the
  old run's files are removed first, so nothing is left mismatched);
- ``--resume`` into a folder made with other prediction settings is refused, naming the fields that differ;
  settings that cannot change predictions (loggers, callbacks, devices, workers, batch size, the feature
  cache, the seed) may differ.

Plain Python (no Lightning): :class:`callbacks.CorrespondenceWriter` claims and releases the folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_modules.components.strict_json import dumps

__all__ = [
    "LOCK_FILE",
    "OUTPUT_FILES",
    "RUN_FILE",
    "RunFolderError",
    "claim_run_folder",
    "flatten_config",
    "prediction_settings",
    "release_run_folder",
    "settings_differences",
]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
#: The files of a finished run (written at its end; results.json, first here, is written last of them).
OUTPUT_FILES = ("results.json", "predictions.jsonl", "ablation.md", "ablation.csv", "analysis.md")
#: Flushed batches of an interrupted run (one file per process).
PARTIAL_GLOB = "predictions.partial.rank*.jsonl"

#: Dotted config keys (as :func:`flatten_config` writes them, and key prefixes ending in "." or "_") that
#: cannot change a test run's predictions: loggers, callbacks and devices (``trainer.``), workers and batch
#: size, the seed (every random draw of the pipeline has its own generator), the training splits, and where a
#: config came from.
IGNORED_SETTINGS = (
    "config", "resume", "overwrite", "verbose", "weights_only", "seed_everything", "trainer.", "data.num_workers",
    "data.batch_size", "data.train_", "data.val_", "data.shuffle_seed",
)  # fmt: skip
#: Last fields of keys that cannot change predictions wherever they sit: the feature cache (its entries are
#: exact, keyed by everything the features depend on).
IGNORED_FIELDS = ("feature_cache_gb", "feature_cache_dir")
#: Exceptions to ``trainer.``: numeric precision changes the features.
KEPT_SETTINGS = ("trainer.precision",)


class RunFolderError(RuntimeError):
    """The run folder is in use, holds a finished run, or holds a run made with other settings."""


def flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dotted.key": value}`` (lists are values), keyed as the flags are typed: without
    the ``init_args`` level of class nodes (``model.pipeline.alpha`` for ``model.init_args.pipeline.init_args.alpha``)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten_config(item, prefix if key == "init_args" else f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def prediction_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config entries a run's predictions depend on, as ``{"dotted.key": value}`` (JSON-able).

    Args:
        config: The run's resolved config (the CLI's, as a nested dict).
    """
    flat = flatten_config(json.loads(json.dumps(config, default=str)))
    return {  # an unset (null) setting is left out: a key missing from a recorded run means null
        key: value for key, value in sorted(flat.items())
        if value is not None and (key in KEPT_SETTINGS or not _ignored(key))
    }


def _ignored(key: str) -> bool:
    if key.endswith("__path__") or key.rsplit(".", 1)[-1] in IGNORED_FIELDS:  # __path__: where a node came from
        return True
    return any(key == i or (i.endswith((".", "_")) and key.startswith(i)) for i in IGNORED_SETTINGS)


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: recorded -> current"`` for every prediction setting that differs (a missing key counts as null)."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old != new:
            lines.append(f"{key}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return lines


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_lock(folder: Path) -> None:
    """Create ``run.lock`` exclusively, or take over one whose process is gone."""
    lock = folder / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    for _ in range(2):
        try:
            with open(lock, "x") as handle:
                handle.write(json.dumps(mine))
            return
        except FileExistsError:
            pass
        try:
            holder = json.loads(lock.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        same_host = host == mine["host"]
        if same_host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            raise RunFolderError(
                f"{folder} is in use: another run (process {pid}, started {holder.get('started')}) holds {lock}. "
                "Wait for it, or give this run another --trainer.default_root_dir."
            )
        if not same_host and host is not None:
            raise RunFolderError(
                f"{folder} may be in use: a run on host {host} (process {pid}) holds {lock}. If no run is "
                f"active there, delete {lock}; otherwise give this run another --trainer.default_root_dir."
            )
        log.warning("run folder: taking over %s left by process %s, which is no longer running", lock, pid)
        lock.unlink(missing_ok=True)
    raise RunFolderError(f"could not take the lock {lock}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def claim_run_folder(
    folder: Path, settings: Mapping[str, Any] | None, resume: bool, overwrite: bool = False
) -> dict[str, Any]:
    """Take ``folder`` for this run, or refuse with :class:`RunFolderError`.

    Args:
        folder: The run's output folder (created if missing).
        settings: :func:`prediction_settings` of this run; None when unknown (no CLI config): then a resume
            cannot be checked and is refused if the folder recorded settings.
        resume: Continue the interrupted run found in ``folder``.
        overwrite: Replace a finished run's files instead of refusing.

    Returns:
        The run record written to ``run.json`` (``settings``, ``started``).

    Raises:
        RunFolderError: The folder is locked by a live run; it holds a finished run (without ``overwrite``,
            or with ``resume``); a resume's settings differ from the recorded ones.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _take_lock(folder)
    try:
        record = _check_and_record(folder, settings, resume, overwrite)
    except BaseException:
        release_run_folder(folder)
        raise
    return record


def _check_and_record(folder: Path, settings: Mapping[str, Any] | None, resume: bool, overwrite: bool) -> dict[str, Any]:
    outputs = [name for name in OUTPUT_FILES if (folder / name).exists()]
    run_file = folder / RUN_FILE
    recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
    partial = sorted(folder.glob(PARTIAL_GLOB))
    # results.json is written last: outputs without it beside flushed predictions are a final write that failed
    # (a full disk), which a resume completes
    finished = outputs if (folder / OUTPUT_FILES[0]).exists() or not partial else []
    if resume and finished:
        raise RunFolderError(
            f"nothing to resume in {folder}: it holds a finished run ({', '.join(finished)}). Start a fresh "
            "run in another folder, or rerun it here with --overwrite true."
        )
    if resume and partial:
        before = None if recorded is None else recorded.get("settings")
        if before is None or settings is None:
            raise RunFolderError(
                f"cannot resume {folder}: nothing records which settings made its flushed predictions "
                f"({RUN_FILE} is missing or incomplete). Start a fresh run (without --resume)."
            )
        differences = settings_differences(before, settings)
        if differences:
            raise RunFolderError(
                f"cannot resume {folder}: its flushed predictions were made with other settings "
                "(recorded -> now):\n  " + "\n  ".join(differences) + "\nResume with the recorded settings, or "
                "start a fresh run in another folder."
            )
        return recorded
    if finished:
        if not overwrite:
            raise RunFolderError(
                f"{folder} holds a finished run ({', '.join(finished)}); a new run would overwrite it. Give it "
                "another --trainer.default_root_dir, or pass --overwrite true to replace it."
            )
        for name in (*OUTPUT_FILES, RUN_FILE):
            (folder / name).unlink(missing_ok=True)
        log.warning("run folder: replacing the finished run in %s (overwrite)", folder)
    if partial and not resume:
        log.warning("run folder: a fresh run discards %d flushed file(s) of an interrupted run in %s "
                    "(resume it with --resume true instead)", len(partial), folder)
        for path in [*partial, *(folder / name for name in outputs)]:
            path.unlink(missing_ok=True)
    record = {"settings": dict(settings) if settings is not None else None, "started": _now()}
    tmp = run_file.with_name(run_file.name + ".partial")
    tmp.write_text(dumps(record, indent=2))
    os.replace(tmp, run_file)
    return record


def release_run_folder(folder: Path) -> None:
    """Give the folder's lock back (only this process's own lock)."""
    lock = folder / LOCK_FILE
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
