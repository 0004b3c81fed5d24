"""CUDA checks: the tiny pipeline on a GPU gives the CPU's numbers (``-m gpu``; skipped without CUDA).

Deselected by default (``pyproject.toml``: ``-m 'not slow and not gpu'``); run on a machine with a GPU with
``python -m pytest -m gpu tests/test_gpu.py`` (``scripts/device_check.sh`` does). Every model is tiny and
random (``tests/conftest.py``); nothing touches the network.

What may legitimately differ between the devices, and how the tests allow for it:

* SD noise is drawn from a private CPU generator and then moved (``SDFeaturizer._noise``), so both devices
  noise the latents identically and the raw features are compared value by value.
* cuDNN convolutions use TF32 by default on Ampere and later (about 1e-3 relative error). The feature and
  keypoint comparisons turn TF32 off (``exact_fp32``); the end-to-end run keeps the defaults users get.
* ``fusion.co_pca`` draws its random range-finder matrix from a private CPU generator and moves it to the
  device, so both devices project onto the same basis (up to rounding).
* Random tiny networks give feature maps with many near-ties: the first GPU run found only about half the
  predicted keypoints identical to the CPU's. A different match is fine when it is an equally good one, so
  the pipeline test compares the nearest-neighbour DISTANCE of every keypoint (the quality of the match)
  and only reports how many matches are identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import evaluate
from datamodules import SPairDataset, write_synthetic_spair
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer
from lightning_modules.components.feature_cache import FeatureCache

from conftest import REPO
DEMO = str(REPO / "configs" / "demo.yaml")

#: The device under test and its Lightning accelerator name.
DEVICE = "cuda"
ACCELERATOR = "gpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PCA_DIMS = (16, 16, 8)  # the demo's co-PCA dimensions for the tiny SD layers 2, 5, 8


# --------------------------------------------------------------------------------------------- helpers


def _tiny_sd() -> SDFeaturizer:
    """The ``tiny_sd`` fixture's featurizer, built anew (same seed, so the same weights)."""
    return SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=192, crop_size=128)


def _tiny_dino() -> DinoFeaturizer:
    """The ``tiny_dino`` fixture's featurizer, built anew (same seed, so the same weights)."""
    return DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=224)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The comparisons below prove something only if both devices run the same weights."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``got`` (any device) equals ``expected`` within ``rel`` times the largest magnitude of ``expected``."""
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
    assert torch.isfinite(got).all() and torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    assert scale > 0
    diff = (got.cpu() - expected.cpu()).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x scale {scale:.3g}"


def _identical_fraction(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, int, int]:
    """(fraction, count, total) of keypoints predicted identically (both ``[N, 2]`` per pair)."""
    same = sum(int((x.cpu() == y.cpu()).all(dim=1).sum()) for x, y in zip(a, b))
    total = sum(len(x) for x in a)
    return same / total, same, total


def _samples(root: Path) -> list[dict]:
    dataset = SPairDataset(root, split="test")
    return [dataset[i] for i in range(len(dataset))]


def _unique_images(samples: list[dict]) -> int:
    return len({s[k] for s in samples for k in ("src_image_path", "trg_image_path")})


class RecordingCache(FeatureCache):
    """A ``FeatureCache`` that records every key it is asked for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keys: list[str] = []

    def fetch(self, keys, compute, device):  # same signature as the parent's
        self.keys.extend(keys)
        return super().fetch(keys, compute, device)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def exact_fp32():
    """Plain fp32 on CUDA for the duration of a test (no TF32 in matmuls or cuDNN convolutions)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def device_sd() -> SDFeaturizer:
    return _tiny_sd().to(DEVICE)


