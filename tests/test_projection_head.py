"""The gated projection head, its losses, its checkpoints, and a synthetic proof that the gate works.

Plain tensors only (no featurizer), seeded; the synthetic training run takes a few seconds on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from lightning_modules.components.fusion import fuse, l2_normalize
from lightning_modules.components.matching import cells_to_points, nearest_neighbors
from lightning_modules.components.projection_head import (
    GatedProjectionHead,
    correspondence_loss,
    keypoint_descriptors,
    soft_argmax_flow_loss,
    symmetric_keypoint_loss,
)


def _features(batch: int = 2, grid: int = 4, seed: int = 0, **channels: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, c, grid, grid, generator=g) for name, c in channels.items()}


# ---------------------------------------------------------------- the head


@pytest.mark.parametrize("hidden_dim, per_channel", [(None, False), (24, False), (None, True), (24, True)])
def test_output_shape_unit_norm_and_gates(hidden_dim: int | None, per_channel: bool) -> None:
    torch.manual_seed(0)
    head = GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=16, hidden_dim=hidden_dim, per_channel_gate=per_channel)
    out = head(_features(sd=12, dino=20))
    assert out.shape == (2, 32, 4, 4) and head.descriptor_dim == 32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 4, 4))
    gates = head.gates()
    assert list(gates) == ["sd", "dino"]
    assert all(0.0 < float(g) < 1.0 and g.ndim == 0 for g in gates.values())
    assert head.gate_logits["sd"].shape == ((16,) if per_channel else (1,))
    out.sum().backward()
    assert all(p.grad is not None for p in head.gate_logits.values())


def test_equal_gates_and_identity_projections_reproduce_concat_l2() -> None:
    head = GatedProjectionHead({"sd": 6, "dino": 6}, out_dim=6, gate_init=1.3)
    with torch.no_grad():
        for conv in head.projections.values():
            conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
            conv.bias.zero_()
    feats = _features(sd=6, dino=6)
    torch.testing.assert_close(head(feats), l2_normalize(fuse(feats["sd"], feats["dino"], alpha=0.5)))


def test_output_follows_the_head_dtype() -> None:
    head = GatedProjectionHead({"sd": 4}, out_dim=3).double()
    assert head(_features(sd=4)).dtype == torch.float64


def test_unknown_missing_and_mismatched_sources_are_clear_errors() -> None:
    head = GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=8)
    with pytest.raises(ValueError, match=r"unknown \['ibot'\].*configured: \['sd', 'dino'\]"):
        head(_features(sd=12, dino=20, ibot=5))
    with pytest.raises(ValueError, match=r"missing \['dino'\]"):
        head(_features(sd=12))
    with pytest.raises(ValueError, match=r"source 'dino': expected \[B, 20, H, W\].*\(2, 21, 4, 4\)"):
        head(_features(sd=12, dino=21))
    feats = _features(sd=12, dino=20)
    feats["dino"] = feats["dino"][..., :3, :3]
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        head(feats)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="at least one"):
        GatedProjectionHead({})
    with pytest.raises(ValueError, match="without '.'"):
        GatedProjectionHead({"sd.v1": 4})
    with pytest.raises(ValueError, match="positive channel count"):
        GatedProjectionHead({"sd": 0})
    with pytest.raises(ValueError, match="out_dim and hidden_dim"):
        GatedProjectionHead({"sd": 4}, out_dim=0)


def test_paper_bottleneck_preset() -> None:
    head = GatedProjectionHead.paper_bottleneck({"sd": 8, "dino": 4}, out_dim=6)
    assert head.config["hidden_dim"] == 6 and isinstance(head.projections["sd"], torch.nn.Sequential)
    assert head(_features(sd=8, dino=4)).shape == (2, 12, 4, 4)


# ---------------------------------------------------------------- losses


def test_symmetric_loss_matches_hand_computation() -> None:
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    trg = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = src @ trg.T / 0.5 = [[2, 1.2], [0, 1.6]]; rows pick the diagonal, then the columns
    rows = math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))
    cols = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))
    loss = symmetric_keypoint_loss(src, trg, temperature=0.5)
    assert loss.item() == pytest.approx((rows / 2 + cols / 2) / 2, rel=1e-6)


def test_symmetric_loss_is_near_zero_for_aligned_one_hot_descriptors() -> None:
    eye = torch.eye(8)
    assert symmetric_keypoint_loss(eye, eye, temperature=0.01).item() < 1e-30
    assert symmetric_keypoint_loss(eye, eye.flip(0), temperature=0.01).item() > 10


def test_symmetric_loss_with_fewer_than_two_keypoints_is_a_differentiable_zero() -> None:
    for n in (0, 1):
        src = torch.randn(n, 4, requires_grad=True)
        loss = symmetric_keypoint_loss(src, torch.randn(n, 4))
        assert loss.item() == 0.0
        loss.backward()
        assert src.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        symmetric_keypoint_loss(torch.eye(2), torch.eye(2), temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        symmetric_keypoint_loss(torch.eye(2), torch.eye(3))


def test_flow_loss_is_zero_for_a_sharp_correct_match() -> None:
    grid, size = 4, 32
    trg_map = torch.eye(grid * grid).view(grid * grid, grid, grid)  # one-hot descriptor per cell
    cells = torch.tensor([0, 5, 10, 15])
    src_desc = torch.eye(grid * grid)[cells]
    trg_points = cells_to_points(cells, size, grid)
    loss = soft_argmax_flow_loss(src_desc, trg_map, trg_points, size, temperature=0.01)
    assert loss.item() < 1e-6


def test_flow_loss_matches_hand_computation() -> None:
    # G = 2 in a 4 px square: s = 2, cell centres (0.5, 0.5), (2.5, 0.5), (0.5, 2.5), (2.5, 2.5)
    trg_map = torch.tensor([0.0, 0.0, 0.0, math.log(3.0)]).view(1, 2, 2)
    points = torch.tensor([[2.5, 2.5]])
    # all-zero similarities: uniform softmax, expected point (1.5, 1.5), error sqrt(2)
    uniform = soft_argmax_flow_loss(torch.zeros(1, 1), trg_map, points, size=4, temperature=1.0)
    assert uniform.item() == pytest.approx(math.sqrt(2) / 4, rel=1e-6)
    # logits (0, 0, 0, ln 3): probabilities (1/6, 1/6, 1/6, 1/2), expected x = y = 3.5 / 6 + 1.25
    weighted = soft_argmax_flow_loss(torch.ones(1, 1), trg_map, points, size=4, temperature=1.0)
    error = math.sqrt(2) * (2.5 - (3.5 / 6 + 1.25))
    assert weighted.item() == pytest.approx(error / 4, rel=1e-6)


def test_keypoint_descriptors_and_the_combined_loss() -> None:
    descriptors = torch.randn(5, 4, 4)
    points = torch.tensor([[0.0, 0.0], [7.9, 0.0], [8.0, 31.0], [31.0, 31.0]])  # 8 px cells in a 32 px square
    expected = descriptors.flatten(1).T[torch.tensor([0, 0, 13, 15])]
    torch.testing.assert_close(keypoint_descriptors(descriptors, points, size=32), expected)
    src, trg = l2_normalize(torch.randn(5, 4, 4), dim=0), l2_normalize(torch.randn(5, 4, 4), dim=0)
    sym = symmetric_keypoint_loss(keypoint_descriptors(src, points[1:], 32), keypoint_descriptors(trg, points[1:], 32))
    flow = soft_argmax_flow_loss(keypoint_descriptors(src, points[1:], 32), trg, points[1:], 32)
    torch.testing.assert_close(correspondence_loss(src, trg, points[1:], points[1:], 32), sym)
    combined = correspondence_loss(src, trg, points[1:], points[1:], 32, flow_weight=2.0)
    torch.testing.assert_close(combined, sym + 2 * flow)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    head = GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=8, hidden_dim=10, per_channel_gate=True, gate_init=0.7)
    with torch.no_grad():
        head.gate_logits["dino"].add_(torch.linspace(-2, 2, 8))
    path = tmp_path / "head.pt"
    head.save_checkpoint(path)
    rebuilt = GatedProjectionHead.from_checkpoint(path)
    assert rebuilt.config == head.config
    feats = _features(sd=12, dino=20)
    torch.testing.assert_close(rebuilt(feats), head(feats), rtol=0, atol=0)
    same_config = GatedProjectionHead(**head.config)
    same_config.load_head_state(torch.load(path, weights_only=True))
    torch.testing.assert_close(same_config(feats), head(feats), rtol=0, atol=0)


def test_checkpoint_shape_mismatch_names_the_parameter(tmp_path) -> None:
    path = tmp_path / "head.pt"
    GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=16).save_checkpoint(path)
    head = GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=8)
    with pytest.raises(ValueError, match=r"'projections.sd.weight' has shape \(16, 12, 1, 1\).*\(8, 12, 1, 1\)"):
        head.load_head_state(path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["out_dim"] = 8  # a config that does not describe its own weights
    with pytest.raises(ValueError, match="projections.sd.weight"):
        GatedProjectionHead.from_checkpoint(payload)


def test_checkpoint_source_mismatch_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "head.pt"
    GatedProjectionHead({"sd": 12, "ibot": 20}, out_dim=8).save_checkpoint(path)
    with pytest.raises(ValueError, match=r"unknown \['ibot'\], missing \['dino'\]"):
        GatedProjectionHead({"sd": 12, "dino": 20}, out_dim=8).load_head_state(path)
    partial = GatedProjectionHead({"sd": 12, "ibot": 20, "dino": 20}, out_dim=8)
    partial.load_head_state(path, strict=False)  # a missing source is tolerated without strict
    with pytest.raises(ValueError, match=r"missing \['dino'\]"):
        partial.load_head_state(path)
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        GatedProjectionHead.from_checkpoint({"config": {"sources": {"sd": 4}, "colour": 1}, "state_dict": {}})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        GatedProjectionHead.from_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="'config' and 'state_dict'"):
        GatedProjectionHead.from_checkpoint({"state_dict": {}})


# ---------------------------------------------------------------- the gate's job, on synthetic pairs

GRID, SIZE, EVAL_KEYPOINTS = 8, 64, 16
GOOD_CHANNELS, BAD_CHANNELS, BAD_RANK = 32, 128, 3


@contextmanager
def _single_thread() -> Iterator[None]:
    """Thousands of tiny ops run fastest (and steadiest on a shared CPU) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _synthetic_pairs(count: int, gen: torch.Generator, mixing: torch.Tensor) -> dict[str, object]:
    """Pairs whose target is the source shifted (``torch.roll``) by a random offset.

    "good" (32 ch) carries the correspondence: target = shifted source + noise (std 0.5). "bad" (128 ch)
    is noise: independent for source and target, of larger magnitude, and low-rank (3 random directions
    mixed into 128 channels). Low rank is what makes it harmful: zero-shot fusion L2-normalises every block,
    so magnitude is irrelevant, and full-rank high-dimensional noise has cosines concentrated near 0 (std
    ~1/sqrt(C)) and barely reorders matches; noise along few directions, like a weak source's features
    that vary for reasons unrelated to the correspondence, has cosines spread over [-1, 1].
    """
    src_good = torch.randn(count, GOOD_CHANNELS, GRID, GRID, generator=gen)
    shifts = torch.randint(0, GRID, (count, 2), generator=gen)
    trg_good = torch.stack([torch.roll(s, (int(dy), int(dx)), dims=(-2, -1)) for s, (dy, dx) in zip(src_good, shifts)])
    trg_good = trg_good + 0.5 * torch.randn(trg_good.shape, generator=gen)

    def noise() -> torch.Tensor:
        return torch.einsum("ck,nkhw->nchw", mixing, torch.randn(count, BAD_RANK, GRID, GRID, generator=gen))

    cells = torch.arange(GRID * GRID)
    rows, cols = cells // GRID, cells % GRID
    trg_cells = ((rows + shifts[:, :1]) % GRID) * GRID + (cols + shifts[:, 1:]) % GRID  # [count, G*G]
    return {
        "src": {"good": src_good, "bad": noise()},
        "trg": {"good": trg_good, "bad": noise()},
        "src_points": cells_to_points(cells, SIZE, GRID),  # every cell centre
        "trg_points": cells_to_points(trg_cells, SIZE, GRID),  # [count, G*G, 2]
        "trg_cells": trg_cells,
        "eval_cells": torch.stack([torch.randperm(GRID * GRID, generator=gen)[:EVAL_KEYPOINTS] for _ in range(count)]),
    }


