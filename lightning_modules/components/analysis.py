"""Supplementary A.10: how SD and DINO complement each other, from per-keypoint outcomes and distances.

For every evaluated keypoint we know whether the SD, DINO and fused features matched it correctly (at
PCK@0.10) and, for SD and DINO, the "relative distance" of a target cell: the source keypoint's feature
distance to that cell, min-max normalised over all target cells (0 = the most similar cell). From these:

- Table 11: the distribution of the eight outcomes ``SD DINO Fused`` (``"011"`` = SD wrong, DINO and
  fused right), in percent of keypoints;
- Fig. 2: P(fused right | SD and DINO outcome) for the four SD/DINO groups;
- Table 12: mean relative distances. Scenario 011: SD's distance to the correct cell, and DINO's
  distance to SD's (false) match; scenario 101: SD's distance to DINO's false match and DINO's distance
  to the correct cell; "average": the correct-cell distances over all keypoints and the other feature's
  false-match distances over the keypoints where the other feature is wrong (our reading of "average").
"""

from __future__ import annotations

import torch

__all__ = ["OUTCOMES", "relative_distance", "summarize_fusion_analysis"]

OUTCOMES = tuple(f"{sd}{dino}{fused}" for sd in "01" for dino in "01" for fused in "01")


def relative_distance(distances: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Min-max normalised distance of each query to one chosen target cell.

    Args:
        distances: ``[N, M]`` feature distance of each source keypoint to every target cell.
        cells: ``[N]`` chosen target cell per keypoint.

    Returns:
        ``[N]`` in [0, 1] (0 where all cells are equally far).
    """
    low, high = distances.min(dim=1).values, distances.max(dim=1).values
    chosen = distances.gather(1, cells.view(-1, 1)).squeeze(1)
    return torch.where(high > low, (chosen - low) / (high - low).clamp_min(1e-12), torch.zeros_like(chosen))


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def summarize_fusion_analysis(
    sd_ok: torch.Tensor,
    dino_ok: torch.Tensor,
    fused_ok: torch.Tensor,
    sd_rel_correct: torch.Tensor,
    dino_rel_correct: torch.Tensor,
    sd_rel_at_dino_match: torch.Tensor,
    dino_rel_at_sd_match: torch.Tensor,
) -> dict[str, object]:
    """The A.10 tables from per-keypoint flags and relative distances (all ``[K]``, K keypoints).

    Args:
        sd_ok: SD matched the keypoint correctly.
        dino_ok: DINO matched it correctly.
        fused_ok: The fused features matched it correctly.
        sd_rel_correct: SD relative distance to the correct (ground-truth) cell.
        dino_rel_correct: DINO relative distance to the correct cell.
        sd_rel_at_dino_match: SD relative distance to the cell DINO matched.
        dino_rel_at_sd_match: DINO relative distance to the cell SD matched.

    Returns:
        ``{"num_keypoints", "outcomes": {code: percent}, "conditional": {group: percent fused right},
        "relative_distance": {"011" | "101" | "average": {"sd_correct", "sd_false", "dino_correct",
        "dino_false"}}}``; an entry with no keypoint is None.
    """
    sd_ok, dino_ok, fused_ok = sd_ok.bool(), dino_ok.bool(), fused_ok.bool()
    total = int(sd_ok.numel())
    code = sd_ok.long() * 4 + dino_ok.long() * 2 + fused_ok.long()
    outcomes = {name: 100.0 * int((code == i).sum()) / total if total else None for i, name in enumerate(OUTCOMES)}
    conditional = {}
    for label, group in (
        ("SD wrong, DINO wrong", ~sd_ok & ~dino_ok),
        ("SD wrong, DINO right", ~sd_ok & dino_ok),
        ("SD right, DINO wrong", sd_ok & ~dino_ok),
        ("SD right, DINO right", sd_ok & dino_ok),
    ):
        right = _mean(fused_ok.double(), group)
        conditional[label] = None if right is None else 100.0 * right
    s011, s101 = ~sd_ok & dino_ok & fused_ok, sd_ok & ~dino_ok & fused_ok
    everything = torch.ones_like(sd_ok)
    relative = {
        "011": {"sd_correct": _mean(sd_rel_correct, s011), "sd_false": None,
                "dino_correct": None, "dino_false": _mean(dino_rel_at_sd_match, s011)},
        "101": {"sd_correct": None, "sd_false": _mean(sd_rel_at_dino_match, s101),
                "dino_correct": _mean(dino_rel_correct, s101), "dino_false": None},
        "average": {"sd_correct": _mean(sd_rel_correct, everything), "sd_false": _mean(sd_rel_at_dino_match, ~dino_ok),
                    "dino_correct": _mean(dino_rel_correct, everything),
                    "dino_false": _mean(dino_rel_at_sd_match, ~sd_ok)},
    }
    return {"num_keypoints": total, "outcomes": outcomes, "conditional": conditional, "relative_distance": relative}
