"""Fetch what a reproduction needs into a data folder: dataset archives (resumable downloads, verified, unpacked
atomically) and model weights (``huggingface_hub``). Offline, say which files are missing and where they go."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import yaml

__all__ = [
    "Archive",
    "Dataset",
    "FetchError",
    "MissingFiles",
    "fetch_dataset",
    "fetch_models",
    "load_datasets",
    "missing_files",
    "missing_message",
    "reachable",
]

DATASETS_FILE = Path(__file__).with_name("datasets.yaml")
#: Inside the data folder: downloaded archives, and the state of the fetch step (checksums, finished datasets).
DOWNLOADS, STATE = "downloads", ".reproduce"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or an archive that cannot be used (the message names the file and the URL)."""


class MissingFiles(RuntimeError):
    """Offline and something is missing: the message lists each file, its URL and where to put it."""


@dataclass(frozen=True)
class Archive:
    """One file to download: ``url``, its ``file`` name in ``<data>/downloads``, what it unpacks into (``unpack_to``,
    a folder under the data folder; None: the file is kept as it is, e.g. a CSV copied to ``copy_to``), and what is
    known of it (``size`` in bytes, ``sha256`` or ``md5``)."""

    url: str
    file: str
    unpack_to: str | None = "."
    copy_to: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A benchmark's data: its archives, the folder its reader takes as ``--data.root`` (relative to the data
    folder) and the paths (relative to that root) that must exist once it is unpacked."""

    name: str
    archives: tuple[Archive, ...]
    root: str
    expect: tuple[str, ...]
    source: str = ""
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def load_datasets(path: str | Path = DATASETS_FILE) -> dict[str, Dataset]:
    """Read and check the datasets data file.

    Raises:
        ValueError: A missing or malformed field, named with the file and the dataset.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of dataset name -> entry")
    datasets = {}
    for name, entry in data.items():
        where = f"{path}: {name}"
        for key in ("archives", "root", "expect"):
            if key not in entry:
                raise ValueError(f"{where}: missing field {key!r}")
        archives = []
        for i, item in enumerate(entry["archives"]):
            unknown = set(item) - set(Archive.__dataclass_fields__)
            if unknown or "url" not in item or "file" not in item:
                raise ValueError(f"{where}: archive {i} needs url and file (unknown fields: {sorted(unknown)})")
            if Path(item["file"]).name != item["file"]:
                raise ValueError(f"{where}: archive {i} file {item['file']!r} must be a plain file name")
            archives.append(Archive(**item))
        datasets[name] = Dataset(name=name, archives=tuple(archives), root=str(entry["root"]),
                                 expect=tuple(entry["expect"]), source=str(entry.get("source", "")),
                                 extra_args=tuple(str(a) for a in entry.get("extra_args", ())))
    return datasets


# --- downloads -----------------------------------------------------------------------------------------------


def _progress(name: str, done: int, total: int | None, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6) / 1e6
    of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    print(f"\r  {name}: {done / 1e6:.1f}{of} at {rate:.1f} MB/s", end="", file=sys.stderr, flush=True)


