"""Throughput of the zero-shot pipeline: the per-image feature cache against per-pair extraction.

On a generated SPair-format root in which every image appears in several pairs, the same featurizer
objects (shared weights) run two pipelines, one pair per call, in the same pair order:

- **baseline**: ``FusedCorrespondence(..., cache=None)``; both images are extracted for every pair, as
  the reference implementation does;
- **ours**: ``FusedCorrespondence(..., cache=FeatureCache(...))``; each image is extracted once, later
  pairs reuse its features.

Reported per precision: extraction passes, wall time, pairs/s, speed-up against the pass-count ratio
(target: speed-up >= 0.8 x pass ratio), the time split of ours between extraction and matching + co-PCA
(target: matching < 10 % of extraction), images/s, peak RSS (and peak CUDA memory), whether the two
pipelines predict the same keypoints, and a projection of the wall time of the full SPair-71k test set.

CPU (default: reduced resolution, SD-1.5-sized and DINOv2-B-sized random models; a few minutes on 2 cores)::

    python benchmarks/throughput.py --out outputs/benchmarks/throughput_cpu.json

GPU (default: the paper's 960 px with 2x2 windows of 512 px for SD, 840 px for DINO; fp32, fp16, bf16)::

    python benchmarks/throughput.py --device cuda --out outputs/benchmarks/throughput_gpu.json

See ``benchmarks/README.md`` for what is measured and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from datamodules.samplers import image_grouped_order  # noqa: E402
from datamodules.spair import SPairDataset  # noqa: E402
from datamodules.synthetic import default_synthetic_categories, write_synthetic_spair  # noqa: E402
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer  # noqa: E402
from lightning_modules.components.feature_cache import FeatureCache  # noqa: E402
from lightning_modules.components.keypoints import transfer  # noqa: E402
from lightning_modules.components.tiny_models import DINOV2_BASE_SIZED, SD15_SIZED  # noqa: E402

#: Pairs in the SPair-71k test split.
SPAIR_TEST_PAIRS = 12234
#: Images in all of SPair-71k (100 per category x 18): an upper bound of the test split's distinct images,
#: used for the projection when neither ``--spair-test-images`` nor ``--data-root`` gives the real count.
SPAIR_ALL_IMAGES = 1800

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Resolution defaults per setting: (SD input px, SD sliding window, crop px, DINO input px).
DEFAULT_SIZES = {
    "cuda": (960, True, 512, 840),  # the paper's
    "cpu": (256, False, 512, 224),  # reduced: SD 32x32 latent (layers at 4/8/16 px), DINO 16x16 tokens
    "tiny": (192, True, 128, 224),  # tiny random models (tests/conftest.py)
}

TARGET_SPEEDUP_FRACTION = 0.8  # speed-up >= 80 % of the pass-count ratio
TARGET_MATCH_FRACTION = 0.10  # matching + co-PCA < 10 % of extraction
TARGET_GPU_SECONDS = 300.0  # the SPair test set in under 5 minutes on one H100
TARGET_GPU_MEMORY = 24 * 2**30  # the default config fits in 24 GB


# ------------------------------------------------------------------------------------------------- timing


class TimedCorrespondence(FusedCorrespondence):
    """``FusedCorrespondence`` that adds up the time spent in ``extract`` and in matching.

    ``match`` is the time in ``predict_pair``: co-PCA, fusion and the nearest-neighbour transfer
    (``describe_pair`` + matching).
    ``extract`` covers padding/resizing, image hashing and cache lookups (with a cache) and the
    featurizer passes. ``sync`` waits for the device so the times are real on CUDA.
    """

    def __init__(
        self, *args: Any, cache: FeatureCache | None = None, sync: Callable[[], None] = lambda: None, **kwargs: Any
    ) -> None:
        super().__init__(*args, feature_cache_gb=0, **kwargs)
        self.cache = cache  # the benchmark's own cache object (None: the baseline extracts every image)
        self.timers = {"extract": 0.0, "extract_cpu": 0.0, "match": 0.0, "match_cpu": 0.0, "co_pca": 0.0,
                       "co_pca_cpu": 0.0}
        self._sync = sync

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self._sync()
        self.timers[name] += time.perf_counter() - wall
        self.timers[f"{name}_cpu"] += time.process_time() - cpu

    def extract(self, images, categories, files=None):  # noqa: ANN001, ANN201 - same signature as the parent
        with self._timed("extract"):
            return super().extract(images, categories, files)

    def describe_pairs(self, pairs):  # noqa: ANN001, ANN201 - co-PCA and fusion of a batch of pairs
        with self._timed("match"), self._timed("co_pca"):  # co-PCA is also counted apart
            return super().describe_pairs(pairs)

    def predict_pair(self, features, sample, descriptors=None):  # noqa: ANN001, ANN201
        with self._timed("match"):
            return super().predict_pair(features, sample, descriptors)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak resident set size since the last reset (``VmHWM``), else over the process lifetime (MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _process_peak_rss_mib()


def _process_peak_rss_mib() -> float:
    """``ru_maxrss`` of this process over its lifetime in MiB (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------------- models


def _num_params(*modules: torch.nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def build_featurizers(args: argparse.Namespace, device: torch.device) -> tuple[SDFeaturizer, DinoFeaturizer]:
    """The SD and DINO featurizers (real-size random, tiny random, or loaded weights), on ``device``."""
    if args.tiny:
        sd_init: dict[str, Any] | None = {"seed": 0}
        dino_init: dict[str, Any] | None = {"seed": 0, "num_hidden_layers": 4}
        dino_layer = 3
    else:
        sd_init = None if args.sd_model else SD15_SIZED
        dino_init = None if args.dino_model else DINOV2_BASE_SIZED
        dino_layer = 11
    sd = SDFeaturizer(
        model_id=args.sd_model, random_init=sd_init, image_size=args.sd_size, sliding_window=args.sd_window,
        crop_size=args.crop_size,
    )
    dino = DinoFeaturizer(model_id=args.dino_model, random_init=dino_init, layer=dino_layer, image_size=args.dino_size)
    return sd.to(device), dino.to(device)


# --------------------------------------------------------------------------------------------------- data


def make_dataset(args: argparse.Namespace, root: Path) -> SPairDataset:
    """A synthetic SPair-format root in which each image appears in about ``pairs_per_image`` pairs."""
    max_pairs = args.images * (args.images - 1)
    pairs_per_category = max(1, min(max_pairs, round(args.images * args.pairs_per_image / 2)))
    write_synthetic_spair(
        root,
        categories=default_synthetic_categories(args.categories),
        images_per_category=args.images,
        pairs_per_category=pairs_per_category,
        image_size=tuple(args.image_size),
        seed=args.seed,
        split="test",
    )
    return SPairDataset(root, split="test")


def spair_test_images(args: argparse.Namespace) -> tuple[int, str]:
    """Distinct images of the SPair-71k test split, and where the number comes from."""
    if args.data_root:
        dataset = SPairDataset(args.data_root, split="test")
        return len(dataset.image_paths), f"counted in {args.data_root} (test split, {len(dataset)} pairs)"
    if args.spair_test_images:
        return int(args.spair_test_images), "given (--spair-test-images), not measured"
    return SPAIR_ALL_IMAGES, (
        f"ASSUMED: {SPAIR_ALL_IMAGES} = all SPair-71k images, an upper bound (not measured; pass --data-root or "
        "--spair-test-images)"
    )


# ---------------------------------------------------------------------------------------------------- run


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Phase:
    """Accumulated wall and process-CPU time of one pipeline's pair calls, and its predictions."""

    def __init__(self, pipeline: TimedCorrespondence) -> None:
        self.pipeline = pipeline
        self.wall = self.cpu = 0.0
        self.predictions: list[torch.Tensor] = []
        self.distances: list[torch.Tensor] = []

    def step(self, samples: Sequence[dict[str, Any]], device: torch.device, precision: str,
             sync: Callable[[], None]) -> None:
        """One ``predict_pairs`` call on ``samples`` (one pair, or a batch: ``--pair-batch``)."""
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        with _autocast(device, precision):
            outs = self.pipeline.predict_pairs(list(samples))
        sync()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        for out in outs:
            self.predictions.append(out["pred_kps"].cpu())
            self.distances.append(out["distance"].cpu())

    def summary(self, pairs: int) -> dict[str, Any]:
        timers = self.pipeline.timers
        result = {
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "pairs_per_s": pairs / self.wall,
            "extract_s": timers["extract"],
            "extract_cpu_s": timers["extract_cpu"],
            "match_s": timers["match"],
            "match_cpu_s": timers["match_cpu"],
            "co_pca_s": timers["co_pca"],
            "other_s": self.wall - timers["extract"] - timers["match"],
            "passes": dict(self.pipeline.extraction_passes),
        }
        result["match_over_extract"] = result["match_s"] / max(result["extract_s"], 1e-12)
        result["match_over_extract_cpu"] = result["match_cpu_s"] / max(result["extract_cpu_s"], 1e-12)
        return result


def _start_memory_phase(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return _reset_peak_rss()


def _memory(device: torch.device, rss_reset: bool) -> dict[str, float | None]:
    memory: dict[str, float | None] = {"peak_rss_mib": _peak_rss_mib() if rss_reset else None}
    if device.type == "cuda":
        memory["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["peak_cuda_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return memory


def run_phases(
    baseline: _Phase,
    ours: _Phase,
    samples: Sequence[dict[str, Any]],
    device: torch.device,
    precision: str,
    sync: Callable[[], None],
    schedule: str,
    log: Callable[[str], None],
    pair_batch: int = 1,
) -> dict[str, Any]:
    """Run every pair through both pipelines (the baseline one pair per call, ours ``pair_batch`` pairs per call,
    batched co-PCA); returns the memory peaks.

    ``sequential``: all pairs through the baseline, then all through ours (a memory peak per phase).
    ``interleaved``: pair i through the baseline, then through ours, for every i: a shared machine's
    load changes over minutes and hits both pipelines alike (one memory peak for both).
    """
    chunks = [samples[i:i + pair_batch] for i in range(0, len(samples), pair_batch)]
    if schedule == "sequential":
        memory = {}
        for name, phase, calls in (("baseline", baseline, [[s] for s in samples]), ("ours", ours, chunks)):
            log(f"[{precision}] {name}: {len(samples)} pairs ...")
            rss_reset = _start_memory_phase(device)
            for call in calls:
                phase.step(call, device, precision, sync)
            memory[name] = _memory(device, rss_reset)
            log(f"[{precision}] {name}: {phase.wall:.1f} s")
        return memory
    log(f"[{precision}] baseline and ours, interleaved pair by pair: {len(samples)} pairs ...")
    rss_reset = _start_memory_phase(device)
    done = 0
    for chunk in chunks:
        for sample in chunk:
            baseline.step([sample], device, precision, sync)
        ours.step(chunk, device, precision, sync)
        done += len(chunk)
        log(f"[{precision}]   pair {done}/{len(samples)}: baseline {baseline.wall:.1f} s, ours {ours.wall:.1f} s")
    shared = _memory(device, rss_reset)
    return {"baseline": shared, "ours": shared}


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, Any]:
    """How far two lists of per-pair tensors are apart (NaN-aware)."""
    equal = sum(torch.equal(x, y) or bool(torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)) for x, y in zip(a, b))
    diffs = [(x - y).abs().nan_to_num(0.0).max().item() if x.numel() else 0.0 for x, y in zip(a, b)]
    nans = sum(int(torch.isnan(x).sum()) for x in a)
    return {"equal_pairs": equal, "pairs": len(a), "max_abs_diff": max(diffs, default=0.0), "nan_values": nans}


def cache_fingerprints(
    sd: SDFeaturizer, dino: DinoFeaturizer, categories: Sequence[str], sync: Callable[[], None]
) -> float:
    """Compute the featurizers' cache keys once (a digest of all weights); returns the seconds it took.

    A one-time cost per process of any cached run (memoised on the featurizers): timed apart so that a
    short benchmark does not charge it to its few pairs; the projection adds it back once.
    """
    sync()
    start = time.perf_counter()
    for category in sorted(set(categories)):
        sd.cache_key(category)
        dino.cache_key(category)
    sync()
    return time.perf_counter() - start


def benchmark_precision(
    precision: str,
    sd: SDFeaturizer,
    dino: DinoFeaturizer,
    samples: Sequence[dict[str, Any]],
    device: torch.device,
    args: argparse.Namespace,
    sync: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Warm-up, then the baseline and ours on the same pairs in the same order."""
    # Warm-up, not timed (first-call allocations, kernel selection, every category's prompt): one image
    # per category, one at a time, the first matched with itself.
    warm = TimedCorrespondence(sd, dino, sync=sync).to(device)
    firsts = {s["category"]: s for s in reversed(samples)}
    with torch.no_grad(), _autocast(device, precision):
        for category, sample in firsts.items():
            (features,) = warm.extract([sample["src_image"]], [category])
        transfer(warm.describe_pair(features, features), features, features, sample["src_kps"], warm.annotation_size)
    sync()
    shapes = {"sd": [list(t.shape) for t in features.sd], "dino": list(features.dino.shape)}
    del features, warm

    cache = FeatureCache(memory_bytes=int(args.cache_mb) << 20)
    baseline = _Phase(TimedCorrespondence(sd, dino, cache=None, sync=sync).to(device))
    ours = _Phase(TimedCorrespondence(sd, dino, cache=cache, sync=sync).to(device))
    memory = run_phases(baseline, ours, samples, device, precision, sync, args.schedule, log, args.pair_batch)

    pairs = len(samples)
    b, o = baseline.summary(pairs) | memory["baseline"], ours.summary(pairs) | memory["ours"]
    baseline_passes = b["passes"]["sd"] + b["passes"]["dino"]
    ours_passes = o["passes"]["sd"] + o["passes"]["dino"]
    pass_ratio = baseline_passes / max(ours_passes, 1)
    speedup, speedup_cpu = b["wall_s"] / o["wall_s"], b["cpu_s"] / o["cpu_s"]
    unique = len({s[k] for s in samples for k in ("src_image_path", "trg_image_path")})
    images_per_s = o["passes"]["sd"] / max(o["extract_s"], 1e-12)  # one SD + one DINO pass per image
    match_per_pair, other_per_pair = o["match_s"] / pairs, o["other_s"] / pairs
    result: dict[str, Any] = {
        "precision": precision,
        "schedule": args.schedule,
        "pair_batch": args.pair_batch,
        "feature_shapes": shapes,
        "pairs": pairs,
        "unique_images": unique,
        "baseline": b,
        "ours": o,
        "cache": {"hits": cache.hits, "entries": len(cache), "used_mib": cache.used_bytes / 2**20},
        "speedup": speedup,
        "speedup_cpu": speedup_cpu,
        "pass_ratio": pass_ratio,
        "speedup_over_pass_ratio": speedup / pass_ratio,
        "speedup_cpu_over_pass_ratio": speedup_cpu / pass_ratio,
        "images_per_s": images_per_s,
        "match_s_per_pair": match_per_pair,
        "other_s_per_pair": other_per_pair,
        "predictions_match": _compare(baseline.predictions, ours.predictions),
        "distances_match": _compare(baseline.distances, ours.distances),
        "targets": {
            "speedup_over_pass_ratio_min": TARGET_SPEEDUP_FRACTION,
            "speedup_ok": speedup / pass_ratio >= TARGET_SPEEDUP_FRACTION,
            "match_over_extract_max": TARGET_MATCH_FRACTION,
            "match_ok": o["match_over_extract"] < TARGET_MATCH_FRACTION,
        },
    }
    test_images, test_pairs = args._spair_test_images, args.spair_test_pairs
    extraction_s = test_images / images_per_s
    per_pair_s = test_pairs * (match_per_pair + other_per_pair)
    ours_s = args._fingerprint_s + extraction_s + per_pair_s
    result["projection"] = {
        "spair_test_pairs": test_pairs,
        "spair_test_images": test_images,
        "spair_test_images_source": args._spair_test_images_source,
        "ours_s": ours_s,
        "ours_fingerprint_s": args._fingerprint_s,
        "ours_extraction_s": extraction_s,
        "ours_per_pair_s": per_pair_s,
        "baseline_s": test_pairs * b["wall_s"] / pairs,
        "formula": "ours: fingerprint + images / images_per_s + pairs * (matching + other per pair); "
        "baseline: pairs * baseline wall per pair. Model loading and JPEG decoding are not included.",
    }
    if device.type == "cuda":
        result["targets"]["spair_test_under_5_min"] = ours_s < TARGET_GPU_SECONDS
        result["targets"]["fits_24gb"] = o["peak_cuda_reserved_mib"] * 2**20 < TARGET_GPU_MEMORY
    del baseline, ours, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------- printing


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def format_report(report: dict[str, Any]) -> str:
    """A readable table of a report."""
    setup = report["setup"]
    lines = [
        "",
        f"device: {setup['device_name']} ({setup['device']}), torch {setup['torch']}, {setup['threads']} threads",
        f"models: {setup['models']}; SD {setup['sd_size']} px"
        f"{' (2x2 windows of %d px)' % setup['crop_size'] if setup['sd_window'] else ' (one window)'}, "
        f"DINO {setup['dino_size']} px; params SD {setup['params']['sd'] / 1e6:.0f} M, "
        f"DINO {setup['params']['dino'] / 1e6:.0f} M",
        f"feature shapes (per image): SD {report['results'][0]['feature_shapes']['sd']}, "
        f"DINO {report['results'][0]['feature_shapes']['dino']}",
        f"data: synthetic SPair root, {setup['categories']} categories x {setup['images_per_category']} images "
        f"({setup['image_size'][0]}x{setup['image_size'][1]} +-1/8), {setup['pairs']} pairs, "
        f"{setup['unique_images']} distinct images ({setup['pairs_per_image']:.1f} pairs per image), "
        f"order: image-grouped",
        f"model build: {setup['build_s']:.1f} s; cache keys (weight digests, once per process, not in the "
        f"timings below): {setup['fingerprint_s']:.1f} s; process peak RSS: {report['process_peak_rss_mib']:.0f} MiB",
    ]
    for r in report["results"]:
        b, o = r["baseline"], r["ours"]
        rows = [
            ("", "baseline", "ours"),
            ("SD / DINO passes", f"{b['passes']['sd']} / {b['passes']['dino']}",
             f"{o['passes']['sd']} / {o['passes']['dino']}"),
            ("wall time", f"{b['wall_s']:.2f} s", f"{o['wall_s']:.2f} s"),
            ("process CPU time", f"{b['cpu_s']:.2f} s", f"{o['cpu_s']:.2f} s"),
            ("pairs/s", f"{b['pairs_per_s']:.3f}", f"{o['pairs_per_s']:.3f}"),
            ("extraction", f"{b['extract_s']:.2f} s", f"{o['extract_s']:.2f} s"),
            ("matching + co-PCA", f"{b['match_s']:.3f} s", f"{o['match_s']:.3f} s"),
            ("  of which co-PCA", f"{b['co_pca_s']:.3f} s", f"{o['co_pca_s']:.3f} s"),
            ("other (bookkeeping)", f"{b['other_s']:.3f} s", f"{o['other_s']:.3f} s"),
            ("matching / extraction", f"{b['match_over_extract']:.2%}", f"{o['match_over_extract']:.2%}"),
            ("  same, CPU time", f"{b['match_over_extract_cpu']:.2%}", f"{o['match_over_extract_cpu']:.2%}"),
            ("peak RSS" + (" (phase)" if r["schedule"] == "sequential" else " (both)"),
             _mib(b["peak_rss_mib"]), _mib(o["peak_rss_mib"])),
        ]
        if "peak_cuda_allocated_mib" in b:
            rows.append(("peak CUDA allocated", _mib(b["peak_cuda_allocated_mib"]), _mib(o["peak_cuda_allocated_mib"])))
            rows.append(("peak CUDA reserved", _mib(b["peak_cuda_reserved_mib"]), _mib(o["peak_cuda_reserved_mib"])))
        lines += ["", f"== {r['precision']}, {r['schedule']}, ours {r['pair_batch']} pair(s) per call =="]
        lines += [f"  {a:<24}{c:>18}{d:>18}" for a, c, d in rows]
        t, p, pm, dm = r["targets"], r["projection"], r["predictions_match"], r["distances_match"]
        lines += [
            f"  speed-up {r['speedup']:.2f}x, pass ratio {r['pass_ratio']:.2f}x, speed-up / pass ratio "
            f"{r['speedup_over_pass_ratio']:.3f} (target >= {t['speedup_over_pass_ratio_min']}: "
            f"{'PASS' if t['speedup_ok'] else 'FAIL'}); by process CPU time: speed-up {r['speedup_cpu']:.2f}x, "
            f"/ pass ratio {r['speedup_cpu_over_pass_ratio']:.3f}",
            f"  matching + co-PCA / extraction (ours) {o['match_over_extract']:.2%} "
            f"(target < {t['match_over_extract_max']:.0%}: {'PASS' if t['match_ok'] else 'FAIL'})",
            f"  images/s {r['images_per_s']:.3f} (ours: distinct images / extraction time); matching "
            f"{r['match_s_per_pair'] * 1e3:.1f} ms/pair, other {r['other_s_per_pair'] * 1e3:.1f} ms/pair",
            f"  cache: {r['cache']['hits']} hits, {r['cache']['entries']} entries, {r['cache']['used_mib']:.1f} MiB",
            f"  predictions ours == baseline: {pm['equal_pairs']}/{pm['pairs']} pairs identical "
            f"(max |diff| {pm['max_abs_diff']:.3g} px; distances max |diff| {dm['max_abs_diff']:.3g}; "
            f"NaN values {pm['nan_values']})",
            f"  projection, SPair-71k test ({p['spair_test_pairs']} pairs, {p['spair_test_images']} images: "
            f"{p['spair_test_images_source']}):",
            f"    ours {_fmt_time(p['ours_s'])} (cache keys {_fmt_time(p['ours_fingerprint_s'])} + extraction "
            f"{_fmt_time(p['ours_extraction_s'])} + per pair {_fmt_time(p['ours_per_pair_s'])}); "
            f"baseline {_fmt_time(p['baseline_s'])}",
        ]
        if "spair_test_under_5_min" in t:
            lines.append(
                f"  GPU targets: SPair test < 5 min: {'PASS' if t['spair_test_under_5_min'] else 'FAIL'}; "
                f"fits 24 GB (peak reserved, ours): {'PASS' if t['fits_24gb'] else 'FAIL'}"
            )
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of the per-image feature cache against per-pair extraction (see benchmarks/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and a tiny root (smoke run)")
    parser.add_argument("--sd-size", type=int, default=None, help="SD input px (default: cpu 256, cuda 960)")
    parser.add_argument("--sd-window", action=argparse.BooleanOptionalAction, default=None,
                        help="SD 2x2 sliding window of --crop-size crops (default: cuda on, cpu off)")
    parser.add_argument("--crop-size", type=int, default=None, help="SD sliding-window crop px (default 512)")
    parser.add_argument("--dino-size", type=int, default=None, help="DINO input px (default: cpu 224, cuda 840)")
    parser.add_argument("--sd-model", default=None,
                        help="diffusers SD pipeline (hub id or directory); default: SD-1.5-sized random weights")
    parser.add_argument("--dino-model", default=None,
                        help="transformers DINOv2 (hub id or directory); default: DINOv2-B-sized random weights")
    parser.add_argument("--categories", type=int, default=2, help="categories of the generated root")
    parser.add_argument("--images", type=int, default=4, help="images per category")
    parser.add_argument("--pairs-per-image", type=float, default=3.0,
                        help="mean number of pairs each image appears in (pairs per category = images x this / 2)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(400, 300), metavar=("W", "H"),
                        help="base image size of the generated root (each image jitters by up to 1/8)")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=None,
                        help="default: cpu fp32; cuda fp32 fp16 bf16 (fp16/bf16 via torch.autocast, cuda only)")
    parser.add_argument("--schedule", choices=["auto", "sequential", "interleaved"], default="auto",
                        help="sequential: all baseline pairs, then all ours (memory peak per phase); interleaved: "
                        "pair by pair, both see the same machine load (auto: cuda sequential, cpu interleaved)")
    parser.add_argument("--cache-mb", type=int, default=4096, help="memory budget of ours' feature cache (MiB)")
    parser.add_argument("--spair-test-pairs", type=int, default=SPAIR_TEST_PAIRS, help="pairs for the projection")
    parser.add_argument("--spair-test-images", type=int, default=None,
                        help=f"distinct images of SPair-71k test for the projection (default: {SPAIR_ALL_IMAGES}, "
                        "an upper bound, unless --data-root is given)")
    parser.add_argument("--data-root", default=None, help="a real SPair-71k root: count its test images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated root")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--pair-batch", type=int, default=1,
                        help="pairs per predict_pairs call of ours (batched co-PCA; the baseline stays one per call)")
    return parser.parse_args(argv)


def _resolve(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    sd_size, sd_window, crop, dino_size = DEFAULT_SIZES["tiny" if args.tiny else device.type]
    args.sd_size = args.sd_size or sd_size
    args.sd_window = sd_window if args.sd_window is None else args.sd_window
    args.crop_size = args.crop_size or min(crop, args.sd_size)
    args.dino_size = args.dino_size or dino_size
    if args.schedule == "auto":
        args.schedule = "sequential" if device.type == "cuda" else "interleaved"
    if args.precision is None:
        args.precision = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]
    if device.type != "cuda" and any(p != "fp32" for p in args.precision):
        raise SystemExit("fp16/bf16 run under torch.autocast on cuda only; on cpu use --precision fp32")
    if args.images < 2 or args.categories < 1 or args.pairs_per_image <= 0:
        raise SystemExit("need --images >= 2, --categories >= 1 and --pairs-per-image > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (also printed, and written to ``--out``)."""
    args = parse_args(argv)
    device = _resolve(args)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    args._spair_test_images, args._spair_test_images_source = spair_test_images(args)

    with tempfile.TemporaryDirectory(prefix="throughput_spair_") as tmp:
        dataset = make_dataset(args, Path(tmp) / "spair")
        order = image_grouped_order(dataset.pair_images())
        samples = [dataset[i] for i in order]  # decoded up front: JPEG decoding is not timed
    unique = len({s[k] for s in samples for k in ("src_image_path", "trg_image_path")})
    log(f"data: {len(samples)} pairs over {unique} distinct images")

    log("building models ...")
    start = time.perf_counter()
    sd, dino = build_featurizers(args, device)
    build_s = time.perf_counter() - start
    args._fingerprint_s = cache_fingerprints(sd, dino, [s["category"] for s in samples], sync)
    models = "tiny random" if args.tiny else (
        f"{args.sd_model or 'SD-1.5-sized random'} + {args.dino_model or 'DINOv2-B-sized random'}"
    )
    setup = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "models": models,
        "params": {"sd": _num_params(sd.unet, sd.vae, sd.text_encoder), "dino": _num_params(dino.model)},
        "sd_size": args.sd_size,
        "sd_window": args.sd_window,
        "crop_size": args.crop_size,
        "dino_size": args.dino_size,
        "categories": args.categories,
        "images_per_category": args.images,
        "image_size": list(args.image_size),
        "pairs": len(samples),
        "unique_images": unique,
        "pairs_per_image": 2 * len(samples) / unique,
        "cache_mb": args.cache_mb,
        "build_s": build_s,
        "fingerprint_s": args._fingerprint_s,
    }
    results = [benchmark_precision(p, sd, dino, samples, device, args, sync, log) for p in args.precision]
    report = {"setup": setup, "results": results, "process_peak_rss_mib": _process_peak_rss_mib(),
              "argv": list(argv) if argv is not None else sys.argv[1:]}
    print(format_report(report), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
