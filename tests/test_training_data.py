"""Tests of the training data: SPair train / val loaders (one process and DDP) and multi-split synthetic roots."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data.distributed import DistributedSampler

from datamodules import PairDataModule, PFPascalDataModule, SPairDataModule, SyntheticSPairDataModule
from datamodules.samplers import (
    ContiguousDistributedSampler,
    EpochShuffleSampler,
    OrderedSampler,
    dataset_pair_images,
    image_grouped_order,
)
from datamodules.spair import SPairDataset
from datamodules.synthetic import read_synthetic_marker, synthetic_root_matches, write_synthetic_spair

CATEGORIES = ("cat", "dog", "bus")
SPLIT_PAIRS = {"test": 3, "trn": 8, "val": 3}  # per category: 9 test, 24 trn and 9 (odd) val pairs


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic root holding the trn, val and test splits."""
    path = tmp_path_factory.mktemp("training") / "spair"
    for split, pairs in SPLIT_PAIRS.items():
        write_synthetic_spair(path, categories=CATEGORIES, pairs_per_category=pairs, split=split)
    return path


def _fit_module(root: Path, **kwargs) -> SPairDataModule:
    datamodule = SPairDataModule(str(root), **kwargs)
    datamodule.setup("fit")
    return datamodule


def _ddp_trainer(rank: int) -> SimpleNamespace:
    """What the datamodule reads of an attached 2-process DDP trainer."""
    return SimpleNamespace(world_size=2, global_rank=rank, distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})


def _ids(loader) -> list[str]:
    return [sample["pair_id"] for batch in loader for sample in batch]


def _files(root: Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths if str(p.relative_to(root)).startswith(prefixes)}


def _pairs(root: Path, split: str) -> set[tuple[str, str]]:
    return {(r.src_image_path.name, r.trg_image_path.name) for r in SPairDataset(root, split=split).records}


# ------------------------------------------------------------------------------------------- train loader


def test_train_loader_covers_every_pair_once_and_reshuffles_per_epoch(root: Path) -> None:
    datamodule = _fit_module(root, batch_size=5, shuffle_seed=3)
    assert datamodule.train_dataset.pair_ids == SPairDataset(root, split="trn").pair_ids
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler)
    batches = list(loader)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 4] and all(isinstance(s, dict) for s in batches[0])
    epoch0 = _ids(batches)
    assert sorted(epoch0) == sorted(datamodule.train_dataset.pair_ids) and len(set(epoch0)) == 24
    assert epoch0 != datamodule.train_dataset.pair_ids  # shuffled

    again = _fit_module(root, batch_size=5, shuffle_seed=3).train_dataloader()
    assert list(again.sampler) == list(loader.sampler)  # reproducible
    loader.sampler.set_epoch(1)
    epoch1 = list(loader.sampler)
    assert sorted(epoch1) == list(range(24)) and epoch1 != list(again.sampler)  # a new order every epoch
    other_seed = _fit_module(root, batch_size=5, shuffle_seed=4).train_dataloader()
    assert list(other_seed.sampler) != list(again.sampler)


def test_epoch_shuffle_matches_a_one_replica_distributed_sampler() -> None:
    data = list(range(17))
    sampler = EpochShuffleSampler(data, seed=5)
    reference = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(sampler) == list(reference) and len(sampler) == 17


def test_split_subsets_and_validate_stage(root: Path) -> None:
    datamodule = _fit_module(root, categories=["cat", "dog"], train_pairs_per_category=3, val_pairs_per_category=2)
    assert len(datamodule.train_dataset) == 6 and len(datamodule.val_dataset) == 4
    assert datamodule.val_categories == ["cat", "dog"] and datamodule.test_dataset is None
    validating = SPairDataModule(str(root), val_split="test")
    with pytest.raises(RuntimeError, match="setup"):
        _ = validating.val_categories
    validating.setup("validate")
    assert validating.train_dataset is None and validating.val_dataset.split == "test"
    assert validating.val_categories == ["bus", "cat", "dog"]
    with pytest.raises(ValueError, match="root"):
        SPairDataModule(None).setup("fit")


# --------------------------------------------------------------------------------------------- val loader


