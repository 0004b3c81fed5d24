"""scripts/reproduce.py: the fetch step against local archives, the runs and the comparison with the tiny models."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import reproduce  # noqa: E402
from reproduction import compare as comparison  # noqa: E402
from reproduction import fetch  # noqa: E402
from reproduction.runs import BENCHMARKS, ROW_FEATURIZERS, ROWS, plan_runs, run_all  # noqa: E402

from datamodules import (  # noqa: E402
    CUBASICDataset,
    PFPascalDataset,
    PFWillowDataset,
    SPairDataset,
    TSSDataset,
    write_synthetic_spair,
)
from datamodules.pfpascal import write_synthetic_pfpascal  # noqa: E402
from lightning_modules.components.hub import MODEL_PATTERNS, SKIPPED_FILES, download_command  # noqa: E402


# --- the data files --------------------------------------------------------------------------------------------


def test_the_data_files_parse_and_cover_every_benchmark_and_row() -> None:
    datasets = fetch.load_datasets()
    assert sorted(datasets) == sorted(BENCHMARKS)
    for dataset in datasets.values():
        assert dataset.archives and dataset.expect and dataset.source
        for archive in dataset.archives:
            assert urlparse(archive.url).scheme in ("http", "https") and archive.file
    numbers = comparison.load_paper_numbers()
    covered = {(n.benchmark, n.row) for n in numbers}
    for benchmark in BENCHMARKS:
        assert {(benchmark, row) for row in ("sd", "dino", "fused")} <= covered, benchmark
    assert ("cub", "fused_alpha0.8") in covered
    assert all(n.table and (n.value is None or 0 < n.value <= 100) and n.tolerance > 0 for n in numbers)
    assert ("spair", "fused", 64.0) in {(n.benchmark, n.row, n.value) for n in numbers}
    assert {n.row for n in numbers} <= set(ROWS)


# --- fetch -----------------------------------------------------------------------------------------------------


def _spair_archive(tmp: Path, kind: str = "tar.gz") -> Path:
    """A generated SPair-71k root packed as the official archive is (top-level folder SPair-71k/)."""
    root = write_synthetic_spair(tmp / "src" / "SPair-71k", categories=("cat",), pairs_per_category=2,
                                 image_size=(48, 36))
    archive = tmp / f"SPair-71k.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as out:
            for path in sorted(root.rglob("*")):
                out.write(path, path.relative_to(root.parent))
    else:
        with tarfile.open(archive, "w:gz") as out:
            out.add(root, arcname="SPair-71k")
    shutil.rmtree(tmp / "src")
    return archive


def _served(site: _Site, archive: Path) -> str:
    """The URL of ``archive`` served by the local HTTP server (its bytes as they are now)."""
    site.files[archive.name] = archive.read_bytes()
    return site.url(archive.name)


def _dataset(url: str, file: str = "SPair-71k.tar.gz", **known) -> fetch.Dataset:
    return fetch.Dataset(name="spair", archives=(fetch.Archive(url=url, file=file, **known),), root="SPair-71k",
                         expect=("PairAnnotation/test", "JPEGImages"), source="test")


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_good_archive_unpacks_to_the_readers_layout_and_a_rerun_skips_it(tmp_path: Path, kind: str) -> None:
    archive = _spair_archive(tmp_path, kind)
    dataset = _dataset(archive.as_uri(), file=archive.name, size=archive.stat().st_size)
    root = fetch.fetch_dataset(dataset, tmp_path / "data", log=lambda _: None)
    assert root == tmp_path / "data" / "SPair-71k" and len(SPairDataset(root, split="test")) == 2
    recorded = json.loads((tmp_path / "data" / ".reproduce" / "checksums.json").read_text())
    assert len(recorded[archive.name]) == 64  # the SHA-256 recorded on the first download

    def no_download(*_):  # noqa: ANN002, ANN202
        raise AssertionError("a verified dataset is not downloaded again")

    said = []
    assert fetch.fetch_dataset(dataset, tmp_path / "data", downloader=no_download, log=said.append) == root
    assert said == [f"spair: present at {root}"]


def test_a_truncated_archive_is_named_and_leaves_no_partial_dataset(tmp_path: Path, site: _Site) -> None:
    archive = _spair_archive(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(fetch.FetchError, match=r"SPair-71k.tar.gz \(from http://127.0.0.1:.*\) is not a complete "
                                               r"archive"):
        fetch.fetch_dataset(_dataset(_served(site, archive)), tmp_path / "data", log=lambda _: None)
    assert not (tmp_path / "data" / "SPair-71k").exists()  # nothing a reader would take for data
    assert not list((tmp_path / "data" / "downloads").glob("*.tar.gz"))  # moved aside as .bad
    assert not list((tmp_path / "data" / ".reproduce").glob("unpacking-*"))


def test_an_altered_archive_fails_its_checksum(tmp_path: Path) -> None:
    archive = _spair_archive(tmp_path)
    good = archive.read_bytes()
    first = tmp_path / "first"
    fetch.fetch_dataset(_dataset(archive.as_uri()), first, log=lambda _: None)  # records the SHA-256
    shutil.rmtree(first / "SPair-71k")
    (first / "downloads" / "SPair-71k.tar.gz").write_bytes(good[:-10] + bytes(10))  # the same size, altered
    with pytest.raises(fetch.FetchError, match=r"SPair-71k.tar.gz \(from .*\) has SHA-256 \w+, but \w+ was recorded"):
        fetch.fetch_dataset(_dataset(archive.as_uri()), first, log=lambda _: None)
    assert not (first / "SPair-71k").exists()
    with pytest.raises(fetch.FetchError, match=r"is \d+ bytes, expected 5"):
        fetch.fetch_dataset(_dataset(archive.as_uri(), size=5), tmp_path / "second", log=lambda _: None)


class _Site:
    """Files served by a 127.0.0.1 HTTP server in a thread: ``files[name]`` with Content-Length and HTTP ranges
    (206; 416 with ``Content-Range: bytes */N`` past the end), or ``handlers[name](request)`` answering a GET as a
    misbehaving server would. ``requests`` lists each GET's (name, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.handlers: dict[str, object] = {}
        self.requests: list[tuple[str, str | None]] = []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - the reachability probe
                self.send_response(200 if self.path.lstrip("/") in site.files else 404)
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                name, wanted = self.path.lstrip("/"), self.headers.get("Range")
                site.requests.append((name, wanted))
                if name in site.handlers:
                    return site.handlers[name](self)
                if name not in site.files:
                    return self.send_error(404)
                body = site.files[name]
                start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                self.wfile.write(body[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{name}"


@pytest.fixture
def site():  # noqa: ANN201
    served = _Site()
    yield served
    served.server.shutdown()
    served.server.server_close()


def _run_fetch(monkeypatch, capsys, data: Path, datasets: dict, *more: str) -> tuple[int, str, str]:  # noqa: ANN001
    """``reproduce.py --datasets FILE`` online (its runs and the weights stubbed out): (exit status, stdout, stderr)."""
    path = data.parent / "datasets.yaml"
    path.write_text(yaml.safe_dump(datasets))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(reproduce, "fetch_models", lambda models, offline=False: None)
    monkeypatch.setattr(reproduce, "run_all", lambda runs: {})
    code = reproduce.main(["--data-dir", str(data), "--datasets", str(path), "--rows", "fused",
                           "--benchmarks", ",".join(datasets), *more])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    """The error of a failed run: one line, the last on stderr (above it only progress lines), no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and sum(line.startswith("error:") for line in lines) == 1, err
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def _spair_entry(url: str, **known) -> dict:
    return {"spair": {"source": "test", "root": "SPair-71k", "expect": ["PairAnnotation/test", "JPEGImages"],
                      "archives": [{"url": url, "file": "SPair-71k.tar.gz", **known}]}}


def _recorded(data: Path) -> dict:
    path = data / ".reproduce" / "checksums.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _flip(data: bytes, where: str) -> bytes:
    """One byte flipped: in a .tar.gz's trailer CRC-32 (every byte decompresses; only gzip's own check fails), in
    the middle of a compressed stream, or in a stored zip member's data."""
    index = {"gzip-crc": len(data) - 8, "gzip-middle": len(data) // 2, "zip-member": len(data) // 3}[where]
    return data[:index] + bytes([data[index] ^ 0x55]) + data[index + 1 :]


@pytest.mark.parametrize("where", ["gzip-crc", "gzip-middle", "zip-member"])
def test_an_archive_with_one_byte_flipped_is_refused_before_anything_is_unpacked(
    tmp_path: Path, site: _Site, monkeypatch, capsys, where: str
) -> None:
    kind = "zip" if where.startswith("zip") else "tar.gz"
    site.files["SPair-71k.tar.gz"] = _flip(_spair_archive(tmp_path, kind).read_bytes(), where)
    data = tmp_path / "data"
    code, _, err = _run_fetch(monkeypatch, capsys, data, _spair_entry(site.url("SPair-71k.tar.gz")))
    line = _one_error_line(err)
    assert code == 2 and "SPair-71k.tar.gz (from " + site.url("SPair-71k.tar.gz") in line
    assert "is not a complete archive" in line and "moved aside to" in line
    assert not (data / "SPair-71k").exists() and _recorded(data) == {}  # nothing a reader takes, nothing recorded
    assert (data / "downloads" / "SPair-71k.tar.gz.bad").exists()
    assert not (data / "downloads" / "SPair-71k.tar.gz").exists()
    assert not list((data / ".reproduce").glob("unpacking-*"))


@pytest.mark.parametrize("then", ["placed in downloads", "served"])
def test_damaged_then_right_ends_with_a_ready_root(tmp_path: Path, site: _Site, monkeypatch, capsys,
                                                    then: str) -> None:
    good = _spair_archive(tmp_path).read_bytes()
    site.files["SPair-71k.tar.gz"] = _flip(good, "gzip-crc")
    data, entry = tmp_path / "data", _spair_entry(site.url("SPair-71k.tar.gz"))
    assert _run_fetch(monkeypatch, capsys, data, entry)[0] == 2
    if then == "served":
        site.files["SPair-71k.tar.gz"] = good
    else:
        (data / "downloads" / "SPair-71k.tar.gz").write_bytes(good)
    code, out, err = _run_fetch(monkeypatch, capsys, data, entry)
    assert code == 0 and "error" not in err and f"spair: ready at {data / 'SPair-71k'}" in out
    assert len(SPairDataset(data / "SPair-71k", split="test")) == 2
    assert _recorded(data) == {"SPair-71k.tar.gz": hashlib.sha256(good).hexdigest()}
    assert [name for name, _ in site.requests] == ["SPair-71k.tar.gz"] * (2 if then == "served" else 1)


def test_a_recorded_checksum_is_kept_until_forget_checksums(tmp_path: Path, site: _Site, monkeypatch, capsys) -> None:
    first = _spair_archive(tmp_path).read_bytes()
    site.files["SPair-71k.tar.gz"] = first
    data, entry = tmp_path / "data", _spair_entry(site.url("SPair-71k.tar.gz"))
    assert _run_fetch(monkeypatch, capsys, data, entry)[0] == 0
    assert _recorded(data) == {"SPair-71k.tar.gz": hashlib.sha256(first).hexdigest()}
    # a new release of the same name: refused against the record, left in place, the flag named
    shutil.rmtree(data / "SPair-71k")
    release = gzip.compress(gzip.decompress(first), mtime=1)  # the same tar, compressed anew: other bytes
    (data / "downloads" / "SPair-71k.tar.gz").write_bytes(release)
    code, _, err = _run_fetch(monkeypatch, capsys, data, entry)
    line = _one_error_line(err)
    assert code == 2 and "was recorded when a file of this name first passed every check" in line
    assert "--forget-checksums" in line and site.url("SPair-71k.tar.gz") in line
    assert (data / "downloads" / "SPair-71k.tar.gz").read_bytes() == release and not (data / "SPair-71k").exists()
    code, out, err = _run_fetch(monkeypatch, capsys, data, entry, "--forget-checksums")
    assert code == 0 and "forgot the recorded SHA-256 of ['SPair-71k.tar.gz']" in out
    assert _recorded(data) == {"SPair-71k.tar.gz": hashlib.sha256(release).hexdigest()}
    assert len(SPairDataset(data / "SPair-71k", split="test")) == 2


def _pfpascal_site(tmp: Path, site: _Site) -> tuple[dict, bytes]:
    """A PF-PASCAL zip (images and annotations, no csv) and its test csv served apart, as the real ones are."""
    root, _ = write_synthetic_pfpascal(tmp / "src")
    csv_bytes = (root / "test_pairs_pf_pascal.csv").read_bytes()
    (root / "test_pairs_pf_pascal.csv").unlink()
    with zipfile.ZipFile(tmp / "PF-dataset-PASCAL.zip", "w") as out:
        for path in sorted(root.rglob("*")):
            out.write(path, path.relative_to(root.parent))
    site.files["PF-dataset-PASCAL.zip"] = (tmp / "PF-dataset-PASCAL.zip").read_bytes()
    site.files["test_pairs_pf_pascal.csv"] = csv_bytes
    entry = {"pfpascal": {"source": "test", "root": "PF-dataset-PASCAL",
                          "expect": ["test_pairs_pf_pascal.csv", "JPEGImages", "Annotations"], "archives": [
        {"url": site.url("PF-dataset-PASCAL.zip"), "file": "PF-dataset-PASCAL.zip"},
        {"url": site.url("test_pairs_pf_pascal.csv"), "file": "test_pairs_pf_pascal.csv", "unpack_to": None,
         "copy_to": "PF-dataset-PASCAL/test_pairs_pf_pascal.csv", "check": "datamodules.pfpascal:check_pairs_file",
         "pairs": 5},
    ]}}  # fmt: skip
    return entry, csv_bytes


def _cut_without_length(body: bytes):  # noqa: ANN202
    def answer(request) -> None:  # noqa: ANN001 - HTTP/1.0, no Content-Length: the end of the body is the close
        request.send_response(200)
        request.end_headers()
        request.wfile.write(body)
    return answer


@pytest.mark.parametrize("served", ["an HTML page", "cut short without Content-Length",
                                    "cut short at a row boundary", "another csv format"])
def test_a_csv_is_checked_as_its_reader_parses_it_before_it_is_installed(
    tmp_path: Path, site: _Site, monkeypatch, capsys, served: str
) -> None:
    entry, good = _pfpascal_site(tmp_path, site)
    csv_url = site.url("test_pairs_pf_pascal.csv")
    if served == "an HTML page":
        site.files["test_pairs_pf_pascal.csv"] = b"<!DOCTYPE html>\n<html><body>503 Service Unavailable</body></html>"
        expected = "is an HTML page"
    elif served == "cut short without Content-Length":
        site.handlers["test_pairs_pf_pascal.csv"] = _cut_without_length(good[: good.rindex(b";")])
        expected = "is not what its reader needs (Malformed PF-PASCAL pairs file"
    elif served == "cut short at a row boundary":  # every row it holds parses: the published count tells
        site.handlers["test_pairs_pf_pascal.csv"] = _cut_without_length(good[: good.rstrip(b"\n").rindex(b"\n") + 1])
        expected = "is not what its reader needs (it holds 4 pairs, the published file 5: cut short?)"
    else:
        site.files["test_pairs_pf_pascal.csv"] = b"source_image,target_image,class,flip,extra\na.jpg,b.jpg,1,0,0\n"
        expected = "expected 7 columns"
    data = tmp_path / "data"
    code, _, err = _run_fetch(monkeypatch, capsys, data, entry)
    line = _one_error_line(err)
    assert code == 2 and f"test_pairs_pf_pascal.csv (from {csv_url}) {expected}" in line or expected in line, line
    assert csv_url in line and "moved aside to" in line
    assert not (data / "PF-dataset-PASCAL").exists() and _recorded(data) == {}
    # the right csv served: installed beside the unpacked zip, both recorded
    site.handlers.clear()
    site.files["test_pairs_pf_pascal.csv"] = good
    code, _, err = _run_fetch(monkeypatch, capsys, data, entry)
    assert code == 0, err
    assert len(PFPascalDataset(data / "PF-dataset-PASCAL")) == 5
    assert sorted(_recorded(data)) == ["PF-dataset-PASCAL.zip", "test_pairs_pf_pascal.csv"]


def test_a_missing_csv_alone_is_fetched_into_a_present_root(tmp_path: Path, site: _Site, monkeypatch, capsys) -> None:
    entry, good = _pfpascal_site(tmp_path, site)
    data = tmp_path / "data"
    write_synthetic_pfpascal(data)
    (data / "PF-dataset-PASCAL" / "test_pairs_pf_pascal.csv").unlink()  # a root unpacked by hand, without the csv
    code, _, err = _run_fetch(monkeypatch, capsys, data, entry)
    assert code == 0, err
    assert site.requests == [("test_pairs_pf_pascal.csv", None)]  # not the zip again
    assert (data / "PF-dataset-PASCAL" / "test_pairs_pf_pascal.csv").read_bytes() == good


def _chunked_then_dropped(request) -> None:  # noqa: ANN001
    request.send_response(200)
    request.send_header("Transfer-Encoding", "chunked")
    request.end_headers()
    request.wfile.write(b"400\r\n" + bytes(1024) + b"\r\n" + b"400\r\n" + bytes(10))  # then the connection closes


def _not_http(request) -> None:  # noqa: ANN001
    request.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    request.close_connection = True


@pytest.mark.parametrize("failure", ["dropped mid-chunk", "not HTTP", "connection refused", "timeout", "HTTP 404"])
def test_a_network_failure_is_one_line_naming_the_file_and_url(
    tmp_path: Path, site: _Site, monkeypatch, capsys, failure: str
) -> None:
    monkeypatch.setattr(fetch, "TIMEOUT", 0.5)
    url = site.url("SPair-71k.tar.gz")
    site.files["SPair-71k.tar.gz"] = b"probe answers"
    if failure == "dropped mid-chunk":
        site.handlers["SPair-71k.tar.gz"], cause = _chunked_then_dropped, "closed in the middle of the transfer"
    elif failure == "not HTTP":
        site.handlers["SPair-71k.tar.gz"], cause = _not_http, "reply is not HTTP (BadStatusLine"
    elif failure == "HTTP 404":
        site.handlers["SPair-71k.tar.gz"], cause = lambda request: request.send_error(404), "HTTP 404"
    elif failure == "timeout":
        site.handlers["SPair-71k.tar.gz"], cause = lambda request: time.sleep(2), "no answer within 0.5 s"
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/SPair-71k.tar.gz"
        listener.close()  # nothing listens there now
        cause = "connection refused"
    data = tmp_path / "data"
    code, _, err = _run_fetch(monkeypatch, capsys, data, _spair_entry(url))
    line = _one_error_line(err)
    assert code == 2 and "SPair-71k.tar.gz" in line and url in line and cause in line, line
    assert not (data / "downloads" / "SPair-71k.tar.gz.part").exists()  # no byte arrived: nothing kept ...
    assert "partial file is kept" not in line  # ... and none claimed
    assert not (data / "SPair-71k").exists()


def _length_then_dropped(body: bytes, sent: int):  # noqa: ANN202
    def answer(request) -> None:  # noqa: ANN001 - announces the whole file, sends part of it, closes
        request.send_response(200)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[:sent])
    return answer


def test_an_interrupted_download_keeps_its_part_says_so_and_resumes(tmp_path: Path, site: _Site, monkeypatch,
                                                                    capsys) -> None:
    whole = _spair_archive(tmp_path).read_bytes()
    site.files["SPair-71k.tar.gz"] = whole
    site.handlers["SPair-71k.tar.gz"] = _length_then_dropped(whole, 1000)
    data, entry = tmp_path / "data", _spair_entry(site.url("SPair-71k.tar.gz"))
    code, _, err = _run_fetch(monkeypatch, capsys, data, entry)
    part = data / "downloads" / "SPair-71k.tar.gz.part"
    line = _one_error_line(err)
    assert code == 2 and f"the server sent 1000 of the {len(whole)} bytes announced" in line
    assert f"rerun to resume (the partial file is kept as {part})" in line and part.stat().st_size == 1000
    site.handlers.clear()
    assert _run_fetch(monkeypatch, capsys, data, entry)[0] == 0
    assert site.requests[-1] == ("SPair-71k.tar.gz", "bytes=1000-") and not part.exists()
    assert (data / "downloads" / "SPair-71k.tar.gz").read_bytes() == whole


@pytest.mark.parametrize("extra", [0, 7])
def test_a_complete_part_answered_416_is_verified_not_downloaded_again(tmp_path: Path, site: _Site, extra: int) -> None:
    whole = _spair_archive(tmp_path).read_bytes()
    site.files["SPair-71k.tar.gz"] = whole
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "SPair-71k.tar.gz.part").write_bytes(whole + bytes(extra))  # complete (or longer than the file)
    root = fetch.fetch_dataset(_dataset(site.url("SPair-71k.tar.gz")), tmp_path / "data", log=lambda _: None)
    expected = [("SPair-71k.tar.gz", f"bytes={len(whole) + extra}-")] + ([("SPair-71k.tar.gz", None)] if extra else [])
    assert site.requests == expected  # 416; a longer .part is no part of the file: downloaded anew
    assert (downloads / "SPair-71k.tar.gz").read_bytes() == whole and len(SPairDataset(root, split="test")) == 2


