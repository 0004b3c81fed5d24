"""Writes a test run's ``predictions.jsonl`` and ``results.json`` and prints the PCK table."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Subset

from datamodules.samplers import dataset_pair_ids
from lightning_modules.components.feature_cache import config_digest
from lightning_modules.components.files import OutputWriteError, write_atomically
from lightning_modules.components.samples import sample_digest
from lightning_modules.components.strict_json import dumps
from lightning_modules.distributed import gather_from_ranks
from lightning_modules.results import RunResults

from . import preemption
from .run_folder import PARTIAL_GLOB, RunFolderError, claim_run_folder, release_run_folder

__all__ = ["CorrespondenceWriter", "IncompleteEvaluationError", "check_complete", "sort_records"]


class IncompleteEvaluationError(RuntimeError):
    """A test run did not score every pair of the dataset exactly once (or scored pairs it does not hold)."""


def _preview(ids: list[str], limit: int = 5) -> str:
    return ", ".join(ids[:limit]) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def check_complete(records: list[dict[str, Any]], pair_ids: list[str], results: RunResults | None) -> None:
    """Check that the run scored each pair of the dataset once: per ablation row, and in the metric's counts.

    Args:
        records: The de-duplicated prediction records of all processes (``pair_id``, optional ``row``).
        pair_ids: The evaluated dataset's pair ids.
        results: The LightningModule's ``test_results`` (``num_pairs`` of each of its :meth:`~RunResults.per_row`).

    Raises:
        IncompleteEvaluationError: If the dataset's pair ids are not unique (de-duplication by pair id would
            merge distinct pairs), a row's predictions miss or add pairs, or a metric counted a different
            number of pairs than the dataset holds.
    """
    expected = set(pair_ids)
    if len(expected) != len(pair_ids):
        repeated = sorted(p for p, n in Counter(pair_ids).items() if n > 1)
        raise IncompleteEvaluationError(
            f"the dataset's pair ids are not unique ({_preview(repeated)}): pairs are de-duplicated by pair id, "
            "so distinct pairs would be merged"
        )
    by_row: dict[str | None, set[str]] = {}
    for record in records:
        by_row.setdefault(record.get("row"), set()).add(str(record["pair_id"]))
    for row, got in (by_row or {None: set()}).items():
        if got != expected:
            where = "" if row is None else f" of ablation row {row!r}"
            raise IncompleteEvaluationError(
                f"the predictions{where} hold {len(got)} unique pairs but the dataset has {len(expected)}; "
                f"missing: [{_preview(sorted(expected - got))}], not in the dataset: [{_preview(sorted(got - expected))}]"
            )
    counts = {} if results is None else {name: row.get("num_pairs") for name, row in results.per_row().items()}
    for row, count in counts.items():
        if count is not None and count != len(expected):
            where = "" if row is None else f" of ablation row {row!r}"
            raise IncompleteEvaluationError(
                f"the metric{where} counted {count} pairs but the dataset has {len(expected)}"
            )


def sort_records(records: list[dict[str, Any]], pair_ids: list[str] | None) -> list[dict[str, Any]]:
    """Records in dataset order (by ``pair_id``; sorted ids when the dataset order is unknown).

    The sort is stable, so an ablation's rows of one pair keep the order ``test_step`` returned them in. The
    file is then the same line for line whatever the evaluation order and the number of processes.
    """
    if pair_ids is None:
        return sorted(records, key=lambda r: str(r["pair_id"]))
    position = {pair_id: i for i, pair_id in enumerate(pair_ids)}
    return sorted(records, key=lambda r: (position.get(str(r["pair_id"]), len(position)), str(r["pair_id"])))


def _evaluated_pair_ids(trainer: L.Trainer) -> list[str] | None:
    """The pair ids of the dataset under test: the datamodule's ``test_dataset``, else the test dataloader's."""
    dataset = getattr(getattr(trainer, "datamodule", None), "test_dataset", None)
    if dataset is None:
        loaders = getattr(trainer, "test_dataloaders", None)
        if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
            loaders = loaders[0]
        dataset = loaders.dataset if isinstance(loaders, DataLoader) else None
    return None if dataset is None else dataset_pair_ids(dataset)


def _partial_reason(trainer: L.Trainer) -> str | None:
    """Why the run evaluates a subset on purpose (``limit_test_batches``, ``fast_dev_run``), or None."""
    if getattr(trainer, "fast_dev_run", False):
        return f"fast_dev_run={trainer.fast_dev_run}"
    limit = getattr(trainer, "limit_test_batches", 1.0)
    if not (isinstance(limit, float) and limit >= 1.0):
        return f"limit_test_batches={limit}"
    return None


def check_scored(results: RunResults | None) -> None:
    """Refuse a summary in which nothing was scored (its averages would all be undefined).

    Raises:
        IncompleteEvaluationError: If the run (or an ablation row) scored no keypoint or pixel.
    """
    if results is None:
        return
    for row, summary in results.per_row().items():
        for count in ("num_points", "num_pixels"):
            if summary.get(count) == 0:
                where = "" if row is None else f" (ablation row {row!r})"
                raise IncompleteEvaluationError(
                    f"no {count[4:-1]} was scored{where}: every {count[4:-1]} of the {summary.get('num_pairs')} pairs "
                    "is invalid or invisible, so every PCK would be undefined"
                )


log = logging.getLogger(__name__)

#: The key of a flushed record that holds :func:`~lightning_modules.components.samples.sample_digest` of its pair
#: (in the partial files only; never in ``predictions.jsonl``).
INPUT_DIGEST = "input_digest"


def _digests(samples: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(pair_id, digest)`` of a loader batch (a module-level function: worker processes pickle it)."""
    return [(str(s["pair_id"]), sample_digest(s)) for s in samples]


