"""Output files are written whole or not at all (``lightning_modules/components/files.py``).

A full disk or a file-size limit while a run writes ``results.json``, a table, a picture or a checkpoint leaves
the previous file (or none) and no temporary file, and the error names the file: never a torn file where a
reader looks. Real limits: a small tmpfs where this machine lets the tests mount one, and ``ulimit -f`` in a
subprocess everywhere.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lightning_modules.components.files import OutputWriteError, save_image_atomically, write_atomically
from lightning_modules.results import PCKResults

from conftest import REPO


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (needs the right to mount; skipped where there is none)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_leaves_the_previous_file_and_no_temporary(small_disk: Path) -> None:
    target = small_disk / "results.json"
    write_atomically(target, '{"pck": 1}')
    with pytest.raises(OutputWriteError, match=rf"could not write {target}: No space left on device") as caught:
        write_atomically(target, "x" * 200_000)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == '{"pck": 1}' and _leftovers(small_disk) == []


def test_a_full_disk_while_results_are_written_leaves_none(small_disk: Path) -> None:
    results = PCKResults({"pck": {"0.1": {"per_point": 50.0}}, "padding": "x" * 100_000})
    with pytest.raises(OutputWriteError, match="results.json: No space left on device"):
        results.write(small_disk)
    assert sorted(p.name for p in small_disk.iterdir()) == []  # not a torn 4096-byte results.json


def test_a_file_size_limit_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    """``ulimit -f`` (RLIMIT_FSIZE) in a subprocess, SIGXFSZ ignored: the write fails with EFBIG."""
    target = tmp_path / "ablation.csv"
    target.write_text("previous\n")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from lightning_modules.components.files import OutputWriteError, write_atomically
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        try:
            write_atomically({str(target)!r}, "x" * 100_000)
        except OutputWriteError as err:
            print(err.errno, err)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(f"{errno.EFBIG} could not write {target}: File too large")
    assert target.read_text() == "previous\n" and _leftovers(tmp_path) == []


def test_pictures_are_written_through_the_same_path(tmp_path: Path) -> None:
    picture = Image.new("RGB", (8, 6), (10, 20, 30))
    save_image_atomically(picture, tmp_path / "pair.png")
    picture.save(tmp_path / "direct.png")
    assert (tmp_path / "pair.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image_atomically(picture, tmp_path / "pair.unknown")
    assert _leftovers(tmp_path) == []
