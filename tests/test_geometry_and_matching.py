"""Image preparation geometry, co-PCA, layer merging, fusion and nearest-neighbour matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components import (
    PadResize,
    cells_to_points,
    co_pca,
    fuse,
    merge_layers,
    nearest_neighbors,
    pad_resize_image,
    points_to_cells,
    transfer_keypoints,
)
from lightning_modules.components.fusion import pca_lowrank_components


def test_pad_resize_geometry_landscape_and_portrait() -> None:
    land = PadResize(width=200, height=100, size=100)
    assert land.scale == 0.5 and land.resized_wh == (100, 50) and land.offset == (0, 25)
    port = PadResize(width=30, height=60, size=840)
    assert port.resized_wh == (420, 840) and port.offset == (210, 0)
    pts = torch.tensor([[0.0, 0.0], [199.0, 99.0], [37.5, 12.25]])
    mapped = land.forward_points(pts)
    assert torch.allclose(mapped, torch.tensor([[0.0, 25.0], [99.5, 74.5], [18.75, 31.125]]))
    assert torch.allclose(land.inverse_points(mapped), pts)


def test_pad_resize_image_pads_with_black_in_the_centre() -> None:
    image = torch.full((3, 20, 40), 200, dtype=torch.uint8)  # H=20, W=40
    out, geo = pad_resize_image(image, 80)
    assert out.shape == (3, 80, 80) and geo.offset == (0, 20)
    assert out[:, :20].abs().max() == 0 and out[:, 60:].abs().max() == 0
    assert torch.allclose(out[:, 20:60], torch.full_like(out[:, 20:60], 200 / 255), atol=1 / 255)


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    tokens = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return torch.cdist(tokens, tokens)


def test_co_pca_is_joint_and_preserves_distances_at_full_rank() -> None:
    torch.manual_seed(0)
    basis = torch.randn(3, 16)
    pair = (torch.randn(2, 5, 5, 3) @ basis).permute(0, 3, 1, 2)  # rank-3 data in 16 channels
    reduced = co_pca(pair, dim=3)
    assert reduced.shape == (2, 3, 5, 5)
    # A shared projection onto the data's span keeps every distance, within AND across the two images.
    assert torch.allclose(_pairwise(reduced), _pairwise(pair), rtol=1e-3, atol=2e-2)
    # Reducing each image separately would not: cross-image distances break.
    separate = torch.cat([co_pca(pair[:1], 3), co_pca(pair[1:], 3)])
    assert (_pairwise(separate) - _pairwise(pair)).abs().max() > 1.0


def test_co_pca_keeps_the_top_components_and_is_deterministic() -> None:
    torch.manual_seed(1)
    scales = torch.tensor([10.0, 5.0, 0.01, 0.01])
    pair = (torch.randn(2, 6, 6, 4) * scales).permute(0, 3, 1, 2)
    torch.manual_seed(123)
    first = co_pca(pair, dim=2)
    torch.manual_seed(456)  # the global RNG must not matter
    second = co_pca(pair, dim=2)
    assert torch.equal(first, second)
    tokens = pair.permute(0, 2, 3, 1).reshape(-1, 4)
    kept_var = first.permute(0, 2, 3, 1).reshape(-1, 2).var(dim=0).sum()
    assert kept_var / (tokens - tokens.mean(0)).var(dim=0).sum() > 0.999
    assert co_pca(pair, dim=64).shape[1] == 4  # clamped to the channel count


def test_merge_layers_upsamples_coarse_to_fine_like_the_reference() -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 6, 6), torch.randn(2, 2, 12, 12)
    merged = merge_layers([c, a, b], size=16)
    up = lambda t, s: F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)  # noqa: E731
    expected = up(torch.cat([c, up(torch.cat([b, up(a, 6)], 1), 12)], 1), 16)
    assert merged.shape == (2, 11, 16, 16)
    assert torch.allclose(merged, expected)


def test_fuse_formula() -> None:
    torch.manual_seed(0)
    sd, dino = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 4, 4)
    fused = fuse(sd, dino, alpha=0.3)
    expected = torch.cat([0.3 * sd / sd.norm(dim=1, keepdim=True), 0.7 * dino / dino.norm(dim=1, keepdim=True)], 1)
    assert torch.allclose(fused, expected)
    assert torch.allclose(fused.norm(dim=1), torch.full((2, 4, 4), math.sqrt(0.3**2 + 0.7**2)))
    assert torch.allclose(fuse(sd, dino, alpha=1.0), sd / sd.norm(dim=1, keepdim=True))
    assert torch.allclose(fuse(None, dino, alpha=0.0), dino / dino.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="alpha"):
        fuse(sd, dino, alpha=1.5)
    with pytest.raises(ValueError, match="differ in size"):
        fuse(sd, dino[..., :2, :2], alpha=0.5)


def test_cells_follow_the_reference_convention() -> None:
    pts = torch.tensor([[13.9, 0.0], [14.0, 839.9], [-3.0, 900.0]])
    cells = points_to_cells(pts, size=840, grid=60)
    assert cells.tolist() == [0, 59 * 60 + 1, 59 * 60 + 0]
    centres = cells_to_points(torch.tensor([0, 3, 60 * 2 + 5]), size=840, grid=60)
    assert centres.tolist() == [[6.5, 6.5], [48.5, 6.5], [76.5, 34.5]]  # 14 * cell + 6.5


def test_nearest_neighbors_matches_brute_force() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(7, 5), torch.randn(30, 5)
    index, distance = nearest_neighbors(q, k)
    brute = torch.cdist(q, k)
    assert torch.equal(index, brute.argmin(dim=1))
    assert torch.allclose(distance, brute.min(dim=1).values, atol=1e-4)


def test_a_known_shift_is_recovered_exactly() -> None:
    torch.manual_seed(0)
    grid, size, shift = 12, 168, (3, -2)  # (dx, dy) in cells; 14 px cells
    source = torch.randn(16, grid, grid)
    target = torch.roll(source, shifts=(shift[1], shift[0]), dims=(1, 2))
    cols = torch.tensor([1, 4, 5, 7, 8])
    rows = torch.tensor([3, 2, 6, 9, 11])
    points = torch.stack([cols, rows], 1).float() * 14 + 3.0  # anywhere inside the cells
    predicted, distance = transfer_keypoints(source, target, points, size)
    expected_cells = torch.stack([(cols + shift[0]) % grid, (rows + shift[1]) % grid], 1)
    assert torch.equal(predicted, expected_cells.float() * 14 + 6.5)
    assert torch.allclose(distance, torch.zeros(5), atol=1e-3)


def _one_hot_grid(grid: int) -> torch.Tensor:
    """Descriptors where every cell is its own basis vector: the nearest neighbour of a cell is itself."""
    return torch.eye(grid * grid).view(grid * grid, grid, grid)


def test_original_annotation_resolution_maps_each_image_in_its_own_square() -> None:
    """Table 8's 'original': no resize, each image padded to its own long side, then cut into the grid."""
    from lightning_modules.components.features import ImageFeatures
    from lightning_modules.components.keypoints import annotation_geometry, keypoint_cells

    image = ImageFeatures(sd=None, dino=None, width=300, height=200)
    geometry = annotation_geometry(image, "original")
    assert (geometry.size, geometry.scale, geometry.offset) == (300, 1.0, (0, 50))
    assert annotation_geometry(image, 840).size == 840
    # (149, 0) -> (149, 50) in the 300 px square; 10 cells of 30 px -> column 4, row 1
    cells = keypoint_cells(image, torch.tensor([[149.0, 0.0], [299.0, 199.0]]), "original", grid=10)
    assert cells.tolist() == [1 * 10 + 4, 8 * 10 + 9]


