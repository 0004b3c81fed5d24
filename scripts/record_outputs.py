"""Record what every config produces with the tiny models on generated data, and compare two recordings.

A restructuring must not change behaviour: record before, record after, compare. Every config of the
collection runs once with the tiny random models (``configs/overlays/tiny.yaml``, and the ablations' tiny
overlays) on small generated benchmarks in the real on-disk formats:

- the demo; SPair-71k, PF-Pascal, PF-Willow, TSS and CUB-200 tests; every ablation table (3 pairs per
  category of its own subset draw); the dense pictures, DAVIS label propagation and instance swapping;
  training each projection-head preset for one epoch.

A run's record (``<out>/records/<name>.json``) holds its ``results.json`` (without ``run``, which names paths
and settings, not outcomes), every line of ``predictions.jsonl``, a SHA-256 of every picture it wrote, and
for training a SHA-256 per tensor of the head it saved. ``--compare A B`` lists every record that differs.

    python scripts/record_outputs.py --out /tmp/before          # about 5 minutes on 2 CPU cores
    python scripts/record_outputs.py --out /tmp/after
    python scripts/record_outputs.py --compare /tmp/before /tmp/after

The generated roots are the product's own (``write_synthetic_*`` beside each reader in ``datamodules/``;
``scripts/reproduce.py --synthetic`` uses the same roots). Run it from the repository checkout (its configs and
entry points). Outputs stay outside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

CONFIGS = REPO / "configs"
TINY = str(CONFIGS / "overlays" / "tiny.yaml")
COMMON = ["--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_run(run_dir: Path) -> dict[str, Any]:
    """The outcome of one run folder: results (without ``run``), prediction lines, picture and head digests."""
    record: dict[str, Any] = {}
    results = run_dir / "results.json"
    if results.is_file():
        record["results"] = {k: v for k, v in json.loads(results.read_text()).items() if k != "run"}
    predictions = run_dir / "predictions.jsonl"
    if predictions.is_file():
        record["predictions"] = [json.loads(line) for line in predictions.read_text().splitlines()]
    pictures = sorted(run_dir.rglob("*.png"))
    if pictures:
        record["pictures"] = {str(p.relative_to(run_dir)): _sha(p.read_bytes()) for p in pictures}
    for extra in ("swap_metrics.json", "ablation.csv", "analysis.md"):
        found = sorted(run_dir.rglob(extra))
        if found:
            record[extra] = found[0].read_text()
    heads = sorted(run_dir.rglob("*.ckpt"))
    if heads:
        import torch

        state = torch.load(heads[-1], map_location="cpu", weights_only=True)["state_dict"]
        record["head"] = {k: _sha(v.contiguous().numpy().tobytes()) for k, v in sorted(state.items()) if "head" in k}
    return record


def generate_roots(base: Path) -> dict[str, Path]:
    """Generate every benchmark root once, in its real on-disk layout (also scripts/reproduce.py --synthetic)."""
    from datamodules import write_synthetic_spair
    from datamodules.cub import write_synthetic_cub
    from datamodules.davis import write_synthetic_davis
    from datamodules.pfpascal import write_synthetic_pfpascal
    from datamodules.pfwillow import write_synthetic_pfwillow
    from datamodules.tss import write_synthetic_tss

    spair = base / "spair"
    for split, pairs in (("trn", 8), ("val", 3), ("test", 3)):
        write_synthetic_spair(spair, categories=("cat", "dog"), images_per_category=4, pairs_per_category=pairs,
                              split=split, image_size=(96, 72))
    tss = write_synthetic_tss(base / "TSS_CVPR2016", {
        "FG3DCar": [("001", (48, 32), (48, 36))], "JODS": [("horse_1", (40, 30), (36, 44))],
        "PASCAL": [("bike_1", (30, 30), (30, 30))],
    })  # fmt: skip
    return {
        "spair": spair,
        "pfpascal": write_synthetic_pfpascal(base / "pf_pascal")[0],
        "pfwillow": write_synthetic_pfwillow(base / "pf_willow")[0],
        "tss": tss,
        "cub": write_synthetic_cub(base / "CUB_200_2011"),
        "davis": write_synthetic_davis(base / "davis", sequences=("blob", "bars"), num_frames=3),
    }


def _runs(data: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """name -> (entry point, arguments without the default_root_dir)."""
    runs: dict[str, tuple[str, list[str]]] = {"demo": ("evaluate", ["test", "--config", str(CONFIGS / "demo.yaml")])}
    for bench in ("spair", "pfpascal", "pfwillow", "tss", "cub"):
        runs[bench] = ("evaluate", ["test", "--config", str(CONFIGS / f"{bench}.yaml"), "--config", TINY,
                                    "--data.root", str(data[bench]), *COMMON])
    runs["cub"][1].extend(["--data.categories", "[1, 2]"])  # the fixture holds two of ASIC's three classes
    for table in sorted((CONFIGS / "ablations").glob("*.yaml")):
        if table.stem.startswith("tiny"):
            continue
        text = table.read_text()
        overlays = [TINY] + [
            str(p) for p in sorted((CONFIGS / "ablations").glob("tiny_*.yaml")) if p.name in text
        ]
        runs[f"ablation_{table.stem}"] = ("evaluate", [
            "test", "--config", str(table), *[a for o in overlays for a in ("--config", o)], "--data.root",
            str(data["spair"]), "--data.pairs_per_category", "3", *COMMON,
        ])  # fmt: skip
    runs["dense"] = ("evaluate", ["predict", "--config", str(CONFIGS / "dense.yaml"), "--config", TINY, "--data.root",
                                  str(data["spair"]), *COMMON, "--model.init_args.resolution", "48"])
    runs["davis"] = ("evaluate", ["test", "--config", str(CONFIGS / "davis.yaml"), "--config", TINY, "--data.root",
                                  str(data["davis"]), *COMMON, "--model.init_args.resolution", "48"])
    runs["swap"] = ("evaluate", [
        "predict", "--config", str(CONFIGS / "swap.yaml"), "--config", TINY, "--data.root", str(data["spair"].parent / "pairs"),
        "--data.init_args.generate", "true", *COMMON, "--model.init_args.resolution", "48",
        "--model.init_args.refine_steps", "4", "--model.init_args.refine_size", "64", "--model.init_args.picture_height", "40",
    ])  # fmt: skip
    for preset in sorted((CONFIGS / "projection").glob("*.yaml")):
        runs[f"projection_{preset.stem}"] = ("train", [
            "fit", "--config", str(preset), "--config", TINY, "--data.root", str(data["spair"]), *COMMON,
            "--data.init_args.batch_size", "4", "--data.init_args.val_pairs_per_category", "null",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.init_args.out_dim", "16", "--model.init_args.hidden_dim", "16", "--model.pipeline.feature_cache_dir", "null",
        ])  # fmt: skip
    return runs


def record(out: Path, only: list[str] | None = None) -> dict[str, str]:
    """Run every config into ``out/runs/<name>`` and write ``out/records/<name>.json``; returns name -> status."""
    import evaluate
    import train

    entry: dict[str, Callable[[list[str]], Any]] = {"evaluate": evaluate.main, "train": train.main}
    out = out.resolve()
    data = generate_roots(out / "data")
    import torch

    # records compare bit for bit: one thread always (a different thread count changes the last bits of
    # reductions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _record_runs(out, data, entry, only)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own


def _record_runs(out: Path, data: dict[str, Path], entry: dict[str, Callable[[list[str]], Any]],
                 only: list[str] | None) -> dict[str, str]:
    """Run every config of :func:`_runs` on one thread and write its record; ``{name: status}``."""
    status = {}
    (out / "records").mkdir(parents=True, exist_ok=True)
    for name, (script, args) in _runs(data).items():
        if only and name not in only:
            continue
        run_dir = out / "runs" / name
        os.chdir(out)
        try:
            entry[script]([*args, "--trainer.default_root_dir", str(run_dir)])
            status[name] = "ok"
        except Exception as err:  # noqa: BLE001 - a failing config is a recorded outcome too
            status[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        (out / "records" / f"{name}.json").write_text(
            json.dumps({"status": status[name], **record_run(run_dir)}, indent=1, sort_keys=True, default=str)
        )
        print(f"{name}: {status[name]}", flush=True)
    return status


def compare(before: Path, after: Path) -> list[str]:
    """Names of the records that differ (or exist on one side only), with the first differing key."""
    a = {p.stem: json.loads(p.read_text()) for p in (before / "records").glob("*.json")}
    b = {p.stem: json.loads(p.read_text()) for p in (after / "records").glob("*.json")}
    problems = [f"{name}: only in {before if name in a else after}" for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            keys = sorted(k for k in set(a[name]) | set(b[name]) if a[name].get(k) != b[name].get(k))
            problems.append(f"{name}: differs in {keys}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="record every config into this folder (outside the repository)")
    parser.add_argument("--only", nargs="*", help="record only these runs (names as in records/)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two recordings")
    args = parser.parse_args(argv)
    if args.compare:
        problems = compare(*args.compare)
        print("\n".join(problems) if problems else f"identical: {len(list((args.compare[0] / 'records').glob('*.json')))} records")
        return 1 if problems else 0
    if args.out is None:
        parser.error("give --out DIR or --compare BEFORE AFTER")
    status = record(args.out, args.only)
    failed = {k: v for k, v in status.items() if v != "ok"}
    print(f"{len(status) - len(failed)} of {len(status)} configs ran" + (f"; failed: {failed}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
