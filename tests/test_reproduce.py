"""scripts/reproduce.py: the fetch step against local archives, the runs and the comparison with the tiny models."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import reproduce  # noqa: E402
from reproduction import compare as comparison  # noqa: E402
from reproduction import fetch  # noqa: E402
from reproduction.runs import BENCHMARKS, ROWS, plan_runs, run_all  # noqa: E402

from datamodules import (  # noqa: E402
    CUBASICDataset,
    PFPascalDataset,
    PFWillowDataset,
    SPairDataset,
    TSSDataset,
    write_synthetic_spair,
)


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


def test_a_truncated_archive_is_named_and_leaves_no_partial_dataset(tmp_path: Path) -> None:
    archive = _spair_archive(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(fetch.FetchError, match=r"SPair-71k.tar.gz \(from file://.*\) is not a complete archive"):
        fetch.fetch_dataset(_dataset(archive.as_uri()), tmp_path / "data", log=lambda _: None)
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


def test_downloads_resume_over_http(tmp_path: Path) -> None:
    archive = _spair_archive(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    shutil.move(archive, served / archive.name)
    requests: list[str | None] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

        def do_GET(self) -> None:  # noqa: N802 - a minimal range server
            requests.append(self.headers.get("Range"))
            body = (served / self.path.lstrip("/")).read_bytes()
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{archive.name}"
        downloads = tmp_path / "data" / "downloads"
        downloads.mkdir(parents=True)
        whole = (served / archive.name).read_bytes()
        (downloads / f"{archive.name}.part").write_bytes(whole[:1000])  # an interrupted download
        root = fetch.fetch_dataset(_dataset(url, size=len(whole)), tmp_path / "data", log=lambda _: None)
    finally:
        server.shutdown()
    assert requests == ["bytes=1000-"] and (downloads / archive.name).read_bytes() == whole
    assert len(SPairDataset(root, split="test")) == 2


def test_offline_it_fails_fast_naming_each_file_its_url_and_where_it_goes(tmp_path: Path, capsys) -> None:
    code = reproduce.main(["--data-dir", str(tmp_path / "data"), "--offline", "--benchmarks", "spair,cub"])
    err = capsys.readouterr().err
    assert code == 2 and "offline: these files are missing" in err
    assert f"{tmp_path / 'data' / 'downloads'}/" in err
    for dataset in (fetch.load_datasets()[name] for name in ("spair", "cub")):
        for archive in dataset.archives:
            assert f"{archive.file}  <-  {archive.url}" in err
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
    assert "paper: not reported" in out
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