def test_downloads_resume_over_http(tmp_path: Path, site: _Site) -> None:
    whole = _spair_archive(tmp_path).read_bytes()
    site.files["SPair-71k.tar.gz"] = whole
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "SPair-71k.tar.gz.part").write_bytes(whole[:1000])  # an interrupted download
    root = fetch.fetch_dataset(_dataset(site.url("SPair-71k.tar.gz"), size=len(whole)), tmp_path / "data",
                               log=lambda _: None)
    assert site.requests == [("SPair-71k.tar.gz", "bytes=1000-")]
    assert (downloads / "SPair-71k.tar.gz").read_bytes() == whole and len(SPairDataset(root, split="test")) == 2


def test_a_stale_partial_root_is_named_never_merged(tmp_path: Path, site: _Site) -> None:
    archive = _spair_archive(tmp_path)
    url = _served(site, archive)
    data = tmp_path / "data"
    (data / "SPair-71k" / "JPEGImages").mkdir(parents=True)
    (data / "SPair-71k" / "JPEGImages" / "left-over.jpg").write_bytes(b"from an earlier attempt")
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_dataset(_dataset(url, file=archive.name), data, log=lambda _: None)
    message = str(err.value)
    assert f"{data / 'SPair-71k'} is already there but incomplete (lacks ['PairAnnotation/test'])" in message
    assert "move it away (or delete it) and rerun" in message and "\n" not in message
    assert sorted(p.name for p in (data / "SPair-71k").rglob("*")) == ["JPEGImages", "left-over.jpg"]  # untouched
    assert _recorded(data) == {} and not list((data / ".reproduce").glob("unpacking-*"))
    shutil.rmtree(data / "SPair-71k")  # as the message says
    root = fetch.fetch_dataset(_dataset(url, file=archive.name), data, log=lambda _: None)
    assert len(SPairDataset(root, split="test")) == 2 and list(_recorded(data)) == [archive.name]


