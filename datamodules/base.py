"""The base of the benchmark LightningDataModules: one evaluated dataset, its categories and its protocol.

Each benchmark's DataModule lives next to its reader (``spair.py``, ``pfpascal.py``, ...), carries its
protocol (the module's ``PROTOCOL``, a :class:`datamodules.protocols.Protocol`) and serves the evaluated split to ``trainer.test`` / ``trainer.predict`` as lists of
sample dicts (images differ in size; the model resizes), in an order that keeps pairs sharing an image
together; under DDP each process gets one contiguous, unpadded chunk of that order (``datamodules.samplers``),
so every pair is scored exactly once.

SPair (``supports_fit``) also serves ``trainer.fit`` / ``trainer.validate``: a training split shuffled
reproducibly and anew every epoch (``EpochShuffleSampler`` in one process, ``DistributedSampler`` under DDP)
and a validation split served exactly like the evaluated one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .protocols import Protocol
from .samplers import (
    ContiguousDistributedSampler,
    EpochShuffleSampler,
    OrderedSampler,
    PairDataLoader,
    collate_pairs,
    dataset_pair_ids,
    dataset_pair_images,
    image_grouped_order,
)

__all__ = ["PairDataModule"]


def require_root_folder(root: str | Path, name: str, hint: str) -> Path:
    """``root`` as a path (``~`` expanded) when it is a folder.

    Raises:
        FileNotFoundError: "<name> root not found: <root>; <hint>".
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name} root not found: {path}; {hint}")
    return path


class PairDataModule(L.LightningDataModule):
    """Base of the benchmark DataModules: one evaluated dataset, its categories and its protocol.

    Subclasses set ``protocol`` (their module's ``PROTOCOL``) and implement :meth:`build_dataset`; the dataset
    must expose ``categories`` (the names the metric groups by), and should expose ``pair_ids`` and ``pair_images()``
    (the evaluation order and the writer's completeness check use them). A subclass that can also train
    sets ``supports_fit`` and implements :meth:`build_train_dataset` and :meth:`build_val_dataset`.

    Args:
        root: Benchmark root (required; None only so that a config can leave it to ``--data.root``).
        batch_size: Pairs per batch (a batch is a list of sample dicts).
        num_workers: DataLoader workers.
    """

    #: The benchmark's scoring protocol (its module's ``PROTOCOL``); None for inputs that are not scored.
    protocol: ClassVar[Protocol | None] = None
    layout_hint: ClassVar[str] = ""
    #: The benchmark's name in "<name> root not found" (:func:`require_root_folder`); empty where
    #: :meth:`check_inputs` leaves the root to the reader (a root that is generated, or a file).
    root_name: ClassVar[str] = ""
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
    def protocol_name(self) -> str:
        """The key of :attr:`protocol` (``spair``, ...; empty without one)."""
        return self.protocol.key if self.protocol is not None else ""

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

    @classmethod
    def check_inputs(cls, **init_args: Any) -> None:
        """Check a config's ``data.init_args`` before any model is loaded (the CLI calls it): ``root`` is given
        and is a folder, with the reader's own message (the reader checks the layout inside as it reads).

        Raises:
            ValueError: No ``root``.
            FileNotFoundError: ``root`` is not a folder (named, with the expected layout).
        """
        if not cls.root_name:
            return
        root = init_args.get("root")
        if root is None:
            raise ValueError(f"{cls.__name__} needs `root` (--data.root DIR); {cls.layout_hint}")
        require_root_folder(root, cls.root_name, cls.layout_hint)

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