def download(archive: Archive, dest: Path, timeout: float = 60.0) -> None:
    """Download ``archive.url`` to ``dest``, resuming a ``dest.part`` left by an interrupted download (HTTP range
    requests), showing progress; the file appears under its name only when complete.

    Raises:
        FetchError: The URL cannot be read, or the server sent fewer bytes than it announced.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = getattr(response, "status", 200) == 206
            if have and not resumed:
                have = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else archive.size
            started, done = time.monotonic(), have
            with part.open("ab" if resumed else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    _progress(archive.file, done, total, started)
            print(file=sys.stderr)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise FetchError(f"download of {archive.file} from {archive.url} failed: {err}; rerun to resume "
                         f"(the partial file is kept as {part})") from err
    if total is not None and done != total:
        raise FetchError(f"download of {archive.file} from {archive.url} stopped at {done} of {total} bytes; rerun "
                         f"to resume (the partial file is kept as {part})")
    part.replace(dest)


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(data_dir: Path) -> tuple[Path, dict[str, str]]:
    path = data_dir / STATE / "checksums.json"
    return path, json.loads(path.read_text()) if path.exists() else {}


def verify(archive: Archive, path: Path, data_dir: Path) -> str:
    """Check a downloaded file: its size and checksum when known, an archive's integrity (every member read),
    and the SHA-256 recorded on its first verified download. Returns its SHA-256 (recorded on first success).

    Raises:
        FetchError: Naming the file, the URL and what is wrong (the bad file is moved aside as ``.bad``).
    """
    def fail(problem: str) -> FetchError:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        return FetchError(f"{archive.file} (from {archive.url}) {problem}; moved aside to {bad}: delete it and "
                          "rerun to download it again")

    if archive.size is not None and path.stat().st_size != archive.size:
        raise fail(f"is {path.stat().st_size} bytes, expected {archive.size}")
    sha256 = _digest(path, "sha256")
    if archive.sha256 and sha256 != archive.sha256:
        raise fail(f"has SHA-256 {sha256}, expected {archive.sha256}")
    if archive.md5 and _digest(path, "md5") != archive.md5:
        raise fail(f"has another MD5 than the expected {archive.md5}")
    record_path, recorded = _checksums(data_dir)
    if recorded.get(archive.file, sha256) != sha256:
        raise fail(f"has SHA-256 {sha256}, but {recorded[archive.file]} was recorded when it was first verified")
    if archive.unpack_to is not None:
        problem = _integrity_problem(path)
        if problem:
            raise fail(f"is not a complete archive ({problem})")
    if archive.file not in recorded:
        recorded[archive.file] = sha256
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return sha256


def _integrity_problem(path: Path) -> str | None:
    """Why an archive cannot be read to its end (None: it can): every member is read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                return f"member {bad} is corrupt" if bad else None
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    while handle is not None and handle.read(_CHUNK):
                        pass
        return None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return str(err) or type(err).__name__


def unpack(path: Path, into: Path, scratch: Path) -> None:
    """Unpack an archive into ``into``: first into ``scratch`` (a folder beside it), then each top-level entry is
    moved into place, so a reader never sees half an archive. Entries already in place are kept."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise FetchError(f"{path.name}: member {name!r} would land outside the data folder")
                archive.extractall(scratch)
        else:
            with tarfile.open(path) as archive:
                archive.extractall(scratch, filter="data")
        into.mkdir(parents=True, exist_ok=True)
        for entry in sorted(scratch.iterdir()):
            if entry.name == "__MACOSX":  # macOS resource forks in some zips (PF-Pascal's): not data
                continue
            target = into / entry.name
            if not target.exists():
                entry.replace(target)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{path.name} could not be unpacked: {err}") from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- datasets ------------------------------------------------------------------------------------------------


def _present(dataset: Dataset, data_dir: Path) -> list[str]:
    """The expected paths that are missing under the dataset's root."""
    root = data_dir / dataset.root
    return [p for p in dataset.expect if not (root / p).exists()]


def missing_files(dataset: Dataset, data_dir: Path) -> list[Archive]:
    """The archives of a dataset that are neither unpacked nor downloaded."""
    if not _present(dataset, data_dir):
        return []
    return [a for a in dataset.archives if not (data_dir / DOWNLOADS / a.file).exists()]