def test_an_archive_of_another_layout_names_its_top_folder_and_installs_nothing(tmp_path: Path, site: _Site) -> None:
    root = write_synthetic_spair(tmp_path / "src" / "SPair71k-v2", categories=("cat",), pairs_per_category=2,
                                 image_size=(48, 36))
    archive = tmp_path / "SPair-71k.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        out.add(root, arcname="SPair71k-v2")
        out.add(root / "PairAnnotation", arcname="README-folder")
    data = tmp_path / "data"
    with pytest.raises(fetch.FetchError) as err:
        fetch.fetch_dataset(_dataset(_served(site, archive)), data, log=lambda _: None)
    message = str(err.value)
    assert "SPair-71k/ would lack ['PairAnnotation/test', 'JPEGImages']" in message
    assert "SPair-71k.tar.gz holds ['README-folder/', 'SPair71k-v2/'] at its top" in message
    assert "nothing was installed" in message and "\n" not in message
    assert sorted(p.name for p in data.iterdir()) == [".reproduce", "downloads"] and _recorded(data) == {}
    assert (data / "downloads" / "SPair-71k.tar.gz").exists()  # not damaged: kept


def test_an_archive_top_entry_beside_the_root_is_named_and_not_kept(tmp_path: Path, site: _Site) -> None:
    root = write_synthetic_spair(tmp_path / "src" / "SPair-71k", categories=("cat",), pairs_per_category=2,
                                 image_size=(48, 36))
    (tmp_path / "src" / "attributes.txt").write_text("not needed by the reader\n")
    archive = tmp_path / "SPair-71k.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        out.add(root, arcname="SPair-71k")
        out.add(tmp_path / "src" / "attributes.txt", arcname="attributes.txt")
    said: list[str] = []
    data = tmp_path / "data"
    assert fetch.fetch_dataset(_dataset(_served(site, archive)), data, log=said.append) == data / "SPair-71k"
    assert "spair: not kept (not under SPair-71k/): ['attributes.txt']" in said
    assert not (data / "attributes.txt").exists()


