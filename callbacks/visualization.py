"""Correspondence pictures of the first pairs of a test run: PNG files, and W&B images when W&B logs the run."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from lightning_modules.components.visualize import draw_correspondences, keypoints_correct
from lightning_modules.components.files import save_image_atomically
from lightning_modules.distributed import gather_from_ranks

__all__ = ["CorrespondenceVisualizer", "UniqueNames", "safe_filename"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """A file-system-safe name for a pair id (SPair ids hold ``:``; others may hold ``/``) that no other id gets.

    An id made of ``[A-Za-z0-9._-]`` only (not starting with a dot, at most 200 characters) is its own name, so
    outputs of such ids keep their names. Any other id is sanitised (every run of other characters becomes
    ``_``, leading dots are dropped, so the file is never hidden or a path component like ``..``; at most 200
    characters) and gets ``-`` and the first 10 hex digits of the SHA-1 of the exact id appended: ``dup/1`` and
    ``dup:1`` are ``dup_1-<digest>`` with two different digests, never one file. The name depends on the id
    alone (the same in every process and every run).
    """
    text = str(name)
    safe = _UNSAFE.sub("_", text).lstrip(".")[:200]
    if safe == text and safe:
        return safe
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[:189] or 'pair'}-{digest}"


class UniqueNames:
    """File names for pair ids within one output folder: :func:`safe_filename`, and on a clash (two ids whose
    names differ only in case, on a case-insensitive file system) the digest form of the later id."""

    def __init__(self) -> None:
        self._used: dict[str, str] = {}

    def __call__(self, pair_id: Any) -> str:
        text = str(pair_id)
        name = safe_filename(text)
        owner = self._used.setdefault(name.casefold(), text)
        if owner != text:
            digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
            name = f"{name[:189]}-{digest}"
            self._used.setdefault(name.casefold(), text)
        return name


def _pad_width(picture: Image.Image, width: int) -> Image.Image:
    if picture.width == width:
        return picture
    padded = Image.new("RGB", (width, picture.height))
    padded.paste(picture, (0, 0))
    return padded


class CorrespondenceVisualizer(L.Callback):
    """Draws the first ``num_pairs`` test pairs (predicted vs ground-truth keypoints) and saves them.

    For every drawn pair, ``<output_dir>/<pair_id>.png`` (pair id made file-safe by :func:`safe_filename`) shows
    the source and target side by side: source keypoints on the left, ground truth as hollow rings and the
    prediction as a dot on the right, green when correct at ``alpha``, red otherwise (see
    :func:`lightning_modules.components.visualize.draw_correspondences`). When any of the trainer's loggers is a
    ``WandbLogger``, the same images are logged to it as a list of ``wandb.Image`` under the key
    ``correspondences`` (captioned with the pair id and its count of correct keypoints) at the end of the test,
    padded on the right to a common width (W&B shows a list of images as one strip).

    Pairs are taken in the order the test loop sees them. With several processes (DDP), each rank draws the
    first ``ceil(num_pairs / world_size)`` of its own pairs, so the files are about ``num_pairs`` pairs but not
    the globally first ones; all ranks' images are gathered for W&B. Records without keypoints (dense flow
    benchmarks such as TSS) are skipped quietly, as are pairs whose images are not in the batch.

    Correctness uses the run's protocol comparison (``protocol.inclusive`` of the LightningModule or datamodule:
    ``error <= alpha * threshold`` when inclusive, else ``error < alpha * threshold``).

    Args:
        num_pairs: How many pairs to draw (0 disables the callback).
        alpha: PCK alpha deciding the green / red colour.
        row: Ablation runs (records with a ``row`` field): the row whose predictions are drawn; None takes the
            first row of the table. Ignored for records without rows.
        output_dir: Where the PNGs go; None uses ``<trainer.log_dir or default_root_dir>/correspondences``.
        height: Height in pixels of each picture.
        log_to_wandb: Also log the images to every ``WandbLogger`` of the trainer.
    """

    def __init__(
        self,
        num_pairs: int = 8,
        alpha: float = 0.1,
        row: str | None = None,
        output_dir: str | None = None,
        height: int = 256,
        log_to_wandb: bool = True,
    ) -> None:
        if num_pairs < 0:
            raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if height < 1:
            raise ValueError(f"height must be positive, got {height}")
        self.num_pairs = int(num_pairs)
        self.alpha = float(alpha)
        self.row = row
        self.output_dir = output_dir
        self.height = int(height)
        self.log_to_wandb = log_to_wandb
        self.saved: list[Path] = []
        self._images: list[tuple[str, Image.Image, str]] = []  # (pair id, picture, caption) for W&B
        self._seen: set[str] = set()
        self._names = UniqueNames()
        self._limit = self.num_pairs
        self._inclusive = False
        self._row_checked = False
        self._active_row: str | None = None
        self._dir = Path(output_dir or ".")

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        """The directory the PNGs are written to (a collective under DDP: call it on every rank)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "correspondences"

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved, self._images, self._seen, self._names = [], [], set(), UniqueNames()
        self._row_checked = False
        self._active_row = self.row
        # Split the budget over the ranks so that the total stays close to num_pairs.
        self._limit = math.ceil(self.num_pairs / max(1, trainer.world_size))
        protocol = getattr(pl_module, "protocol", None) or getattr(getattr(trainer, "datamodule", None), "protocol", None)
        self._inclusive = bool(getattr(protocol, "inclusive", False))
        # Resolved once, here, on every rank: `trainer.log_dir` is a collective (it broadcasts rank 0's directory),
        # so calling it per batch, where ranks draw different numbers of pairs, would deadlock DDP runs.
        self._dir = self.resolve_dir(trainer)

    def _select(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records to draw from one batch: keypoint records of the chosen ablation row."""
        records = [r for r in records if isinstance(r, dict) and "pred_kps" in r and "trg_kps" in r]
        rows = list(dict.fromkeys(r["row"] for r in records if "row" in r))
        if not rows:
            if self.row is not None and not self._row_checked:
                rank_zero_warn(f"CorrespondenceVisualizer: row={self.row!r} is ignored, the records have no rows")
            self._row_checked = True
            return records
        if self._active_row is None:
            self._active_row = rows[0]  # the table's first row: records come out row by row in table order
        elif self._active_row not in rows:
            raise ValueError(f"CorrespondenceVisualizer: row {self._active_row!r} is not a row of this ablation {rows}")
        self._row_checked = True
        return [r for r in records if r.get("row") == self._active_row]

    def _filename(self, pair_id: str) -> str:
        return self._names(pair_id) + ".png"

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if len(self._seen) >= self._limit or not outputs or not isinstance(outputs, list):
            return
        samples = {s["pair_id"]: s for s in batch if isinstance(s, dict) and "pair_id" in s} \
            if isinstance(batch, (list, tuple)) else {}
        out = self._dir
        for record in self._select(outputs):
            pair_id = str(record["pair_id"])
            sample = samples.get(record["pair_id"])
            if len(self._seen) >= self._limit:
                break
            if pair_id in self._seen or sample is None or "src_image" not in sample:
                continue
            self._seen.add(pair_id)
            correct = keypoints_correct(record["pred_kps"], record["trg_kps"], record["threshold"], self.alpha,
                                        self._inclusive)
            picture = draw_correspondences(sample["src_image"], sample["trg_image"], record["src_kps"],
                                           record["trg_kps"], record["pred_kps"], correct, height=self.height)
            out.mkdir(parents=True, exist_ok=True)
            path = out / self._filename(pair_id)
            save_image_atomically(picture, path)
            self.saved.append(path)
            caption = f"{pair_id}: {int(correct.sum())}/{len(correct)} correct at PCK@{self.alpha:g}"
            if self.log_to_wandb:
                self._images.append((pair_id, picture, caption))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_to_wandb:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        images = self._images
        if loggers:
            # Collective: every rank holds the same logger config, so all ranks take this branch together.
            unique: dict[str, tuple[str, Image.Image, str]] = {}
            for item in (i for part in gather_from_ranks(images) for i in part):
                unique.setdefault(item[0], item)  # a padded sampler may have drawn a pair on two ranks
            images = list(unique.values())
        if not trainer.is_global_zero or not images:
            return
        # W&B shows an image list as one strip and warns when sizes differ: pad the panels to a common width
        # (the PNG files keep their own size).
        width = max(i[1].width for i in images)
        pictures = [_pad_width(i[1], width) for i in images]
        for logger in loggers:
            logger.log_image(key="correspondences", images=pictures, caption=[i[2] for i in images])
        self._images = []
