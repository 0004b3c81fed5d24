"""Benchmarks own their protocol: each benchmark's module defines its ``PROTOCOL`` beside its reader, its
DataModule carries it, and the modules take the metric from it (``Protocol.make_metric``). A new benchmark is
then its own file: one defined here, with a protocol of its own, is scored by it end to end."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import evaluate
from datamodules import SPairDataModule, write_synthetic_spair
from datamodules.protocols import BENCHMARK_MODULES, PROTOCOLS, Protocol, get_protocol
from lightning_modules.metrics import PCK, DenseFlowPCK
from lightning_modules.segmentation_metrics import JAndF

from conftest import CPU_ARGS, SPAIR_CONFIG, TINY_OVERLAY

#: A benchmark that exists only here: SPair-71k's files scored at alpha 0.2 with an inclusive comparison.
LENIENT = Protocol(name="SPair-71k, lenient", key="spair_lenient", alphas=(0.2,), threshold="max(w, h) of the target bbox",
                   averages=("per_point", "category_mean"), inclusive=True)


class LenientSPairDataModule(SPairDataModule):
    """SPair-71k's reader under :data:`LENIENT` (no edit of ``datamodules/`` needed)."""

    protocol = LENIENT


def test_each_benchmark_module_defines_the_protocol_its_datamodule_carries() -> None:
    classes = {"spair": "SPairDataModule", "pfpascal": "PFPascalDataModule", "pfwillow": "PFWillowDataModule",
               "cub": "CUBDataModule", "tss": "TSSDataModule", "davis": "DAVISDataModule"}
    assert set(PROTOCOLS) == set(BENCHMARK_MODULES) == set(classes)
    for key, class_name in classes.items():
        module = importlib.import_module(f"datamodules.{BENCHMARK_MODULES[key]}")
        datamodule = getattr(module, class_name)
        assert datamodule.protocol is module.PROTOCOL is get_protocol(key) is PROTOCOLS[key]
        assert datamodule().protocol_name == key == module.PROTOCOL.key
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        get_protocol("nope")


def test_the_protocol_makes_the_metric_that_scores_it() -> None:
    spair = get_protocol("spair").make_metric(["cat"])
    assert isinstance(spair, PCK) and spair.groups == get_protocol("spair").groups and not spair.inclusive
    assert get_protocol("spair").make_metric(["cat"], groups=False).groups == ()
    assert get_protocol("pfwillow").make_metric(["car"], alphas=[0.1]).alphas == (0.1,)
    assert get_protocol("pfwillow").make_metric(["car"]).inclusive
    assert isinstance(get_protocol("tss").make_metric(["FG3DCar"]), DenseFlowPCK)
    assert isinstance(get_protocol("davis").make_metric(["blob"]), JAndF)
    assert "key" not in get_protocol("spair").as_record()  # results.json records what it recorded before


def test_a_benchmark_defined_in_its_own_file_is_scored_by_its_own_protocol(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    out = tmp_path / "out"
    evaluate.main(["test", "--config", SPAIR_CONFIG, "--config", TINY_OVERLAY, "--data.root", str(root),
                   "--data.class_path", f"{__name__}.LenientSPairDataModule", *CPU_ARGS,
                   "--trainer.default_root_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "SPair-71k, lenient" and results["protocol"]["inclusive"] is True
    assert list(results["pck"]) == ["0.2"] and results["num_pairs"] == 2
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    hits = sum(sum(((p[0] - g[0]) ** 2 + (p[1] - g[1]) ** 2) ** 0.5 <= 0.2 * r["threshold"]
                   for p, g in zip(r["pred_kps"], r["trg_kps"])) for r in predictions)
    points = sum(len(r["trg_kps"]) for r in predictions)
    assert results["pck"]["0.2"]["per_point"] == pytest.approx(100.0 * hits / points)