# --- model weights ---------------------------------------------------------------------------------------------


def test_the_model_files_listed_are_those_the_download_fetches() -> None:
    from fnmatch import fnmatch

    for kind, files in fetch.MODEL_FILES.items():
        for name in files:
            assert any(fnmatch(name, p) for p in MODEL_PATTERNS), (kind, name)
            assert not any(fnmatch(name, p) for p in SKIPPED_FILES), (kind, name)
    assert fetch.default_model_ids() == {"sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                         "dino": "facebook/dinov2-base"}


@pytest.mark.parametrize("files", [(), ("config.json",), ("config.json", "model.safetensors")])
def test_the_printed_download_command_runs_under_the_installed_hf_and_fetches_what_fetch_models_does(
        monkeypatch, files: tuple[str, ...]) -> None:
    """The command our messages print, given to the installed ``hf`` (its download function replaced): the same
    patterns as ``fetch_models``' snapshot_download, or exactly the named files, into the named folder."""
    import shlex

    from huggingface_hub.cli import download as cli_download
    from huggingface_hub.cli.hf import app

    calls = []
    monkeypatch.setattr(cli_download, "snapshot_download", lambda **kw: calls.append(kw) or "/x")
    monkeypatch.setattr(cli_download, "hf_hub_download", lambda **kw: calls.append(kw) or "/x")
    words = shlex.split(download_command("org/model", files, local_dir="some dir"))
    assert words[:2] == ["hf", "download"]
    app(words[1:], standalone_mode=False)
    (call,) = calls
    assert call["repo_id"] == "org/model" and call["local_dir"] == "some dir"
    if not files:
        assert call["allow_patterns"] == list(MODEL_PATTERNS) and call["ignore_patterns"] == list(SKIPPED_FILES)
    elif len(files) == 1:
        assert call["filename"] == files[0]
    else:
        assert call["allow_patterns"] == list(files) and not call.get("ignore_patterns")


def test_offline_the_list_names_each_model_file_and_how_to_get_exactly_those(tmp_path: Path, capsys) -> None:
    sd = tmp_path / "sd15"
    for name in fetch.MODEL_FILES["sd"][1:]:  # a local folder that lacks the UNet's config
        (sd / name).parent.mkdir(parents=True, exist_ok=True)
        (sd / name).write_text("{}")
    code = reproduce.main(["--data-dir", str(tmp_path / "data"), "--offline", "--benchmarks", "spair",
                           "--sd-model", str(sd)])
    err = capsys.readouterr().err
    assert code == 2 and "offline: these model files are missing:" in err
    assert f"  sd model {sd} (a local folder): unet/config.json (small files, under 1 MB each)\n" in err
    assert f"hf download stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json --local-dir {sd}" in err
    dino = " ".join(fetch.MODEL_FILES["dino"])
    assert "  dino model facebook/dinov2-base: config.json, model.safetensors (about 346 MB in all)\n" in err
    assert f"hf download facebook/dinov2-base {dino} --local-dir dinov2-base" in err
    assert "then pass --dino-model dinov2-base (a hub id or a local folder; it becomes " \
           "--model.pipeline.dino.model_id)" in err and f"then pass --sd-model {sd}" in err
    for line in err.splitlines():  # never the whole repository
        if "hf download" in line:
            assert line.split("hf download ")[1].split()[1] != "--local-dir", line
    # an SD-only row: the DINO model is not needed, so not listed
    assert reproduce.main(["--data-dir", str(tmp_path / "data"), "--offline", "--benchmarks", "spair",
                           "--rows", "sd"]) == 2
    err = capsys.readouterr().err
    assert "sd model stable-diffusion-v1-5/stable-diffusion-v1-5:" in err and "dino model" not in err
    assert f"{', '.join(fetch.MODEL_FILES['sd'])} (about 4.26 GB in all)\n" in err
    # another hub id: its sizes are not known here, and the list says so
    assert reproduce.main(["--data-dir", str(tmp_path / "data"), "--offline", "--benchmarks", "spair",
                           "--rows", "dino", "--dino-model", "org/another-dino"]) == 2
    err = capsys.readouterr().err
    assert "  dino model org/another-dino: config.json, model.safetensors (sizes unknown offline for a model " \
           "other than the paper's)\n" in err


def test_the_listed_model_sizes_are_the_paper_models_float32_parameters() -> None:
    """MODEL_FILE_SIZES against the architectures built (on the meta device, no weights) from SD 1.5's and
    DINOv2-B's configs as published on the hub (unet/config.json, vae/config.json, text_encoder/config.json of
    stable-diffusion-v1-5; config.json of facebook/dinov2-base)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    with torch.device("meta"):
        models = {
            ("sd", "unet/diffusion_pytorch_model.safetensors"): UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            ("sd", "vae/diffusion_pytorch_model.safetensors"): AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4),
            ("sd", "text_encoder/model.safetensors"): CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")),
            ("dino", "model.safetensors"): Dinov2Model(Dinov2Config(
                hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518,
                mlp_ratio=4, layerscale_value=1.0)),
        }
    for (kind, name), model in models.items():
        assert fetch.MODEL_FILE_SIZES[kind][name] == 4 * sum(p.numel() for p in model.parameters()), name
    listed = {(kind, name) for kind, sizes in fetch.MODEL_FILE_SIZES.items() for name in sizes}
    assert listed == set(models) and all(name in fetch.MODEL_FILES[kind] for kind, name in listed)


@pytest.mark.parametrize("row", ["sd", "dino", "fused"])
def test_model_options_reach_the_runs_configs(tmp_path: Path, row: str, capsys) -> None:
    import evaluate

    args = reproduce.parse_args(["--data-dir", str(tmp_path), "--rows", row, "--sd-model", "/models/sd15",
                                 "--dino-model", "org/dino"])
    (run,) = plan_runs(["spair"], [row], {"spair": tmp_path}, tmp_path / "out", 1, models=reproduce.chosen_models(args))
    with pytest.raises(SystemExit):
        evaluate.main([*run.args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["pipeline"]["init_args"]
    for kind, model_id in (("sd", "/models/sd15"), ("dino", "org/dino")):
        if kind in ROW_FEATURIZERS[row]:
            assert printed[kind]["init_args"]["model_id"] == model_id
        else:
            assert printed[kind] is None
    assert "--synthetic runs the tiny random models" in str(
        pytest.raises(SystemExit, reproduce.parse_args, ["--data-dir", "x", "--synthetic", "--sd-model", "y"]).value)


def test_a_synthetic_table_says_so_at_its_top_and_an_empty_paper_cell_is_a_dash(tmp_path: Path) -> None:
    table = [comparison.Comparison("pfwillow", "fused", "PCK@0.1 per_image", None, 40.0, None, 1.0, None,
                                   "not evaluated in the paper"),
             comparison.Comparison("spair", "fused", "PCK@0.1 category_mean", 64.0, 1.0, -63.0, 1.0, False, "Table 2")]
    text = comparison.write_comparison(table, tmp_path, {"synthetic": True})
    md = (tmp_path / "reproduction.md").read_text()
    assert md == "# Reproduction of the paper's numbers\n\n" + text and text.startswith(comparison.SYNTHETIC_NOTE)
    assert "| pfwillow | fused | PCK@0.1 per_image | — [a] | 40.0 | - | — | not evaluated in the paper |" in md
    assert md.rstrip().endswith(comparison.NO_NUMBER_NOTE) and "not reported" not in md
    plain = comparison.write_comparison(table[1:], tmp_path, {"synthetic": False})
    assert "Generated" not in plain and "[a]" not in plain


def test_offline_it_fails_fast_naming_each_file_its_url_and_where_it_goes(tmp_path: Path, capsys) -> None:
    code = reproduce.main(["--data-dir", str(tmp_path / "data"), "--offline", "--benchmarks", "spair,cub"])
    err = capsys.readouterr().err
    assert code == 2 and "offline: these files are missing" in err
    assert f"{tmp_path / 'data' / 'downloads'}/" in err
    for dataset in (fetch.load_datasets()[name] for name in ("spair", "cub")):
        for archive in dataset.archives:
            assert f"{archive.file} (size unknown offline)  <-  {archive.url}" in err
    assert not (tmp_path / "data" / "runs").exists()  # nothing ran


def test_synthetic_roots_need_neither_pytest_nor_the_test_suite(tmp_path: Path) -> None:
    """--synthetic's generators are the product's: they run where pytest is not installed."""
    script = f"""
import sys
from pathlib import Path
sys.modules["pytest"] = None  # import pytest / conftest now raise ImportError, as where they are not installed
sys.modules["conftest"] = None
sys.path.insert(0, {str(REPO / "scripts")!r})
import reproduce
roots, _ = reproduce.synthetic_roots(Path({str(tmp_path)!r}))
tests = Path({str(REPO / "tests")!r})
print(sorted(roots))
print([m for m, mod in sys.modules.items() if tests in Path(getattr(mod, "__file__", None) or "/").parents])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    names, from_tests = done.stdout.strip().splitlines()[-2:]
    assert names == str(sorted([*BENCHMARKS, "davis"])) and from_tests == "[]"
    roots = json.loads((tmp_path / "synthetic" / "roots.json").read_text())
    assert len(SPairDataset(roots["spair"], split="test")) == 6 and len(PFPascalDataset(roots["pfpascal"])) == 5
    assert len(PFWillowDataset(roots["pfwillow"])) == 5 and len(TSSDataset(roots["tss"])) == 6
    assert len(CUBASICDataset(roots["cub"], categories=[1, 2])) > 0


# --- run and compare -------------------------------------------------------------------------------------------


def _in_process(args) -> int:  # noqa: ANN001
    import evaluate

    evaluate.main(list(args))
    return 0


def test_runs_and_the_comparison_table_on_every_benchmark(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(reproduce, "run_all", lambda runs: run_all(runs, runner=_in_process))
    common = ["--data-dir", str(tmp_path), "--synthetic"]
    assert reproduce.main(common) == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "runs" / "reproduction.json").read_text())
    rows = {(r["benchmark"], r["row"]) for r in table["table"]}
    expected = {(b, r) for b in BENCHMARKS for r in ("sd", "dino", "fused")} | {("cub", "fused_alpha0.8")}
    assert expected <= rows and set(table["context"]["runs"].values()) == {"ran"}
    for line in table["table"]:
        assert line["ours"] is not None
        if line["paper"] is None:  # not reported: no difference, no verdict
            assert line["difference"] is None and line["within"] is None
            continue
        assert line["difference"] == pytest.approx(line["ours"] - line["paper"])
        assert line["within"] == (abs(line["difference"]) <= line["tolerance"])
    assert "paper: not reported" not in out and "| — [a] |" in out and comparison.NO_NUMBER_NOTE in out
    assert (tmp_path / "runs" / "reproduction.md").read_text().startswith(
        "# Reproduction of the paper's numbers\n\n" + comparison.SYNTHETIC_NOTE)
    assert "| spair | fused | PCK@0.1 category_mean | 64.0 |" in out
    assert (tmp_path / "runs" / "reproduction.md").read_text().count("| spair |") == 3
    # a rerun skips every finished run and prints the same table
    ran = []
    monkeypatch.setattr(reproduce, "run_all", lambda runs: run_all(runs, runner=lambda a: ran.append(a) or 0))
    assert reproduce.main(common) == 0 and ran == []
    again = json.loads((tmp_path / "runs" / "reproduction.json").read_text())
    assert again["table"] == table["table"] and set(again["context"]["runs"].values()) == {"skipped"}


