"""Dense pixel correspondence on synthetic descriptors: identity, known shifts, masks, chunking, pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.components import dense
from lightning_modules.components.dense import (
    PixelCorrespondence,
    dense_picture,
    pixel_correspondence,
    position_colour_map,
    propagate_labels,
    resize_nearest,
    sample_descriptors,
    transfer,
    transfer_colours,
    working_size,
)
from lightning_modules.components.image_prep import PadResize


def one_hot_descriptors(grid: int) -> torch.Tensor:
    """``[G*G, G, G]``: a distinct one-hot descriptor per cell (bilinear mixtures stay distinct)."""
    return torch.eye(grid * grid).view(grid * grid, grid, grid)


def pixel_xy(height: int, width: int) -> torch.Tensor:
    """``[H, W, 2]`` (x, y) of every pixel."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys], dim=-1).float()


def test_sample_descriptors_hits_cell_centres():
    """Cell c is sampled exactly at c * s + s / 2 - 0.5 (the matching module's centre convention)."""
    grid, size = 6, 48
    desc = torch.randn(5, grid, grid)
    step = size / grid
    cells = torch.tensor([[0, 0], [5, 0], [2, 3], [5, 5]])  # (col, row)
    points = cells.float() * step + (step / 2 - 0.5)
    sampled = sample_descriptors(desc, points, size)
    expected = desc[:, cells[:, 1], cells[:, 0]].T
    torch.testing.assert_close(sampled, expected, rtol=0, atol=1e-5)


