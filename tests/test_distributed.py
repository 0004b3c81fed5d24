"""Distributed evaluation: the evaluation order, the unpadded sampler, and 2 DDP processes (CPU, gloo)
giving exactly the 1-process ``results.json`` and ``predictions.jsonl``.

The DDP runs go through ``tests/scripts/run_eval.py`` in a subprocess: ``strategy="ddp"`` re-launches
``sys.argv`` for rank 1, which inside pytest would run pytest again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from callbacks.prediction_writer import IncompleteEvaluationError, check_complete, sort_records
from lightning_modules.ablation import AblationResults
from lightning_modules.results import PCKResults
from datamodules import PFPascalDataset, SPairDataModule, SPairDataset, write_synthetic_spair
from datamodules.samplers import (
    ContiguousDistributedSampler,
    OrderedSampler,
    PairDataLoader,
    contiguous_bounds,
    dataset_pair_images,
    image_grouped_order,
)
from datamodules.samplers import collate_pairs
from datamodules.tss import TSSDataset, write_flo

from conftest import CONFIGS, REPO
from test_shared_images import write_shared_image_pfpascal
SCRIPT = REPO / "tests" / "scripts" / "run_eval.py"


# --------------------------------------------------------------------------------------------------
# evaluation order
# --------------------------------------------------------------------------------------------------
def _shares_image(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    return bool({a[1], a[2]} & {b[1], b[2]})


def test_image_grouped_order_keeps_pairs_sharing_an_image_together() -> None:
    # category "b" listed first and interleaved with "a"; in dataset order no two neighbours share an image
    pairs = [
        ("b", "b1", "b2"), ("a", "a1", "a2"), ("b", "b3", "b4"), ("a", "a3", "a4"),
        ("b", "b2", "b3"), ("a", "a2", "a3"), ("a", "a4", "a1"), ("a", "a5", "a6"),
    ]  # fmt: skip
    order = image_grouped_order(pairs)
    assert sorted(order) == list(range(len(pairs)))
    assert order == image_grouped_order(list(pairs))  # deterministic
    categories = [pairs[i][0] for i in order]
    assert categories == sorted(categories)  # grouped by category, categories sorted
    # "a": the chain a1-a2, a2-a3, a3-a4, a4-a1 (the last brings no new image), then the disconnected a5-a6
    assert [pairs[i][1:] for i in order[:5]] == [("a1", "a2"), ("a2", "a3"), ("a3", "a4"), ("a4", "a1"), ("a5", "a6")]
    assert [pairs[i][1:] for i in order[5:]] == [("b1", "b2"), ("b2", "b3"), ("b3", "b4")]
    neighbours = [_shares_image(pairs[i], pairs[j]) for i, j in zip(order, order[1:])]
    assert sum(neighbours) == 5  # every step shares an image except a4-a1 -> a5-a6 and the category change
    assert image_grouped_order([]) == []


def test_image_grouped_order_on_a_benchmark_root(tmp_path) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), images_per_category=4,
                                 pairs_per_category=8)
    dataset = SPairDataset(root)
    pairs = dataset_pair_images(dataset)
    assert pairs is not None and len(pairs) == len(dataset)
    order = image_grouped_order(pairs)
    assert sorted(order) == list(range(len(dataset)))
    ordered = [pairs[i] for i in order]
    grouped = sum(_shares_image(a, b) for a, b in zip(ordered, ordered[1:]))
    in_dataset_order = sum(_shares_image(a, b) for a, b in zip(pairs, pairs[1:]))
    assert grouped >= in_dataset_order and grouped >= len(dataset) // 2


# --------------------------------------------------------------------------------------------------
# unpadded contiguous sampler
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_items", [0, 1, 2, 5, 7, 9])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_contiguous_chunks_tile_the_order_unpadded(num_items, num_replicas, batch_size) -> None:
    dataset = list(range(num_items))
    order = list(reversed(range(num_items)))
    samplers = [
        ContiguousDistributedSampler(dataset, order=order, num_replicas=num_replicas, rank=r, batch_size=batch_size)
        for r in range(num_replicas)
    ]
    chunks = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(c) for c in chunks]
    assert sum(chunks, []) == order  # contiguous, in rank order, each index once: no padding, nothing dropped
    batches = [len(c) // batch_size + (len(c) % batch_size > 0) for c in chunks]
    assert max(batches) - min(batches) <= 1  # balanced in whole batches
    for rank, chunk in enumerate(chunks):
        if any(chunks[rank + 1 :]):
            assert len(chunk) % batch_size == 0  # chunk boundaries are 1-process batch boundaries
    if batch_size == 1:
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    for s in samplers:
        s.set_epoch(3)  # harmless: no shuffling
    assert [list(s) for s in samplers] == chunks


def test_a_rank_beyond_the_items_gets_none() -> None:
    assert contiguous_bounds(1, 2, 0) == (0, 1) and contiguous_bounds(1, 2, 1) == (1, 1)
    assert contiguous_bounds(5, 2, 0, batch_size=2) == (0, 4) and contiguous_bounds(5, 2, 1, batch_size=2) == (4, 5)
    sampler = ContiguousDistributedSampler([0], num_replicas=2, rank=1)
    assert len(sampler) == 0 and list(sampler) == []
    with pytest.raises(ValueError, match="permutation"):
        ContiguousDistributedSampler([0, 1, 2], order=[0, 0, 1], num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        contiguous_bounds(3, 2, 2)


def test_pair_dataloader_gives_an_empty_rank_one_empty_batch() -> None:
    """Lightning skips the test loop (and its hooks) of a process with zero batches; one empty batch keeps it in."""
    empty = PairDataLoader([0], batch_size=1, sampler=ContiguousDistributedSampler([0], num_replicas=2, rank=1),
                           collate_fn=collate_pairs)
    assert len(empty) == 1 and list(empty) == [[]]
    full = PairDataLoader([10, 11, 12], batch_size=2, sampler=OrderedSampler([2, 0, 1]), collate_fn=collate_pairs)
    assert len(full) == 2 and list(full) == [[12, 10], [11]]


def test_lightning_keeps_the_contiguous_sampler() -> None:
    """Lightning injects its own (padded) DistributedSampler unless the loader's sampler already is one."""
    assert issubclass(ContiguousDistributedSampler, DistributedSampler)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    connector = trainer._data_connector  # no process is launched before fit/test
    dataset = list(range(5))
    sampler = ContiguousDistributedSampler(dataset, order=[4, 2, 0, 1, 3], num_replicas=2, rank=1)
    with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning calls a *_dataloader hook
        loader = PairDataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=collate_pairs)
    assert connector._requires_distributed_sampler(DataLoader(dataset))  # a plain loader would be replaced
    assert not connector._requires_distributed_sampler(loader)
    assert connector._prepare_dataloader(loader, shuffle=False, mode=RunningStage.TESTING) is loader
    assert list(loader) == [[1], [3]]
    predicting = connector._prepare_dataloader(loader, shuffle=False, mode=RunningStage.PREDICTING)
    assert list(predicting) == [[1], [3]]  # re-instantiated for prediction, same chunk