def test_the_tolerance_column_and_a_missing_run(tmp_path: Path) -> None:
    numbers = [comparison.PaperNumber("spair", "fused", "0.1", "category_mean", 64.0, "Table 1", 1.0),
               comparison.PaperNumber("spair", "sd", "0.1", "category_mean", 50.0, "Table 1", 1.0),
               comparison.PaperNumber("tss", "fused", "0.05", "per_dataset/JODS", 73.2, "Table 3", 2.0)]
    for bench, row, pck in (("spair", "fused", {"0.1": {"category_mean": 63.2}}),
                            ("tss", "fused", {"0.05": {"per_dataset": {"JODS": 70.0}}})):
        (tmp_path / bench / row).mkdir(parents=True)
        (tmp_path / bench / row / "results.json").write_text(json.dumps({"pck": pck}))
    table = comparison.compare(numbers, tmp_path, ["spair", "tss"], ["sd", "fused"])
    assert [(c.ours, c.within) for c in table] == [(63.2, True), (None, None), (70.0, False)]
    text = comparison.render_markdown(table)
    assert "| 64.0 | 63.2 | -0.8 | yes (+-1) |" in text and "| 50.0 | - | - | no run |" in text
    assert "| 73.2 | 70.0 | -3.2 | NO (+-2) |" in text


def test_plan_skips_the_cub_only_row_elsewhere_and_shares_one_feature_cache(tmp_path: Path) -> None:
    roots = {b: tmp_path / b for b in BENCHMARKS}
    runs = plan_runs(list(BENCHMARKS), list(ROWS), roots, tmp_path / "out", devices=4)
    assert len(runs) == 5 * 3 + 1 and [r.row for r in runs if r.benchmark == "cub"][-1] == "fused_alpha0.8"
    assert all("--trainer.devices" in r.args and str(tmp_path / "out" / "feature_cache") in r.args for r in runs)