@pytest.fixture(scope="module")
def device_dino() -> DinoFeaturizer:
    return _tiny_dino().to(DEVICE)


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 categories x 4 images, 6 pairs each: 12 pairs over 8 images (each image in 3 pairs)."""
    return write_synthetic_spair(
        tmp_path_factory.mktemp("gpu_spair") / "spair", categories=("cat", "dog"), images_per_category=4,
        pairs_per_category=6,
    )


# --------------------------------------------------------------------------------------------- featurizers


def test_sd_features_on_the_device_equal_the_cpu_features(tiny_sd, device_sd, exact_fp32) -> None:
    _assert_same_weights(tiny_sd.unet, device_sd.unet)
    assert device_sd.unet.device.type == DEVICE
    images = torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(1))
    expected = tiny_sd(images, ["cat", "dog"])
    got = device_sd(images.to(DEVICE), ["cat", "dog"])
    again = device_sd(images.to(DEVICE), ["cat", "dog"])
    assert [tuple(f.shape) for f in got] == [(2, 32, 3, 3), (2, 32, 6, 6), (2, 16, 12, 12)]
    for g, a, e in zip(got, again, expected):
        assert g.device.type == DEVICE
        _assert_close_to_scale(g, e, rel=1e-3)  # the same (CPU-drawn) noise on both devices
        _assert_close_to_scale(a, g, rel=1e-5)  # a second pass on the device repeats the first


def test_dino_features_on_the_device_equal_the_cpu_features(tiny_dino, device_dino, exact_fp32) -> None:
    _assert_same_weights(tiny_dino.model, device_dino.model)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = tiny_dino(images)
    got = device_dino(images.to(DEVICE))
    assert tuple(got.shape) == (2, tiny_dino.model.config.hidden_size, 16, 16) and got.device.type == DEVICE
    _assert_close_to_scale(got, expected, rel=1e-3)
    _assert_close_to_scale(device_dino(images.to(DEVICE)), got, rel=1e-5)


# --------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("pca_dims", [PCA_DIMS, None], ids=["co_pca", "raw"])
def test_predict_pairs_on_the_device_matches_cpu(
    tiny_sd, tiny_dino, device_sd, device_dino, spair_root, exact_fp32, pca_dims
) -> None:
    samples = _samples(spair_root)
    cpu = FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=pca_dims)
    dev = FusedCorrespondence(device_sd, device_dino, alpha=0.5, pca_dims=pca_dims).to(DEVICE)
    assert dev.device.type == DEVICE
    expected = cpu.predict_pairs(samples)
    got = dev.predict_pairs(samples)
    unique = _unique_images(samples)
    # one batch: every distinct image extracted once on either device
    assert cpu.extraction_passes == dev.extraction_passes == {"sd": unique, "dino": unique}
    for out, ref, sample in zip(got, expected, samples):
        assert out["pred_kps"].device.type == DEVICE and out["pred_kps"].dtype == torch.float32
        assert out["pred_kps"].shape == ref["pred_kps"].shape == sample["src_kps"].shape
        assert torch.isfinite(out["pred_kps"]).all() and torch.isfinite(out["distance"]).all()
        # every keypoint's match is as good on the device as on the CPU (the same cell, or a tie)
        torch.testing.assert_close(out["distance"].cpu(), ref["distance"], rtol=1e-3, atol=1e-4)
    fraction, same, total = _identical_fraction([o["pred_kps"] for o in got], [o["pred_kps"] for o in expected])
    print(f"{same}/{total} keypoints predicted identically on {DEVICE} and CPU ({pca_dims=})")


def test_feature_cache_on_the_device_cuts_the_passes_and_keeps_the_predictions(
    device_sd, device_dino, spair_root, exact_fp32
) -> None:
    samples = _samples(spair_root)
    unique = _unique_images(samples)
    assert unique <= len(samples)  # images are in 3 pairs on average: a cache must at least halve the passes
    plain = FusedCorrespondence(device_sd, device_dino, alpha=0.5, pca_dims=PCA_DIMS, feature_cache_gb=0).to(DEVICE)
    cache = FeatureCache()
    cached = FusedCorrespondence(device_sd, device_dino, alpha=0.5, pca_dims=PCA_DIMS).to(DEVICE)
    cached.cache = cache
    expected = [plain.predict_pairs([s])[0]["pred_kps"] for s in samples]  # one pair per call, as the reference
    got = [cached.predict_pairs([s])[0]["pred_kps"] for s in samples]
    assert plain.extraction_passes == {"sd": 2 * len(samples), "dino": 2 * len(samples)}
    assert cached.extraction_passes == {"sd": unique, "dino": unique}
    assert 2 * sum(cached.extraction_passes.values()) <= sum(plain.extraction_passes.values())
    assert cache.hits == 2 * (2 * len(samples) - unique) and len(cache) == 2 * unique
    # cached features stay on the device and are served from the cache
    hits = cache.hits
    (features,) = cached.extract([samples[0]["src_image"]], [samples[0]["category"]])
    assert cache.hits == hits + 2 and cached.extraction_passes == {"sd": unique, "dino": unique}
    assert features.dino.device.type == DEVICE and all(t.device.type == DEVICE for t in features.sd)
    # an image extracted alone or beside another gives (nearly) the same features, so the same matches
    fraction, same, total = _identical_fraction(got, expected)
    assert fraction >= 0.95, f"only {same}/{total} keypoints identical with and without the cache"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_predictions_are_finite_fp32_and_cached_apart(
    device_sd, device_dino, spair_root, dtype
) -> None:
    from lightning_modules.components.features import _precision  # private: imported here, not at collection

    samples = _samples(spair_root)
    unique = _unique_images(samples)
    cache = RecordingCache()
    pipeline = FusedCorrespondence(device_sd, device_dino, alpha=0.5, pca_dims=PCA_DIMS).to(DEVICE)
    pipeline.cache = cache
    full = pipeline.predict_pairs(samples)
    exact_keys = set(cache.keys)
    assert len(exact_keys) == 2 * unique and all(k.endswith("|exact") for k in exact_keys)
    cache.keys.clear()
    with torch.autocast(DEVICE, dtype=dtype):
        assert _precision(torch.device(DEVICE)) == f"autocast-{dtype}"
        low = pipeline.predict_pairs(samples)
    low_keys = set(cache.keys)
    assert len(low_keys) == 2 * unique and all(k.endswith(f"|autocast-{dtype}") for k in low_keys)
    assert not low_keys & exact_keys
    # the fp32 entries were not reused: every image was extracted again under autocast
    assert pipeline.extraction_passes == {"sd": 2 * unique, "dino": 2 * unique}
    for out, ref in zip(low, full):
        for name in ("pred_kps", "distance"):
            assert out[name].dtype == torch.float32 and out[name].shape == ref[name].shape
            assert torch.isfinite(out[name]).all()
    # autocast took effect (the distances moved) but the matches are still mostly the fp32 ones
    assert any(not torch.equal(out["distance"], ref["distance"]) for out, ref in zip(low, full))
    fraction, same, total = _identical_fraction([o["pred_kps"] for o in low], [o["pred_kps"] for o in full])
    assert fraction >= 0.5, f"only {same}/{total} keypoints agree between {dtype} and fp32"


# --------------------------------------------------------------------------------------------- end to end


def _run_demo(accelerator: str, out: Path) -> tuple:
    cli = evaluate.main(["test", "--config", DEMO, "--trainer.accelerator", accelerator,
                         "--trainer.default_root_dir", str(out)])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return cli, predictions, json.loads((out / "results.json").read_text())


def test_demo_on_the_device_writes_the_cpu_results(tmp_path, monkeypatch) -> None:
    from test_evaluate_cli import _assert_matches_recomputation  # tests/ is on sys.path (rootdir conftest)

    monkeypatch.chdir(tmp_path)  # relative paths in configs must not write into the repository
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dev_cli, dev_preds, dev_results = _run_demo(ACCELERATOR, tmp_path / "device")
    assert dev_cli.trainer.strategy.root_device.type == DEVICE
    if DEVICE == "cuda":  # the model went back to the CPU at teardown, but it ran on the GPU
        assert torch.cuda.max_memory_allocated() > 0
    cpu_cli, cpu_preds, cpu_results = _run_demo("cpu", tmp_path / "cpu")
    assert cpu_cli.trainer.strategy.root_device.type == "cpu"
    for out in ("device", "cpu"):
        assert (tmp_path / out / "config.yaml").is_file()
    assert dev_results["num_pairs"] == cpu_results["num_pairs"] == len(dev_preds) == 18
    assert dev_results["num_points"] == cpu_results["num_points"]
    assert dev_results["extraction_passes"] == cpu_results["extraction_passes"]
    assert [p["pair_id"] for p in dev_preds] == [p["pair_id"] for p in cpu_preds]
    for d, c in zip(dev_preds, cpu_preds):
        assert d["trg_kps"] == c["trg_kps"] and d["threshold"] == pytest.approx(c["threshold"])
        assert all(math.isfinite(v) for point in d["pred_kps"] for v in point)
    # the metric computed on the device is the SPair protocol applied to the device's predictions
    _assert_matches_recomputation(dev_preds, dev_results)
    same = sum(p == q for d, c in zip(dev_preds, cpu_preds) for p, q in zip(d["pred_kps"], c["pred_kps"]))
    assert set(dev_results["pck"]) == set(cpu_results["pck"]) == {"0.01", "0.05", "0.1"}
    # how close the two runs' numbers are is the distance test's job (random features tie a lot); report it
    print(f"demo: {same}/{dev_results['num_points']} keypoints identical; PCK@0.1 per point "
          f"{dev_results['pck']['0.1']['per_point']:.2f} ({DEVICE}) vs {cpu_results['pck']['0.1']['per_point']:.2f} (cpu)")