def test_working_pixel_points_align_pixel_centres():
    """A 64 x 32 image in a 32 square is resized to 32 x 16 at offset (0, 8); a 16 x 8 working pixel is 2 px."""
    points = dense.working_pixel_points(PadResize(64, 32, 32), (8, 16))
    assert points.shape == (8 * 16, 2)
    assert points[0].tolist() == [0.5, 8.5]
    assert points[1].tolist() == [2.5, 8.5]
    assert points[16].tolist() == [0.5, 10.5]
    assert points[-1].tolist() == [30.5, 22.5]
    full = dense.working_pixel_points(PadResize(5, 3, 5), (3, 5))  # original size, scale 1: pixel + offset
    assert torch.equal(full.view(3, 5, 2), pixel_xy(3, 5) + torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("case", ["scale", "padding"])
def test_same_content_at_another_scale_or_padding(case):
    """Same descriptors, different geometries: target pixels land on the source pixel showing the same content.

    ``scale``: the target is the source at twice the size (both fill a 32 px square), so target pixel ``t``
    (padded centre ``t / 2 - 0.25``) matches source pixel ``floor(t / 2)``. ``padding``: the source is a
    32 x 16 strip centred at rows 8..23 of the square, the target fills it, so target ``(x, y)`` matches
    source ``(x, y - 8)``. Checked away from the clamped border band.
    """
    grid, size = 8, 32
    desc = one_hot_descriptors(grid)
    if case == "scale":
        src_geo, trg_geo = PadResize(32, 32, size), PadResize(64, 64, size)
        expected = torch.div(pixel_xy(64, 64), 2, rounding_mode="floor")
        region = slice(6, 58), slice(6, 58)  # target pixels 0..5 reach the clamped source band
    else:
        src_geo, trg_geo = PadResize(32, 16, size), PadResize(32, 32, size)
        expected = pixel_xy(32, 32) - torch.tensor([0.0, 8.0])
        region = slice(8, 24), slice(2, 30)
    corr = pixel_correspondence(desc, desc, src_geo, trg_geo)
    assert torch.equal(corr.source_xy[region], expected[region])


def test_working_size():
    assert working_size(48, 80) == (48, 80)
    assert working_size(48, 80, 40) == (24, 40)
    assert working_size(300, 100, 30) == (30, 10)
    assert working_size(2, 1000, 10) == (1, 10)  # at least one pixel
    with pytest.raises(ValueError):
        working_size(10, 10, 0)


@pytest.mark.parametrize(
    ("width", "height", "size", "grid", "resolution"),
    [(64, 64, 64, 8, None), (80, 48, 80, 10, None), (80, 48, 80, 10, 40)],
)
def test_identity_pair_maps_pixels_to_themselves(width, height, size, grid, resolution):
    """Same descriptors on both sides: every pixel maps to itself.

    Tolerance: exact wherever a pixel lies between cell centres; within half a cell of the square's border
    bilinear sampling clamps to the border cell, all those pixels share one descriptor and the tie may pick
    another of them, so the error there is below half a cell (``s / 2`` working pixels) along that axis.
    """
    geometry = PadResize(width, height, size)
    desc = one_hot_descriptors(grid)
    corr = pixel_correspondence(desc, desc, geometry, geometry, resolution=resolution)
    h, w = working_size(height, width, resolution)
    assert corr.source_size == corr.target_size == (h, w)
    assert corr.source_xy.shape == (h, w, 2) and corr.valid.all()
    cell = (size / grid) * (w / width)  # a cell in working pixels
    error = (corr.source_xy - pixel_xy(h, w)).abs()
    assert error.max() < cell / 2
    assert error.max() > 0 or resolution is not None  # the square case has clamped border pixels
    band = math.ceil(cell / 2 - 0.5)  # working pixels before the first cell centre
    interior = slice(band, h - band), slice(band, w - band)
    assert (error[interior] == 0).all()
    assert corr.distance.max() < 1e-4


@pytest.mark.parametrize(("kx", "ky"), [(2, 0), (1, 3)])
def test_known_shift_moves_matches_by_whole_cells(kx, ky):
    """Target cell c holds source cell c + k: a target pixel matches source pixel target + k * cell."""
    grid, size = 8, 64
    step = size // grid
    geometry = PadResize(size, size, size)
    source = torch.randn(32, grid, grid)
    target = torch.roll(source, shifts=(-ky, -kx), dims=(1, 2))
    corr = pixel_correspondence(source, target, geometry, geometry)
    expected = pixel_xy(size, size) + torch.tensor([kx * step, ky * step]).float()
    # Pixels between the centres of target cells 0 .. G-1-k interpolate unwrapped source cells only.
    first = step // 2
    rows = slice(first, step * (grid - 1 - ky) + first)
    cols = slice(first, step * (grid - 1 - kx) + first)
    assert torch.equal(corr.source_xy[rows, cols], expected[rows, cols])
    assert corr.distance[rows, cols].max() < 1e-4


def test_transfer_colours_identity_reproduces_colour_map():
    """One cell per pixel: the identity is exact, so the transferred map is the colour map itself."""
    side = 16
    geometry = PadResize(side, side, side)
    desc = one_hot_descriptors(side)
    corr = pixel_correspondence(desc, desc, geometry, geometry)
    transferred, colours = transfer_colours(corr)
    assert torch.equal(colours, position_colour_map(side, side))
    assert torch.equal(transferred, colours)


def test_transfer_colours_known_shift_reproduces_shifted_colours():
    """Target pixel (x, y) holds source pixel (x + 3, y + 1) (wrapped): the colours move the same way."""
    side = 16
    geometry = PadResize(side, side, side)
    source = one_hot_descriptors(side)
    target = torch.roll(source, shifts=(-1, -3), dims=(1, 2))
    corr = pixel_correspondence(source, target, geometry, geometry)
    transferred, colours = transfer_colours(corr)
    assert torch.equal(transferred, torch.roll(colours, shifts=(-1, -3), dims=(1, 2)))
    assert not torch.equal(transferred, colours)


def test_propagate_labels_identity_gives_iou_one():
    """Labels at the original size, matched at half resolution: each label comes back with IoU 1."""
    side = 32
    geometry = PadResize(side, side, side)
    desc = one_hot_descriptors(side)
    labels = torch.zeros(side, side, dtype=torch.long)
    labels[4:20, 2:14] = 1
    labels[10:30, 16:30] = 2
    labels[24:32, 0:8] = 3
    corr = pixel_correspondence(desc, desc, geometry, geometry, resolution=16)
    propagated = propagate_labels(labels, corr)
    expected = resize_nearest(labels, (16, 16))
    assert propagated.shape == (16, 16) and propagated.dtype == labels.dtype
    for label in range(4):
        pred, true = propagated == label, expected == label
        assert true.any()
        assert (pred & true).sum() / (pred | true).sum() == 1.0


def test_propagate_labels_follow_the_matches():
    """Target pixel (x, y) holds source pixel (x + 5, y + 2) (wrapped): the labels move with it."""
    side = 16
    geometry = PadResize(side, side, side)
    source = one_hot_descriptors(side)
    target = torch.roll(source, shifts=(-2, -5), dims=(1, 2))
    labels = torch.zeros(side, side, dtype=torch.long)
    labels[3:9, 6:12] = 1
    labels[10:14, 1:5] = 2
    corr = pixel_correspondence(source, target, geometry, geometry)
    assert torch.equal(propagate_labels(labels, corr), torch.roll(labels, shifts=(-2, -5), dims=(0, 1)))


def test_masks_restrict_targets_and_candidates():
    torch.manual_seed(0)
    src_geo, trg_geo = PadResize(56, 40, 64), PadResize(36, 48, 64)
    source, target = torch.randn(16, 8, 8), torch.randn(16, 8, 8)
    source_mask = torch.zeros(40, 56, dtype=torch.bool)
    source_mask[5:25, 10:40] = True
    target_mask = torch.zeros(48, 36, dtype=torch.bool)
    target_mask[8:40, 4:30] = True

    unmasked = pixel_correspondence(source, target, src_geo, trg_geo)
    assert unmasked.valid.all()
    xy = unmasked.source_xy.long()
    assert not source_mask[xy[..., 1], xy[..., 0]].all()  # without the mask some matches land outside

    corr = pixel_correspondence(source, target, src_geo, trg_geo, source_mask=source_mask, target_mask=target_mask)
    assert torch.equal(corr.valid, target_mask)
    assert (corr.source_xy[~corr.valid] == -1).all() and torch.isinf(corr.distance[~corr.valid]).all()
    xy = corr.source_xy[corr.valid].long()
    assert source_mask[xy[:, 1], xy[:, 0]].all()

    transferred, _ = transfer_colours(corr, fill=255)
    assert (transferred[:, ~target_mask] == 255).all()
    labels = transfer(torch.ones(1, 40, 56, dtype=torch.int32), corr, fill=-7)
    assert labels.dtype == torch.int32 and (labels[0][~target_mask] == -7).all()
    assert (labels[0][target_mask] == 1).all()


def test_masks_are_resized_to_the_working_size():
    torch.manual_seed(1)
    geometry = PadResize(60, 40, 60)
    desc = torch.randn(8, 6, 6)
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10:30, 20:50] = True
    corr = pixel_correspondence(desc, desc, geometry, geometry, resolution=30, source_mask=mask, target_mask=mask)
    small = resize_nearest(mask, (20, 30))
    assert corr.target_size == (20, 30) and torch.equal(corr.valid, small)
    xy = corr.source_xy[corr.valid].long()
    assert small[xy[:, 1], xy[:, 0]].all()


