"""The interactive viewer page of a run (``viewer.html``): the first pairs (input order), their descriptors and
matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from torch.utils.data import DataLoader

from datamodules.samplers import dataset_pair_ids
from lightning_modules.components.files import write_atomically
from lightning_modules.components.viewer import render_viewer, viewer_pair
from lightning_modules.distributed import gather_from_ranks

__all__ = ["ViewerWriter"]


def _run_points(record: Any) -> dict[str, Any] | None:
    """The run's matches of a pair from its record: a match ``line`` (own images) or a keypoint prediction
    record (benchmarks); None for records without points (dense flow, ablation rows)."""
    if not isinstance(record, dict):
        return None
    source = record.get("line", record)
    if "src_kps" not in source or "pred_kps" not in source:
        return None
    return {"src": source["src_kps"], "pred": source["pred_kps"], "mutual": source.get("mutual"),
            "inside": source.get("inside")}


#: How to put more pairs in the page from the command line (ViewerWriter is the last callback of
#: configs/match.yaml and configs/demo.yaml; jsonargparse applies ``init_args`` to the last one).
MORE_FLAG = "--trainer.callbacks.init_args.num_pairs"


def _input_pair_ids(trainer: L.Trainer) -> list[str] | None:
    """The pair ids of the run's dataset in input order (the pairs file's, the folder's, the benchmark's), or
    None when the dataset does not expose them."""
    dataset = getattr(getattr(trainer, "datamodule", None), "test_dataset", None)
    if dataset is None:
        for name in ("predict_dataloaders", "test_dataloaders"):
            loaders = getattr(trainer, name, None)
            if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
                loaders = loaders[0]
            if isinstance(loaders, DataLoader):
                dataset = loaders.dataset
                break
    return None if dataset is None else dataset_pair_ids(dataset)


class ViewerWriter(L.Callback):
    """Writes ``<trainer.log_dir or default_root_dir>/<filename>``: one self-contained page in which one picks a
    pair, clicks a source point and sees its match and the similarity heatmap on the target
    (:mod:`lightning_modules.components.viewer`). Works in ``test`` and ``predict`` runs of any module that
    holds a ``pipeline`` (:class:`~lightning_modules.components.FusedCorrespondence`).

    The page holds the first ``num_pairs`` pairs of the input (the pairs file's, the folder's or the
    benchmark's order, whatever order the run processed them in), in that order, and says "N of M pairs" with
    the flag that shows more (``--trainer.callbacks.init_args.num_pairs M``); so does the console line. Their
    features come from the pipeline's cache, so the page costs one co-PCA per kept pair. A dataset that does
    not expose its pair ids keeps the first pairs processed (under DDP about ``num_pairs / world_size`` of each
    rank's, gathered).

    Args:
        num_pairs: Pairs in the page (each adds about ``2 x cells x dims`` bytes plus two small JPEGs).
        dims: Dimensions kept per descriptor cell.
        filename: The page's name in the run folder.
        image_side: Long side of the embedded images in pixels.
        display_height: Height of the images on the page in CSS pixels.
    """

    def __init__(self, num_pairs: int = 16, dims: int = 32, filename: str = "viewer.html", image_side: int = 512,
                 display_height: int = 360) -> None:
        for name, value in (("num_pairs", num_pairs), ("dims", dims), ("image_side", image_side),
                            ("display_height", display_height)):
            if int(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_pairs, self.dims, self.filename = int(num_pairs), int(dims), filename
        self.image_side, self.display_height = int(image_side), int(display_height)
        self.pairs: list[dict[str, Any]] = []
        self.path: Path | None = None
        self.total = 0
        self._limit = self.num_pairs
        self._order: list[str] | None = None
        self._wanted: set[str] = set()
        self._seen: set[str] = set()

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "pipeline", None) is None:
            raise ValueError(f"ViewerWriter needs a module with a `pipeline` (FusedCorrespondence); "
                             f"{type(pl_module).__name__} has none")
        self.pairs, self._seen, self.total = [], set(), 0
        self._order = _input_pair_ids(trainer)
        self._wanted = set(self._order[: self.num_pairs]) if self._order is not None else set()
        self._limit = -(-self.num_pairs // max(1, trainer.world_size))
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename

    def _keep(self, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        records = outputs if isinstance(outputs, list) and len(outputs) == len(batch) else [None] * len(batch)
        for sample, record in zip(batch, records):
            pair_id = str(sample["pair_id"])
            new = pair_id not in self._seen
            self._seen.add(pair_id)
            if self._order is not None:
                if not new or pair_id not in self._wanted:
                    continue
            elif len(self.pairs) >= self._limit or not new:
                continue
            self.pairs.append(viewer_pair(pl_module.pipeline, sample, _run_points(record), dims=self.dims,
                                          image_side=self.image_side))

    def _write(self, trainer: L.Trainer) -> None:
        parts = gather_from_ranks((self.pairs, sorted(self._seen)))
        if not trainer.is_global_zero or self.path is None:
            return
        unique: dict[str, dict[str, Any]] = {}
        for pairs, _ in parts:
            for pair in pairs:
                unique.setdefault(pair["pair_id"], pair)  # a padded sampler may have served a pair twice
        pairs = list(unique.values())
        if self._order is not None:
            position = {pair_id: i for i, pair_id in enumerate(self._order)}
            pairs.sort(key=lambda pair: position.get(pair["pair_id"], len(position)))
        self.total = len({pair_id for _, seen in parts for pair_id in seen})
        hint = f"{MORE_FLAG} {self.total}" if len(pairs) < self.total else ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, render_viewer(pairs, display_height=self.display_height, total_pairs=self.total,
                                                  more_hint=hint))
        more = f"; to show all: {hint}" if hint else ""
        print(f"viewer ({len(pairs)} of {self.total} pairs, {self.path.stat().st_size / 1024:.0f} KiB{more}): "
              f"{self.path}", flush=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep(pl_module, outputs, batch)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep(pl_module, outputs, batch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)
