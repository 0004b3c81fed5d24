"""The thin LightningDataModules over the plain benchmark readers.

Each wraps one reader, names its protocol (``datamodules.protocols``) and serves the evaluated split to
``trainer.test`` / ``trainer.predict`` as lists of sample dicts (images differ in size; the model
resizes), in an order that keeps pairs sharing an image together; under DDP each process gets one
contiguous, unpadded chunk of that order (``datamodules.samplers``), so every pair is scored exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from .cub import LAYOUT_HINT as CUB_LAYOUT_HINT
from .cub import CUBASICDataset
from .pfpascal import LAYOUT_HINT as PF_PASCAL_LAYOUT_HINT
from .pfpascal import PFPascalDataset
from .pfwillow import LAYOUT_HINT as PF_WILLOW_LAYOUT_HINT
from .pfwillow import PFWillowDataset
from .protocols import Protocol, get_protocol
from .samplers import (
    ContiguousDistributedSampler,
    OrderedSampler,
    PairDataLoader,
    dataset_pair_ids,
    dataset_pair_images,
    image_grouped_order,
)
from .spair import LAYOUT_HINT, SPairDataset, collate_pairs, normalize_split
from .synthetic import default_synthetic_categories, synthetic_root_matches, write_synthetic_spair
from .tss import TSS_DATASETS, TSS_LAYOUT_HINT, TSSDataset

__all__ = [
    "CUBDataModule",
    "PFPascalDataModule",
    "PFWillowDataModule",
    "PairDataModule",
    "SPairDataModule",
    "SyntheticSPairDataModule",
    "TSSDataModule",
]


class PairDataModule(L.LightningDataModule):
    """Base of the benchmark DataModules: one evaluated dataset, its categories and its protocol.

    Subclasses set ``protocol_name`` and implement :meth:`build_dataset`; the dataset must expose
    ``categories`` (the names the metric groups by), and should expose ``pair_ids`` and ``pair_images()``
    (the evaluation order and the writer's completeness check use them).

    Args:
        root: Benchmark root (required; None only so that a config can leave it to ``--data.root``).
        batch_size: Pairs per batch (a batch is a list of sample dicts).
        num_workers: DataLoader workers.
    """

    protocol_name: ClassVar[str] = ""
    layout_hint: ClassVar[str] = ""

    def __init__(self, root: str | None = None, batch_size: int = 1, num_workers: int = 0) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.test_dataset: Any = None
        #: Pair ids already scored by an interrupted run (set by ``CorrespondenceWriter(resume=True)``).
        self.finished_pair_ids: set[str] = set()

    @property
    def protocol(self) -> Protocol:
        """The benchmark's scoring protocol."""
        return get_protocol(self.protocol_name)

    @property
    def alphas(self) -> tuple[float, ...]:
        """The protocol's PCK alphas."""
        return self.protocol.alphas

    def build_dataset(self, root: str) -> Dataset:
        """Build the evaluated dataset from ``root``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the evaluated dataset for ``stage`` in ``{"test", "predict", None}``."""
        if stage in (None, "test", "predict") and self.test_dataset is None:
            if self.root is None:
                raise ValueError(f"{type(self).__name__} needs `root` (--data.root DIR); {self.layout_hint}")
            self.test_dataset = self.build_dataset(self.root)

    @property
    def categories(self) -> list[str]:
        """Sorted category names of the evaluated dataset (after :meth:`setup`)."""
        if self.test_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before .categories")
        return list(self.test_dataset.categories)

    def evaluation_order(self) -> list[int]:
        """Dataset indices in evaluation order: pairs sharing an image together (after :meth:`setup`).

        See :func:`datamodules.samplers.image_grouped_order`; dataset order for a dataset without
        ``pair_images()``.
        """
        if self.test_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('test') must be called first")
        pairs = dataset_pair_images(self.test_dataset)
        order = list(range(len(self.test_dataset))) if pairs is None else image_grouped_order(pairs)
        if self.finished_pair_ids:  # resuming: only the pairs an interrupted run did not finish
            ids = dataset_pair_ids(self.test_dataset) or []
            order = [i for i in order if ids[i] not in self.finished_pair_ids]
        return order

    def _distributed_kwargs(self) -> dict[str, int] | None:
        """``num_replicas`` and ``rank`` of the attached trainer when it runs several processes, else None."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        kwargs = trainer.distributed_sampler_kwargs or {}
        return {"num_replicas": int(kwargs.get("num_replicas", trainer.world_size)),
                "rank": int(kwargs.get("rank", trainer.global_rank))}

    def _dataloader(self) -> DataLoader:
        order = self.evaluation_order()
        distributed = self._distributed_kwargs()
        # Our samplers, in one process too: the order groups pairs by shared image, and under DDP an UNPADDED
        # sampler (Lightning keeps any DistributedSampler) scores each pair exactly once.
        sampler: Sampler[int] = (
            OrderedSampler(order)
            if distributed is None
            else ContiguousDistributedSampler(self.test_dataset, order=order, batch_size=self.batch_size, **distributed)
        )
        return PairDataLoader(
            self.test_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        """The evaluated split as lists of sample dicts, in :meth:`evaluation_order`; each process its own chunk."""
        return self._dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The evaluated split as lists of sample dicts, in :meth:`evaluation_order`; each process its own chunk."""
        return self._dataloader()


class SPairDataModule(PairDataModule):
    """SPair-71k (``datamodules.spair.SPairDataset``), scored with the SPair protocol.

    Args:
        root: SPair-71k root (``PairAnnotation/``, ``JPEGImages/``).
        test_split: Split evaluated (``test``, ``val`` or ``trn``).
        categories: Categories to keep (``None``: all).
        pairs_per_category: Per-category subset size (``None``: all; the paper's ablations use 20).
        seed: Seed of the per-category subset.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "spair"
    layout_hint = LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.test_split = normalize_split(test_split)
        self.category_filter = list(categories) if categories is not None else None
        self.pairs_per_category = pairs_per_category
        self.seed = seed

    def build_dataset(self, root: str) -> SPairDataset:
        """The SPair split with the configured filter and subset."""
        return SPairDataset(
            root,
            split=self.test_split,
            categories=self.category_filter,
            pairs_per_category=self.pairs_per_category,
            seed=self.seed,
        )


class SyntheticSPairDataModule(SPairDataModule):
    """:class:`SPairDataModule` over a generated synthetic benchmark.

    See :func:`write_synthetic_spair` for what is generated.

    ``prepare_data`` (and ``setup``, for runs without a Trainer) write the benchmark into ``root``
    unless a complete one generated with identical arguments is already there; the data is then
    read by the real SPair reader.

    Args:
        root: Directory of the synthetic benchmark; None puts it in ``<trainer.default_root_dir>/synthetic_spair``.
        test_split: Split written and evaluated.
        categories: Categories to keep when reading (``None``: all).
        pairs_per_category: Per-category subset size when reading (``None``: all).
        seed: Seed of the per-category subset.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
        synthetic_categories: Generated category names; ``None`` uses
            :func:`default_synthetic_categories` with ``num_categories``.
        num_categories: Number of generated categories when ``synthetic_categories`` is ``None``.
        images_per_category: Generated images per category.
        synthetic_pairs_per_category: Generated pairs per category.
        image_width: Base image width.
        image_height: Base image height.
        num_keypoints: Keypoints per object.
        generator_seed: Seed of the generator.
    """

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        synthetic_categories: list[str] | None = None,
        num_categories: int = 2,
        images_per_category: int = 4,
        synthetic_pairs_per_category: int = 6,
        image_width: int = 160,
        image_height: int = 120,
        num_keypoints: int = 8,
        generator_seed: int = 0,
    ) -> None:
        super().__init__(
            root=root,
            test_split=test_split,
            categories=categories,
            pairs_per_category=pairs_per_category,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        names = (
            list(synthetic_categories)
            if synthetic_categories is not None
            else default_synthetic_categories(num_categories)
        )
        self.generator_kwargs: dict[str, Any] = {
            "categories": names,
            "images_per_category": images_per_category,
            "pairs_per_category": synthetic_pairs_per_category,
            "num_keypoints": num_keypoints,
            "image_size": (image_width, image_height),
            "seed": generator_seed,
            "split": self.test_split,
        }

    def is_generated(self) -> bool:
        """Whether ``root`` holds a complete benchmark generated with these arguments."""
        return self.root is not None and synthetic_root_matches(self.root, **self.generator_kwargs)

    def _ensure_generated(self) -> None:
        if self.root is None:
            # Without an explicit root the benchmark lives with the run: <default_root_dir>/synthetic_spair.
            if self.trainer is None:
                raise ValueError(f"{type(self).__name__} needs `root` when used without a Trainer")
            self.root = str(Path(self.trainer.default_root_dir) / "synthetic_spair")
        if not self.is_generated():
            write_synthetic_spair(self.root, **self.generator_kwargs)

    def prepare_data(self) -> None:
        """Write the synthetic benchmark (skipped if already generated with identical args)."""
        self._ensure_generated()

    def setup(self, stage: str | None = None) -> None:
        """Generate the benchmark if needed, then build the test dataset.

        Args:
            stage: Lightning stage.
        """
        if stage in (None, "test", "predict"):
            self._ensure_generated()
        super().setup(stage)


class TSSDataModule(PairDataModule):
    """TSS dense flow (``datamodules.tss.TSSDataset``): FG3DCar, JODS and PASCAL, both directions.

    Args:
        root: The ``TSS_CVPR2016`` folder.
        datasets: Sub-datasets to evaluate (default all three; results are reported per dataset).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "tss"
    layout_hint = TSS_LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        datasets: list[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.datasets = list(datasets) if datasets is not None else list(TSS_DATASETS)

    def build_dataset(self, root: str) -> TSSDataset:
        """All directed pairs of the selected sub-datasets."""
        return TSSDataset(root, self.datasets)


class CUBDataModule(PairDataModule):
    """CUB-200-2011 with the ASIC protocol (``datamodules.cub.CUBASICDataset``).

    All ordered pairs of each class's test images (ACSM's ``test_cub_cleaned.mat``), on the protocol's
    square crops: samples' images are the ``crop_size`` px crops, keypoints are crop pixels and the PCK
    threshold is ``crop_size``. Results are reported per class (``per_category``) and as their mean.

    Args:
        root: The ``CUB_200_2011`` folder.
        categories: CUB class indices evaluated, each separately (ASIC and the paper: 1, 2, 3).
        crop_size: Side of the square crop (ASIC: 256).
        test_list: ACSM's test list (default ``<root>/cachedir/cub/data/test_cub_cleaned.mat``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "cub"
    layout_hint = CUB_LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        categories: list[int] | None = None,
        crop_size: int = 256,
        test_list: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.class_indices = [int(c) for c in categories] if categories is not None else [1, 2, 3]
        self.crop_size = crop_size
        self.test_list = test_list

    def build_dataset(self, root: str) -> CUBASICDataset:
        """All ordered test pairs of the selected classes."""
        return CUBASICDataset(root, categories=self.class_indices, crop_size=self.crop_size, test_list=self.test_list)


# ------------------------------------------------------------------------------ PF-PASCAL / PF-WILLOW


class PFPascalDataModule(PairDataModule):
    """PF-PASCAL (``datamodules.pfpascal.PFPascalDataset``), scored with the ``pfpascal`` protocol.

    Args:
        root: The ``PF-dataset-PASCAL`` folder (``*_pairs_pf_pascal.csv``, ``JPEGImages/``, ``Annotations/``).
        test_split: Split evaluated (``test``, ``val`` or ``trn``).
        categories: PASCAL classes to keep (``None``: all).
        threshold: ``"image"`` (max side of the target image: the reference protocol) or ``"bbox"``
            (max side of the target object box from ``Annotations/<cat>/<name>.mat``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "pfpascal"
    layout_hint = PF_PASCAL_LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        threshold: str = "image",
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.test_split = test_split
        self.category_filter = list(categories) if categories is not None else None
        self.threshold = threshold

    def build_dataset(self, root: str) -> PFPascalDataset:
        """The PF-PASCAL split with the configured filter and threshold rule."""
        return PFPascalDataset(root, split=self.test_split, categories=self.category_filter, threshold=self.threshold)


class PFWillowDataModule(PairDataModule):
    """PF-WILLOW (``datamodules.pfwillow.PFWillowDataset``), scored with the ``pfwillow`` protocol.

    Args:
        root: The ``PF-dataset`` (or HPF's ``PF-WILLOW``) folder holding the test pairs csv.
        categories: Categories (``car``, ``duck``, ``motorbike``, ``winebottle``) or subclasses
            (``car(G)``...) to keep (``None``: all).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "pfwillow"
    layout_hint = PF_WILLOW_LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        categories: list[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.category_filter = list(categories) if categories is not None else None

    def build_dataset(self, root: str) -> PFWillowDataset:
        """The PF-WILLOW test pairs with the configured filter."""
        return PFWillowDataset(root, categories=self.category_filter)