def _current_digests(trainer: L.Trainer, pair_ids: list[str]) -> dict[str, str]:
    """What the reader returns now for ``pair_ids``, as digests (read with the datamodule's workers)."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "test_dataset", None)
    order = dataset_pair_ids(dataset) if dataset is not None else None
    if order is None:
        return {}
    wanted = set(pair_ids)
    indices = [i for i, pair_id in enumerate(order) if pair_id in wanted]
    workers = int(getattr(datamodule, "num_workers", 0) or 0)
    loader = DataLoader(Subset(dataset, indices), batch_size=8, num_workers=workers, collate_fn=_digests)
    return dict(item for batch in loader for item in batch)


def read_partial_records(directory: Path) -> list[dict[str, Any]]:
    """The records an interrupted run flushed (every process's file), each (pair, row) once, only pairs
    whose every ablation row was written. A torn last line (the process died while writing) is skipped."""
    records: dict[tuple[str, str | None], dict[str, Any]] = {}
    for path in sorted(directory.glob(PARTIAL_GLOB)):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("resume: skipping a torn line of %s", path)
                continue
            records.setdefault((str(record["pair_id"]), record.get("row")), record)
    rows = {row for _, row in records}
    per_pair = Counter(pair_id for pair_id, _ in records)
    return [r for (pair_id, _), r in records.items() if per_pair[pair_id] == len(rows)]


class CorrespondenceWriter(L.Callback):
    """Collects the per-pair records returned by ``test_step`` and writes the run's output files.

    Files, in ``output_dir`` (default: the trainer's log dir):
    ``predictions.jsonl`` (one line per pair, original pixels) and ``results.json`` (the PCK summary
    that the LightningModule computed in ``on_test_epoch_end``).

    Nothing is lost when a run stops: every process appends each finished batch's records to
    ``predictions.partial.rank<R>.jsonl`` (flushed and synced to disk), and the partial files are removed
    only once the final files are written. A rerun with ``resume=True`` (``evaluate.py test ... --resume
    true``) and the same output directory and config reads them back, restores the module's metric
    (``restore_predictions``), evaluates only the pairs not finished yet, and ends with the files an
    uninterrupted run writes. ``extraction_passes`` then counts the resumed run's passes only.

    The run owns its folder (:mod:`callbacks.run_folder`): a lock while it runs, ``run.json`` with the
    settings its predictions depend on (the CLI hands them over as ``run_settings``); a second run into a
    locked folder, a fresh run into a finished one (without ``overwrite``) and a resume with other settings
    are refused. ``results.json`` repeats the settings (``run``) and says whether the run is ``complete``.

    Args:
        output_dir: Where to write; None uses ``trainer.log_dir``.
        print_table: Print the PCK table at the end of the run.
        resume: Continue an interrupted run found in the output directory instead of starting over.
        overwrite: Replace a finished run found in the output directory instead of refusing to start.
    """

    def __init__(
        self, output_dir: str | None = None, print_table: bool = True, resume: bool = False, overwrite: bool = False
    ) -> None:
        self.output_dir = output_dir
        self.print_table = print_table
        self.resume = resume
        self.overwrite = overwrite
        #: The prediction settings of this run (:func:`callbacks.run_folder.prediction_settings`); set by the CLI.
        self.run_settings: dict[str, Any] | None = None
        self._records: list[dict[str, Any]] = []
        self._restored: list[dict[str, Any]] = []
        self._partial: Path | None = None
        self._claimed: Path | None = None
        self._run: dict[str, Any] = {}

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        """The directory this run writes to."""
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Claim the output directory, and on resume find the finished pairs (before the dataloader is built)."""
        if stage != "test":
            return
        out = self.resolve_dir(trainer)  # a collective: every process calls it
        self._claim(trainer, out)
        self._partial = out / f"predictions.partial.rank{trainer.global_rank}.jsonl"
        self._restored = []
        if self.resume:
            self._restored = self._unchanged(trainer, read_partial_records(out))
            datamodule = getattr(trainer, "datamodule", None)
            if self._restored and not hasattr(datamodule, "finished_pair_ids"):
                raise ValueError("resume needs a datamodule with `finished_pair_ids` (datamodules.PairDataModule)")
            if datamodule is not None and hasattr(datamodule, "finished_pair_ids"):
                datamodule.finished_pair_ids = {str(r["pair_id"]) for r in self._restored}
            log.info("resume: %d finished records found in %s", len(self._restored), out)

    def _unchanged(self, trainer: L.Trainer, restored: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The flushed records whose pair the reader still returns as it did when they were made (the same
        :func:`~lightning_modules.components.samples.sample_digest`), without their digests; the others are
        evaluated again, and the log names them. Rank 0 reads the changed pairs; every process learns them."""
        changed: list[str] = []
        unrecorded: list[str] = []  # flushed by a version that kept no digest: their data cannot be compared
        if trainer.is_global_zero and restored:
            recorded = {str(r["pair_id"]): r.get(INPUT_DIGEST) for r in restored}
            unrecorded = sorted(p for p, digest in recorded.items() if digest is None)
            now = _current_digests(trainer, sorted(p for p, digest in recorded.items() if digest is not None))
            changed = sorted(p for p, digest in recorded.items() if digest is not None and now.get(p) != digest)
        changed, unrecorded = trainer.strategy.broadcast((changed, unrecorded), src=0)
        if changed:
            log.warning("resume: the data of %d flushed pair(s) changed since they were evaluated (%s): they are "
                        "evaluated again", len(changed), _preview(changed))
        if unrecorded:
            log.warning("resume: %d flushed pair(s) carry no record of their data (flushed by an earlier version), so "
                        "it cannot be compared (%s): they are evaluated again", len(unrecorded), _preview(unrecorded))
        skip = set(changed) | set(unrecorded)
        return [{k: v for k, v in r.items() if k != INPUT_DIGEST} for r in restored if str(r["pair_id"]) not in skip]

    def _claim(self, trainer: L.Trainer, out: Path) -> None:
        """Rank 0 takes the folder (:func:`claim_run_folder`); every process learns the outcome."""
        error = None
        if trainer.is_global_zero:
            try:
                self._run = claim_run_folder(out, self.run_settings, self.resume, self.overwrite)
                self._claimed = out
                preemption.on_stop(self._release)  # a SIGTERM may end the process outside any hook
            except RunFolderError as err:
                error = str(err)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise RunFolderError(error)

    def _release(self) -> None:
        if self._claimed is not None:
            release_run_folder(self._claimed)
            self._claimed = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the folder back; the flushed predictions stay for ``--resume``."""
        self._release()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records = []
        if self._restored and trainer.is_global_zero:  # one process holds them: the metric syncs across ranks
            restore = getattr(pl_module, "restore_predictions", None)
            if restore is None:
                raise ValueError(f"{type(pl_module).__name__} cannot resume: it has no restore_predictions()")
            restore(self._restored)
            self._records = list(self._restored)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs:
            self._records.extend(outputs)
            digests = {str(s["pair_id"]): sample_digest(s) for s in batch} if isinstance(batch, list) else {}
            self._flush([{**r, INPUT_DIGEST: digests.get(str(r["pair_id"]))} for r in outputs])

    def _flush(self, records: list[dict[str, Any]]) -> None:
        """Append a batch's records (each with the digest of its pair's data, which a resume checks) to this
        process's partial file, durably (a crash loses nothing done)."""
        if self._partial is None:
            return
        try:
            self._partial.parent.mkdir(parents=True, exist_ok=True)
            with open(self._partial, "a") as handle:
                handle.write("".join(dumps(record) + "\n" for record in records))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # a full disk mid-run: the batches flushed before stay (a torn last line is skipped)
            raise OutputWriteError(err.errno, f"could not write {self._partial}: {err.strerror or err}; the "
                                   f"predictions of the finished batches are kept in {self._partial.parent}: make "
                                   "room and rerun the same command with --resume true") from err

    def _gathered_records(self) -> list[dict[str, Any]]:
        """Every process's records, each (pair, ablation row) once."""
        records = [r for part in gather_from_ranks(self._records) for r in part]
        unique: dict[tuple[str, str | None], dict[str, Any]] = {}
        for record in records:  # a padded sampler repeats pairs: keep each pair (of each ablation row) once
            unique.setdefault((record["pair_id"], record.get("row")), record)
        return list(unique.values())

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self._gathered_records()  # a collective: every process, before rank 0 goes on alone
        pair_ids = _evaluated_pair_ids(trainer)
        results = getattr(pl_module, "test_results", None)
        partial_reason = _partial_reason(trainer)
        # on every process (all hold the gathered records and the synchronised results), so that all stop
        if pair_ids is not None and partial_reason is None:
            check_complete(records, pair_ids, results)
        check_scored(results)
        out = self.resolve_dir(trainer)  # also a collective: `trainer.log_dir` broadcasts rank 0's directory
        if not trainer.is_global_zero:
            return
        try:
            with preemption.deferred():  # a SIGTERM now lets the final files be written whole first
                self._write(out, sort_records(records, pair_ids), results, partial_reason)
        except OutputWriteError as err:  # a full disk: nothing torn is left, the flushed predictions stay
            raise OutputWriteError(err.errno, f"{err}; the run's predictions are kept in {out}: make room and "
                                   "rerun the same command with --resume true to write its files") from err
        finally:
            self._release()

    def _write(
        self, out: Path, records: list[dict[str, Any]], results: RunResults | None, partial_reason: str | None
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "predictions.jsonl", "".join(dumps(record) + "\n" for record in records))
        if results is not None:  # results.json last: a folder holding it holds a finished run
            settings = self._run.get("settings")
            text = results.write(out, run={
                "complete": partial_reason is None, "partial_reason": partial_reason, "config": "config.yaml",
                "settings_digest": None if settings is None else config_digest(settings), "settings": settings,
            })  # fmt: skip
            warning = "" if partial_reason is None else f"\nPARTIAL RUN ({partial_reason}): not every pair was evaluated"
            if self.print_table:
                print("\n" + text + ("" if text.endswith("\n") else "\n") + f"written to {out}" + warning, flush=True)
        if partial_reason is None:  # the run is complete and written: the flushed batches are done with
            for done in out.glob(PARTIAL_GLOB):
                done.unlink()