def test_original_annotation_resolution_predicts_cell_centres_in_the_target_square() -> None:
    """Identity descriptors send a source cell to the same target cell, whose centre is in target pixels."""
    from lightning_modules.components.features import ImageFeatures
    from lightning_modules.components.keypoints import transfer

    grid = 10
    descriptors = torch.stack([_one_hot_grid(grid), _one_hot_grid(grid)])
    source = ImageFeatures(sd=None, dino=None, width=300, height=200)  # 30 px cells, offset (0, 50)
    target = ImageFeatures(sd=None, dino=None, width=100, height=200)  # 20 px cells, offset (50, 0)
    predicted, distance, _ = transfer(descriptors, source, target, torch.tensor([[149.0, 0.0]]), "original")
    # source cell (col 4, row 1) -> target centre 4 * 20 + 9.5 = 89.5, 1 * 20 + 9.5 = 29.5, minus offset (50, 0)
    assert predicted.tolist() == [[39.5, 29.5]]
    assert distance.tolist() == [0.0]
    # at a common 840 px square the same keypoint falls elsewhere: the setting is really used
    at_840, _, _ = transfer(descriptors, source, target, torch.tensor([[149.0, 0.0]]), 840)
    assert not torch.equal(at_840, predicted)


def test_annotation_size_rejects_anything_but_pixels_or_original() -> None:
    from lightning_modules.components.keypoints import check_annotation_size

    assert check_annotation_size("original") == "original" and check_annotation_size(512) == 512
    assert check_annotation_size(None) is None
    with pytest.raises(ValueError, match="annotation_size must be a positive number of pixels or 'original'"):
        check_annotation_size("native")
    with pytest.raises(ValueError, match="row 'x' annotation_size"):
        check_annotation_size(0, "row 'x' annotation_size")


