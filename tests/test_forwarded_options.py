"""Forwarded DataModule options: a reader's arguments are its DataModule's, a DataModule's are its subclass's.

``SyntheticSPairDataModule`` takes ``SPairDataModule``'s options through ``**kwargs`` and ``DAVISDataModule``
takes ``DAVISDataset``'s, so the CLI (jsonargparse, following the forwarded ``**kwargs``) lists them with their
own types, defaults and documentation, and an option added to the parent or the reader reaches the subclass or
the DataModule without editing it. The synthetic DataModules' generator options take their defaults from the
generators' signatures.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from jsonargparse import ArgumentParser

from datamodules import davis
from datamodules.davis import DAVISDataModule, DAVISDataset, SyntheticDAVISDataModule, write_synthetic_davis
from datamodules.spair import SPairDataModule
from datamodules.synthetic import SyntheticSPairDataModule, synthetic_root_matches, write_synthetic_spair

#: The synthetic SPair DataModule's own options: the generator's, under the DataModule's names (and ``root``).
SYNTHETIC_SPAIR_OWN = {
    "root", "synthetic_categories", "num_categories", "images_per_category", "synthetic_pairs_per_category",
    "image_width", "image_height", "num_keypoints", "generator_seed", "synthetic_train_pairs_per_category",
    "synthetic_val_pairs_per_category", "scene",
}  # fmt: skip
SYNTHETIC_DAVIS_OWN = {
    "root", "num_sequences", "num_frames", "image_width", "image_height", "num_objects", "generator_seed",
}  # fmt: skip


def cli_options(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{option: (type, default)}`` of ``cls`` as the CLI lists them (jsonargparse, as LightningCLI does)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    return {
        action.dest.split(".", 1)[1]: (getattr(action, "_typehint", None), action.default)
        for action in parser._actions
        if action.dest.startswith("data.")
    }


def signature_defaults(function: Any) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def test_the_synthetic_spair_module_takes_exactly_spairs_options_plus_its_own() -> None:
    spair, synthetic = cli_options(SPairDataModule), cli_options(SyntheticSPairDataModule)
    assert len(spair) == 13 and set(synthetic) == set(spair) | SYNTHETIC_SPAIR_OWN
    assert {name: synthetic[name] for name in set(spair) - {"root"}} == {n: spair[n] for n in set(spair) - {"root"}}
    assert synthetic["batch_size"][1] == 1 and synthetic["subset_draw"][1] == "uniform"


def test_the_davis_module_takes_exactly_its_readers_options() -> None:
    reader = {name: param for name, param in inspect.signature(DAVISDataset).parameters.items() if name != "root"}
    options = cli_options(DAVISDataModule)
    assert len(reader) == 6 and set(options) == set(reader) | {"root", "batch_size", "num_workers"}
    assert all(options[name][1] == param.default for name, param in reader.items())
    synthetic = cli_options(SyntheticDAVISDataModule)
    assert set(synthetic) == set(options) | SYNTHETIC_DAVIS_OWN
    assert all(synthetic[name] == options[name] for name in set(options) - {"root"})


def test_the_generator_options_default_to_the_generators_defaults() -> None:
    spair, dm = signature_defaults(write_synthetic_spair), signature_defaults(SyntheticSPairDataModule)
    assert (dm["images_per_category"], dm["num_keypoints"], dm["scene"], dm["generator_seed"]) == (
        spair["images_per_category"], spair["num_keypoints"], spair["scene"], spair["seed"])  # fmt: skip
    assert ((dm["image_width"], dm["image_height"]), dm["synthetic_pairs_per_category"]) == (
        spair["image_size"], spair["pairs_per_category"])  # fmt: skip
    gen, dm = signature_defaults(write_synthetic_davis), signature_defaults(SyntheticDAVISDataModule)
    assert (dm["num_frames"], (dm["image_width"], dm["image_height"]), dm["num_objects"], dm["generator_seed"]) == (
        gen["num_frames"], gen["size"], gen["num_objects"], gen["seed"])  # fmt: skip


class _WithNewOption(SPairDataModule):
    """SPairDataModule with one more option, as if it had been added there."""

    def __init__(self, new_option: int = 7, **kwargs) -> None:
        super().__init__(**kwargs)
        self.new_option = new_option


class _SyntheticOverNewOption(SyntheticSPairDataModule, _WithNewOption):
    """SyntheticSPairDataModule unchanged, its parent (next in the MRO) with a new option."""


def test_a_new_spair_option_reaches_the_synthetic_module_without_editing_it(tmp_path) -> None:
    options = cli_options(_SyntheticOverNewOption)
    assert options["new_option"] == (int, 7) and set(options) == set(cli_options(SyntheticSPairDataModule)) | {
        "new_option"
    }
    dm = _SyntheticOverNewOption(str(tmp_path / "syn"), new_option=3, batch_size=2, num_categories=1)
    assert (dm.new_option, dm.batch_size, dm.image_kwargs["categories"]) == (3, 2, ["aeroplane"])


class _ReaderWithNewOption(DAVISDataset):
    def __init__(self, root, new_option: int = 5, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.new_option = new_option


def test_a_new_reader_option_reaches_the_davis_modules_without_editing_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(davis, "DAVISDataset", _ReaderWithNewOption)
    assert cli_options(DAVISDataModule)["new_option"] == (int, 5)
    assert cli_options(SyntheticDAVISDataModule)["new_option"] == (int, 5)
    dm = SyntheticDAVISDataModule(str(tmp_path / "davis"), num_frames=3, new_option=2, max_frames=1)
    dm.setup("test")
    assert dm.test_dataset.new_option == 2 and len(dm.test_dataset) == 2  # two sequences, one frame each


def test_forwarded_options_keep_their_checks(tmp_path) -> None:
    with pytest.raises(TypeError, match="frame_strde"):
        DAVISDataModule(str(tmp_path), frame_strde=2)  # a typo is refused at once, not in setup
    with pytest.raises(TypeError, match="frame_strde"):
        SyntheticDAVISDataModule(str(tmp_path), frame_strde=2)
    with pytest.raises(TypeError, match="test_splt"):
        SyntheticSPairDataModule(str(tmp_path), test_splt="val")
    with pytest.raises(ValueError, match="subset_draw"):
        SyntheticSPairDataModule(str(tmp_path), subset_draw="random")
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticDAVISDataModule(str(tmp_path), batch_size=0)
    dm = DAVISDataModule(str(write_synthetic_davis(tmp_path / "d", sequences=("blob", "bars"), num_frames=4)),
                         sequences=["blob"], frame_stride=2, skip_last_frame=True)
    dm.setup("test")
    assert dm.test_dataset.pair_ids == ["blob/00002"]
    with pytest.raises(ValueError, match="frame_stride"):
        DAVISDataModule(str(tmp_path / "d"), frame_stride=0).setup("test")


def test_the_synthetic_spair_module_forwards_its_splits_and_filters(tmp_path) -> None:
    dm = SyntheticSPairDataModule(str(tmp_path / "syn"), synthetic_categories=["cat", "dog"], test_split="val",
                                  categories=["dog"], pairs_per_category=2, train_split="test")
    assert (dm.test_split, dm.train_split, dm.category_filter, dm.pairs_per_category) == ("val", "test", ["dog"], 2)
    dm.setup("test")
    assert dm.categories == ["dog"] and len(dm.test_dataset) == 2
    assert synthetic_root_matches(dm.root, categories=["cat", "dog"], split="val")  # the generator's defaults
    assert not synthetic_root_matches(dm.root, categories=["cat", "dog"], split="val", seed=1)
    with pytest.raises(TypeError):
        synthetic_root_matches(dm.root, categories=["cat", "dog"], splits="val")
