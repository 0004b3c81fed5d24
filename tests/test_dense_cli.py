"""Dense correspondence pictures, DAVIS label propagation and instance swapping through ``evaluate.py``.

Tiny random models on generated data (SPair-format pairs, a DAVIS-format root, masked pairs); seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from callbacks import PictureWriter
from callbacks.visualization import safe_filename
from datamodules import (
    DAVISDataset,
    MaskedPairsDataModule,
    MaskedPairsDataset,
    SPairDataModule,
    write_synthetic_davis,
    write_synthetic_masked_pairs,
    write_synthetic_spair,
)
from lightning_modules import DenseCorrespondence, InstanceSwap
from lightning_modules.components import FusedCorrespondence
from lightning_modules.components.dense import resize_nearest

from conftest import CONFIGS, CPU_ARGS as COMMON, TINY_OVERLAY as TINY


def test_dense_config_writes_one_colour_map_picture_per_pair(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=2,
                                 image_size=(96, 72))
    evaluate.main(["predict", "--config", str(CONFIGS / "dense.yaml"), "--config", TINY, "--data.root", str(root),
                   *COMMON, "--model.init_args.resolution", "48", "--trainer.default_root_dir", str(tmp_path / "run")])
    pictures = sorted((tmp_path / "run" / "dense").glob("*.png"))
    assert len(pictures) == 4  # pairs_per_category 2 x 2 categories
    for path in pictures:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"))
        # [source | source colour map | target | transferred]: each panel's long side is the resolution
        assert array.shape[0] <= 48 and 4 * 48 >= array.shape[1] >= 2 * 48
        quarter = array[:, array.shape[1] // 4 : array.shape[1] // 2]
        assert len(np.unique(quarter.reshape(-1, 3), axis=0)) > 100  # a colour map, not a blank panel


def test_davis_label_propagation_reports_j_and_f_for_every_frame(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_davis(tmp_path / "davis", sequences=("blob", "bars"), num_frames=3)
    out = tmp_path / "run"
    cli = evaluate.main(["test", "--config", str(CONFIGS / "davis.yaml"), "--config", TINY, "--data.root", str(root),
                         *COMMON, "--model.init_args.resolution", "48", "--trainer.default_root_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    dataset = DAVISDataset(root)
    assert len(records) == len(dataset) == results["num_frames"] == results["num_pairs"] == 4  # 2 x (3 - 1)
    assert sorted(r["pair_id"] for r in records) == sorted(dataset.pair_ids)
    assert set(results["per_sequence"]) == {"blob", "bars"}
    for key in ("J_mean", "F_mean"):
        assert 0.0 <= results[key] <= 1.0
    assert results["JF_mean"] == pytest.approx((results["J_mean"] + results["F_mean"]) / 2)
    assert results["protocol"]["name"] == "DAVIS-2017 label propagation"
    # the first frame is the source of every frame of its sequence: extracted once per sequence
    assert results["extraction_passes"]["dino"] == 2 + 4
    assert cli.model.pipeline.cache is not None
    for record in records:  # each line holds the frame's true pixel count per object, read independently here
        sample = dataset[dataset.pair_ids.index(record["pair_id"])]
        assert record["true_pixels"] == {str(i): int((sample["trg_labels"] == i).sum())
                                         for i in range(1, sample["num_objects"] + 1)}


def test_swap_config_writes_swapped_and_refined_pictures(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    evaluate.main(["predict", "--config", str(CONFIGS / "swap.yaml"), "--config", TINY, "--data.root",
                   str(tmp_path / "pairs"), "--data.init_args.generate", "true", *COMMON,
                   "--model.init_args.resolution", "48", "--model.init_args.refine_steps", "4",
                   "--model.init_args.refine_size", "64", "--model.init_args.picture_height", "40",
                   "--trainer.default_root_dir", str(out)])
    pictures = sorted((out / "swap").glob("*.png"))
    assert [p.stem for p in pictures] == ["pair000", "pair001"]
    with Image.open(pictures[0]) as picture:
        assert picture.height == 40 and picture.width >= 4 * 40  # source | target | swapped | refined


def test_swap_changes_only_the_target_instance_before_refinement(tmp_path, tiny_sd, tiny_dino) -> None:
    write_synthetic_masked_pairs(tmp_path / "pairs", num_pairs=2)
    module = InstanceSwap(FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=None), resolution=48, refine=True, refine_steps=4,
                          refine_size=64)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[PictureWriter(subdir="swap")])
    outputs = [r for batch in trainer.predict(module, datamodule=MaskedPairsDataModule(str(tmp_path / "pairs")))
               for r in batch]
    dataset = MaskedPairsDataset(tmp_path / "pairs")
    assert [o["pair_id"] for o in outputs] == dataset.pair_ids
    for output, index in zip(outputs, range(len(dataset))):
        sample = dataset[index]
        preliminary, refined = output["preliminary"], output["refined"]
        size = tuple(preliminary.shape[-2:])
        mask = resize_nearest(sample["trg_mask"].to(torch.uint8), size).bool()
        target = torch.from_numpy(np.array(Image.fromarray(sample["trg_image"].permute(1, 2, 0).numpy())
                                            .resize((size[1], size[0]), Image.Resampling.LANCZOS))).permute(2, 0, 1)
        assert torch.equal(preliminary[:, ~mask], target[:, ~mask])  # outside the instance: the target, bit for bit
        assert not torch.equal(preliminary[:, mask], target[:, mask])  # inside: the source's appearance
        assert refined.dtype == torch.uint8 and refined.shape == preliminary.shape
    assert len(list((tmp_path / "swap").glob("*.png"))) == 2


def test_swap_needs_masks_and_an_sd_model_for_refinement(tiny_dino) -> None:
    with pytest.raises(ValueError, match="refine=True needs an sd featurizer"):
        InstanceSwap(FusedCorrespondence(None, tiny_dino, alpha=0.0), refine=True)
    with pytest.raises(FileNotFoundError, match="masked pairs file not found"):
        MaskedPairsDataset("/nonexistent/pairs.json")


def test_dense_test_stage_refuses_a_keypoint_benchmark(tmp_path, tiny_sd, tiny_dino) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=1, image_size=(96, 72))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a DAVIS datamodule .* got SPairDataModule; for pictures"):
        trainer.test(DenseCorrespondence(FusedCorrespondence(tiny_sd, tiny_dino)), datamodule=SPairDataModule(root=str(root)))


def test_davis_instance_masks_feed_the_swap(tmp_path, tiny_sd, tiny_dino) -> None:
    from datamodules import DAVISInstancePairs, DAVISSwapDataModule
    from datamodules.davis import read_davis_annotation

    root = write_synthetic_davis(tmp_path / "davis", sequences=("blob", "bars", "dots"), num_frames=2)
    pairs = DAVISInstancePairs(root)
    assert pairs.pair_ids == ["bars-blob", "blob-dots"]  # each sequence with the next, sorted
    sample = pairs[0]
    annotation = read_davis_annotation(Path(root) / "Annotations" / "480p" / "bars" / "00000.png")
    assert torch.equal(sample["src_mask"], annotation == 1) and sample["category"] == "bars"
    module = InstanceSwap(FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=None), resolution=40, refine=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    outputs = [r for batch in trainer.predict(module, datamodule=DAVISSwapDataModule(str(root), pairs=[["dots", "bars"]]))
               for r in batch]
    assert [o["pair_id"] for o in outputs] == ["dots-bars"] and outputs[0]["refined"] is None
    with pytest.raises(ValueError, match=r"unknown sequences \['nope'\]"):
        DAVISInstancePairs(root, pairs=[["blob", "nope"]])
    with pytest.raises(ValueError, match="object 9 is not annotated"):
        DAVISInstancePairs(root, object_id=9)[0]


def test_picture_writer_saves_every_picture_and_logs_the_first_to_wandb(tmp_path) -> None:
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from lightning.pytorch.loggers import WandbLogger

    logger = MagicMock(spec=WandbLogger)
    trainer = SimpleNamespace(loggers=[logger], world_size=1, is_global_zero=True, log_dir=None,
                              default_root_dir=str(tmp_path))
    writer = PictureWriter(subdir="dense", key="dense_correspondence", num_logged=2)
    writer.on_predict_start(trainer, None)
    records = [{"pair_id": f"a:{i}", "picture": Image.new("RGB", (10 + i, 8))} for i in range(3)]
    writer.on_predict_batch_end(trainer, None, records, None, 0)
    writer.on_predict_end(trainer, None)
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == sorted(f"{safe_filename(f'a:{i}')}.png" for i in range(3))
    (call,) = logger.log_image.call_args_list
    assert call.kwargs["key"] == "dense_correspondence" and call.kwargs["caption"] == ["a:0", "a:1"]
    assert [image.size for image in call.kwargs["images"]] == [(11, 8), (11, 8)]  # padded to a common width
