"""Fetch what a reproduction needs into a data folder: dataset archives and files (resumable downloads, every byte
verified before anything is installed where a reader looks, installed atomically) and model weights
(``huggingface_hub``). Offline, say which files are missing and where they go.

What "verified" means here, in order: not an HTML page; the size, SHA-256 and MD5 when known; the SHA-256 recorded
when a file of that name first passed every check (``<data>/.reproduce/checksums.json``, reset with
:func:`forget_checksums`); an archive decompressed to its end (every member read, gzip/zip CRCs checked); a plain
file parsed as its reader parses it (``check`` in ``datasets.yaml``). A dataset's archives are then unpacked into a
scratch folder in the data folder, the reader's layout is checked there, and each top-level folder is renamed into
place; only then are the checksums recorded.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import lzma
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from . import write_output

__all__ = [
    "Archive",
    "Dataset",
    "FetchError",
    "MODEL_FILES",
    "MODEL_FILE_SIZES",
    "MissingFiles",
    "default_model_ids",
    "download",
    "fetch_dataset",
    "fetch_models",
    "forget_checksums",
    "load_datasets",
    "missing_files",
    "missing_message",
    "missing_model_files",
    "models_message",
    "needed_archives",
    "unreachable",
    "verify",
]

DATASETS_FILE = Path(__file__).with_name("datasets.yaml")
#: Inside the data folder: downloaded archives, and the state of the fetch step (checksums, scratch folders).
DOWNLOADS, STATE = "downloads", ".reproduce"
#: Seconds a download waits for the server (to connect, or for the next bytes).
TIMEOUT = 60.0
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download or a file that cannot be used (a one-line message naming the file and the URL)."""


class MissingFiles(RuntimeError):
    """Offline and something is missing: the message lists each file, its URL and where to put it."""


@dataclass(frozen=True)
class Archive:
    """One file to download: ``url``, its ``file`` name in ``<data>/downloads``, what it unpacks into (``unpack_to``,
    a folder under the data folder; None: the file is kept as it is and copied to ``copy_to``), what is known of it
    (``size`` in bytes, ``sha256`` or ``md5``), ``check``: ``module:function`` that parses a plain file as its
    reader does (raises ValueError; returns the number of pairs), ``pairs``: how many the published file holds (a
    csv cut short at a row boundary by a dropped connection without Content-Length still parses), and
    ``provides``: the paths of the dataset's ``expect`` it supplies (default:
    a plain file its ``copy_to``, an archive every expected path no other file provides); it is fetched only when
    one of them is missing."""

    url: str
    file: str
    unpack_to: str | None = "."
    copy_to: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    check: str | None = None
    provides: tuple[str, ...] | None = None
    pairs: int | None = None


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
            if item.get("check") is not None and ":" not in item["check"]:
                raise ValueError(f"{where}: archive {i} check {item['check']!r} must read module:function")
            if item.get("provides") is not None:
                item = {**item, "provides": tuple(item["provides"])}
            archives.append(Archive(**item))
        dataset = Dataset(name=name, archives=tuple(archives), root=str(entry["root"]), expect=tuple(entry["expect"]),
                          source=str(entry.get("source", "")),
                          extra_args=tuple(str(a) for a in entry.get("extra_args", ())))
        unprovided = set(dataset.expect) - {p for a in dataset.archives for p in _provides(dataset, a)}
        if unprovided:
            raise ValueError(f"{where}: no archive provides {sorted(unprovided)}")
        datasets[name] = dataset
    return datasets


def _provides(dataset: Dataset, archive: Archive) -> tuple[str, ...]:
    """The expected paths (relative to the root) that ``archive`` supplies."""
    if archive.provides is not None:
        return archive.provides
    if archive.unpack_to is None:
        copied = PurePosixPath(archive.copy_to or "")
        return tuple(p for p in dataset.expect if copied == PurePosixPath(dataset.root, p))
    others = {p for a in dataset.archives if a is not archive and (a.provides is not None or a.unpack_to is None)
              for p in _provides(dataset, a)}
    return tuple(p for p in dataset.expect if p not in others)