def fetch_dataset(dataset: Dataset, data_dir: str | Path, offline: bool = False,
                  downloader: Callable[[Archive, Path], None] = download, log: Callable[[str], None] = print) -> Path:
    """Make ``dataset`` ready under ``data_dir``: skip it when its layout is there; else download (or, offline,
    take from ``<data>/downloads``) each archive, verify it and unpack it; then check the reader's layout.

    Returns:
        The dataset's root (``--data.root``).

    Raises:
        MissingFiles: Offline with archives missing (names each, its URL and where to put it).
        FetchError: A download or an archive that cannot be used, or a layout still incomplete after unpacking.
    """
    data_dir = Path(data_dir)
    root = data_dir / dataset.root
    if not _present(dataset, data_dir):
        log(f"{dataset.name}: present at {root}")
        return root
    missing = missing_files(dataset, data_dir)
    if missing and offline:
        raise MissingFiles(missing_message({dataset.name: missing}, data_dir))
    for archive in dataset.archives:
        path = data_dir / DOWNLOADS / archive.file
        if not path.exists():
            log(f"{dataset.name}: downloading {archive.url}")
            downloader(archive, path)
        verify(archive, path, data_dir)
        if archive.unpack_to is not None:
            log(f"{dataset.name}: unpacking {archive.file}")
            unpack(path, data_dir / archive.unpack_to, data_dir / STATE / f"unpacking-{archive.file}")
        elif archive.copy_to is not None:
            target = data_dir / archive.copy_to
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    still = _present(dataset, data_dir)
    if still:
        raise FetchError(f"{dataset.name}: after unpacking, {root} still lacks {still} (the archives' layout is not "
                         f"what {DATASETS_FILE.name} says; source: {dataset.source})")
    log(f"{dataset.name}: ready at {root}")
    return root


def missing_message(missing: dict[str, Sequence[Archive]], data_dir: Path) -> str:
    """What to download by hand, and where to put it, for an offline machine."""
    lines = [f"offline: these files are missing; download each and put it in {data_dir / DOWNLOADS}/ (the next run "
             "verifies and unpacks it), or unpack the dataset yourself where the readers expect it:"]
    for name, archives in missing.items():
        for archive in archives:
            lines.append(f"  {name}: {archive.file}  <-  {archive.url}")
    return "\n".join(lines)


# --- model weights -------------------------------------------------------------------------------------------


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether ``url`` answers (a quick probe before downloading: offline, fail fast with the list of files)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered (some refuse HEAD)
    except (urllib.error.URLError, OSError, ValueError):
        return False


#: What the featurizers load of a hub repository (the diffusers/transformers files, safetensors only): a whole
#: snapshot of the SD v1-5 repository would also fetch its single-file checkpoints, several times the size.
MODEL_FILES = ["*.json", "*.txt", "tokenizer/*", "scheduler/*", "*.safetensors"]
_SKIP = ["*.ckpt", "*.bin", "*.msgpack", "*.h5", "*.onnx", "*fp16*", "*non_ema*", "*.pth", "*.pt",
         "v1-5-pruned*", "*emaonly*", "safety_checker/*"]


def fetch_models(model_ids: Sequence[str], offline: bool = False, log: Callable[[str], None] = print) -> None:
    """Download what the featurizers load of each hub model id into the Hugging Face cache
    (``huggingface_hub.snapshot_download`` of :data:`MODEL_FILES`, resumable); local folders are left alone.
    Offline, check that the cache holds each one.

    Raises:
        MissingFiles: A model the cache lacks while offline (names it and how to get it).
        FetchError: A download that failed.
    """
    from huggingface_hub import snapshot_download

    missing = []
    for model_id in model_ids:
        if Path(os.path.expanduser(model_id)).is_dir():
            log(f"model {model_id}: local folder")
            continue
        try:
            snapshot_download(model_id, allow_patterns=MODEL_FILES, ignore_patterns=_SKIP, local_files_only=offline)
            log(f"model {model_id}: {'in the cache' if offline else 'downloaded (or up to date)'}")
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises several types for one cause
            if offline:
                missing.append(model_id)
            else:
                raise FetchError(f"model {model_id} could not be downloaded: {err}") from err
    if missing:
        raise MissingFiles("offline: these models are not in the Hugging Face cache: " + ", ".join(missing)
                           + "; where the hub is reachable run `huggingface-cli download <id>` (or `--local-dir DIR` "
                           "and pass DIR as the model id)")

