"""Run the paper's rows on each benchmark with the existing configs (one ``evaluate.py test`` run per benchmark and
row), sharing one on-disk feature cache, and skip runs already finished with the same command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import write_output

__all__ = ["BENCHMARKS", "ROWS", "ROW_FEATURIZERS", "Run", "plan_runs", "run_all"]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
#: Benchmark -> its run config.
BENCHMARKS = {name: CONFIGS / f"{name}.yaml" for name in ("spair", "pfpascal", "pfwillow", "tss", "cub")}
#: Row -> the arguments that make it from the benchmark's config (the paper's rows; ``fused_alpha0.8`` is the
#: supplementary's CUB row).
ROWS: dict[str, list[str]] = {
    "sd": ["--config", str(CONFIGS / "overlays" / "sd_only.yaml")],
    "dino": ["--config", str(CONFIGS / "overlays" / "dino_only.yaml")],
    "fused": [],
    "fused_alpha0.8": ["--model.pipeline.alpha", "0.8"],
}
#: Row -> the featurizers it loads (``sd``, ``dino``: the ``--model.pipeline.<name>`` nodes).
ROW_FEATURIZERS: dict[str, tuple[str, ...]] = {
    "sd": ("sd",), "dino": ("dino",), "fused": ("sd", "dino"), "fused_alpha0.8": ("sd", "dino"),
}
#: The file in a run folder recording the command that produced it (the skip check compares it).
COMMAND_FILE = "reproduce_command.json"


@dataclass(frozen=True)
class Run:
    """One evaluation: ``benchmark`` x ``row``, its output folder and its ``evaluate.py`` arguments
    (``resumable``: an interrupted run is continued with ``--resume``, else started again)."""

    benchmark: str
    row: str
    out: Path
    args: tuple[str, ...]
    resumable: bool = True

    @property
    def finished(self) -> bool:
        """A complete ``results.json`` made by this very command."""
        results, command = self.out / "results.json", self.out / COMMAND_FILE
        if not (results.is_file() and command.is_file()):
            return False
        try:
            written = json.loads(results.read_text())
            complete = "pck" in written or "rows" in written  # a benchmark run, or an ablation table's
            same = json.loads(command.read_text()) == list(self.args)
        except (json.JSONDecodeError, OSError):
            return False
        return complete and same


def plan_runs(
    benchmarks: Sequence[str], rows: Sequence[str], roots: dict[str, Path], out: Path, devices: int,
    extra_configs: Sequence[str] = (), extra_args: dict[str, Sequence[str]] | None = None,
    feature_cache: Path | None | str = "default", models: dict[str, str] | None = None,
    row_args: dict[str, list[str]] | None = None,
) -> list[Run]:
    """The runs of a reproduction: each benchmark with each row that applies (``fused_alpha0.8`` on CUB only).

    Args:
        benchmarks: Names out of :data:`BENCHMARKS`.
        rows: Names out of :data:`ROWS`.
        roots: Benchmark -> its ``--data.root``.
        out: Output folder; run ``b`` x ``r`` goes to ``out/b/r`` and the feature cache to ``out/feature_cache``.
        devices: ``--trainer.devices``.
        extra_configs: More ``--config`` files (e.g. ``configs/overlays/tiny.yaml``).
        extra_args: Benchmark -> more arguments (e.g. CUB's ``--data.categories``).
        feature_cache: The on-disk feature cache shared by the rows (``"default"``: ``out/feature_cache``; None:
            none, each run extracts its images itself). Passed as an absolute path: a run takes a relative
            ``feature_cache_dir`` under its own folder, which would give each row a cache of its own.
        models: Featurizer (``sd``, ``dino``) -> hub id or local folder, for the rows that load it
            (``--model.pipeline.<name>.model_id``); a featurizer not named keeps its config's model.
        row_args: Rows beyond :data:`ROWS` -> their arguments (DINO alone, like ``dino``; the supplementary's
            Table 10 variants, :func:`.tables.table10_row_args`).
    """
    cache = out / "feature_cache" if feature_cache == "default" else feature_cache
    cache = None if cache is None else Path(cache).expanduser().absolute()  # one cache for every row
    runs = []
    for benchmark in benchmarks:
        for row in rows:
            if row == "fused_alpha0.8" and benchmark != "cub":
                continue
            folder = out / benchmark / row
            args = ["test", "--config", str(BENCHMARKS[benchmark]), *{**ROWS, **(row_args or {})}[row]]
            for config in extra_configs:
                args += ["--config", str(config)]
            args += ["--data.root", str(roots[benchmark]), "--trainer.devices", str(devices),
                     "--trainer.default_root_dir", str(folder),
                     "--model.pipeline.feature_cache_dir", "null" if cache is None else str(cache),
                     *(extra_args or {}).get(benchmark, ())]
            for name in ROW_FEATURIZERS.get(row, ("dino",)):
                if name in (models or {}):
                    args += [f"--model.pipeline.{name}.model_id", str(models[name])]
            runs.append(Run(benchmark, row, folder, tuple(args)))
    return runs


def subprocess_runner(args: Sequence[str]) -> int:
    """Run ``python evaluate.py <args>`` in its own process (Lightning launches the other ranks from it)."""
    return subprocess.call([sys.executable, str(REPO / "evaluate.py"), *args], cwd=REPO)


def run_all(runs: Sequence[Run], runner: Callable[[Sequence[str]], int] = subprocess_runner,
            log: Callable[[str], None] = print) -> dict[tuple[str, str], str]:
    """Run each run not already finished; returns ``(benchmark, row) -> "ran" | "skipped" | "failed (rc N)"``.

    A run that fails is reported and the others still run; its row then shows no number.
    """
    status = {}
    for run in runs:
        key = (run.benchmark, run.row)
        if run.finished:
            log(f"{run.benchmark} / {run.row}: finished earlier with the same command, skipped ({run.out})")
            status[key] = "skipped"
            continue
        log(f"{run.benchmark} / {run.row}: python evaluate.py {' '.join(run.args)}")
        run.out.mkdir(parents=True, exist_ok=True)
        command = run.out / COMMAND_FILE
        same = command.is_file() and command.read_text().strip() == json.dumps(list(run.args))
        # the same command interrupted: continue it; anything else there (another command): replace it
        resume = same and run.resumable and not (run.out / "results.json").exists()
        mode = ["--resume", "true"] if resume else ["--overwrite", "true"]
        write_output(command, json.dumps(list(run.args)) + "\n")
        code = runner([*run.args, *mode])
        if code == 0 and run.finished:
            status[key] = "ran"
        else:
            status[key] = f"failed (rc {code})"
            log(f"{run.benchmark} / {run.row}: FAILED with exit status {code}")
    return status