def test_datamodule_serves_the_grouped_order_and_splits_it_under_ddp(tmp_path) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog", "bus"), pairs_per_category=3)
    datamodule = SPairDataModule(str(root), batch_size=2)
    datamodule.setup("test")
    order = datamodule.evaluation_order()
    assert order == image_grouped_order(dataset_pair_images(datamodule.test_dataset))
    single = datamodule.test_dataloader()
    assert isinstance(single.sampler, OrderedSampler) and list(single.sampler) == order
    pair_ids = []
    for rank in range(2):
        datamodule.trainer = SimpleNamespace(  # what the datamodule reads of an attached DDP trainer
            world_size=2, global_rank=rank, distributed_sampler_kwargs={"num_replicas": 2, "rank": rank}
        )
        loader = datamodule.test_dataloader()
        assert isinstance(loader.sampler, ContiguousDistributedSampler) and loader.sampler.rank == rank
        pair_ids += [s["pair_id"] for batch in loader for s in batch]
    assert pair_ids == [datamodule.test_dataset.pair_ids[i] for i in order]  # 9 pairs: 3 batches + 2 batches


# --------------------------------------------------------------------------------------------------
# the writer's completeness check and deterministic order
# --------------------------------------------------------------------------------------------------
def test_writer_checks_every_pair_is_scored_once_and_orders_by_dataset() -> None:
    ids = ["p0", "p1", "p2"]
    records = [{"pair_id": "p2"}, {"pair_id": "p0"}, {"pair_id": "p1"}]
    check_complete(records, ids, PCKResults({"num_pairs": 3}))
    assert [r["pair_id"] for r in sort_records(records, ids)] == ids
    assert [r["pair_id"] for r in sort_records(records, None)] == ids
    with pytest.raises(IncompleteEvaluationError, match=r"2 unique pairs but the dataset has 3; missing: \[p1\]"):
        check_complete(records[:2], ids, None)
    with pytest.raises(IncompleteEvaluationError, match="counted 4 pairs"):
        check_complete(records, ids, PCKResults({"num_pairs": 4}))
    with pytest.raises(IncompleteEvaluationError, match="not unique"):
        check_complete(records, ["p0", "p1", "p1", "p2"], None)
    rows = [{"row": row, "pair_id": p} for p in ("p1", "p0", "p2") for row in ("A", "B")]
    assert [(r["pair_id"], r["row"]) for r in sort_records(rows, ids)] == [
        (p, row) for p in ids for row in ("A", "B")  # pair-major, rows in test_step's order
    ]
    check_complete(rows, ids, AblationResults({"table": {}, "rows": {"A": {"num_pairs": 3}, "B": {"num_pairs": 3}}}))
    with pytest.raises(IncompleteEvaluationError, match="ablation row 'B'"):
        check_complete(rows[:-1], ids, None)
    with pytest.raises(IncompleteEvaluationError, match="metric of ablation row 'A' counted 2"):
        check_complete(rows, ids, AblationResults({"rows": {"A": {"num_pairs": 2}, "B": {"num_pairs": 3}}}))


