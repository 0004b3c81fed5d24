"""Reproduce the paper in one command: fetch and verify the data and weights, run the paper's rows on each benchmark,
and print the paper's numbers beside ours.

    # a connected GPU machine: everything, Table 1's rows on every benchmark
    python scripts/reproduce.py --data-dir /data/sd-dino --devices 1
    python scripts/reproduce.py --data-dir /data/sd-dino --benchmarks spair,pfpascal --rows fused --devices 4
    # weights downloaded elsewhere (a folder per model, or another hub id)
    python scripts/reproduce.py --data-dir /data/sd-dino --sd-model /models/sd15 --dino-model /models/dinov2-base
    # this machine (no network, no GPU): generated roots in the real layouts and the tiny random models
    python scripts/reproduce.py --data-dir /tmp/repro --synthetic
    # the supplementary's tables, every cell beside the paper's (rows needing ODISE / iBOT files: give them)
    python scripts/reproduce.py --data-dir /data/sd-dino --tables all --ibot-checkpoint ibot_vitb16_teacher.pth

Steps: (1) fetch what is missing into ``--data-dir`` (``scripts/reproduction/datasets.yaml``: URLs and layouts;
downloads resume; every file is verified before anything is installed where a reader looks: not an HTML page, its
known size and checksums, an archive decompressed to its end with every CRC checked, a csv parsed as its reader
parses it; archives are unpacked into a scratch folder, the reader's layout checked there, then renamed into place;
a file's SHA-256 is recorded only after all that, and checked on later runs: ``--forget-checksums`` drops the
records of the chosen benchmarks' files; weights through ``huggingface_hub``, only the files the featurizers load).
A failure is one line naming the file and its URL (exit status 2). Offline it stops at once and lists the data
files and the model files it needs, and where to put them. (2) one ``evaluate.py test`` run per benchmark and row
into ``<out>/<benchmark>/<row>`` (rows: ``sd``, ``dino``, ``fused``, and the supplementary's CUB
``fused_alpha0.8``), sharing ``<out>/feature_cache``; a run finished with the same command is skipped, an
interrupted one resumed. (3) the comparison with ``scripts/reproduction/paper_numbers.yaml``: printed, and
``<out>/reproduction.md`` / ``reproduction.json``. Exit status 1 when a run failed.

``--tables 1,2,...`` (or ``all``) reproduces the supplementary's tables instead (``reproduction/tables.py``):
each table's config on the data its cells name (the 20-pairs-per-category SPair-71k subset, the whole test set,
or the benchmark runs for Table 10's PF-Pascal / TSS columns and Table 13's CUB), into ``<out>/tables/``, then
every cell beside the paper's (``reproduction/supplementary_numbers.yaml``) with the difference and a summary
line per table. Rows that need files the hub does not have are run when given (``--odise-captioner``,
``--odise-projection``, ``--ibot-checkpoint``; SD-XL with a 24 GiB GPU or ``--sdxl``) and otherwise reported
as skipped with what they need. Add ``--benchmarks`` / ``--rows`` to run the main rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]

from reproduction import write_output  # noqa: E402
from reproduction.compare import PAPER_FILE, compare, load_paper_numbers, write_comparison  # noqa: E402
from reproduction.fetch import (  # noqa: E402
    DATASETS_FILE,
    FetchError,
    MissingFiles,
    default_model_ids,
    fetch_dataset,
    fetch_models,
    forget_checksums,
    load_datasets,
    missing_files,
    missing_message,
    missing_model_files,
    unreachable,
)
from reproduction.runs import BENCHMARKS, ROW_FEATURIZERS, ROWS, plan_runs, run_all  # noqa: E402
from reproduction.tables import (  # noqa: E402
    REQUIREMENTS,
    SUPPLEMENTARY_FILE,
    benchmark_runs_needed,
    compare_tables,
    comparison_records,
    load_supplementary,
    missing_hub_models,
    parse_tables,
    plan_table_runs,
    projected_gpu_minutes,
    render_tables,
    rows_without_a_cell,
    table10_row_args,
    table_benchmarks,
    table_hub_models,
)

TINY = REPO / "configs" / "overlays" / "tiny.yaml"


def _names(text: str, known: list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"error: unknown {what} {unknown}; choose from {','.join(known)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="where the data sets are (or go)")
    parser.add_argument("--benchmarks", default=None, help="comma-separated, of " + ",".join(BENCHMARKS)
                        + " (default: all of them, or none with --tables)")
    parser.add_argument("--rows", default=None, help="comma-separated, of " + ",".join(ROWS) + " (default: all)")
    parser.add_argument("--tables", default=None,
                        help="the supplementary's tables to reproduce: 'all' or comma-separated, of 1-8, 10-13")
    for requirement in REQUIREMENTS.values():
        if requirement.key == "sdxl":
            parser.add_argument(requirement.flag, action="store_true", help="run Table 6's SD-XL rows even "
                                "without a 24 GiB GPU")
        else:
            parser.add_argument(requirement.flag, type=Path, default=None, metavar="FILE",
                                help=f"for Table {','.join(map(str, requirement.tables))}: {requirement.need}")
    parser.add_argument("--supplementary", type=Path, default=SUPPLEMENTARY_FILE,
                        help="the supplementary's numbers data file")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (Lightning's --trainer.devices)")
    parser.add_argument("--out", type=Path, default=None, help="run folders and the table (default <data-dir>/runs)")
    parser.add_argument("--offline", action="store_true", default=os.environ.get("HF_HUB_OFFLINE") == "1",
                        help="never download: use what is there, else list what is missing (default with HF_HUB_OFFLINE=1)")
    parser.add_argument("--feature-cache", default="default",
                        help="folder of the feature cache the rows share (default <out>/feature_cache, about 26 MB "
                        "per image at the paper's settings); 'none' to run without one")
    parser.add_argument("--config", action="append", default=[], help="more --config files for every run")
    parser.add_argument("--synthetic", action="store_true",
                        help="generated roots in the real layouts and the tiny random models (a smoke run, no downloads)")
    parser.add_argument("--sd-model", default=None,
                        help="the SD weights: a hub id or a local folder in diffusers' layout, passed to the runs as "
                        "--model.pipeline.sd.model_id (default: the config's, " + default_model_ids()["sd"] + ")")
    parser.add_argument("--dino-model", default=None,
                        help="the DINOv2 weights: a hub id or a local folder in transformers' layout, passed to the "
                        "runs as --model.pipeline.dino.model_id (default: the config's, " + default_model_ids()["dino"]
                        + ")")
    parser.add_argument("--forget-checksums", action="store_true",
                        help="drop the SHA-256 recorded for the chosen benchmarks' files (<data-dir>/.reproduce/"
                        "checksums.json) before fetching: for a file that changed on purpose (new release)")
    parser.add_argument("--datasets", type=Path, default=DATASETS_FILE, help="the datasets data file")
    parser.add_argument("--paper", type=Path, default=PAPER_FILE, help="the paper's numbers data file")
    args = parser.parse_args(argv)
    main_rows = args.tables is None or args.benchmarks is not None or args.rows is not None
    args.benchmarks = _names(args.benchmarks or ",".join(BENCHMARKS), list(BENCHMARKS), "benchmarks") if main_rows else []
    args.rows = _names(args.rows or ",".join(ROWS), list(ROWS), "rows") if main_rows else []
    args.table_benchmarks = []  # the roots the tables need beyond --benchmarks (main)
    try:
        args.tables = [] if args.tables is None else parse_tables(args.tables)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for requirement in REQUIREMENTS.values():
        given = getattr(args, requirement.key)
        if isinstance(given, Path):
            if not given.expanduser().is_file():
                raise SystemExit(f"error: {requirement.flag} {given}: no such file ({requirement.need})")
            setattr(args, requirement.key, given.expanduser().absolute())
    # the runs start in the repository (subprocess_runner): every folder is passed as an absolute path
    args.data_dir = args.data_dir.expanduser().absolute()
    args.out = (args.out or args.data_dir / "runs").expanduser().absolute()
    if args.synthetic and (args.sd_model or args.dino_model):
        raise SystemExit("error: --synthetic runs the tiny random models; --sd-model / --dino-model do not apply")
    return args


def chosen_models(args: argparse.Namespace) -> dict[str, str]:
    """Featurizer -> model (hub id or local folder) that the chosen rows load: the given ones, else the configs'."""
    given = {"sd": args.sd_model, "dino": args.dino_model}
    kinds = {kind for row in args.rows for kind in ROW_FEATURIZERS[row]} | ({"sd", "dino"} if args.tables else set())
    return {kind: given[kind] or model_id for kind, model_id in default_model_ids().items() if kind in kinds}