def test_val_loader_is_image_grouped_and_ignores_resume(root: Path) -> None:
    datamodule = _fit_module(root, batch_size=2)
    val_ids = datamodule.val_dataset.pair_ids
    assert val_ids == SPairDataset(root, split="val").pair_ids
    order = image_grouped_order(dataset_pair_images(datamodule.val_dataset))
    datamodule.finished_pair_ids = set(val_ids[:4])  # resuming a test run must not thin out validation
    loader = datamodule.val_dataloader()
    assert isinstance(loader.sampler, OrderedSampler) and list(loader.sampler) == order
    assert datamodule.evaluation_order(datamodule.val_dataset) == order
    assert _ids(loader) == [val_ids[i] for i in order]

    datamodule.setup("test")  # the test loader still skips finished pairs
    test_ids = datamodule.test_dataset.pair_ids
    datamodule.finished_pair_ids = set(test_ids[:4])
    assert sorted(_ids(datamodule.test_dataloader())) == sorted(test_ids[4:])
    assert len(datamodule.evaluation_order()) == len(test_ids) - 4


# ------------------------------------------------------------------------------------------------------ DDP


def test_ddp_train_sampler_is_a_distributed_sampler(root: Path) -> None:
    datamodule = _fit_module(root, batch_size=2, shuffle_seed=7)
    indices = []
    for rank in range(2):
        datamodule.trainer = _ddp_trainer(rank)
        sampler = datamodule.train_dataloader().sampler
        assert type(sampler) is DistributedSampler
        assert (sampler.rank, sampler.num_replicas, sampler.shuffle, sampler.seed, sampler.drop_last) == (
            rank, 2, True, 7, False
        )  # fmt: skip
        indices += list(sampler)
    assert sorted(indices) == list(range(24))

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    loader = datamodule.train_dataloader()  # no process is launched before fit
    assert trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader


def test_ddp_val_chunks_are_disjoint_and_unpadded(root: Path) -> None:
    datamodule = _fit_module(root, batch_size=2)
    order = datamodule.evaluation_order(datamodule.val_dataset)
    chunks = []
    for rank in range(2):
        datamodule.trainer = _ddp_trainer(rank)
        loader = datamodule.val_dataloader()
        assert isinstance(loader.sampler, ContiguousDistributedSampler) and loader.sampler.rank == rank
        chunks.append(_ids(loader))
    assert not set(chunks[0]) & set(chunks[1])
    val_ids = datamodule.val_dataset.pair_ids
    assert len(val_ids) == 9 and chunks[0] + chunks[1] == [val_ids[i] for i in order]  # each pair exactly once


# ---------------------------------------------------------------------------------------- trainer.fit