# --------------------------------------------------------------------------------------------------
# end to end: 2 DDP processes vs 1 process, through evaluate.py
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_tss(root: Path) -> Path:
    """A tiny TSS_CVPR2016 tree: one folder per sub-dataset, random images and flows (6 directed pairs)."""
    rng = np.random.default_rng(0)
    for dataset, folder, sizes in (("FG3DCar", "001", [(48, 32), (48, 36)]), ("JODS", "horse_1", [(40, 30), (36, 44)]),
                                   ("PASCAL", "cat_2", [(50, 40), (50, 40)])):
        path = root / dataset / folder
        path.mkdir(parents=True)
        for idx, (w, h) in enumerate(sizes, start=1):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path / f"image{idx}.png")
            write_flo(path / f"flow{idx}.flo", torch.from_numpy(rng.normal(0, 5, (2, h, w)).astype(np.float32)))
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
            Image.fromarray(mask).save(path / f"mask{idx}.png")
    return root


def _runs(spair: Path, tss: Path, out: Path, pfpascal: Path) -> dict[str, list[str]]:
    """The runs compared, by name: evaluate.py arguments (without ``test``)."""
    common = ["--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    tiny_spair = ["--config", str(CONFIGS / "spair.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
                  "--data.root", str(spair), *common]
    return {
        # 9 pairs (odd): rank 0 scores 5, rank 1 scores 4; large alphas so that the PCK values are not all 0
        "odd": [*tiny_spair, "--model.pck_alphas", "[0.1, 0.5, 1.0]", "--trainer.default_root_dir", str(out / "odd")],
        # 1 pair on 2 processes: rank 1 has nothing to score
        "one_pair": [*tiny_spair, "--data.categories", "[dog]", "--data.pairs_per_category", "1",
                     "--trainer.default_root_dir", str(out / "one_pair")],
        # the ablation module (3 rows and the A.10 analysis, which gathers per-pair records), batches of 2; the
        # reference's subset draw (3 per category here) repeats pairs, which count once per draw on any device count
        "ablation": ["--config", str(CONFIGS / "ablations" / "a10_analysis.yaml"),
                     "--config", str(CONFIGS / "ablations" / "tiny.yaml"), "--data.root", str(spair),
                     "--data.pairs_per_category", "3",
                     "--data.batch_size", "2", *common, "--trainer.default_root_dir", str(out / "ablation")],
        # training the projection head (train.py fit): 16 trn pairs in batches of 4, 2 epochs, val every epoch
        "fit": ["fit", "--config", str(CONFIGS / "projection" / "sd_dinov2_b.yaml"),
                "--config", str(CONFIGS / "overlays" / "tiny.yaml"), "--data.root", str(spair.parent / "spair_fit"),
                "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
                "--data.init_args.val_pairs_per_category", "null", "--trainer.accelerator", "cpu",
                "--trainer.max_epochs", "2", "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
                "--model.init_args.out_dim", "16", "--model.init_args.hidden_dim", "16",
                "--model.pipeline.feature_cache_dir", "null", "--trainer.default_root_dir", str(out / "fit")],
        # PF-Pascal with three JPEGs each under two classes: both batches of 4 (one per rank under DDP) hold a file
        # under two prompts
        "pfpascal_shared": ["--config", str(CONFIGS / "pfpascal.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
                            "--data.root", str(pfpascal), *common, "--data.init_args.batch_size", "4",
                            "--trainer.default_root_dir", str(out / "pfpascal_shared")],
        # dense flow (DenseFlowPCK, float64 end-point-error state)
        "tss": ["--config", str(CONFIGS / "tss.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
                "--data.root", str(tss), *common, "--trainer.default_root_dir", str(out / "tss")],
    }


def _launch(runs: dict[str, list[str]], name: str, extra: list[str], base: Path) -> subprocess.Popen:
    """Start ``run_eval.py`` on ``runs`` in its own session (so that a hung process group can be killed whole)."""
    runs_file = base / f"{name}.json"
    runs_file.write_text(json.dumps(list(runs.values())))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):  # never inherit a process group's identity
        env.pop(key, None)
    with open(base / f"{name}.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, str(SCRIPT), str(runs_file), *extra], cwd=base, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory) -> dict[str, Any]:
    """Every run of :func:`_runs` once in 1 process and once on 2 DDP processes (concurrently, ~1 min on 2 cores)."""
    base = tmp_path_factory.mktemp("ddp")
    spair = write_synthetic_spair(base / "spair", categories=("cat", "dog", "bus"), images_per_category=3,
                                  pairs_per_category=3)
    tss = _write_tss(base / "TSS_CVPR2016")
    for split, pairs in (("trn", 8), ("val", 5)):  # 16 trn pairs, 10 val pairs (5 per rank)
        write_synthetic_spair(base / "spair_fit", categories=("cat", "dog"), images_per_category=4,
                              pairs_per_category=pairs, split=split, image_size=(96, 72))
    pfpascal = write_shared_image_pfpascal(base / "pfpascal")
    single, ddp = base / "single", base / "ddp"
    start = time.monotonic()
    procs = {
        "single": _launch(_runs(spair, tss, single, pfpascal), "single", [], base),
        "ddp": _launch(_runs(spair, tss, ddp, pfpascal), "ddp", ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
                       base),
    }
    try:
        for proc in procs.values():
            proc.wait(timeout=max(1.0, 400 - (time.monotonic() - start)))
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # timed out: end the run's whole session (rank 0 and the rank 1 it launched)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = {name: (base / f"{name}.log").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{logs[name][-6000:]}"
    pair_ids = {  # the evaluated pairs, read independently of the datamodules
        "odd": SPairDataset(spair).pair_ids,
        "one_pair": SPairDataset(spair, categories=["dog"], pairs_per_category=1).pair_ids,
        "ablation": SPairDataset(spair, pairs_per_category=3, seed=42, subset_draw="reference").pair_ids,
        "tss": TSSDataset(tss).pair_ids,
        "pfpascal_shared": PFPascalDataset(pfpascal).pair_ids,
    }
    return {"single": single, "ddp": ddp, "logs": logs, "pair_ids": pair_ids, "seconds": time.monotonic() - start,
            "spair_fit": base / "spair_fit"}


def _results(out: Path) -> str:
    results = json.loads((out / "results.json").read_text())
    # each process's own extraction count, not comparable until it is all-reduced in on_test_epoch_end
    results.pop("extraction_passes")
    return json.dumps(results, sort_keys=True)  # text: exact float equality, NaN included


@pytest.mark.parametrize("run", ["odd", "one_pair", "ablation", "tss", "pfpascal_shared"])
def test_ddp_gives_exactly_the_single_process_outputs(ddp_and_single, run) -> None:
    single, ddp = ddp_and_single["single"] / run, ddp_and_single["ddp"] / run
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp_and_single["logs"]["ddp"]
    assert _results(ddp) == _results(single)
    lines = (ddp / "predictions.jsonl").read_text().splitlines()
    assert lines == (single / "predictions.jsonl").read_text().splitlines()  # same lines, same order
    records = [json.loads(line) for line in lines]
    results = json.loads((ddp / "results.json").read_text())
    rows = list(results["rows"]) if "rows" in results else [None]
    counts = [results["rows"][row]["num_pairs"] for row in rows] if "rows" in results else [results["num_pairs"]]
    pair_ids = ddp_and_single["pair_ids"][run]
    assert len(pair_ids) == {"odd": 9, "one_pair": 1, "ablation": 9, "tss": 6, "pfpascal_shared": 8}[run]
    assert counts == [len(pair_ids)] * len(rows)
    keys = [(r["pair_id"], r.get("row")) for r in records]
    assert len(keys) == len(set(keys))  # each pair (of each ablation row) once
    assert sorted(keys) == sorted((p, row) for p in pair_ids for row in rows)
    assert [r["pair_id"] for r in records[:: len(rows)]] == pair_ids  # written in dataset order
    if run == "ablation":
        assert (ddp / "analysis.md").read_text() == (single / "analysis.md").read_text()
        assert (ddp / "ablation.csv").read_text() == (single / "ablation.csv").read_text()
    if run == "odd":  # the comparison is not between all-zero tables
        assert any(0 < v < 100 for a in results["pck"].values() for v in a["per_category"].values())
    print(f"{run}: 1 process and 2 DDP processes ran in {ddp_and_single['seconds']:.0f} s (concurrently)")


def test_a_metric_sorted_by_pair_key_ignores_the_arrival_order() -> None:
    """Bit-identical sums whatever the split: the de-duplicated states are in pair-key order."""
    from lightning_modules.metrics import PCK

    torch.manual_seed(0)
    preds = [torch.rand(5, 2) * 100 for _ in range(7)]
    gts = [torch.rand(5, 2) * 100 for _ in range(7)]
    ids = [f"pair{i}" for i in range(7)]
    results = []
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 4, 2, 0, 5, 3, 1, 0]):
        metric = PCK([0.1, 0.3, 0.7], ["a"])
        metric.update(
            preds=[preds[i] for i in order], gts=[gts[i] for i in order], thresholds=[100.0] * len(order),
            categories=["a"] * len(order), pair_ids=[ids[i] for i in order],
        )
        results.append(json.dumps(metric.compute(), sort_keys=True))
    assert results[0] == results[1]