def test_empty_source_mask_leaves_everything_invalid():
    geometry = PadResize(16, 16, 16)
    desc = torch.randn(4, 4, 4)
    corr = pixel_correspondence(desc, desc, geometry, geometry, source_mask=torch.zeros(16, 16, dtype=torch.bool))
    assert not corr.valid.any() and (corr.source_xy == -1).all()
    assert (propagate_labels(torch.ones(16, 16, dtype=torch.long), corr) == 0).all()


def test_chunk_size_does_not_change_results():
    torch.manual_seed(2)
    src_geo, trg_geo = PadResize(50, 30, 64), PadResize(30, 44, 64)
    source, target = torch.randn(24, 8, 8), torch.randn(24, 8, 8)
    target_mask = torch.rand(44, 30) > 0.3
    small = pixel_correspondence(source, target, src_geo, trg_geo, target_mask=target_mask, chunk=7)
    large = pixel_correspondence(source, target, src_geo, trg_geo, target_mask=target_mask, chunk=100000)
    assert torch.equal(small.source_xy, large.source_xy)
    assert torch.equal(small.valid, large.valid)
    assert torch.equal(small.distance, large.distance)


def test_large_working_size_is_matched_in_bounded_chunks(monkeypatch):
    """A 256 x 256 target matched 1024 pixels at a time: no step sees more than chunk x source pixels."""
    shapes = []
    real = dense.nearest_neighbors

    def spy(queries, keys):
        shapes.append((len(queries), len(keys)))
        return real(queries, keys)

    monkeypatch.setattr(dense, "nearest_neighbors", spy)
    torch.manual_seed(3)
    source, target = torch.randn(16, 8, 8), torch.randn(16, 8, 8)
    corr = pixel_correspondence(source, target, PadResize(32, 32, 64), PadResize(256, 256, 64), chunk=1024)
    assert corr.target_size == (256, 256) and corr.source_size == (32, 32)
    assert corr.valid.all() and corr.source_xy.max() <= 31
    assert len(shapes) == 64 and max(q for q, _ in shapes) == 1024
    assert {k for _, k in shapes} == {32 * 32}


