"""Weights & Biases for test runs: a logger that goes offline by itself, and the run's results as W&B data.

* :class:`AutoWandbLogger`: Lightning's ``WandbLogger`` whose ``offline=None`` (the default) means "online iff
  an API key is available" (``WANDB_API_KEY`` or a ``~/.netrc`` login for the W&B host), so the same config
  works on a laptop without an account and on a cluster with one. ``WANDB_MODE`` in the environment wins.
* :class:`WandbResults`: at the end of ``trainer.test`` sends the PCK of every alpha and average, a per-category
  (per-dataset) table, the ablation table, the extraction pass counts and the throughput to every
  ``WandbLogger``.

The resolved config reaches W&B through :class:`callbacks.config_logging.LoggerSaveConfigCallback` (wired in
``cli.py``); the correspondence images through :class:`callbacks.CorrespondenceVisualizer`.
"""

from __future__ import annotations

import math
import netrc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.distributed import gather_from_ranks

__all__ = [
    "AutoWandbLogger",
    "WandbResults",
    "resolve_wandb_mode",
    "results_to_wandb",
    "wandb_api_key_available",
]

_DEFAULT_HOST = "https://api.wandb.ai"


def wandb_api_key_available(environ: Mapping[str, str] | None = None, netrc_path: str | os.PathLike | None = None) -> bool:
    """Whether W&B has credentials to go online, without contacting any server.

    True when ``WANDB_API_KEY`` is set and non-empty, or when the netrc file (``netrc_path``, else ``$NETRC``,
    else ``~/.netrc``, where ``wandb login`` writes) holds a password for the W&B host (``WANDB_BASE_URL``,
    default ``api.wandb.ai``). The key itself is never read into the result or logged.

    Args:
        environ: Environment to consult (default ``os.environ``; tests pass their own).
        netrc_path: Netrc file to consult instead of the default.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY", "").strip():
        return True
    path = Path(netrc_path or env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc").expanduser()
    if not path.is_file():
        return False
    host = urlparse(env.get("WANDB_BASE_URL") or _DEFAULT_HOST).hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):  # an unreadable netrc means no usable key, not a crash
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(
    offline: bool | None, environ: Mapping[str, str] | None = None, netrc_path: str | os.PathLike | None = None
) -> Literal["online", "offline", "disabled"]:
    """The W&B mode a run uses.

    Order: ``WANDB_MODE=disabled`` in the environment (a kill switch) > an explicit ``offline`` >
    ``WANDB_MODE`` = ``offline`` / ``dryrun`` / ``online`` > online iff :func:`wandb_api_key_available`.

    Args:
        offline: True / False force the mode; None decides automatically.
        environ: Environment to consult (default ``os.environ``).
        netrc_path: Netrc file to consult (see :func:`wandb_api_key_available`).
    """
    env = os.environ if environ is None else environ
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode == "disabled":
        return "disabled"
    if offline is not None:
        return "offline" if offline else "online"
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode == "online":
        return "online"
    return "online" if wandb_api_key_available(env, netrc_path) else "offline"


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline when no API key is available (see :func:`resolve_wandb_mode`).

    Offline runs are written to ``<save_dir>/wandb/offline-run-*`` and can be uploaded later with
    ``wandb sync <dir>``. Unlike ``WandbLogger(offline=True)``, the mode is passed to ``wandb.init`` instead of
    being written into ``os.environ``, so it does not leak into later runs of the same process.

    ``save_dir`` None means the trainer's ``default_root_dir``, filled in by the CLI
    (``cli.py``) through :meth:`use_default_save_dir`, so that ``results.json``,
    ``config.yaml`` and the W&B files all land in the run directory. Outside the CLI, pass ``save_dir``.

    Args:
        name: Display name of the run.
        save_dir: Directory of the W&B files (and the trainer's ``log_dir``).
        project: W&B project.
        offline: True / False force the mode; None (default): online iff an API key is available.
        version: Run id to resume.
        entity: W&B entity (user or team).
        group: Run group (e.g. one per ablation table).
        tags: Run tags.
        notes: Run notes.
        job_type: Run job type.
        log_model: Upload checkpoints (needs online mode; evaluation writes none).
        prefix: Prefix of every metric key.
        checkpoint_name: Name of the model checkpoint artifact.
        **kwargs: Further ``wandb.init`` arguments.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | None = None,
        project: str = "sd-dino-lightning",
        offline: bool | None = None,
        version: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
        checkpoint_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        mode = resolve_wandb_mode(offline)
        if mode != "online" and log_model:
            if offline:  # the user asked for both: the parent's error
                raise ValueError(f"log_model={log_model!r} needs an online run, but offline=True")
            rank_zero_warn(f"W&B runs {mode} (no API key or WANDB_MODE): log_model={log_model!r} is ignored")
            log_model = False
        extra = {k: v for k, v in {"entity": entity, "group": group, "tags": tags, "notes": notes,
                                   "job_type": job_type}.items() if v is not None}
        kwargs.setdefault("mode", mode)
        super().__init__(name=name, save_dir=save_dir, version=version, offline=False, project=project,
                         log_model=log_model, prefix=prefix, checkpoint_name=checkpoint_name, **extra, **kwargs)
        self.mode = str(kwargs["mode"])
        self._offline = self.mode != "online"

    def use_default_save_dir(self, path: str | os.PathLike) -> None:
        """Use ``path`` as ``save_dir`` if none was given and the W&B run has not started yet."""
        if self._save_dir is None and self._experiment is None:
            self._save_dir = os.fspath(path)
            self._wandb_init["dir"] = self._save_dir

    @property
    def experiment(self) -> Any:
        """The W&B run (started on first access; rank 0 only, a dummy elsewhere)."""
        if self._experiment is None and self._save_dir is not None:
            # wandb falls back to a temp dir when `dir` does not exist: create the run dir first.
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)
        return super().experiment


def _alpha_key(alpha: str) -> str:
    return f"pck@{alpha}"


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def results_to_wandb(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, tuple[list[str], list[list[Any]]]]]:
    """Turn a run's summary (the content of ``results.json``) into W&B metrics and tables.

    Plain Python (no wandb objects), so it is easy to test.

    Metrics: ``pck@<alpha>/<average>`` for every alpha and scalar average (``per_point``, ``per_image``,
    ``category_mean``, ``weighted``, ``per_pixel``, ``dataset_mean``, ... whatever the protocol computed),
    ``aepe/<average>`` for dense benchmarks, and for ablations ``ablation/<row>/pck@<alpha>`` (the table's
    headline average).

    Tables (name -> (columns, rows)): ``pck_per_category`` (or ``pck_per_dataset``) with one row per group and
    one column per alpha (ablations: one row per setting and category); ``ablation`` (settings x alphas).

    Args:
        results: The ``summary`` of the module's ``test_results``.

    Returns:
        ``(metrics, tables)``.
    """
    metrics: dict[str, float] = {}
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    protocol = results.get("protocol") or {}
    label = protocol.get("group_label", "per_category")
    group_column = label.removeprefix("per_")
    if "table" in results:  # an ablation (lightning_modules/ablation.py)
        table: Mapping[str, Mapping[str, float]] = results["table"]
        alphas = list(next(iter(table.values()), {}))
        tables["ablation"] = (["setting", *map(_alpha_key, alphas)],
                              [[row, *(float(values[a]) for a in alphas)] for row, values in table.items()])
        for row, values in table.items():
            for alpha in alphas:
                metrics[f"ablation/{row}/{_alpha_key(alpha)}"] = float(values[alpha])
        data = []
        for row, row_results in (results.get("rows") or {}).items():
            pck = row_results["pck"]
            groups = sorted({g for a in pck for g in pck[a].get(label, {})})
            data += [[row, g, *(float(pck[a][label].get(g, math.nan)) for a in alphas)] for g in groups]
        if data:
            tables[f"pck_{label}"] = (["setting", group_column, *map(_alpha_key, alphas)], data)
        return metrics, tables
    pck = results.get("pck") or {}
    alphas = list(pck)
    for alpha in alphas:
        for average, value in _scalars(pck[alpha]).items():
            metrics[f"{_alpha_key(alpha)}/{average}"] = value
    for average, value in _scalars(results.get("aepe") or {}).items():
        metrics[f"aepe/{average}"] = value
    groups = sorted({g for a in alphas for g in pck[a].get(label, {})})
    if groups:
        tables[f"pck_{label}"] = ([group_column, *map(_alpha_key, alphas)],
                                  [[g, *(float(pck[a][label].get(g, math.nan)) for a in alphas)] for g in groups])
    return metrics, tables


class WandbResults(L.Callback):
    """Sends a test run's results to every ``WandbLogger`` of the trainer at the end of ``trainer.test``.

    Logged (rank 0, one ``log`` call per kind):

    * metrics (:func:`results_to_wandb`): ``pck@<alpha>/<average>`` for every alpha and average. Keys the
      LightningModule already logged with ``self.log`` (``ZeroShotCorrespondence`` logs the protocol's
      averages) are not logged twice; W&B keeps their last value in the run summary either way.
    * tables: ``pck_per_category`` (``pck_per_dataset`` for TSS) and, for ablations, ``ablation``.
    * summary values: ``num_pairs``, ``num_points`` / ``num_pixels``, ``num_images``,
      ``extraction_passes/<featurizer>``, ``test_time_s`` (wall time from ``on_test_start`` to ``on_test_end``
      of this callback), ``pairs_per_s`` and ``images_per_s`` (unique images per second).

    The results come from the LightningModule's ``test_results`` attribute, which it sets in
    ``on_test_epoch_end``; that hook runs before every callback's ``on_test_end``, so the position of this
    callback relative to ``CorrespondenceWriter`` does not matter. The wall time includes whatever other
    callbacks do before this one's ``on_test_end`` (writing ``predictions.jsonl`` when the writer is listed
    first), which is negligible next to feature extraction.

    Args:
        log_tables: Also log the W&B tables.
    """

    def __init__(self, log_tables: bool = True) -> None:
        self.log_tables = log_tables
        self.summary: dict[str, Any] = {}
        self._start = 0.0
        self._pair_ids: set[str] = set()
        self._images: set[str] = set()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._pair_ids, self._images, self.summary = set(), set(), {}

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for sample in batch if isinstance(batch, (list, tuple)) else ():
            if isinstance(sample, dict):
                if "pair_id" in sample:
                    self._pair_ids.add(str(sample["pair_id"]))
                for key in ("src_image_path", "trg_image_path"):
                    if key in sample:
                        self._images.add(str(sample[key]))

    def _gathered(self) -> tuple[set[str], set[str]]:
        parts = gather_from_ranks((self._pair_ids, self._images))
        pair_ids = set().union(*(p[0] for p in parts))  # a padded sampler's duplicates collapse here
        images = set().union(*(p[1] for p in parts))
        return pair_ids, images

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:  # same on every rank, so the collective below is entered by all or none
            return
        pair_ids, images = self._gathered()
        if not trainer.is_global_zero:
            return
        run_results = getattr(pl_module, "test_results", None)  # a lightning_modules.results.RunResults
        results = run_results.summary if run_results is not None else {}
        metrics, tables = results_to_wandb(results) if results else ({}, {})
        num_pairs = len(pair_ids)
        if run_results is not None:  # every ablation row scores the same pairs: the first row's count
            num_pairs = int(next(iter(run_results.per_row().values())).get("num_pairs", num_pairs))
        summary: dict[str, Any] = {"num_pairs": num_pairs, "test_time_s": elapsed}
        summary.update({k: v for k, v in results.items() if k.startswith("num_") and isinstance(v, int)})
        if images:
            summary["num_images"] = len(images)
            summary["images_per_s"] = len(images) / elapsed if elapsed > 0 else math.nan
        summary["pairs_per_s"] = num_pairs / elapsed if elapsed > 0 else math.nan
        for name, passes in (results.get("extraction_passes") or {}).items():
            summary[f"extraction_passes/{name}"] = passes
        already = set(trainer.logged_metrics)
        new_metrics = {k: v for k, v in metrics.items() if k not in already}
        self.summary = {**metrics, **summary}
        for logger in loggers:
            if new_metrics:
                logger.log_metrics(new_metrics)
            if self.log_tables:
                for key, (columns, data) in tables.items():
                    logger.log_table(key=key, columns=columns, data=data)
            # Summary, not history: these are one number per run (and W&B shows them in the runs table).
            logger.experiment.summary.update(summary)