# --- downloads -----------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(err: BaseException, timeout: float) -> str:
    """What went wrong in a network operation, in a few words."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else OSError(str(err.reason))
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed in the middle of the transfer ({err!r})"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without a reply"
    if isinstance(err, http.client.BadStatusLine):
        return f"the server's reply is not HTTP (BadStatusLine: {_one_line(str(err))[:80]})"
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout:g} s (timed out)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ConnectionResetError):
        return "the connection was reset"
    return _one_line(f"{type(err).__name__}: {err}")


#: What a failed network operation raises (urllib's errors, http.client's for broken replies, socket errors).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def _progress(name: str, done: int, total: int | None, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6) / 1e6
    of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    print(f"\r  {name}: {done / 1e6:.1f}{of} at {rate:.1f} MB/s", end="", file=sys.stderr, flush=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (START, TOTAL); None where absent or unreadable."""
    try:
        span, total = (value or "").split(" ", 1)[1].split("/")
        start = None if span == "*" else int(span.split("-")[0])
        return start, None if total == "*" else int(total)
    except (IndexError, ValueError):
        return None, None


def _transfer(archive: Archive, part: Path, have: int, timeout: float) -> tuple[int, int | None]:
    """One HTTP request appending to (or, when the server ignores the range, rewriting) ``part``; returns the bytes
    now in it and the total the server announced (or the size the data file gives)."""
    request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"} if have else {})
    shown = False
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = have > 0 and response.status == 206
            start, total = _content_range(response.headers.get("Content-Range")) if resumed else (None, None)
            if resumed and start not in (None, have):
                raise ValueError(f"asked for the bytes from {have} on, the server sent them from {start}")
            done = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = total or (done + int(length) if length else archive.size)
            started = time.monotonic()
            with part.open("ab" if resumed else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    _progress(archive.file, done, total, started)
                    shown = True
        return done, total
    finally:
        if shown:
            print(file=sys.stderr)  # end the progress line


def _failed(archive: Archive, reason: str, part: Path) -> FetchError:
    """The one-line error of a failed download; says that the partial file is kept only where one is."""
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    kept = (f"rerun to resume (the partial file is kept as {part})" if part.exists()
            else "rerun to try again")
    return FetchError(f"download of {archive.file} from {archive.url} failed: {reason}; {kept}")


def download(archive: Archive, dest: Path, timeout: float | None = None) -> None:
    """Download ``archive.url`` to ``dest``, resuming a ``dest.part`` left by an interrupted download (HTTP range
    requests), showing progress; the file appears under its name only when the server sent all it announced. A
    ``.part`` the server calls complete (HTTP 416 to the range request) is taken as the whole file (then verified).

    Raises:
        FetchError: One line naming the file, the URL and the cause (refused, timed out, dropped mid-transfer, a
            reply that is not HTTP, an HTTP error), and whether a partial file is kept to resume from.
    """
    timeout = TIMEOUT if timeout is None else timeout
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            done, total = _transfer(archive, part, have, timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # Range Not Satisfiable: nothing after the bytes we have
                _, total = _content_range(err.headers.get("Content-Range"))
                if total is None or total == have:
                    part.replace(dest)
                    return
                part.unlink()  # longer than the file: not a part of it; start over
                continue
            raise _failed(archive, _reason(err, timeout), part) from err
        except _NETWORK_ERRORS as err:
            raise _failed(archive, _reason(err, timeout), part) from err
        if total is not None and done != total:
            if done > total:
                part.unlink()
            raise _failed(archive, f"the server sent {done} of the {total} bytes announced", part)
        part.replace(dest)
        return


def unreachable(url: str, timeout: float | None = None) -> str | None:
    """Why ``url``'s server cannot be reached (None: it answers); a quick probe (at most 10 s) before downloading,
    so that an offline machine fails at once."""
    timeout = min(10.0, TIMEOUT) if timeout is None else timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except (urllib.error.HTTPError, http.client.HTTPException):
        return None  # the server answered (some refuse HEAD); a download then says what is wrong
    except _NETWORK_ERRORS as err:
        return _reason(err, timeout)


# --- verification --------------------------------------------------------------------------------------------


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(data_dir: Path) -> tuple[Path, dict[str, str]]:
    path = data_dir / STATE / "checksums.json"
    return path, json.loads(path.read_text()) if path.exists() else {}


def _record_checksums(data_dir: Path, sha256: Mapping[str, str]) -> None:
    """Record the SHA-256 of files that passed every check (the first record of a name stays)."""
    path, recorded = _checksums(data_dir)
    new = {name: digest for name, digest in sha256.items() if name not in recorded}
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_output(path, json.dumps({**recorded, **new}, indent=1, sort_keys=True) + "\n")


def forget_checksums(data_dir: str | Path, files: Sequence[str]) -> list[str]:
    """Drop the recorded SHA-256 of ``files`` (``reproduce.py --forget-checksums``); returns the names dropped."""
    path, recorded = _checksums(Path(data_dir))
    dropped = [name for name in files if name in recorded]
    if dropped:
        write_output(path, json.dumps({k: v for k, v in recorded.items() if k not in dropped}, indent=1,
                                      sort_keys=True) + "\n")
    return dropped


def _html_problem(path: Path) -> str | None:
    """An HTML page where a data file belongs (an error, sign-in or virus-scan page served with status 200)."""
    with path.open("rb") as handle:
        head = handle.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head[:256]:
        return (f"is an HTML page ({path.stat().st_size} bytes), not the file: the server sent an error or sign-in "
                "page instead (open the URL in a browser to see it)")
    return None


def _integrity_problem(path: Path) -> str | None:
    """Why an archive cannot be read to its end (None: it can): every member is decompressed with its CRC checked,
    and a tarball's compressed stream is read to its very end (gzip checks its CRC-32 and length there) with
    nothing but end-of-archive zero blocks after the last member."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                return f"member {bad} fails its CRC check" if bad else None
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    while handle is not None and handle.read(_CHUNK):
                        pass
            stream = archive.fileobj
            stream.seek(archive.offset)
            while chunk := stream.read(_CHUNK):
                if chunk.strip(b"\0"):
                    return f"bytes after the last member it lists, at offset {archive.offset} (a damaged header?)"
        return None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as err:
        return _one_line(str(err) or type(err).__name__)


def _content_problem(archive: Archive, path: Path) -> str | None:
    """What the file's reader finds wrong with it (``archive.check``, e.g. a csv's header, columns and values)."""
    if archive.check is None:
        return None
    module, function = archive.check.split(":")
    try:
        count = getattr(importlib.import_module(module), function)(path)
    except (ValueError, OSError) as err:
        return f"is not what its reader needs ({_one_line(str(err))})"
    if archive.pairs is not None and count != archive.pairs:
        return f"is not what its reader needs (it holds {count} pairs, the published file {archive.pairs}: cut short?)"
    return None


def verify(archive: Archive, path: Path, data_dir: Path) -> str:
    """Check a downloaded file (see the module docstring for the checks and their order); nothing is recorded.

    Returns:
        Its SHA-256.

    Raises:
        FetchError: One line naming the file, the URL and what is wrong. A damaged file is moved aside as
            ``.bad`` (the next run downloads it again); one that only differs from its recorded SHA-256 stays.
    """
    def fail(problem: str) -> FetchError:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        return FetchError(f"{archive.file} (from {archive.url}) {problem}; moved aside to {bad}: rerun to download "
                          f"it again, or put the right file in {path.parent}/")

    problem = _html_problem(path)
    if problem:
        raise fail(problem)
    if archive.size is not None and path.stat().st_size != archive.size:
        raise fail(f"is {path.stat().st_size} bytes, expected {archive.size}")
    sha256 = _digest(path, "sha256")
    if archive.sha256 and sha256 != archive.sha256:
        raise fail(f"has SHA-256 {sha256}, expected {archive.sha256}")
    if archive.md5 and _digest(path, "md5") != archive.md5:
        raise fail(f"has another MD5 than the expected {archive.md5}")
    _, recorded = _checksums(data_dir)
    if recorded.get(archive.file, sha256) != sha256:
        raise FetchError(f"{path} (from {archive.url}) has SHA-256 {sha256}, but {recorded[archive.file]} was "
                         "recorded when a file of this name first passed every check; it is left in place: if it is "
                         "the right file, rerun with --forget-checksums, else delete it and rerun to download it again")
    if archive.unpack_to is not None:
        problem = _integrity_problem(path)
        problem = problem and f"is not a complete archive ({problem})"
    else:
        problem = _content_problem(archive, path)
    if problem:
        raise fail(problem)
    return sha256


# --- datasets ------------------------------------------------------------------------------------------------


def _absent(dataset: Dataset, data_dir: Path, paths: Sequence[str] | None = None) -> list[str]:
    """The expected paths (or those of ``paths``) that are missing under the dataset's root."""
    root = data_dir / dataset.root
    return [p for p in (dataset.expect if paths is None else paths) if not (root / p).exists()]


def needed_archives(dataset: Dataset, data_dir: Path) -> list[Archive]:
    """The files to fetch: a plain file not yet at its ``copy_to``, an archive that provides a path the root lacks."""
    return [a for a in dataset.archives
            if (not (data_dir / a.copy_to).exists() if a.unpack_to is None and a.copy_to
                else _absent(dataset, data_dir, _provides(dataset, a)))]


def missing_files(dataset: Dataset, data_dir: Path) -> list[Archive]:
    """The needed archives of a dataset that are not downloaded."""
    return [a for a in needed_archives(dataset, data_dir) if not (data_dir / DOWNLOADS / a.file).exists()]


def _merge(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, merging folders (what a later archive holds replaces an earlier one's file)."""
    if target.is_dir() and source.is_dir():
        for entry in source.iterdir():
            _merge(entry, target / entry.name)
        source.rmdir()
        return
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


def _unpack(archive: Archive, path: Path, into: Path) -> list[str]:
    """Unpack ``path`` into the folder ``into`` (created) and return the names at the archive's top (a folder's
    with a trailing ``/``)."""
    into.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as handle:
                for name in handle.namelist():
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise FetchError(f"{archive.file} (from {archive.url}): member {name!r} would land outside "
                                         "the data folder")
                handle.extractall(into)
        else:
            with tarfile.open(path) as handle:
                handle.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{archive.file} (from {archive.url}) could not be unpacked into {into}: "
                         f"{_one_line(str(err))}") from err
    return sorted(entry.name + "/" * entry.is_dir() for entry in into.iterdir()
                  if entry.name != "__MACOSX")  # macOS resource forks: not data


def _related(unit: PurePosixPath, root: PurePosixPath) -> bool:
    """Whether an installed path is the root, holds it, or lies inside it (else: not needed by the reader)."""
    return unit == root or root.is_relative_to(unit) or unit.is_relative_to(root)


def fetch_dataset(dataset: Dataset, data_dir: str | Path, offline: bool = False,
                  downloader: Callable[[Archive, Path], None] = download, log: Callable[[str], None] = print) -> Path:
    """Make ``dataset`` ready under ``data_dir``: skip it when its layout is there; else download (or, offline,
    take from ``<data>/downloads``) each archive it needs and verify it; unpack them (and copy the plain files)
    into a scratch folder in the data folder, check the reader's layout there, rename each top-level entry into
    place; then record the files' SHA-256.

    Returns:
        The dataset's root (``--data.root``).

    Raises:
        MissingFiles: Offline with archives missing (names each, its URL and where to put it).
        FetchError: One line: a download or a file that cannot be used, an archive whose layout is not the
            reader's (naming what it holds at its top), or an incomplete folder in the way (saying what to do).
    """
    data_dir = Path(data_dir)
    root = data_dir / dataset.root
    if not _absent(dataset, data_dir):
        log(f"{dataset.name}: present at {root}")
        return root
    needed = needed_archives(dataset, data_dir)
    missing = missing_files(dataset, data_dir)
    if missing and offline:
        raise MissingFiles(missing_message({dataset.name: missing}, data_dir))
    verified = {}
    for archive in needed:
        path = data_dir / DOWNLOADS / archive.file
        if not path.exists():
            log(f"{dataset.name}: downloading {archive.url}")
            downloader(archive, path)
        verified[archive.file] = verify(archive, path, data_dir)
    scratch = data_dir / STATE / f"unpacking-{dataset.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        units = _stage(dataset, needed, data_dir, scratch, log)
        _install(dataset, units, data_dir, scratch, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    still = _absent(dataset, data_dir)
    if still:  # not expected: the layout was checked before installing
        raise FetchError(f"{dataset.name}: after installing, {root} still lacks {still}")
    _record_checksums(data_dir, verified)
    log(f"{dataset.name}: ready at {root}")
    return root


def _stage(dataset: Dataset, needed: Sequence[Archive], data_dir: Path, scratch: Path,
           log: Callable[[str], None]) -> dict[PurePosixPath, Archive]:
    """Unpack and copy the needed files into ``scratch`` (laid out as the data folder) and check the reader's
    layout there; returns each path to install (relative to the data folder) and the file it comes from."""
    units: dict[PurePosixPath, Archive] = {}
    tops: dict[str, list[str]] = {}
    for i, archive in enumerate(needed):
        path = data_dir / DOWNLOADS / archive.file
        if archive.unpack_to is None:
            target = PurePosixPath(archive.copy_to or archive.file)
            (scratch / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, scratch / target)
            units[target] = archive
            continue
        log(f"{dataset.name}: unpacking {archive.file}")
        unpacked = scratch / f".archive-{i}"
        tops[archive.file] = _unpack(archive, path, unpacked)
        for name in tops[archive.file]:
            unit = PurePosixPath(archive.unpack_to, name.rstrip("/"))
            _merge(unpacked / unit.name, scratch / unit)
            units[unit] = archive
        shutil.rmtree(unpacked)
    root = PurePosixPath(dataset.root)
    units = {u: a for u, a in units.items() if not any(u != o and u.is_relative_to(o) for o in units)}
    stray = sorted(str(u) for u in units if not _related(u, root))
    installed = [u for u in units if _related(u, root)]
    lacking = [p for p in dataset.expect
               if not (scratch / root / p).exists()
               and (any((root / p).is_relative_to(u) for u in installed) or not (data_dir / root / p).exists())]
    held = "; ".join(f"{name} holds {names}" for name, names in tops.items())
    if lacking:
        raise FetchError(f"{dataset.name}: unpacked, {dataset.root}/ would lack {lacking}, so nothing was installed "
                         f"({held or 'no archive unpacked'} at its top; {DATASETS_FILE.name} expects the root "
                         f"{dataset.root}/; source: {dataset.source})")
    if stray:
        log(f"{dataset.name}: not kept (not under {dataset.root}/): {stray}")
    return {u: units[u] for u in installed}


def _install(dataset: Dataset, units: Mapping[PurePosixPath, Archive], data_dir: Path, scratch: Path,
             log: Callable[[str], None]) -> None:
    """Rename each staged path into place (one rename each: a reader never sees half of it); an incomplete folder
    or file already in the way is left alone and named with what to do."""
    for unit, archive in units.items():
        target = data_dir / unit
        if target.exists() or target.is_symlink():
            lacks = [p for p in dataset.expect if (PurePosixPath(dataset.root, p)).is_relative_to(unit)
                     and not (data_dir / dataset.root / p).exists()]
            raise FetchError(f"{target} is already there but incomplete (lacks {lacks}) and {archive.file} would "
                             f"replace it: move it away (or delete it) and rerun; the verified {archive.file} in "
                             f"{data_dir / DOWNLOADS}/ is then installed")
    for unit in sorted(units):
        (data_dir / unit).parent.mkdir(parents=True, exist_ok=True)
        os.rename(scratch / unit, data_dir / unit)


def missing_message(missing: Mapping[str, Sequence[Archive]], data_dir: Path,
                    missing_models: Mapping[str, Sequence[str]] | None = None,
                    models: Mapping[str, str] | None = None) -> str:
    """What to download by hand, and where to put it, for an offline machine: dataset files, then model files
    (:func:`missing_model_files` of ``models``)."""
    lines = []
    if missing:
        lines.append(f"offline: these files are missing; download each and put it in {data_dir / DOWNLOADS}/ (the "
                     "next run verifies and unpacks it), or unpack the dataset yourself where the readers expect it:")
        for name, archives in missing.items():
            for archive in archives:
                size = f"{archive.size} bytes" if archive.size else "size unknown offline"
                lines.append(f"  {name}: {archive.file} ({size})  <-  {archive.url}")
    if missing_models:
        lines.append(models_message(missing_models, models or {}, "offline: these model files are missing"))
    return "\n".join(lines)


# --- model weights -------------------------------------------------------------------------------------------

#: What the featurizers load of a hub repository or local folder, per featurizer: the SD featurizer's
#: ``from_pretrained`` of the ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` subfolders
#: (diffusers' layout), the DINO featurizer's ``AutoModel.from_pretrained`` (transformers' layout).
MODEL_FILES: dict[str, tuple[str, ...]] = {
    "sd": ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
           "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
           "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
           "tokenizer/vocab.json", "scheduler/scheduler_config.json"),
    "dino": ("config.json", "model.safetensors"),
}
#: Approximate sizes in bytes of the weight files of the paper's models, for the offline list: float32 parameters
#: of each architecture (SD 1.5's UNet 859,520,964, VAE 83,653,863 and CLIP ViT-L/14 text encoder 123,060,480;
#: DINOv2-B/14 86,580,480), checked against the architectures built from the models' configs
#: (tests/test_reproduce.py). A file's safetensors header adds well under 0.1 MB; the config, tokenizer and
#: scheduler files are a few KB to 1 MB each and are not listed. A local folder is taken to be the paper's model
#: (its download command fetches that); another hub id's sizes are unknown offline.
MODEL_FILE_SIZES: dict[str, dict[str, int]] = {
    "sd": {"unet/diffusion_pytorch_model.safetensors": 3_438_083_856,
           "vae/diffusion_pytorch_model.safetensors": 334_615_452,
           "text_encoder/model.safetensors": 492_241_920},
    "dino": {"model.safetensors": 346_321_920},
}
#: The reproduce.py option that takes each featurizer's model (a hub id or a local folder).
MODEL_OPTIONS = {"sd": "--sd-model", "dino": "--dino-model"}


def _local(model_id: str) -> Path | None:
    path = Path(os.path.expanduser(model_id))
    return path if path.is_dir() else None


def missing_model_files(models: Mapping[str, str]) -> dict[str, list[str]]:
    """Per featurizer (``sd``, ``dino`` -> model id), the files of :data:`MODEL_FILES` that neither its local folder
    nor the Hugging Face cache holds (checked without the network); featurizers with none missing are left out."""
    from huggingface_hub import try_to_load_from_cache

    missing = {}
    for kind, model_id in models.items():
        folder = _local(model_id)
        have = ((lambda f: (folder / f).is_file()) if folder is not None
                else (lambda f: isinstance(try_to_load_from_cache(model_id, f), str)))
        lacking = [f for f in MODEL_FILES[kind] if not have(f)]
        if lacking:
            missing[kind] = lacking
    return missing


def models_message(missing: Mapping[str, Sequence[str]], models: Mapping[str, str], what: str) -> str:
    """The missing model files of :func:`missing_model_files` and how to get exactly those (``what``: the
    message's opening words)."""
    from lightning_modules.components.hub import download_command  # the core, on first use

    papers = default_model_ids()
    lines = [f"{what}:"]
    for kind, files in missing.items():
        model_id = models[kind]
        folder = _local(model_id)
        hub_id = papers[kind] if folder is not None else model_id
        target = str(folder) if folder is not None else hub_id.rstrip("/").split("/")[-1]
        lines += [f"  {kind} model {model_id}{' (a local folder)' if folder else ''}: {', '.join(files)}"
                  f" ({_files_size(kind, files, known=hub_id == papers[kind])})",
                  f"    where the hub is reachable: {download_command(hub_id, files, local_dir=target)}",
                  f"    then pass {MODEL_OPTIONS[kind]} {target} (a hub id or a local folder; it becomes "
                  f"--model.pipeline.{kind}.model_id)"]
    return "\n".join(lines)


def _files_size(kind: str, files: Sequence[str], known: bool) -> str:
    """The size of a model's missing ``files`` as the offline list prints it: about N GB / MB in all (the weights
    of :data:`MODEL_FILE_SIZES`; the small files are left out), or unknown for a model other than the paper's."""
    if not known:
        return "sizes unknown offline for a model other than the paper's"
    total = sum(MODEL_FILE_SIZES[kind].get(name, 0) for name in files)
    if total == 0:
        return "small files, under 1 MB each"
    return f"about {total / 1e9:.2f} GB in all" if total >= 1e9 else f"about {total / 1e6:.0f} MB in all"


def default_model_ids() -> dict[str, str]:
    """The model ids of the paper's configs (``configs/featurizers/sd15.yaml``, ``dinov2_b14.yaml``)."""
    featurizers = Path(__file__).resolve().parents[2] / "configs" / "featurizers"
    return {kind: yaml.safe_load((featurizers / name).read_text())["init_args"]["model_id"]
            for kind, name in (("sd", "sd15.yaml"), ("dino", "dinov2_b14.yaml"))}


def fetch_models(models: Mapping[str, str], offline: bool = False, log: Callable[[str], None] = print) -> None:
    """Make each featurizer's model ready: a local folder must hold :data:`MODEL_FILES`; a hub id is downloaded
    into the Hugging Face cache (``snapshot_download`` of the core's ``hub.MODEL_PATTERNS``, resumable), or, offline, must be
    there.

    Args:
        models: Featurizer (``sd``, ``dino``) -> hub id or local folder.
        offline: Never download.
        log: Progress lines.

    Raises:
        MissingFiles: Offline with model files missing (names each file and how to get exactly those).
        FetchError: A local folder that lacks files, or a download that failed (one line).
    """
    from huggingface_hub import snapshot_download

    from lightning_modules.components.hub import MODEL_PATTERNS, SKIPPED_FILES  # the core, on first use

    for kind, model_id in models.items():
        if _local(model_id) is None and not offline:
            try:
                snapshot_download(model_id, allow_patterns=list(MODEL_PATTERNS), ignore_patterns=list(SKIPPED_FILES))
            except Exception as err:  # noqa: BLE001 - huggingface_hub raises several types for one cause
                raise FetchError(f"{kind} model {model_id} could not be downloaded: "
                                 f"{_one_line(f'{type(err).__name__}: {err}')[:300]}") from err
    missing = missing_model_files(models)
    if missing and offline:
        raise MissingFiles(models_message(missing, models, "offline: these model files are missing"))
    if missing:
        raise FetchError(_one_line(models_message(missing, models, "these model files are missing after the download")))
    for kind, model_id in models.items():
        log(f"{kind} model {model_id}: {'local folder' if _local(model_id) else 'in the Hugging Face cache'}")
