"""A learned, gated fusion of feature sources and the losses that train it (supervised setting).

Zero-shot fusion (:func:`.fusion.fuse`) weights every source by a fixed ``alpha``; the supplementary (A.5)
notes that a weak source can then cost accuracy, and that a learned projection would let fusion ignore
harmful features. :class:`GatedProjectionHead` projects each source with its own 1x1 convolution (or a
small 1x1-conv bottleneck), L2-normalises it, scales it by a learned gate in (0, 1) and concatenates the
blocks; the result is L2-normalised per token again, so only the *relative* gates matter and a gate can
never act as a loss temperature. Training turns a harmful source's gate down.

The losses work on the descriptors of annotated keypoints of a pair:

- :func:`symmetric_keypoint_loss`: CLIP-style symmetric cross-entropy (the paper's supervised loss);
- :func:`soft_argmax_flow_loss`: an optional dense term, the error of the soft-argmax match.

Coordinates follow :mod:`.matching`: pixels of the ``size`` x ``size`` padded input, cell
``floor(x * G / size)``, cell centre ``cell * s + s / 2 - 0.5`` with ``s = size / G``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .files import write_atomically
from .fusion import l2_normalize
from .hub import load_weights_file
from .matching import cells_to_points, points_to_cells

__all__ = [
    "GatedProjectionHead",
    "correspondence_loss",
    "keypoint_descriptors",
    "soft_argmax_flow_loss",
    "symmetric_keypoint_loss",
]

#: A checkpoint written by :meth:`GatedProjectionHead.save_checkpoint`, or the dict it holds.
CheckpointLike = str | os.PathLike | Mapping[str, Any]

#: Key of the head (``{"config", "state_dict"}``) inside a training checkpoint written by ``train.py``; such a
#: checkpoint is accepted wherever a head checkpoint is.
TRAINING_CHECKPOINT_KEY = "projection_head"


def _check_sources(sources: Mapping[str, int]) -> dict[str, int]:
    if not sources:
        raise ValueError("GatedProjectionHead needs at least one feature source, got none")
    checked = {}
    for name, channels in sources.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"source names must be non-empty strings without '.', got {name!r}")
        if int(channels) <= 0:
            raise ValueError(f"source {name!r} must have a positive channel count, got {channels}")
        checked[name] = int(channels)
    return checked


def _projection(in_dim: int, out_dim: int, hidden_dim: int | None) -> nn.Module:
    if hidden_dim is None:
        return nn.Conv2d(in_dim, out_dim, kernel_size=1)
    return nn.Sequential(
        nn.Conv2d(in_dim, hidden_dim, kernel_size=1), nn.GELU(), nn.Conv2d(hidden_dim, out_dim, kernel_size=1)
    )


class GatedProjectionHead(nn.Module):
    """Per-source projection, per-source gate, then concatenation (a learned :func:`.fusion.fuse`).

    Every source ``s`` (e.g. ``"sd"``, ``"dino"``) gets a projection ``P_s`` and a gate
    ``g_s = sigmoid(logit_s)``; a token's descriptor is
    ``normalize(cat_s(g_s * normalize(P_s(x_s))))``, the blocks in the order of ``sources``. With equal
    gates and identity projections this is the paper's ``concat_l2`` fusion at ``alpha = 0.5`` (up to a
    constant factor per token, so with the same nearest neighbours).

    Projections: ``hidden_dim=None`` gives one 1x1 convolution (``C_s -> out_dim``, a linear map of every
    token); a ``hidden_dim`` gives a bottleneck ``Conv1x1(C_s -> hidden) -> GELU -> Conv1x1(hidden -> out_dim)``.
    The paper trains "a bottleneck layer" in its supervised setting without specifying it; the
    :meth:`paper_bottleneck` preset (``hidden_dim = out_dim = 768``) is this implementation's guess, not the
    paper's recorded architecture.

    Args:
        sources: Channel count of each source, by name (names: non-empty, no ``'.'``); the order is the
            order of the blocks in the output.
        out_dim: Channels of every projected block (the output has ``len(sources) * out_dim``).
        hidden_dim: Width of the bottleneck; None for a single 1x1 convolution.
        per_channel_gate: One gate per output channel of each source instead of one per source.
        gate_init: Initial gate *logit* (0.0 gives gates of 0.5).
    """

    def __init__(
        self,
        sources: dict[str, int],
        out_dim: int = 256,
        hidden_dim: int | None = None,
        per_channel_gate: bool = False,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.sources = _check_sources(sources)
        if int(out_dim) <= 0 or (hidden_dim is not None and int(hidden_dim) <= 0):
            raise ValueError(f"out_dim and hidden_dim must be positive, got {out_dim} and {hidden_dim}")
        self.out_dim = int(out_dim)
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.per_channel_gate = bool(per_channel_gate)
        self.gate_init = float(gate_init)
        gate_shape = (self.out_dim,) if self.per_channel_gate else (1,)
        self.projections = nn.ModuleDict(
            {name: _projection(c, self.out_dim, self.hidden_dim) for name, c in self.sources.items()}
        )
        self.gate_logits = nn.ParameterDict(
            {name: nn.Parameter(torch.full(gate_shape, self.gate_init)) for name in self.sources}
        )

    @classmethod
    def paper_bottleneck(cls, sources: dict[str, int], **kwargs: Any) -> GatedProjectionHead:
        """The bottleneck preset: ``hidden_dim = out_dim = 768`` (overridable; see the class notes)."""
        kwargs.setdefault("out_dim", 768)
        kwargs.setdefault("hidden_dim", kwargs["out_dim"])
        return cls(sources, **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (stored in checkpoints to rebuild the head)."""
        return {
            "sources": dict(self.sources),
            "out_dim": self.out_dim,
            "hidden_dim": self.hidden_dim,
            "per_channel_gate": self.per_channel_gate,
            "gate_init": self.gate_init,
        }

    @property
    def descriptor_dim(self) -> int:
        """Channels of the output, ``len(sources) * out_dim``."""
        return len(self.sources) * self.out_dim

    def gates(self) -> dict[str, torch.Tensor]:
        """Current gate of every source (a scalar tensor; the mean over channels for per-channel gates)."""
        return {name: torch.sigmoid(self.gate_logits[name].detach()).mean() for name in self.sources}

    def _check_features(self, features: Mapping[str, torch.Tensor]) -> None:
        missing = [name for name in self.sources if name not in features]
        unknown = [name for name in features if name not in self.sources]
        if missing or unknown:
            raise ValueError(
                f"feature sources do not match the head: missing {missing}, unknown {unknown} "
                f"(configured: {list(self.sources)})"
            )
        shapes = {}
        for name, expected in self.sources.items():
            tensor = features[name]
            if tensor.ndim != 4 or tensor.shape[1] != expected:
                raise ValueError(
                    f"source {name!r}: expected [B, {expected}, H, W] features, got {tuple(tensor.shape)}"
                )
            shapes[name] = (tensor.shape[0], *tensor.shape[-2:])
        if len(set(shapes.values())) > 1:
            sizes = ", ".join(f"{name} {tuple(size)}" for name, size in shapes.items())
            raise ValueError(f"sources differ in batch or spatial size ([B, H, W]): {sizes}")

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fused descriptors of a batch.

        Args:
            features: ``{name: [B, C_s, H, W]}``, exactly the configured sources (cast to the head's dtype).

        Returns:
            ``[B, len(sources) * out_dim, H, W]``, unit L2 norm per token.
        """
        self._check_features(features)
        blocks = []
        for name in self.sources:  # the configured order (ParameterDict may sort its keys)
            projection = self.projections[name]
            weight = next(projection.parameters())
            projected = l2_normalize(projection(features[name].to(dtype=weight.dtype)))
            blocks.append(projected * torch.sigmoid(self.gate_logits[name]).view(1, -1, 1, 1))
        return l2_normalize(torch.cat(blocks, dim=1))

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """``torch.save`` ``{"config": self.config, "state_dict": ...}`` (tensors on the CPU), written whole or not
        at all (:func:`.files.write_atomically`)."""
        buffer = io.BytesIO()
        torch.save(self.checkpoint_dict(), buffer)
        write_atomically(path, buffer.getvalue())

    def checkpoint_dict(self) -> dict[str, Any]:
        """``{"config": self.config, "state_dict": ...}`` with the tensors on the CPU (what checkpoints hold)."""
        state = {key: value.detach().cpu() for key, value in self.state_dict().items()}
        return {"config": self.config, "state_dict": state}

    @classmethod
    def from_checkpoint(cls, checkpoint: CheckpointLike) -> GatedProjectionHead:
        """Rebuild a head from :meth:`save_checkpoint`'s file (or its dict), on the CPU.

        Raises:
            ValueError: The file is not such a checkpoint, its config is invalid, or its weights do not fit
                its config (the mismatching parameter is named).
        """
        payload = _read_checkpoint(checkpoint)
        config = payload["config"]
        unexpected = sorted(set(config) - {"sources", "out_dim", "hidden_dim", "per_channel_gate", "gate_init"})
        if unexpected or "sources" not in config:
            raise ValueError(f"invalid head config in checkpoint: unknown keys {unexpected}, keys {sorted(config)}")
        head = cls(**config)
        head.load_head_state(payload)
        return head

    def load_head_state(self, checkpoint: CheckpointLike, strict: bool = True) -> None:
        """Load the weights of a checkpoint into this head.

        Args:
            checkpoint: A path written by :meth:`save_checkpoint`, or the dict it holds.
            strict: Require every configured source in the checkpoint; with False, sources the checkpoint
                lacks keep their current weights. Unknown sources and shape mismatches are errors either way.

        Raises:
            ValueError: The checkpoint names a source this head does not have, lacks one (``strict``), or a
                parameter's shape differs (named, with both shapes).
        """
        state = _read_checkpoint(checkpoint)["state_dict"]
        ckpt_sources = {key.split(".")[1] for key in state if key.count(".") >= 1}
        unknown = sorted(ckpt_sources - set(self.sources))
        missing = sorted(set(self.sources) - ckpt_sources)
        if unknown or (strict and missing):
            raise ValueError(
                f"checkpoint sources do not match the head: unknown {unknown}, missing {missing} "
                f"(configured: {list(self.sources)})"
            )
        own = self.state_dict()
        for key, value in state.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint parameter {key!r} has shape {tuple(value.shape)}, the head expects "
                    f"{tuple(own[key].shape)} (config: {self.config})"
                )
        try:
            self.load_state_dict(state, strict=strict)
        except RuntimeError as err:
            raise ValueError(f"checkpoint does not fit the head (config: {self.config}): {err}") from err


def _read_checkpoint(checkpoint: CheckpointLike) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping):
        payload = checkpoint
    else:
        payload = load_weights_file(checkpoint, "head checkpoint")
    if isinstance(payload, Mapping) and isinstance(payload.get(TRAINING_CHECKPOINT_KEY), Mapping):
        payload = payload[TRAINING_CHECKPOINT_KEY]  # a training checkpoint (train.py) holds the head here
    if not isinstance(payload, Mapping) or not {"config", "state_dict"} <= set(payload):
        found = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(f"a head checkpoint is a dict with 'config' and 'state_dict', got {found}")
    return payload


def keypoint_descriptors(descriptors: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """Descriptor of the cell every keypoint falls in.

    Args:
        descriptors: ``[D, G, G]`` descriptor map.
        points: ``[N, 2]`` (x, y) points in pixels of the ``size`` padded square.
        size: Side of the padded square.

    Returns:
        ``[N, D]``.
    """
    cells = points_to_cells(points.to(descriptors.device), size, descriptors.shape[-1])
    return descriptors.flatten(1).T[cells]


def symmetric_keypoint_loss(
    src_desc: torch.Tensor, trg_desc: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """CLIP-style symmetric cross-entropy: keypoint ``i`` of the source must pick keypoint ``i`` of the target.

    ``logits = src @ trg.T / temperature``; the loss is ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.
    The descriptors are used as given (unit-norm ones, as the head returns, make the logits cosines).

    Args:
        src_desc: ``[N, D]`` source keypoint descriptors.
        trg_desc: ``[N, D]`` descriptors of the corresponding target keypoints, same order.
        temperature: Softmax temperature (> 0).

    Returns:
        Scalar loss. With fewer than two keypoints there is nothing to contrast: a zero that still belongs
        to the autograd graph (so a batch of such pairs can be summed and back-propagated).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if src_desc.shape != trg_desc.shape or src_desc.ndim != 2:
        shapes = f"{tuple(src_desc.shape)} and {tuple(trg_desc.shape)}"
        raise ValueError(f"expected two [N, D] tensors of one shape, got {shapes}")
    if src_desc.shape[0] < 2:
        return (src_desc.sum() + trg_desc.sum()) * 0.0
    logits = src_desc @ trg_desc.T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def soft_argmax_flow_loss(
    src_desc: torch.Tensor, trg_map: torch.Tensor, trg_points: torch.Tensor, size: int, temperature: float = 0.05
) -> torch.Tensor:
    """Mean error of the soft-argmax match of each source keypoint, as a fraction of ``size``.

    Every source descriptor is compared with every target cell (``src . trg / temperature``, softmax over
    the ``G*G`` cells); the expected cell centre (:func:`.matching.cells_to_points`) is the predicted
    point, and its Euclidean distance to the annotated target point is averaged over keypoints and divided
    by ``size``.

    Args:
        src_desc: ``[N, D]`` source keypoint descriptors.
        trg_map: ``[D, G, G]`` target descriptor map.
        trg_points: ``[N, 2]`` (x, y) annotated target points, pixels of the ``size`` square.
        size: Side of the padded square.
        temperature: Softmax temperature (> 0).

    Returns:
        Scalar loss; zero (in the graph) when ``N`` is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(src_desc) == 0:
        return (src_desc.sum() + trg_map.sum()) * 0.0
    grid = trg_map.shape[-1]
    probs = torch.softmax(src_desc @ trg_map.flatten(1) / temperature, dim=1)
    centres = cells_to_points(torch.arange(grid * grid, device=trg_map.device), size, grid).to(probs.dtype)
    expected = probs @ centres
    return (expected - trg_points.to(expected)).norm(dim=1).mean() / size


def correspondence_loss(
    src_map: torch.Tensor,
    trg_map: torch.Tensor,
    src_points: torch.Tensor,
    trg_points: torch.Tensor,
    size: int,
    temperature: float = 0.05,
    flow_weight: float = 0.0,
) -> torch.Tensor:
    """Supervised loss of one pair: symmetric keypoint loss plus ``flow_weight`` x soft-argmax flow loss.

    Args:
        src_map: ``[D, G, G]`` source descriptors (e.g. one item of :class:`GatedProjectionHead`'s output).
        trg_map: ``[D, G, G]`` target descriptors.
        src_points: ``[N, 2]`` (x, y) source keypoints in pixels of the ``size`` square.
        trg_points: ``[N, 2]`` corresponding target keypoints.
        size: Side of the padded square.
        temperature: Temperature of both terms.
        flow_weight: Weight of the dense term; 0 skips it.
    """
    src_desc = keypoint_descriptors(src_map, src_points, size)
    loss = symmetric_keypoint_loss(src_desc, keypoint_descriptors(trg_map, trg_points, size), temperature)
    if flow_weight:
        loss = loss + flow_weight * soft_argmax_flow_loss(src_desc, trg_map, trg_points, size, temperature)
    return loss