def _accuracy(src: torch.Tensor, trg: torch.Tensor, pairs: dict) -> float:
    """Fraction of the evaluation keypoints whose nearest target cell is the true one."""
    hits = 0
    for i, cells in enumerate(pairs["eval_cells"]):
        queries = keypoint_descriptors(src[i], pairs["src_points"][cells], SIZE)
        index, _ = nearest_neighbors(queries, trg[i].flatten(1).T)
        hits += int((index == pairs["trg_cells"][i, cells]).sum())
    return hits / pairs["eval_cells"].numel()


def _train(head: GatedProjectionHead, pairs: dict, gen: torch.Generator, steps: int = 300) -> list[float]:
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(pairs["trg_cells"]), (8,), generator=gen)
        src = head({name: f[batch] for name, f in pairs["src"].items()})
        trg = head({name: f[batch] for name, f in pairs["trg"].items()})
        loss = torch.stack([
            correspondence_loss(s, t, pairs["src_points"], pairs["trg_points"][i], SIZE, temperature=0.1)
            for s, t, i in zip(src, trg, batch)
        ]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_gate_learns_to_ignore_a_harmful_source() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(BAD_CHANNELS, BAD_RANK, generator=gen)
    train, held_out = _synthetic_pairs(64, gen, mixing), _synthetic_pairs(32, gen, mixing)
    src, trg = held_out["src"], held_out["trg"]

    good_alone = _accuracy(l2_normalize(src["good"]), l2_normalize(trg["good"]), held_out)
    bad_alone = _accuracy(l2_normalize(src["bad"]), l2_normalize(trg["bad"]), held_out)
    zero_shot = _accuracy(fuse(src["good"], src["bad"], 0.5), fuse(trg["good"], trg["bad"], 0.5), held_out)

    head = GatedProjectionHead({"good": GOOD_CHANNELS, "bad": BAD_CHANNELS}, out_dim=32)
    with _single_thread():
        losses = _train(head, train, gen)
    with torch.no_grad():
        trained = _accuracy(head(src), head(trg), held_out)
    gates = {name: float(g) for name, g in head.gates().items()}
    print(
        f"\n[gated head] accuracy: zero-shot fused {zero_shot:.3f}, informative alone {good_alone:.3f}, "
        f"noise alone {bad_alone:.3f}, trained head {trained:.3f}; gates good {gates['good']:.3f}, "
        f"bad {gates['bad']:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    # the problem: fusing in the harmful source zero-shot costs accuracy
    assert zero_shot < good_alone - 0.1
    # the fix: the trained head is at least as good as the informative source, and has turned the noise down
    assert trained >= good_alone
    assert gates["bad"] < 0.5 * gates["good"]
    assert losses[-1] < 0.5 * losses[0]
