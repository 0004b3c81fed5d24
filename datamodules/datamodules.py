"""The thin LightningDataModules over the plain benchmark readers.

Each wraps one reader, names its protocol (``datamodules.protocols``) and serves the evaluated split to
``trainer.test`` / ``trainer.predict`` as lists of sample dicts (images differ in size; the model
resizes), in an order that keeps pairs sharing an image together; under DDP each process gets one
contiguous, unpadded chunk of that order (``datamodules.samplers``), so every pair is scored exactly once.

SPair (``supports_fit``) also serves ``trainer.fit`` / ``trainer.validate``: a training split shuffled
reproducibly and anew every epoch (``EpochShuffleSampler`` in one process, ``DistributedSampler`` under DDP)
and a validation split served exactly like the evaluated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .cub import LAYOUT_HINT as CUB_LAYOUT_HINT
from .cub import CUBASICDataset
from .davis import LAYOUT_HINT as DAVIS_LAYOUT_HINT
from .davis import SYNTHETIC_MARKER as DAVIS_SYNTHETIC_MARKER
from .davis import DAVISDataset, DAVISInstancePairs, write_synthetic_davis
from .masked_pairs import MASKED_PAIRS_HINT, MaskedPairsDataset, write_synthetic_masked_pairs
from .pfpascal import LAYOUT_HINT as PF_PASCAL_LAYOUT_HINT
from .pfpascal import PFPascalDataset
from .pfwillow import LAYOUT_HINT as PF_WILLOW_LAYOUT_HINT
from .pfwillow import PFWillowDataset
from .protocols import Protocol, get_protocol
from .samplers import (
    ContiguousDistributedSampler,
    EpochShuffleSampler,
    OrderedSampler,
    PairDataLoader,
    dataset_pair_ids,
    dataset_pair_images,
    image_grouped_order,
)
from .spair import LAYOUT_HINT, SUBSET_DRAWS, SPairDataset, collate_pairs, normalize_split
from .synthetic import default_synthetic_categories, synthetic_root_matches, write_synthetic_spair
from .tss import TSS_DATASETS, TSS_LAYOUT_HINT, TSSDataset

__all__ = [
    "CUBDataModule",
    "DAVISDataModule",
    "DAVISSwapDataModule",
    "MaskedPairsDataModule",
    "PFPascalDataModule",
    "PFWillowDataModule",
    "PairDataModule",
    "SPairDataModule",
    "SyntheticDAVISDataModule",
    "SyntheticSPairDataModule",
    "TSSDataModule",
]


class PairDataModule(L.LightningDataModule):
    """Base of the benchmark DataModules: one evaluated dataset, its categories and its protocol.

    Subclasses set ``protocol_name`` and implement :meth:`build_dataset`; the dataset must expose
    ``categories`` (the names the metric groups by), and should expose ``pair_ids`` and ``pair_images()``
    (the evaluation order and the writer's completeness check use them). A subclass that can also train
    sets ``supports_fit`` and implements :meth:`build_train_dataset` and :meth:`build_val_dataset`.

    Args:
        root: Benchmark root (required; None only so that a config can leave it to ``--data.root``).
        batch_size: Pairs per batch (a batch is a list of sample dicts).
        num_workers: DataLoader workers.
    """

    protocol_name: ClassVar[str] = ""
    layout_hint: ClassVar[str] = ""
    #: Whether the benchmark has training / validation splits (``trainer.fit`` / ``trainer.validate``).
    supports_fit: ClassVar[bool] = False

    def __init__(self, root: str | None = None, batch_size: PositiveInt = 1, num_workers: NonNegativeInt = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or int(batch_size) < 1:  # the CLI checks the type; this for Python callers
            raise ValueError(f"batch_size must be a positive int (data.init_args.batch_size), got {batch_size!r}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0 (data.init_args.num_workers), got {num_workers!r}")
        self.root = root
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.test_dataset: Any = None
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        #: Base seed of the training shuffle (subclasses that train set it).
        self.shuffle_seed = 0
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

    def build_train_dataset(self, root: str) -> Dataset:
        """Build the training dataset from ``root`` (only where ``supports_fit``)."""
        raise NotImplementedError

    def build_val_dataset(self, root: str) -> Dataset:
        """Build the validation dataset from ``root`` (only where ``supports_fit``)."""
        raise NotImplementedError

    def _require_root(self) -> str:
        if self.root is None:
            raise ValueError(f"{type(self).__name__} needs `root` (--data.root DIR); {self.layout_hint}")
        return self.root

    def _require_fit_support(self) -> None:
        if not self.supports_fit:
            raise NotImplementedError(
                f"{type(self).__name__} has no training / validation data: only SPairDataModule supports "
                "trainer.fit and trainer.validate (train the projection head on SPair-71k)"
            )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``.

        ``"test"``, ``"predict"`` or None: the evaluated dataset. ``"fit"``: the training and validation
        datasets; ``"validate"``: the validation dataset (both only where ``supports_fit``).

        Args:
            stage: Lightning stage.
        """
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self.build_dataset(self._require_root())
        if stage in ("fit", "validate"):
            self._require_fit_support()
            if stage == "fit" and self.train_dataset is None:
                self.train_dataset = self.build_train_dataset(self._require_root())
            if self.val_dataset is None:
                self.val_dataset = self.build_val_dataset(self._require_root())

    @property
    def categories(self) -> list[str]:
        """Sorted category names of the evaluated dataset (after :meth:`setup`)."""
        if self.test_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before .categories")
        return list(self.test_dataset.categories)

    @property
    def val_categories(self) -> list[str]:
        """Sorted category names of the validation dataset (after ``setup("fit")`` or ``setup("validate")``)."""
        if self.val_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') must be called before .val_categories")
        return list(self.val_dataset.categories)

    def evaluation_order(self, dataset: Any = None) -> list[int]:
        """Dataset indices in evaluation order: pairs sharing an image together (after :meth:`setup`).

        See :func:`datamodules.samplers.image_grouped_order`; dataset order for a dataset without
        ``pair_images()``. Resuming (``finished_pair_ids``) drops finished pairs of the evaluated dataset
        only; any other dataset (validation) is ordered in full.

        Args:
            dataset: The dataset to order; None for the evaluated dataset (``test_dataset``).
        """
        if dataset is None:
            dataset = self.test_dataset
            if dataset is None:
                raise RuntimeError(f"{type(self).__name__}.setup('test') must be called first")
        pairs = dataset_pair_images(dataset)
        order = list(range(len(dataset))) if pairs is None else image_grouped_order(pairs)
        if self.finished_pair_ids and dataset is self.test_dataset:  # resuming: only the unfinished pairs
            ids = dataset_pair_ids(dataset) or []
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

    def _pair_loader(self, dataset: Any, sampler: Sampler[int]) -> DataLoader:
        return PairDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_pairs,
            persistent_workers=self.num_workers > 0,
        )

    def _dataloader(self, dataset: Any = None) -> DataLoader:
        """An evaluation loader of ``dataset`` (None: the evaluated dataset) in :meth:`evaluation_order`."""
        order = self.evaluation_order(dataset)
        dataset = self.test_dataset if dataset is None else dataset
        distributed = self._distributed_kwargs()
        # Our samplers, in one process too: the order groups pairs by shared image, and under DDP an UNPADDED
        # sampler (Lightning keeps any DistributedSampler) scores each pair exactly once.
        sampler: Sampler[int] = (
            OrderedSampler(order)
            if distributed is None
            else ContiguousDistributedSampler(dataset, order=order, batch_size=self.batch_size, **distributed)
        )
        return self._pair_loader(dataset, sampler)

    def test_dataloader(self) -> DataLoader:
        """The evaluated split as lists of sample dicts, in :meth:`evaluation_order`; each process its own chunk."""
        return self._dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The evaluated split as lists of sample dicts, in :meth:`evaluation_order`; each process its own chunk."""
        return self._dataloader()

    def train_dataloader(self) -> DataLoader:
        """The training split as lists of sample dicts, shuffled reproducibly and anew every epoch.

        One process: :class:`~datamodules.samplers.EpochShuffleSampler` (seed ``shuffle_seed``). Under DDP:
        ``DistributedSampler(shuffle=True, seed=shuffle_seed, drop_last=False)``, which Lightning keeps;
        Lightning calls ``set_epoch`` on either at the start of every epoch.

        Raises:
            NotImplementedError: Where the benchmark has no training split (``supports_fit`` is False).
        """
        self._require_fit_support()
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') must be called first")
        distributed = self._distributed_kwargs()
        sampler: Sampler[int] = (
            EpochShuffleSampler(self.train_dataset, seed=self.shuffle_seed)
            if distributed is None
            else DistributedSampler(
                self.train_dataset, shuffle=True, seed=self.shuffle_seed, drop_last=False, **distributed
            )
        )
        return self._pair_loader(self.train_dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        """The validation split, served like the evaluated one (image-grouped order, unpadded DDP chunks).

        ``finished_pair_ids`` (resuming a test run) does not apply: every validation pair is scored.

        Raises:
            NotImplementedError: Where the benchmark has no validation split (``supports_fit`` is False).
        """
        self._require_fit_support()
        if self.val_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup('fit') or setup('validate') must be called first")
        return self._dataloader(self.val_dataset)


class SPairDataModule(PairDataModule):
    """SPair-71k (``datamodules.spair.SPairDataset``), scored with the SPair protocol.

    Serves ``trainer.test`` / ``trainer.predict`` on ``test_split`` and ``trainer.fit`` /
    ``trainer.validate`` on ``train_split`` / ``val_split`` (all with the ``categories`` filter).

    Args:
        root: SPair-71k root (``PairAnnotation/``, ``JPEGImages/``).
        test_split: Split evaluated (``test``, ``val`` or ``trn``).
        categories: Categories to keep (``None``: all).
        pairs_per_category: Per-category subset size of the evaluated split (``None``: all; the paper's
            ablations use 20).
        seed: Seed of the per-category subsets (of every split).
        subset_draw: How the subsets are drawn: ``uniform`` (distinct pairs, the default) or ``reference``
            (the reference's ``--SAMPLE`` draw with replacement; with ``seed: 42`` the paper's ablation pairs,
            see ``configs/overlays/spair_subset20.yaml``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
        train_split: Split trained on (``trn`` alias ``train``, ``val`` or ``test``).
        val_split: Split validated on (model selection).
        train_pairs_per_category: Per-category subset size of the training split (``None``: all).
        val_pairs_per_category: Per-category subset size of the validation split (``None``: all).
        shuffle_seed: Base seed of the training shuffle (epoch ``e`` uses ``shuffle_seed + e``).
    """

    protocol_name = "spair"
    layout_hint = LAYOUT_HINT
    supports_fit = True

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        subset_draw: Literal["uniform", "reference"] = "uniform",
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
        train_split: str = "trn",
        val_split: str = "val",
        train_pairs_per_category: int | None = None,
        val_pairs_per_category: int | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.test_split = normalize_split(test_split)
        self.category_filter = list(categories) if categories is not None else None
        self.pairs_per_category = pairs_per_category
        self.seed = seed
        if subset_draw not in SUBSET_DRAWS:  # the CLI checks the Literal; this is for Python callers
            raise ValueError(f"unknown subset_draw {subset_draw!r}; choose one of {list(SUBSET_DRAWS)}")
        self.subset_draw = subset_draw
        self.train_split = normalize_split(train_split)
        self.val_split = normalize_split(val_split)
        self.train_pairs_per_category = train_pairs_per_category
        self.val_pairs_per_category = val_pairs_per_category
        self.shuffle_seed = int(shuffle_seed)

    def _split_dataset(self, root: str, split: str, pairs_per_category: int | None) -> SPairDataset:
        return SPairDataset(
            root,
            split=split,
            categories=self.category_filter,
            pairs_per_category=pairs_per_category,
            seed=self.seed,
            subset_draw=self.subset_draw,
        )

    def build_dataset(self, root: str) -> SPairDataset:
        """The SPair split with the configured filter and subset."""
        return self._split_dataset(root, self.test_split, self.pairs_per_category)

    def build_train_dataset(self, root: str) -> SPairDataset:
        """The training split with the configured filter and subset."""
        return self._split_dataset(root, self.train_split, self.train_pairs_per_category)

    def build_val_dataset(self, root: str) -> SPairDataset:
        """The validation split with the configured filter and subset."""
        return self._split_dataset(root, self.val_split, self.val_pairs_per_category)


class SyntheticSPairDataModule(SPairDataModule):
    """:class:`SPairDataModule` over a generated synthetic benchmark.

    See :func:`write_synthetic_spair` for what is generated.

    ``prepare_data`` (and ``setup``, for runs without a Trainer) write the splits a stage needs into
    ``root`` unless complete ones generated with identical arguments are already there: ``test_split``
    for test / predict, ``train_split`` and ``val_split`` for fit, ``val_split`` for validate (all
    three for ``prepare_data`` without a Trainer). The splits share the images and coexist in ``root``;
    the data is then read by the real SPair reader.

    Args:
        root: Directory of the synthetic benchmark; None puts it in ``<trainer.default_root_dir>/synthetic_spair``.
        test_split: Split written and evaluated.
        categories: Categories to keep when reading (``None``: all).
        pairs_per_category: Per-category subset size when reading the evaluated split (``None``: all).
        seed: Seed of the per-category subsets.
        subset_draw: How the subsets are drawn (``uniform`` or ``reference``, see :class:`SPairDataModule`).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
        synthetic_categories: Generated category names; ``None`` uses
            :func:`default_synthetic_categories` with ``num_categories``.
        num_categories: Number of generated categories when ``synthetic_categories`` is ``None``.
        images_per_category: Generated images per category.
        synthetic_pairs_per_category: Generated pairs per category of ``test_split``.
        image_width: Base image width.
        image_height: Base image height.
        num_keypoints: Keypoints per object.
        generator_seed: Seed of the generator.
        train_split: Split written and trained on.
        val_split: Split written and validated on.
        train_pairs_per_category: Per-category subset size when reading the training split (``None``: all).
        val_pairs_per_category: Per-category subset size when reading the validation split (``None``: all).
        shuffle_seed: Base seed of the training shuffle.
        synthetic_train_pairs_per_category: Generated pairs per category of ``train_split`` (capped at
            ``images_per_category * (images_per_category - 1)``).
        synthetic_val_pairs_per_category: Generated pairs per category of ``val_split`` (capped likewise).
    """

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        subset_draw: Literal["uniform", "reference"] = "uniform",
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
        synthetic_categories: list[str] | None = None,
        num_categories: int = 2,
        images_per_category: int = 4,
        synthetic_pairs_per_category: int = 6,
        image_width: int = 160,
        image_height: int = 120,
        num_keypoints: int = 8,
        generator_seed: int = 0,
        train_split: str = "trn",
        val_split: str = "val",
        train_pairs_per_category: int | None = None,
        val_pairs_per_category: int | None = None,
        shuffle_seed: int = 0,
        synthetic_train_pairs_per_category: int = 12,
        synthetic_val_pairs_per_category: int = 6,
    ) -> None:
        super().__init__(
            root=root,
            test_split=test_split,
            categories=categories,
            pairs_per_category=pairs_per_category,
            seed=seed,
            subset_draw=subset_draw,
            batch_size=batch_size,
            num_workers=num_workers,
            train_split=train_split,
            val_split=val_split,
            train_pairs_per_category=train_pairs_per_category,
            val_pairs_per_category=val_pairs_per_category,
            shuffle_seed=shuffle_seed,
        )
        names = (
            list(synthetic_categories)
            if synthetic_categories is not None
            else default_synthetic_categories(num_categories)
        )
        self.image_kwargs: dict[str, Any] = {
            "categories": names,
            "images_per_category": images_per_category,
            "num_keypoints": num_keypoints,
            "image_size": (image_width, image_height),
            "seed": generator_seed,
        }
        # Generated pairs per split; a split named twice keeps its first role's count (test, then train).
        cap = max(1, images_per_category * (images_per_category - 1))
        self.synthetic_pairs: dict[str, int] = {self.test_split: synthetic_pairs_per_category}
        self.synthetic_pairs.setdefault(self.train_split, min(synthetic_train_pairs_per_category, cap))
        self.synthetic_pairs.setdefault(self.val_split, min(synthetic_val_pairs_per_category, cap))
        #: Generator arguments of the evaluated split.
        self.generator_kwargs: dict[str, Any] = self.split_generator_kwargs(self.test_split)

    def split_generator_kwargs(self, split: str) -> dict[str, Any]:
        """The :func:`write_synthetic_spair` arguments (``root`` aside) of one of the configured splits."""
        split = normalize_split(split)
        return {**self.image_kwargs, "pairs_per_category": self.synthetic_pairs[split], "split": split}

    def stage_splits(self, stage: str | None) -> list[str]:
        """The splits ``stage`` reads: fit: train and val; validate: val; test / predict: test; None: all."""
        if stage == "fit":
            splits = [self.train_split, self.val_split]
        elif stage == "validate":
            splits = [self.val_split]
        elif stage in ("test", "predict"):
            splits = [self.test_split]
        else:
            splits = [self.test_split, self.train_split, self.val_split]
        return list(dict.fromkeys(splits))

    def is_generated(self, split: str | None = None) -> bool:
        """Whether ``root`` holds a complete ``split`` (default: the evaluated one) generated with these arguments."""
        kwargs = self.split_generator_kwargs(self.test_split if split is None else split)
        return self.root is not None and synthetic_root_matches(self.root, **kwargs)

    def _ensure_generated(self, splits: list[str]) -> None:
        if self.root is None:
            # Without an explicit root the benchmark lives with the run: <default_root_dir>/synthetic_spair.
            if self.trainer is None:
                raise ValueError(f"{type(self).__name__} needs `root` when used without a Trainer")
            self.root = str(Path(self.trainer.default_root_dir) / "synthetic_spair")
        for split in splits:
            if not self.is_generated(split):
                write_synthetic_spair(self.root, **self.split_generator_kwargs(split))

    def _trainer_stage(self) -> str | None:
        """The running trainer function (``fit``, ``validate``, ``test``, ``predict``), None without one."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def prepare_data(self) -> None:
        """Write the splits of the trainer's stage (all without a Trainer); those already generated are skipped."""
        self._ensure_generated(self.stage_splits(self._trainer_stage()))

    def setup(self, stage: str | None = None) -> None:
        """Generate the splits of ``stage`` if needed, then build its datasets.

        Args:
            stage: Lightning stage (None: the evaluated split, as :meth:`PairDataModule.setup`).
        """
        self._ensure_generated(self.stage_splits(stage or "test"))
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
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.datasets = list(datasets) if datasets is not None else list(TSS_DATASETS)

    def build_dataset(self, root: str) -> TSSDataset:
        """All directed pairs of the selected sub-datasets."""
        return TSSDataset(root, self.datasets)


class DAVISDataModule(PairDataModule):
    """DAVIS-2017 label propagation (``datamodules.davis.DAVISDataset``): the first frame's annotation carried to
    every later frame of its sequence, scored with J and F (``lightning_modules.segmentation_metrics``).

    Args:
        root: The DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        sequences: Sequences to evaluate (None: all of ``split``, or all folders without a split).
        resolution: ``480p`` or ``Full-Resolution``.
        split: Sequence list ``ImageSets/2017/<split>.txt`` (e.g. ``val``); None lists the folders.
        frame_stride: Evaluate every ``frame_stride``-th frame.
        max_frames: At most this many target frames per sequence (None: all).
        skip_last_frame: Leave each sequence's last frame out, as the DAVIS toolkit does.
        batch_size: Pairs (frames) per batch.
        num_workers: DataLoader workers.
    """

    protocol_name = "davis"
    layout_hint = DAVIS_LAYOUT_HINT

    def __init__(
        self,
        root: str | None = None,
        sequences: list[str] | None = None,
        resolution: str = "480p",
        split: str | None = None,
        frame_stride: int = 1,
        max_frames: int | None = None,
        skip_last_frame: bool = False,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.dataset_kwargs: dict[str, Any] = {
            "sequences": sequences, "resolution": resolution, "split": split, "frame_stride": frame_stride,
            "max_frames": max_frames, "skip_last_frame": skip_last_frame,
        }

    def build_dataset(self, root: str) -> DAVISDataset:
        """The selected sequences' (first frame, frame t) items."""
        return DAVISDataset(root, **self.dataset_kwargs)


class SyntheticDAVISDataModule(DAVISDataModule):
    """:class:`DAVISDataModule` over a generated DAVIS-format root (``datamodules.davis.write_synthetic_davis``).

    The root is written unless one generated before is there (its marker file); with ``root`` None it lives in
    ``<trainer.default_root_dir>/synthetic_davis``.

    Args:
        root: Where the generated root goes.
        num_sequences: Generated sequences (named ``seq0``, ``seq1``, ...).
        num_frames: Frames per sequence.
        image_width: Frame width.
        image_height: Frame height.
        num_objects: Objects per sequence.
        generator_seed: Seed of the generator.
        batch_size: Pairs (frames) per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        root: str | None = None,
        num_sequences: int = 2,
        num_frames: int = 4,
        image_width: int = 96,
        image_height: int = 64,
        num_objects: int = 2,
        generator_seed: int = 0,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.generator_kwargs: dict[str, Any] = {
            "sequences": tuple(f"seq{i}" for i in range(num_sequences)), "num_frames": num_frames,
            "size": (image_width, image_height), "num_objects": num_objects, "seed": generator_seed,
        }

    def prepare_data(self) -> None:
        """Write the generated root (skipped when one is there)."""
        self._ensure_generated()

    def _ensure_generated(self) -> None:
        if self.root is None:
            if self.trainer is None:
                raise ValueError(f"{type(self).__name__} needs `root` when used without a Trainer")
            self.root = str(Path(self.trainer.default_root_dir) / "synthetic_davis")
        if not (Path(self.root) / DAVIS_SYNTHETIC_MARKER).is_file():
            write_synthetic_davis(self.root, **self.generator_kwargs)

    def setup(self, stage: str | None = None) -> None:
        """Generate the root if needed, then build the dataset."""
        if stage in (None, "test", "predict"):
            self._ensure_generated()
        super().setup(stage)


class MaskedPairsDataModule(PairDataModule):
    """Image pairs with instance masks from a JSON list (``datamodules.masked_pairs``): the inputs of instance
    swapping, served to ``trainer.predict``. There is no benchmark protocol.

    Args:
        root: The JSON file, or a folder holding it as ``pairs.json``.
        generate: When ``root`` holds no ``pairs.json``, write ``num_generated`` generated pairs (textured
            ellipses and their masks) into it: a smoke run without data.
        num_generated: Pairs generated.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    layout_hint = MASKED_PAIRS_HINT

    def __init__(self, root: str | None = None, generate: bool = False, num_generated: int = 2,
                 batch_size: PositiveInt = 1, num_workers: NonNegativeInt = 0) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.generate, self.num_generated = bool(generate), int(num_generated)

    @property
    def protocol(self) -> None:  # type: ignore[override]
        """None: swapped images are not scored against a benchmark protocol."""
        return None

    def build_dataset(self, root: str) -> MaskedPairsDataset:
        """The listed pairs (generated first when ``generate`` is set and none are there)."""
        path = Path(root)
        if self.generate and not (path.is_file() or (path / "pairs.json").is_file()):
            write_synthetic_masked_pairs(path, num_pairs=self.num_generated)
        return MaskedPairsDataset(path)


class DAVISSwapDataModule(MaskedPairsDataModule):
    """Instance-swap inputs with the dataset's own instance masks: DAVIS frame-0 pairs of two sequences
    (``datamodules.davis.DAVISInstancePairs``), served to ``trainer.predict``.

    Args:
        root: DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        pairs: ``[[source sequence, target sequence], ...]``; None pairs each sequence with the next.
        object_id: The annotated object swapped (its mask in both frames).
        resolution: ``480p`` or ``Full-Resolution``.
        split: Restrict the sequences to ``ImageSets/2017/<split>.txt``.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    layout_hint = DAVIS_LAYOUT_HINT

    def __init__(self, root: str | None = None, pairs: list[list[str]] | None = None, object_id: int = 1,
                 resolution: str = "480p", split: str | None = None, batch_size: PositiveInt = 1,
                 num_workers: NonNegativeInt = 0) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.pair_kwargs: dict[str, Any] = {"pairs": pairs, "object_id": object_id, "resolution": resolution,
                                            "split": split}

    def build_dataset(self, root: str) -> DAVISInstancePairs:
        """The configured sequence pairs with their object masks."""
        return DAVISInstancePairs(root, **self.pair_kwargs)


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
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
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
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
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
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.category_filter = list(categories) if categories is not None else None

    def build_dataset(self, root: str) -> PFWillowDataset:
        """The PF-WILLOW test pairs with the configured filter."""
        return PFWillowDataset(root, categories=self.category_filter)
