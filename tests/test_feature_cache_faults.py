"""The on-disk feature cache when its disk fails it: a file-size limit, a full disk, a writer killed mid-write.

A failed write is one warning naming the folder and what to do, and the run goes on with the features it
computed (the same numbers, no torn entry); a writer killed in the middle leaves a temporary file that the
next run removes. The limits are real: ``RLIMIT_FSIZE`` (``ulimit -f``) in a subprocess always, a small tmpfs
where this machine lets the tests mount one (root), and a write shim for a full disk everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules import write_synthetic_spair
from lightning_modules.components import feature_cache as fc
from lightning_modules.components.feature_cache import FeatureCache, tensors_checksum

from conftest import REPO, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
CPU = torch.device("cpu")


def _leftovers(directory: Path) -> list[str]:
    """Every file of the cache folder that is not a finished entry (temporary files of any writer)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.suffix != ".safetensors")


def _assert_entries_whole(directory: Path) -> int:
    """Every entry in the folder reads back and matches its checksum (no torn entry); returns how many."""
    from safetensors import safe_open

    entries = sorted(directory.rglob("*.safetensors"))
    for path in entries:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata()
            stored = [handle.get_tensor(str(i)) for i in range(int(meta["count"]))]
        assert meta["checksum"] == tensors_checksum(stored), path
    return len(entries)


def _assert_one_clear_warning(text: str, directory: Path, flag: str = "--model.pipeline.feature_cache_dir") -> str:
    lines = [line for line in text.splitlines() if "feature cache: cannot write" in line]
    assert len(lines) == 1, text[-3000:]
    line = lines[0]
    assert str(directory) in line and f"{flag} DIR" in line and f"{flag} null" in line and "bigger disk" in line, line
    return line


# ------------------------------------------------------------------------------- a failed write, unit level

#: Writes a 256 KiB entry, then a 16-byte one, then asks for both again, under a file-size limit (argv[2]
#: bytes; 0: none). Prints per fetch [computed, values right].
WRITER = r"""
import json, resource, sys, torch
from lightning_modules.components.feature_cache import FeatureCache
directory, limit = sys.argv[1], int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
values = {"big": torch.arange(65536, dtype=torch.float32), "small": torch.ones(4)}
cache = FeatureCache(memory_bytes=1 << 30, directory=directory)
report = []
for keys in (["big"], ["small"], ["big", "small"]):
    features, computed = cache.fetch(keys, lambda idx, keys=keys: [(values[keys[i]].clone(),) for i in idx], torch.device("cpu"))
    report.append([computed, all(torch.equal(f[0], values[k]) for f, k in zip(features, keys))])
print(json.dumps(report))
"""


def _run_writer(directory: Path, limit: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(directory), str(limit)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_a_file_size_limit_is_one_warning_naming_the_cache_and_the_run_goes_on(tmp_path: Path) -> None:
    """``ulimit -f`` (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG): was the bare
    ``Error while serializing: I/O error: File too large (os error 27)`` and a crash."""
    directory = tmp_path / "cache"
    done = _run_writer(directory, limit=64 << 10)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [[1, True], [1, True], [0, True]]  # memory still serves the third
    line = _assert_one_clear_warning(done.stderr, directory)
    assert "file-size limit" in line
    assert _leftovers(directory) == [] and _assert_entries_whole(directory) == 0  # nothing torn, nothing left


def test_a_full_disk_shim_is_one_warning_no_torn_entry(tmp_path: Path, monkeypatch, caplog) -> None:
    """ENOSPC after half an entry's bytes (a write shim: runs everywhere)."""
    def half_then_full(path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fc, "_write_new", half_then_full)
    cache = FeatureCache(memory_bytes=0, directory=tmp_path)
    values = {"a": torch.randn(300), "b": torch.randn(7)}
    with caplog.at_level("WARNING"):
        for keys in (["a"], ["b", "a"]):
            features, computed = cache.fetch(keys, lambda idx, keys=keys: [(values[keys[i]].clone(),) for i in idx], CPU)
            assert computed == len(keys) and all(torch.equal(f[0], values[k]) for f, k in zip(features, keys))
    line = _assert_one_clear_warning(caplog.text, tmp_path)
    assert "the disk is full" in line and cache.writes_failed
    assert _leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.safetensors"))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 96 KiB tmpfs (root only: skipped where it cannot be mounted)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); the ulimit and shim variants cover the code")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the ulimit and shim "
                    "variants cover the code")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


def test_a_full_tmpfs_is_one_warning_and_the_run_goes_on(small_tmpfs: Path) -> None:
    directory = small_tmpfs / "cache"
    done = _run_writer(directory)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [[1, True], [1, True], [0, True]]
    assert "the disk is full" in _assert_one_clear_warning(done.stderr, directory)
    assert _leftovers(directory) == [] and _assert_entries_whole(directory) == 0


# ------------------------------------------------------------------------ a failed write, a whole evaluation


@pytest.fixture(scope="module")
def spair(tmp_path_factory) -> Path:
    return write_synthetic_spair(tmp_path_factory.mktemp("spair") / "spair", categories=("cat", "dog"),
                                 pairs_per_category=2)


