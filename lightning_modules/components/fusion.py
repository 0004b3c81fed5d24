"""Co-PCA of SD layers over an image pair, layer merging, and SD + DINO fusion (paper Eq. 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["FUSIONS", "PCA_SOLVERS", "co_pca", "co_pca_batch", "fuse", "fuse_blocks", "l2_normalize", "merge_layers"]

#: How co-PCA's randomised PCA orients its range finder (:func:`pca_lowrank_components`):
#:
#: - ``"torch1.13"`` (default): as ``torch.pca_lowrank`` in torch 1.13.1, which the reference ran. With more
#:   channels than components (every SD layer at q = 256) or fewer rows than channels, it works on the
#:   transpose, with an ``N x q`` random test matrix, and takes ``V`` from the SVD of the tall ``N x q`` matrix.
#: - ``"torch2.4"``: as ``torch.pca_lowrank`` in torch >= 2.4, on the transpose only with fewer rows than
#:   channels (a ``C x q`` test matrix otherwise).
#:
#: Both find the same principal subspace up to the randomised approximation; on power-law features they
#: disagree on a few per cent of the nearest-neighbour cells (``benchmarks/reference_differences.py``).
PCA_SOLVERS = ("torch1.13", "torch2.4")


def co_pca(pair: torch.Tensor, dim: int, niter: int = 2, seed: int = 0, solver: str = "torch1.13") -> torch.Tensor:
    """Project the features of an image pair onto their joint top principal components.

    As in the reference: the tokens of both images are concatenated, mean-centred and reduced with the
    randomised PCA of ``torch.pca_lowrank(q=dim, center=False)``; the projection is shared, so distances
    between the two images stay comparable. :func:`pca_lowrank_components` computes the same thing with its
    random test matrix drawn from a private CPU generator seeded with ``seed``, so a pair gets the same
    projection across runs, batches, processes AND devices (``pca_lowrank`` draws it on the features' device,
    whose generator differs between CPU and CUDA), and the global random state is left alone. One pair is a
    batch of one of :func:`co_pca_batch`.

    Args:
        pair: ``[2, C, H, W]`` features of the source and the target image.
        dim: Number of components (clamped to ``min(C, 2*H*W)``).
        niter: Subspace iterations (torch's default, used by the reference).
        seed: Seed of the randomised range finder.
        solver: One of :data:`PCA_SOLVERS` (the reference's torch 1.13 by default).

    Returns:
        ``[2, min(dim, C, 2HW), H, W]``.
    """
    return co_pca_batch(pair.unsqueeze(0), dim, niter, seed, solver)[0]


def co_pca_batch(
    pairs: torch.Tensor, dim: int, niter: int = 2, seed: int = 0, solver: str = "torch1.13"
) -> torch.Tensor:
    """:func:`co_pca` of a batch of pairs whose maps share one shape, each pair reduced on its own (its own
    mean and principal directions) with one set of batched calls: the range finder as batched matmuls, batched
    orthonormalisation and a batched small SVD, the same test matrix for every pair.

    Args:
        pairs: ``[B, 2, C, H, W]``.
        dim: Number of components (clamped to ``min(C, 2*H*W)``).
        niter: Subspace iterations.
        seed: Seed of the randomised range finder.
        solver: One of :data:`PCA_SOLVERS`.

    Returns:
        ``[B, 2, min(dim, C, 2HW), H, W]``.
    """
    batch, n, channels, height, width = pairs.shape
    tokens = pairs.float().permute(0, 1, 3, 4, 2).reshape(batch, n * height * width, channels)
    centred = tokens - tokens.mean(dim=1, keepdim=True)
    q = min(dim, channels, centred.shape[1])
    reduced = centred @ pca_lowrank_components(centred, q, niter, seed, solver)
    return reduced.reshape(batch, n, height, width, q).permute(0, 1, 4, 2, 3)


def pca_lowrank_components(
    data: torch.Tensor, q: int, niter: int = 2, seed: int = 0, solver: str = "torch1.13"
) -> torch.Tensor:
    """The ``[C, q]`` principal directions ``V`` of ``torch.pca_lowrank(data, q, center=False, niter)``.

    The same algorithm (Halko et al. 2009, Algorithm 5.1, as ``torch._lowrank`` implements it in the torch
    release ``solver`` names, :data:`PCA_SOLVERS`), step for step, so on the CPU under
    ``torch.manual_seed(seed)`` it returns that release's ``V`` exactly; the random test matrix comes from a CPU
    generator seeded with ``seed`` and is then moved to ``data``'s device. On CUDA the decompositions take
    faster routes to the same subspaces (:func:`orthonormal_basis`, :func:`right_singular_vectors`): cuSOLVER's
    QR and SVD are latency-bound at these sizes (1.3-2.3 ms per QR and 7 ms per SVD on an H200;
    ``benchmarks/co_pca.py``).

    Args:
        data: ``[N, C]`` (already centred) rows, or a batch ``[..., N, C]`` of such matrices, each reduced on
            its own with the same test matrix.
        q: Number of components (``<= min(N, C)``).
        niter: Subspace iterations.
        seed: Seed of the test matrix.
        solver: ``"torch1.13"`` (the reference's) or ``"torch2.4"``.

    Returns:
        ``[C, q]`` (``[..., C, q]`` for a batch).
    """
    if solver not in PCA_SOLVERS:
        raise ValueError(f"unknown pca_solver {solver!r}; choose one of {list(PCA_SOLVERS)}")
    rows, channels = data.shape[-2:]
    transposed = rows < channels or (solver == "torch1.13" and channels > q)
    matrix = data.mH if transposed else data  # the range finder's orientation
    generator = torch.Generator().manual_seed(seed)
    test = torch.randn(matrix.shape[-1], q, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = orthonormal_basis(matrix @ test)
    for _ in range(niter):
        basis = orthonormal_basis(matrix.mH @ basis)
        basis = orthonormal_basis(matrix @ basis)
    if not transposed:
        return right_singular_vectors(basis.mH @ matrix)  # [q, C]: the data in the found subspace
    if solver == "torch1.13":  # V = Q @ V' of the SVD of the tall B^T = A Q ([N, q])
        return basis @ tall_right_singular_vectors(data @ basis)
    left, _, _ = torch.linalg.svd(basis.mH @ matrix, full_matrices=False)  # torch >= 2.4: U of the wide Q^H A^T
    return basis @ left


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """``Q`` of the thin QR decomposition of ``x`` ``[..., N, k]`` (``N >= k``).

    On the CPU: LAPACK's Householder QR (``torch.linalg.qr``, as ``pca_lowrank``). On CUDA: CholeskyQR2 in
    float64 (two rounds of ``Q = X R^-1`` with ``R`` the Cholesky factor of ``X^H X``), about 0.5 ms where
    cuSOLVER's QR takes 1.3-2.3 ms; it spans the same space, its columns may differ in sign. Each matrix of a
    batch that is too ill-conditioned for it (its Cholesky fails, or its result is not orthonormal to 1e-6)
    gets Householder QR instead.
    """
    if x.device.type != "cuda":
        return torch.linalg.qr(x).Q
    basis, ok = _cholesky_qr2(x)
    if bool(ok.all()):
        return basis
    if x.ndim == 2:
        return torch.linalg.qr(x).Q
    basis[~ok] = torch.linalg.qr(x[~ok]).Q
    return basis


def _cholesky_qr2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR2 of ``x`` ``[..., N, k]``: ``(Q, ok)``, ``ok`` ``[...]`` False where it did not work."""
    y = x.double()
    ok = torch.ones(x.shape[:-2], dtype=torch.bool, device=x.device)
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(y.mH @ y)
        ok &= info == 0
        y = torch.linalg.solve_triangular(factor.mH, y, upper=True, left=False)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    ok &= ((y.mH @ y) - eye).abs().amax(dim=(-2, -1)) < 1e-6  # False for NaN too
    return y.to(x.dtype), ok


def right_singular_vectors(small: torch.Tensor) -> torch.Tensor:
    """``V`` ``[..., C, q]`` of the SVD of a wide ``[..., q, C]`` matrix, by decreasing singular value.

    On CUDA through cuSOLVER's ``gesvda`` on the tall transpose (about 2 ms where the default driver takes
    7 ms on an H200), checked to be orthonormal to 1e-4 per matrix; a matrix that fails is recomputed with the
    default driver.
    """
    if small.device.type != "cuda":
        return torch.linalg.svd(small, full_matrices=False)[2].mH
    return _checked_gesvda(small.mH, left=True, fallback=lambda t: torch.linalg.svd(t.mH, full_matrices=False)[2].mH)


def tall_right_singular_vectors(tall: torch.Tensor) -> torch.Tensor:
    """``V`` ``[..., q, q]`` of the SVD of a tall ``[..., N, q]`` matrix (``torch.linalg.svd``'s ``Vh.mH``), by
    decreasing singular value; on CUDA through ``gesvda``, checked as :func:`right_singular_vectors`."""
    if tall.device.type != "cuda":
        return torch.linalg.svd(tall, full_matrices=False)[2].mH
    return _checked_gesvda(tall, left=False, fallback=lambda t: torch.linalg.svd(t, full_matrices=False)[2].mH)


def _checked_gesvda(tall: torch.Tensor, left: bool, fallback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``U`` (``left``) or ``V`` of tall matrices by cuSOLVER's ``gesvda``; a matrix whose result is not
    orthonormal to 1e-4 gets ``fallback(matrix)`` (the default driver) instead."""
    u, _, vh = torch.linalg.svd(tall, full_matrices=False, driver="gesvda")
    vectors = u if left else vh.mH
    eye = torch.eye(vectors.shape[-1], dtype=vectors.dtype, device=vectors.device)
    ok = ((vectors.mH @ vectors) - eye).abs().amax(dim=(-2, -1)) < 1e-4
    if bool(ok.all()):
        return vectors
    if tall.ndim == 2:
        return fallback(tall)
    vectors[~ok] = fallback(tall[~ok])
    return vectors


def merge_layers(layers: Sequence[torch.Tensor], size: int | None = None) -> torch.Tensor:
    """Concatenate multi-resolution feature maps, coarse to fine, as the reference does.

    The coarsest map is bilinearly upsampled to the next resolution and concatenated with it, and so on
    up to the finest (15 -> 30 -> 60 for SD at 960 px), then the result is resized to ``size``.

    Args:
        layers: ``[B, C_i, H_i, W_i]`` maps (any order).
        size: Output side; defaults to the finest resolution.

    Returns:
        ``[B, sum(C_i), size, size]``.
    """
    ordered = sorted(layers, key=lambda t: t.shape[-1])
    merged = ordered[0]
    for layer in ordered[1:]:
        if merged.shape[-2:] != layer.shape[-2:]:
            merged = F.interpolate(merged, size=layer.shape[-2:], mode="bilinear", align_corners=False)
        merged = torch.cat([layer, merged], dim=1)
    if size is not None and merged.shape[-1] != size:
        merged = F.interpolate(merged, size=(size, size), mode="bilinear", align_corners=False)
    return merged


def l2_normalize(features: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """Divide every token (along ``dim``) by its L2 norm."""
    return features / features.norm(dim=dim, keepdim=True).clamp_min(eps)


FUSIONS = ("concat_l2", "concat", "sum_l2", "sum")


def fuse_blocks(blocks: Sequence[tuple[torch.Tensor, float]], mode: str = "concat_l2") -> torch.Tensor:
    """Fuse any number of ``(map [B, C_i, H, W], weight)`` blocks, as :func:`fuse` fuses two: ``concat_l2``
    ``cat(w_i * ||B_i||_2)``, ``concat`` ``cat(B_i)`` (raw), ``sum_l2`` ``sum(w_i * ||B_i||_2)``, ``sum``
    ``sum(B_i)`` (raw; the sums need equal channels). Blocks of weight 0 are left out.
    """
    if mode not in FUSIONS:
        raise ValueError(f"unknown fusion {mode!r}; choose one of {list(FUSIONS)}")
    used = [(block, float(weight)) for block, weight in blocks if weight > 0]
    if not used:
        raise ValueError("nothing to fuse: every block has weight 0")
    sizes = {tuple(block.shape[-2:]) for block, _ in used}
    if len(sizes) != 1:
        raise ValueError(f"the blocks' maps differ in size: {sorted(sizes)}")
    normalize = l2_normalize if mode.endswith("_l2") else (lambda t: t)
    weighted = [block if mode in ("concat", "sum") else weight * normalize(block) for block, weight in used]
    if mode.startswith("concat"):
        return torch.cat(weighted, dim=1)
    if len({block.shape[1] for block in weighted}) != 1:
        raise ValueError(f"fusion {mode!r} needs equal channels, got {[block.shape[1] for block in weighted]}")
    return torch.stack(weighted).sum(0)


def fuse(
    sd: torch.Tensor | None, dino: torch.Tensor | None, alpha: float = 0.5, mode: str = "concat_l2"
) -> torch.Tensor:
    """Fuse SD and DINO maps (supplementary Table 4); the paper's default is ``concat_l2``.

    - ``concat_l2``: ``cat(alpha * ||SD||_2, (1 - alpha) * ||DINO||_2)`` along channels (paper Eq. 2);
    - ``concat``: ``cat(SD, DINO)``, raw (no normalisation, no weights);
    - ``sum_l2``: ``alpha * ||SD||_2 + (1 - alpha) * ||DINO||_2``;
    - ``sum``: ``SD + DINO``, raw.

    ``||.||_2`` normalises every token to unit length. The sums need equal channel counts (e.g. co-PCA
    3 x 256 = 768 = DINOv2-B). With ``alpha`` 1 (or no DINO map) the result is the SD map alone, with 0 the
    DINO map alone (L2-normalised in the ``_l2`` modes, raw otherwise).

    Args:
        sd: ``[B, C_sd, H, W]`` or None.
        dino: ``[B, C_dino, H, W]`` or None (same spatial size as ``sd``).
        alpha: Weight of the SD block, in [0, 1].
        mode: One of :data:`FUSIONS`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mode not in FUSIONS:
        raise ValueError(f"unknown fusion {mode!r}; choose one of {list(FUSIONS)}")
    normalize = l2_normalize if mode.endswith("_l2") else (lambda t: t)
    use_sd, use_dino = sd is not None and alpha > 0, dino is not None and alpha < 1
    if use_sd and use_dino:
        if sd.shape[-2:] != dino.shape[-2:]:
            raise ValueError(f"SD map {tuple(sd.shape)} and DINO map {tuple(dino.shape)} differ in size")
        if mode.startswith("sum") and sd.shape[1] != dino.shape[1]:
            raise ValueError(f"fusion {mode!r} needs equal channels, got SD {sd.shape[1]} and DINO {dino.shape[1]}")
        return fuse_blocks([(sd, alpha), (dino, 1 - alpha)], mode)  # the arithmetic has one home
    if use_sd:
        return normalize(sd)
    if use_dino:
        return normalize(dino)
    raise ValueError(f"nothing to fuse: alpha={alpha} with sd={'set' if sd is not None else None}, "
                     f"dino={'set' if dino is not None else None}")