def synthetic_roots(data_dir: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Generated roots of every benchmark in its real on-disk layout (``write_synthetic_*`` of ``datamodules``)."""
    from record_outputs import generate_roots  # scripts/record_outputs.py: the same roots its record runs use

    folder, extra = data_dir / "synthetic", {"cub": ["--data.categories", "[1, 2]"]}  # CUB: two of its classes
    made = folder / "roots.json"  # written last: a rerun reuses the roots (their cached features too)
    if made.is_file():
        return {name: Path(path) for name, path in json.loads(made.read_text()).items()}, extra
    shutil.rmtree(folder, ignore_errors=True)
    roots = generate_roots(folder)
    write_output(made, json.dumps({name: str(path) for name, path in roots.items()}))
    return roots, extra


def fetch_all(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, list[str]], dict[str, str]]:
    """Step 1: every requested dataset ready and the weights there (or MissingFiles listing all that is missing,
    data and model files, when offline or the first server cannot be reached). Returns the roots, each benchmark's
    extra arguments, and the models given on the command line (featurizer -> id or folder) for the runs."""
    datasets = load_datasets(args.datasets)
    chosen = {name: datasets[name] for name in [*args.benchmarks, *args.table_benchmarks] if name in datasets}
    if args.forget_checksums:
        dropped = forget_checksums(args.data_dir, [a.file for ds in chosen.values() for a in ds.archives])
        print(f"forgot the recorded SHA-256 of {dropped or 'no file'}")
    models = chosen_models(args)
    missing = {name: m for name, ds in chosen.items() if (m := missing_files(ds, args.data_dir))}
    if args.offline:
        missing_models = missing_model_files(models)
        if missing or missing_models:
            raise MissingFiles(missing_message(missing, args.data_dir, missing_models, models))
    elif missing:
        first = next(iter(missing.values()))[0]
        problem = unreachable(first.url)
        if problem:
            raise FetchError(f"cannot reach {first.url} to download {first.file}: {problem}; offline? --offline "
                             "lists every file to download by hand and where it goes")
    roots = {name: fetch_dataset(ds, args.data_dir, offline=args.offline) for name, ds in chosen.items()}
    fetch_models(models, offline=args.offline)
    model_args = {kind: model_id for kind, model_id in models.items() if getattr(args, f"{kind}_model")}
    return roots, {name: list(ds.extra_args) for name, ds in chosen.items()}, model_args


def main(argv: list[str] | None = None) -> int:
    """Fetch, run, compare; returns the exit status."""
    args = parse_args(argv)
    numbers = load_paper_numbers(args.paper)  # a broken data file fails before anything is fetched or run
    tables = load_supplementary(args.supplementary) if args.tables else {}
    args.table_benchmarks = [b for b in table_benchmarks(tables, args.tables) if b not in args.benchmarks]
    try:
        roots, extra, models = (*synthetic_roots(args.data_dir), {}) if args.synthetic else fetch_all(args)
    except (MissingFiles, FetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    configs = [*([str(TINY)] if args.synthetic else []), *args.config]
    cache = {"default": "default", "none": None}.get(args.feature_cache, Path(args.feature_cache))
    runs = plan_runs(args.benchmarks, args.rows, roots, args.out, args.devices, configs, extra, cache, models)
    table_runs, skipped = [], {}
    if args.tables:
        print(f"supplementary Tables {', '.join(map(str, args.tables))}: about "
              f"{projected_gpu_minutes(tables, args.tables):.0f} min on one H200 in fp32 (projected from "
              "benchmarks/README.md's measured per-image and per-pair times, not measured; the shared feature "
              "cache lowers it)")
        cache_dir = args.out / "feature_cache" if cache == "default" else cache
        given: dict = {key: getattr(args, key) for key in REQUIREMENTS}
        if args.offline and not args.synthetic:  # the tables' extra hub models that are not there: rows skipped
            given["missing_models"] = missing_hub_models(table_hub_models(tables, args.tables))
        table_runs = plan_table_runs(tables, args.tables, roots, args.out, args.devices, configs, cache_dir, given,
                                     args.synthetic, models)
        skipped = {t.table: t.skipped for t in table_runs}
        planned = {(r.benchmark, r.row) for r in runs}
        for benchmark, rows in benchmark_runs_needed(tables, args.tables).items():
            more = [row for row in rows if (benchmark, row) not in planned]
            runs += plan_runs([benchmark], more, roots, args.out, args.devices, configs, extra, cache, models,
                              row_args=table10_row_args())
    unique = list({t.run.out: t.run for t in table_runs}.values())
    status = run_all([*runs, *unique])
    table = compare(numbers, args.out, args.benchmarks, args.rows)
    context = {"synthetic": args.synthetic, "devices": args.devices, "configs": configs,
               "runs": {f"{b}/{r}": s for (b, r), s in status.items()}}
    supplementary = None
    if args.tables:
        cells = compare_tables(tables, args.tables, args.out, skipped)
        extra_rows = rows_without_a_cell(tables, args.tables, args.out)
        supplementary = (render_tables(tables, cells, extra_rows),
                         {"cells": comparison_records(cells), "rows_without_a_cell": extra_rows})
    text = write_comparison(table, args.out, context, supplementary)
    print("\n" + text + f"\nwritten to {args.out / 'reproduction.md'} and reproduction.json")
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
