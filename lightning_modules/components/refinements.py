"""Test-time refinements of keypoint matching beyond the paper (GeoAware-SC style), each off by default.

* **Window soft-argmax** (:func:`window_soft_argmax`): instead of the arg-max cell's centre, the softmax-weighted
  mean position of the cells in a ``(2w+1)^2`` window around the arg-max, which gives sub-cell predictions.
* **Mutual nearest neighbours** (:func:`mutual_matches`): a match is mutual when the matched target cell's
  own nearest source cell is the query cell; kept per keypoint with a confidence (:func:`match_confidence`,
  the softmax probability of the matched cell) so that predictions.jsonl can be filtered later.

Scores are cosine similarities of the descriptors (the fused descriptors are L2-normalised per block, so this
ranks like the L2 nearest neighbour of :mod:`.matching` for ``concat_l2``). Coordinates follow :mod:`.matching`:
a cell ``c`` (fractional here) has its centre at ``c * s + s / 2 - 0.5`` with ``s = size / grid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fusion import l2_normalize
from .matching import nearest_neighbors, points_to_cells

__all__ = ["MatchRefinement", "match_confidence", "mutual_matches", "refined_transfer", "window_soft_argmax"]


@dataclass(frozen=True)
class MatchRefinement:
    """Which refinements a keypoint transfer applies.

    Attributes:
        soft_argmax_window: Half-width ``w`` of the soft-argmax window in cells; None keeps the arg-max cell.
        soft_argmax_temperature: Softmax temperature over cosine similarities (window and confidence).
        mutual_check: Record whether each match is a mutual nearest neighbour.
    """

    soft_argmax_window: int | None = None
    soft_argmax_temperature: float = 0.04
    mutual_check: bool = False

    def __post_init__(self) -> None:
        if self.soft_argmax_window is not None and int(self.soft_argmax_window) < 0:
            raise ValueError(f"soft_argmax_window must be >= 0 or null, got {self.soft_argmax_window}")
        if not self.soft_argmax_temperature > 0:
            raise ValueError(f"soft_argmax_temperature must be positive, got {self.soft_argmax_temperature}")

    @property
    def active(self) -> bool:
        """Whether anything differs from the paper's plain nearest-neighbour transfer."""
        return self.soft_argmax_window is not None or self.mutual_check


def window_soft_argmax(scores: torch.Tensor, grid: int, window: int, temperature: float) -> torch.Tensor:
    """Soft-argmax of every row of ``scores`` inside a ``(2 * window + 1)^2`` window around its arg-max.

    Args:
        scores: ``[N, grid * grid]`` similarity of each query to every cell (row-major cells).
        grid: Cells per side.
        window: Half-width of the window in cells (0 gives the arg-max cell exactly).
        temperature: Softmax temperature.

    Returns:
        ``[N, 2]`` fractional (col, row) cell coordinates.
    """
    best = scores.argmax(dim=1)
    rows, cols = torch.div(best, grid, rounding_mode="floor"), best % grid
    offsets = torch.arange(-window, window + 1, device=scores.device)
    cand_rows = (rows[:, None, None] + offsets[None, :, None]).expand(-1, -1, len(offsets))
    cand_cols = (cols[:, None, None] + offsets[None, None, :]).expand(-1, len(offsets), -1)
    inside = (cand_rows >= 0) & (cand_rows < grid) & (cand_cols >= 0) & (cand_cols < grid)
    flat = (cand_rows.clamp(0, grid - 1) * grid + cand_cols.clamp(0, grid - 1)).reshape(len(scores), -1)
    local = scores.gather(1, flat) / temperature
    local = local.masked_fill(~inside.reshape(len(scores), -1), float("-inf"))
    weights = torch.softmax(local, dim=1)
    col = (weights * cand_cols.reshape(len(scores), -1).float()).sum(dim=1)
    row = (weights * cand_rows.reshape(len(scores), -1).float()).sum(dim=1)
    return torch.stack([col, row], dim=1)


def match_confidence(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax probability of the best cell of every row (``[N]``, in (0, 1])."""
    return torch.softmax(scores / temperature, dim=1).amax(dim=1)


def mutual_matches(source: torch.Tensor, target: torch.Tensor, query_cells: torch.Tensor) -> torch.Tensor:
    """Whether each query cell's nearest target cell has the query cell as ITS nearest source cell.

    Args:
        source: ``[D, G, G]`` source descriptors.
        target: ``[D, G, G]`` target descriptors.
        query_cells: ``[N]`` flat source cells of the queries.

    Returns:
        ``[N]`` bool.
    """
    src_tokens, trg_tokens = source.flatten(1).T, target.flatten(1).T
    forward, _ = nearest_neighbors(src_tokens[query_cells], trg_tokens)
    backward, _ = nearest_neighbors(trg_tokens[forward], src_tokens)
    return backward == query_cells


def refined_transfer(
    source: torch.Tensor,
    target: torch.Tensor,
    points: torch.Tensor,
    size: int,
    target_size: int,
    refinement: MatchRefinement,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Keypoint transfer with the configured refinements (:func:`.matching.transfer_keypoints`'s contract).

    Returns:
        ``(predicted points [N, 2] in padded-target pixels, L2 distance of the arg-max match [N], extras)``;
        ``extras`` holds ``confidence`` ``[N]`` and, with ``mutual_check``, ``mutual`` ``[N]`` bool.
    """
    grid = source.shape[-1]
    cells = points_to_cells(points, size, grid)
    queries = l2_normalize(source.flatten(1).T[cells].float(), dim=1)
    keys = l2_normalize(target.flatten(1).T.float(), dim=1)
    scores = queries @ keys.T
    index, distance = nearest_neighbors(source.flatten(1).T[cells], target.flatten(1).T)
    if refinement.soft_argmax_window is not None:
        coords = window_soft_argmax(scores, grid, int(refinement.soft_argmax_window), refinement.soft_argmax_temperature)
    else:
        coords = torch.stack([index % grid, torch.div(index, grid, rounding_mode="floor")], dim=1).float()
    step = target_size / grid
    predicted = coords * step + (step / 2 - 0.5)
    extras = {"confidence": match_confidence(scores, refinement.soft_argmax_temperature)}
    if refinement.mutual_check:
        extras["mutual"] = mutual_matches(source, target, cells)
    return predicted, distance, extras