def _evaluate(root: Path, out: Path, cache: Path | None, limit: int = 0) -> subprocess.CompletedProcess:
    args = ["test", "--config", SPAIR, "--config", TINY, "--data.root", str(root), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--model.pipeline.feature_cache_dir", "null" if cache is None else str(cache),
            "--trainer.default_root_dir", str(out)]

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], env=ENV, cwd=out.parent,
                          capture_output=True, text=True, timeout=600, preexec_fn=limited if limit else None)


@pytest.fixture(scope="module")
def reference(spair: Path, tmp_path_factory) -> Path:
    """The same evaluation without a disk cache."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = _evaluate(spair, out, None)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_run(a: Path, b: Path) -> None:
    results = [json.loads((run / "results.json").read_text()) for run in (a, b)]
    assert results[0]["pck"] == results[1]["pck"]
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()


def test_evaluate_under_a_file_size_limit_warns_once_and_scores_the_same(spair, reference, tmp_path) -> None:
    """The issue's case: the run's own files (a few KB) fit under the limit, the cache entries (27 KB and more)
    do not. Was exit 1 with ``Error while serializing: I/O error: File too large (os error 27)``."""
    cache = tmp_path / "cache"
    done = _evaluate(spair, tmp_path / "run", cache, limit=16 << 10)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_one_clear_warning(done.stderr, cache)
    _same_run(reference, tmp_path / "run")
    assert _leftovers(cache) == [] and _assert_entries_whole(cache) == 0


def test_evaluate_with_the_cache_on_a_full_tmpfs_scores_the_same(spair, reference, small_tmpfs, tmp_path) -> None:
    cache = small_tmpfs / "cache"
    done = _evaluate(spair, tmp_path / "run", cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the disk is full" in _assert_one_clear_warning(done.stderr, cache)
    _same_run(reference, tmp_path / "run")
    assert _leftovers(cache) == []
    _assert_entries_whole(cache)  # the entries written before the disk filled are whole


# ----------------------------------------------------------------------------------- a writer killed mid-write

#: Writes one entry and stops (prints "stopped", waits on stdin) where argv[2] says: "rename" after its bytes are
#: in the temporary file, before the rename; "half" with half of them written.
KILLED = r"""
import os, sys, torch
from lightning_modules.components import feature_cache as fc
directory, where = sys.argv[1], sys.argv[2]
def stop():
    print("stopped", flush=True)
    sys.stdin.read()
if where == "rename":
    os.replace = lambda src, dst: stop()
else:
    def half(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        stop()
    fc._write_new = half
value = torch.arange(4096, dtype=torch.float32)
fc.FeatureCache(memory_bytes=0, directory=directory).fetch(["a"], lambda idx: [(value.clone(),)], torch.device("cpu"))
print("finished", flush=True)
"""


@pytest.mark.parametrize("where", ["rename", "half"])
def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_run(tmp_path: Path, where: str, caplog) -> None:
    """SIGKILL timed by a hook in the writer (not a sleep): was a temporary file left in the cache for good."""
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), where], env=ENV, cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "stopped", child.stderr.read()[-3000:]
        assert _leftovers(tmp_path), "the writer stopped before creating its temporary file"
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    value = torch.arange(4096, dtype=torch.float32)
    cache = FeatureCache(memory_bytes=0, directory=tmp_path)
    with caplog.at_level("WARNING"):
        features, computed = cache.fetch(["a"], lambda idx: [(value.clone(),)], CPU)
    assert computed == 1 and torch.equal(features[0][0], value)
    assert _leftovers(tmp_path) == [] and _assert_entries_whole(tmp_path) == 1
    assert "removed 1 temporary file(s) left by interrupted writes" in caplog.text
    features, computed = FeatureCache(memory_bytes=0, directory=tmp_path).fetch(["a"], lambda idx: [], CPU)
    assert computed == 0 and torch.equal(features[0][0], value)


def test_only_dead_or_old_writers_temporaries_are_removed(tmp_path: Path) -> None:
    """A live writer's temporary file stays; a dead one's, an old one's and an old ``.tmpXXXXXX`` (what
    safetensors' save_file left when killed) go; other files are never touched."""
    entry = FeatureCache(memory_bytes=0, directory=tmp_path).path_for("a")
    entry.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        files = {
            "live": fc.temporary_path(entry, live.pid),
            "dead": fc.temporary_path(entry, dead.pid),
            "old_other_host": entry.with_name(f"{entry.name}.elsewhere.{live.pid}.partial"),
            "new_other_host": entry.with_name(f"{entry.name}.elsewhere.{dead.pid}.partial"),
            "old_legacy": entry.parent / ".tmpAbC123",
            "new_legacy": entry.parent / ".tmpXyZ789",
            "old_unrelated": entry.parent / "notes.txt",
        }
        for path in files.values():
            path.write_bytes(b"")
        two_hours_ago = time.time() - 7200
        for name in ("old_other_host", "old_legacy", "old_unrelated"):
            os.utime(files[name], (two_hours_ago, two_hours_ago))
        FeatureCache(memory_bytes=0, directory=tmp_path).fetch(["b"], lambda idx: [(torch.ones(2),)], CPU)
        kept = {name for name, path in files.items() if path.exists()}
        assert kept == {"live", "new_other_host", "new_legacy", "old_unrelated"}
    finally:
        live.communicate(input=b"", timeout=60)
