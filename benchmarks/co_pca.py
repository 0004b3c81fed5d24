"""Time co-PCA of one pair at the paper's shapes: torch.pca_lowrank under fork_rng (today's torch; how the
reference-style code seeds it) against ``fusion.pca_lowrank_components`` (test matrix from a CPU generator; the
algorithm of ``--solver``: ``torch1.13``, the reference's and our default, or ``torch2.4``, today's torch's).

    python benchmarks/co_pca.py --device cpu --repeats 3 --threads 1 --solver torch2.4

    python benchmarks/co_pca.py --device cuda
    python benchmarks/co_pca.py --device cpu --repeats 5 --threads 1
    python benchmarks/co_pca.py --device cpu --batch 8 --repeats 3 --threads 1   # batched vs per pair

With ``--batch N``: ``N`` pairs per layer reduced one pair at a time (``co_pca``, today's per-pair path) and as one
batch (``co_pca_batch``: batched range finder, orthonormalisation and small SVD); prints both times per pair,
their ratio, whether the two give the same descriptors (bit for bit, and the largest difference) and the same
nearest neighbours (every source token's nearest target token, on the three layers' reductions).

SD 1.5 at 960 px gives layers 2/5/8 of 1280 x 15 x 15, 1280 x 30 x 30 and 640 x 60 x 60; each is reduced to
256 components per pair (both images' tokens together), on feature-like data (a decaying spectrum). Prints
milliseconds per pair (all three layers) and how far our result on the device is from the reference
algorithm on the CPU (the largest pairwise token distance difference, relative to the mean distance).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.components.fusion import PCA_SOLVERS, co_pca, co_pca_batch  # noqa: E402

SHAPES = ((1280, 15), (1280, 30), (640, 60))


def feature_like_pair(channels: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[2, C, side, side]`` pair with a decaying spectrum (as real features have), so that the top 256
    components are well defined: rank-512 signal with singular values ``1 / (1 + k / 16)`` plus noise."""
    tokens = 2 * side * side
    rank = min(512, channels, tokens)
    scales = 1.0 / (1.0 + torch.arange(rank) / 16.0)
    signal = (torch.randn(tokens, rank, generator=generator) * scales) @ torch.randn(rank, channels, generator=generator)
    noisy = signal + 0.01 * torch.randn(tokens, channels, generator=generator)
    return noisy.reshape(2, side, side, channels).permute(0, 3, 1, 2).contiguous()


def reference_co_pca(pair: torch.Tensor, dim: int, niter: int = 2, seed: int = 0) -> torch.Tensor:
    """co-PCA with torch.pca_lowrank under a forked, seeded global RNG (the previous implementation)."""
    n, channels, height, width = pair.shape
    tokens = pair.float().permute(0, 2, 3, 1).reshape(n * height * width, channels)
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    q = min(dim, channels, centred.shape[0])
    devices = [centred.device] if centred.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=q, center=False, niter=niter)
    return (centred @ v[:, :q]).reshape(n, height, width, q).permute(0, 3, 1, 2)


def exact_co_pca(pair: torch.Tensor, dim: int) -> torch.Tensor:
    """For comparison only: exact PCA from the eigenvectors of the C x C covariance (not what the reference does)."""
    n, channels, height, width = pair.shape
    tokens = pair.float().permute(0, 2, 3, 1).reshape(n * height * width, channels)
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    q = min(dim, channels, centred.shape[0])
    _, vectors = torch.linalg.eigh(centred.mT @ centred)
    return (centred @ vectors[:, -q:]).reshape(n, height, width, q).permute(0, 3, 1, 2)


def _distances(pair: torch.Tensor) -> torch.Tensor:
    tokens = pair.permute(0, 2, 3, 1).reshape(-1, pair.shape[1])
    return torch.cdist(tokens, tokens)