class _Recorder(L.LightningModule):
    """Records the pair ids of every training epoch and of validation."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_ids: list[list[str]] = []
        self.val_ids: list[str] = []

    def on_train_epoch_start(self) -> None:
        self.train_ids.append([])

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        self.train_ids[-1].extend(s["pair_id"] for s in batch)
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self.val_ids.extend(s["pair_id"] for s in batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_reshuffles_each_epoch_and_writes_only_fit_splits(tmp_path: Path) -> None:
    datamodule = SyntheticSPairDataModule(
        str(tmp_path / "syn"), batch_size=4, images_per_category=3, synthetic_train_pairs_per_category=5,
        synthetic_val_pairs_per_category=3, shuffle_seed=1,
    )  # fmt: skip
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(model, datamodule=datamodule)
    ids = datamodule.train_dataset.pair_ids
    assert len(ids) == 10 and [sorted(epoch) for epoch in model.train_ids] == [sorted(ids)] * 2
    sampler = EpochShuffleSampler(ids, seed=1)
    for epoch, seen in enumerate(model.train_ids):  # Lightning called set_epoch on our sampler
        sampler.set_epoch(epoch)
        assert seen == [ids[i] for i in sampler]
    assert model.train_ids[0] != model.train_ids[1]
    val = datamodule.val_dataset
    once = [val.pair_ids[i] for i in image_grouped_order(dataset_pair_images(val))]
    assert len(once) == 6 and model.val_ids == once * 2  # validated after each epoch, in image-grouped order
    annotations = tmp_path / "syn" / "PairAnnotation"
    assert sorted(p.name for p in annotations.iterdir()) == ["trn", "val"]  # fit writes only what it reads


# -------------------------------------------------------------------------------------------- synthetic


def test_synthetic_splits_coexist_and_leave_the_test_split_untouched(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    datamodule = SyntheticSPairDataModule(
        str(root), synthetic_categories=["cat", "dog"], synthetic_pairs_per_category=6,
        synthetic_train_pairs_per_category=10, synthetic_val_pairs_per_category=6,
    )  # fmt: skip
    datamodule.setup("test")
    assert not (root / "PairAnnotation" / "trn").exists() and not (root / "PairAnnotation" / "val").exists()
    data_dirs = ("PairAnnotation/", "Layout/", "JPEGImages/", "ImageAnnotation/")
    before = _files(root, data_dirs)
    plain = _files(write_synthetic_spair(tmp_path / "plain", categories=("cat", "dog"), pairs_per_category=6), data_dirs)
    assert plain == before  # the test split is the plain single-split writer's, byte for byte

    datamodule.setup("fit")
    after = _files(root)
    assert {k: after[k] for k in before} == before  # writing trn / val left every test-split file alone
    counts = {split: len(SPairDataset(root, split=split)) for split in ("trn", "val", "test")}
    assert counts == {"trn": 20, "val": 12, "test": 12}
    assert len(datamodule.train_dataset) == 20 and len(datamodule.val_dataset) == 12
    for split in ("trn", "val", "test"):
        assert read_synthetic_marker(root, split=split)["complete"] is True
        assert datamodule.is_generated(split)
    assert synthetic_root_matches(root, categories=["cat", "dog"], pairs_per_category=6, split="test")
    assert _pairs(root, "val") != _pairs(root, "test")  # same count, own pair seed per split


def test_synthetic_splits_share_the_images_and_their_keypoints(tmp_path: Path) -> None:
    root = write_synthetic_spair(tmp_path / "syn", pairs_per_category=6, split="test")
    write_synthetic_spair(root, pairs_per_category=10, split="trn")  # the images are reused, not rewritten
    paths = sorted((root / "PairAnnotation").glob("*/*.json"))
    assert sorted({p.parent.name for p in paths}) == ["test", "trn"] and len(paths) == 32
    for path in paths:
        pair = json.loads(path.read_text())
        for side in ("src", "trg"):
            name = Path(pair[f"{side}_imname"]).stem
            image = json.loads((root / "ImageAnnotation" / pair["category"] / f"{name}.json").read_text())
            assert [image["kps"][k] for k in pair["kps_ids"]] == pair[f"{side}_kps"]
            assert pair[f"{side}_bndbox"] == image["bndbox"]


def test_synthetic_prepare_data_without_trainer_writes_all_splits_once(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    datamodule = SyntheticSPairDataModule(str(root), images_per_category=3)  # 12 train pairs capped at 6
    datamodule.prepare_data()
    markers = sorted(root.glob(".synthetic_spair*.json"))
    assert len(markers) == 4 and all(read_synthetic_marker(root, s)["complete"] for s in ("trn", "val", "test"))
    stamps = [m.stat().st_mtime_ns for m in markers]
    datamodule.prepare_data()  # identical args: nothing rewritten
    assert [m.stat().st_mtime_ns for m in markers] == stamps
    assert len(SPairDataset(root, split="trn")) == 12

    SyntheticSPairDataModule(str(root), images_per_category=3, generator_seed=1).setup("test")  # new images
    assert not (root / "PairAnnotation" / "trn").exists() and read_synthetic_marker(root, "trn") is None


# ----------------------------------------------------------------------------------- no training support


@pytest.mark.parametrize("cls", [PFPascalDataModule, PairDataModule])
def test_benchmarks_without_training_data_refuse_fit(cls: type[PairDataModule], tmp_path: Path) -> None:
    datamodule = cls(root=str(tmp_path))
    assert not cls.supports_fit and SPairDataModule.supports_fit
    for call in (datamodule.train_dataloader, datamodule.val_dataloader, lambda: datamodule.setup("fit")):
        with pytest.raises(NotImplementedError, match=rf"{cls.__name__}.*only SPairDataModule supports"):
            call()