def _pca_lowrank_torch_1_13(a: torch.Tensor, q: int, niter: int = 2) -> torch.Tensor:
    """``V`` of ``torch.pca_lowrank(a, q, center=False, niter)`` as torch 1.13.1 computes it (``torch/_lowrank.py``
    of that release, ``_svd_lowrank`` and ``get_approximate_basis``, transcribed), for real dense ``a``."""
    m, n = a.shape
    if m < n or n > q:  # torch 1.13: the SVD approximation of the transpose
        a_t = a.T
        r = torch.randn(a_t.shape[1], q, dtype=a.dtype)  # [m, q]
        basis = torch.linalg.qr(a_t @ r).Q
        for _ in range(niter):
            basis = torch.linalg.qr(a_t.T @ basis).Q
            basis = torch.linalg.qr(a_t @ basis).Q
        _, _, vh = torch.linalg.svd(a @ basis, full_matrices=False)  # B_t = A Q_c, [m, q]
        return basis @ vh.mH
    r = torch.randn(n, q, dtype=a.dtype)
    basis = torch.linalg.qr(a @ r).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    _, _, vh = torch.linalg.svd((a.T @ basis).T, full_matrices=False)  # B_t = (A^T Q_c)^T, [q, n]
    return vh.mH


@pytest.mark.parametrize(("rows", "channels", "q"), [(300, 40, 16), (20, 64, 12), (50, 50, 50)])
def test_pca_components_are_torch_pca_lowrank_exactly_and_leave_the_global_rng_alone(rows, channels, q) -> None:
    data = torch.randn(rows, channels, generator=torch.Generator().manual_seed(rows))
    data = data - data.mean(0, keepdim=True)
    torch.manual_seed(7)
    _, _, expected = torch.pca_lowrank(data, q=q, center=False, niter=2)  # today's torch (>= 2.4)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    got = pca_lowrank_components(data, q, niter=2, seed=7, solver="torch2.4")
    assert torch.equal(torch.get_rng_state(), state)  # drawn from a private generator
    assert torch.equal(got, expected[:, :q])  # same algorithm, same test matrix: bit for bit on the CPU


@pytest.mark.parametrize(("rows", "channels", "q"), [(300, 40, 16), (20, 64, 12), (50, 50, 50), (1800, 128, 32)])
def test_pca_components_default_to_the_reference_torch_1_13_algorithm(rows, channels, q) -> None:
    generator = torch.Generator().manual_seed(rows)
    spectrum = torch.logspace(0, -3, min(rows, channels))  # power-law features, as SD's are
    data = (torch.randn(rows, spectrum.numel(), generator=generator) * spectrum) @ torch.linalg.qr(
        torch.randn(channels, spectrum.numel(), generator=generator)).Q.T
    data = data - data.mean(0, keepdim=True)
    torch.manual_seed(7)
    expected = _pca_lowrank_torch_1_13(data, q)  # what the reference (torch 1.13.1) called
    got = pca_lowrank_components(data, q, niter=2, seed=7)
    assert torch.equal(got, expected)  # bit for bit on the CPU
    modern = pca_lowrank_components(data, q, niter=2, seed=7, solver="torch2.4")
    if channels > q and rows >= channels:  # only torch 1.13 runs the range finder on the transpose here
        assert not torch.equal(got, modern)
    elif channels == q:  # neither release transposes: the same computation
        assert torch.equal(got, modern)
    # the same leading subspace either way: the top components agree up to sign
    torch.testing.assert_close((got[:, :2].T @ modern[:, :2]).abs(), torch.eye(2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="unknown pca_solver 'torch3'"):
        pca_lowrank_components(data, q, solver="torch3")


def test_cholesky_qr2_spans_the_qr_space_and_refuses_a_rank_deficient_input() -> None:
    from lightning_modules.components.fusion import _cholesky_qr2, right_singular_vectors

    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(3)) @ torch.diag(torch.logspace(0, 3, 24))
    basis, ok = _cholesky_qr2(x)  # the CUDA route, run here on the CPU
    householder = torch.linalg.qr(x).Q
    assert bool(ok) and basis.dtype == x.dtype
    torch.testing.assert_close(basis.mT @ basis, torch.eye(24), atol=1e-5, rtol=0)
    # the same column space: projecting one basis onto the other loses nothing
    torch.testing.assert_close(householder @ (householder.mT @ basis), basis, atol=1e-4, rtol=0)
    deficient = torch.cat([x[:, :12], x[:, :12]], dim=1)  # rank 12 of 24 columns
    assert not bool(_cholesky_qr2(deficient)[1])  # orthonormal_basis then falls back to Householder QR
    # in a batch, only the matrix it fails on is refused (that one alone gets Householder QR)
    assert _cholesky_qr2(torch.stack([x, deficient]))[1].tolist() == [True, False]
    wide = torch.randn(8, 40, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(right_singular_vectors(wide), torch.linalg.svd(wide, full_matrices=False)[2].mT)