def test_position_colour_map():
    colours = position_colour_map(20, 30)
    assert colours.shape == (3, 20, 30) and colours.dtype == torch.uint8
    assert torch.equal(colours, position_colour_map(20, 30))
    corners = [tuple(colours[:, r, c].tolist()) for r, c in [(0, 0), (0, 29), (19, 0), (19, 29)]]
    assert corners == [(0, 0, 255), (255, 0, 128), (0, 255, 128), (255, 255, 0)]
    steps = colours.int().diff(dim=2).abs().max(), colours.int().diff(dim=1).abs().max()
    assert max(steps) <= 255 // 19 + 1  # smooth: a pixel step changes a channel by about 255 / (side - 1)
    assert position_colour_map(1, 1).shape == (3, 1, 1)


def test_transfer_checks_the_source_size():
    corr = PixelCorrespondence(
        source_xy=torch.zeros(2, 2, 2),
        valid=torch.ones(2, 2, dtype=torch.bool),
        distance=torch.zeros(2, 2),
        source_size=(3, 4),
        target_size=(2, 2),
    )
    with pytest.raises(ValueError):
        transfer(torch.zeros(1, 2, 2), corr)
    assert transfer(torch.arange(12).view(1, 3, 4), corr).eq(0).all()


@pytest.mark.parametrize("resolution", [None, 24])
def test_dense_picture_layout(resolution):
    torch.manual_seed(4)
    src_geo, trg_geo = PadResize(40, 28, 32), PadResize(30, 48, 32)
    corr = pixel_correspondence(torch.randn(8, 4, 4), torch.randn(8, 4, 4), src_geo, trg_geo, resolution=resolution)
    (hs, ws), (ht, wt) = corr.source_size, corr.target_size
    source_image = torch.full((3, 28, 40), 200, dtype=torch.uint8)
    target_image = torch.full((3, 48, 30), 50, dtype=torch.uint8)
    picture = dense_picture(source_image, target_image, corr)
    assert picture.size == (2 * ws + 2 * wt, max(hs, ht))
    array = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    transferred, colours = transfer_colours(corr)
    assert (array[:, :hs, :ws] == 200).all()
    assert torch.equal(array[:, :hs, ws : 2 * ws], colours)
    assert (array[:, :ht, 2 * ws : 2 * ws + wt] == 50).all()
    assert torch.equal(array[:, :ht, 2 * ws + wt :], transferred)