def _time(fn, pairs, device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for pair in pairs:  # warm-up: kernels, cuSOLVER handles
        fn(pair, 256)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for pair in pairs:
            fn(pair, 256)
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _nearest(pair: torch.Tensor) -> torch.Tensor:
    """Every source token's nearest target token (L2) on a reduced pair ``[2, q, H, W]``."""
    tokens = pair.flatten(2).transpose(1, 2)
    return torch.cdist(tokens[0], tokens[1]).argmin(dim=1)


def batched_vs_per_pair(device: torch.device, batch: int, repeats: int, solver: str = "torch1.13") -> dict[str, float]:
    """Time co-PCA of ``batch`` pairs per layer, per pair and batched, and compare their outputs."""
    generator = torch.Generator().manual_seed(0)
    layers = [torch.stack([feature_like_pair(c, side, generator) for _ in range(batch)]).to(device) for c, side in SHAPES]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def per_pair() -> list[torch.Tensor]:
        return [torch.stack([co_pca(pair, 256, solver=solver) for pair in layer]) for layer in layers]

    def batched() -> list[torch.Tensor]:
        return [co_pca_batch(layer, 256, solver=solver) for layer in layers]

    timings = {}
    for name, fn in (("per_pair", per_pair), ("batched", batched)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        timings[name] = 1000 * statistics.median(times) / batch
    one, many = per_pair(), batched()
    same_nn = sum(int(torch.equal(_nearest(a[i]), _nearest(b[i]))) for a, b in zip(one, many) for i in range(batch))
    return {
        "per_pair_ms": timings["per_pair"],
        "batched_ms": timings["batched"],
        "ratio": timings["per_pair"] / timings["batched"],
        "identical": float(all(torch.equal(a, b) for a, b in zip(one, many))),
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(one, many)),
        "same_nearest": same_nn,
        "compared": len(SHAPES) * batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=0, help="compare per-pair and batched co-PCA of this many pairs")
    parser.add_argument("--solver", choices=PCA_SOLVERS, default="torch1.13", help="co-PCA's pca_solver")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.batch:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        r = batched_vs_per_pair(device, args.batch, args.repeats, args.solver)
        print(f"device {name}, {torch.get_num_threads()} threads; co-PCA ({args.solver}) of {args.batch} pairs, layers {SHAPES} to 256, "
              f"median of {args.repeats}")
        print(f"  per pair (co_pca)      : {r['per_pair_ms']:8.2f} ms/pair")
        print(f"  batched (co_pca_batch) : {r['batched_ms']:8.2f} ms/pair  ({r['ratio']:.2f}x)")
        print(f"  same descriptors bit for bit: {bool(r['identical'])} (largest difference {r['max_abs_diff']:.2e}); "
              f"same nearest neighbours on {r['same_nearest']} of {r['compared']} layer-pairs")
        return
    generator = torch.Generator().manual_seed(0)
    pairs = [feature_like_pair(c, side, generator).to(device) for c, side in SHAPES]
    old = _time(reference_co_pca, pairs, device, args.repeats)
    ours = functools.partial(co_pca, solver=args.solver)
    new = _time(ours, pairs, device, args.repeats)
    exact = _time(exact_co_pca, pairs, device, args.repeats)
    gap = 0.0  # ours on this device against the reference algorithm on the CPU (torch.pca_lowrank, seed 0)
    for pair in pairs:
        a, b = ours(pair.cpu(), 256), ours(pair, 256).cpu()
        da, db = _distances(a), _distances(b)
        gap = max(gap, ((da - db).abs().max() / da.mean()).item())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; co-PCA of one pair, layers {SHAPES} to 256, median of {args.repeats}")
    print(f"  torch.pca_lowrank under fork_rng: {old:8.2f} ms/pair")
    print(f"  pca_lowrank_components ({args.solver}): {new:8.2f} ms/pair")
    print(f"  exact PCA (eigh of the covariance), for comparison: {exact:8.2f} ms/pair")
    print(f"  ours on {name} vs the reference algorithm on the CPU: max |pairwise distance difference| / mean "
          f"distance = {gap:.2e}")


if __name__ == "__main__":
    main()