def _fit_checkpoints(out: Path) -> tuple[dict[str, Any], Path]:
    last = torch.load(out / "fit" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (best,) = (out / "fit" / "checkpoints").glob("best-*.ckpt")
    return last, best


def test_ddp_training_splits_the_steps_and_validates_every_val_pair_once(ddp_and_single, tmp_path) -> None:
    from lightning_modules import ProjectionHeadTraining
    from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer

    single, _ = _fit_checkpoints(ddp_and_single["single"])
    ddp, ddp_best = _fit_checkpoints(ddp_and_single["ddp"])
    # 16 trn pairs, batches of 4: 4 steps an epoch in one process, 2 on each of 2 processes
    assert (single["global_step"], ddp["global_step"]) == (8, 4)
    assert all(k.startswith("pipeline.head.") for k in ddp["state_dict"])
    # the val PCK the DDP run selected its best checkpoint by is the single-process PCK over all 10 val pairs
    # of that checkpoint's head: each val pair scored exactly once across the two ranks (no padding)
    (score,) = [state["best_model_score"] for key, state in ddp["callbacks"].items() if key.startswith("ModelCheckpoint")]
    tiny = CONFIGS / "featurizers"
    sd = SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=256, crop_size=128)
    dino = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 12, "hidden_size": 80},
                          layer=11, image_size=224)
    assert "hidden_size: 80" in (tiny / "tiny_dino.yaml").read_text()  # the same tiny models as the run's
    module = ProjectionHeadTraining(FusedCorrespondence(sd, dino), out_dim=16, hidden_dim=16, init_ckpt=str(ddp_best))
    datamodule = SPairDataModule(root=str(ddp_and_single["spair_fit"]), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, datamodule=datamodule)
    assert len(datamodule.val_dataset) == 10
    assert metrics["val/pck@0.1"] == pytest.approx(float(score), abs=1e-4)
