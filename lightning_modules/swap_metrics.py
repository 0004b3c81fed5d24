"""Instance-swap scores of supplementary Table 9: CLIP score and CLIP-based FID (Paint-by-Example's protocol).

A torchmetrics ``Metric`` (:class:`SwapScores`) over functional twins (:func:`clip_image_score`,
:func:`frechet_distance`), on a frozen CLIP image embedder (:class:`.components.clip_features.CLIPImageEmbedder`).

* **CLIP score** of a pair: ``100 * max(cos(e, r), 0)`` between the CLIP image embeddings of the *edited
  region* (the bounding box of the target instance in the swapped image) and of the *reference* (the bounding
  box of the source instance) -- Paint-by-Example's "CLIP score" (similarity between the edited region and the
  reference image), with torchmetrics ``CLIPScore``'s formula applied to two images. The mean over pairs is
  reported.
* **FID (CLIP-based)**: the Fréchet distance between Gaussians fitted to the raw (not normalised) projected CLIP
  embeddings of all edited regions and of all reference regions -- the features of clean-fid's CLIP FID
  (OpenAI CLIP's ``encode_image``). It is computed here (:func:`frechet_distance`, float64), not with
  torchmetrics' ``FrechetInceptionDistance``: the regions have different sizes and the sets are deduplicated
  by pair id first. Caveat: a covariance of ``N`` samples has rank at most ``N - 1``; with fewer pairs than
  embedding dimensions (512 for ViT-B/32) the estimate is heavily biased and only comparable between runs over
  the *same* pairs; on a handful of pairs it is meaningless (NaN for fewer than 2 pairs). Paint-by-Example
  compares the edited images with a separate set of real images (COCO); here the reference regions play that
  role, so the numbers are not those of Table 9.
* **Quality score** (Table 9's middle column, Paint-by-Example's QS from GIQA) is **not computed**: it is the
  likelihood of each image's features under a Gaussian mixture model that GIQA fits on a large set of *real*
  images; neither that trained GMM nor the real image set of the paper is available, so it cannot be
  reproduced here.

Distributed evaluation: every state is a ``dist_reduce_fx="cat"`` list with the stable 64-bit key of the pair
id (:func:`.metrics.stable_pair_key`); ``compute()`` keeps the first occurrence of every pair key, in key
order (:func:`.segmentation_metrics.first_occurrence`), so a padded ``DistributedSampler``'s duplicates never
count and the split over processes does not change the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .components.clip_features import CLIPImageEmbedder
from .metrics import TypedListStates, stable_pair_key
from .segmentation_metrics import first_occurrence

__all__ = ["SwapScores", "clip_image_score", "frechet_distance"]


def clip_image_score(a_emb: Tensor, b_emb: Tensor) -> Tensor:
    """``100 * max(cos(a_i, b_i), 0)`` per row: torchmetrics ``CLIPScore``'s formula for two images.

    Args:
        a_emb: ``[N, D]`` embeddings (normalised here, so raw embeddings work too).
        b_emb: ``[N, D]``.

    Returns:
        ``[N]`` scores in [0, 100].
    """
    if a_emb.shape != b_emb.shape or a_emb.dim() != 2:
        raise ValueError(f"embeddings must both be [N, D], got {tuple(a_emb.shape)} and {tuple(b_emb.shape)}")
    cos = torch.nn.functional.cosine_similarity(a_emb.float(), b_emb.float(), dim=-1)
    return 100.0 * cos.clamp_min(0.0)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula), in float64.

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` with unbiased covariances (``np.cov``).
    The trace of the matrix square root is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)`` (similar to ``S_a S_b``, so the same eigenvalues) -- the
    value of pytorch-fid's ``scipy.linalg.sqrtm`` formula, but stable for the rank-deficient covariances of
    few samples.

    Args:
        features_a: ``[N, D]``.
        features_b: ``[M, D]``.

    Returns:
        The distance (rounding below 0 is clipped to 0); NaN when either set has fewer than 2 rows.
    """
    a = features_a.detach().to("cpu", torch.float64)
    b = features_b.detach().to("cpu", torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    dim = a.shape[1]
    cov_a, cov_b = torch.cov(a.T).reshape(dim, dim), torch.cov(b.T).reshape(dim, dim)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    return max(0.0, float(mean_term + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_root))


class SwapScores(TypedListStates):
    """Mean CLIP score and CLIP-based FID of edited regions against reference regions (see the module doc).

    States (``dist_reduce_fx="cat"`` lists, on the metric's device): ``clip_score`` (float32 per pair),
    ``edited_embedding`` / ``reference_embedding`` (raw projected CLIP embeddings, float32, flattened
    ``[N * D]``) and ``pair_key`` (long).

    ``compute()`` returns ``{"clip_score": mean over pairs (0..100, higher is better), "fid_clip": Fréchet
    distance of the raw CLIP embeddings of the edited and of the reference regions (lower is better; NaN under
    2 pairs, unreliable with fewer pairs than embedding dimensions), "num_pairs": int}``; with no update the
    scores are NaN. Table 9's "Quality score" (GIQA) is not computed: it needs GIQA's GMM trained on a real
    image set, which is not available.

    Args:
        embedder: The frozen CLIP image embedder (a submodule: it follows the metric's device; one embedder may
            be shared by several metrics).
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    _state_dtypes = {
        "clip_score": torch.float32,
        "edited_embedding": torch.float32,
        "reference_embedding": torch.float32,
        "pair_key": torch.long,
    }

    def __init__(self, embedder: CLIPImageEmbedder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder
        self._add_list_states()

    def update(
        self,
        *,
        edited_regions: Sequence[Tensor],
        reference_regions: Sequence[Tensor],
        pair_ids: Sequence[str],
    ) -> None:
        """Add a batch of pairs.

        Args:
            edited_regions: Per pair uint8 ``[3, h, w]`` crop of the edited image (any sizes).
            reference_regions: Per pair uint8 ``[3, h, w]`` crop of the reference.
            pair_ids: Per pair stable identifiers (used for de-duplication).
        """
        if isinstance(pair_ids, str):
            raise ValueError("`pair_ids` must be a sequence of strings, one per pair")
        if not len(edited_regions) == len(reference_regions) == len(pair_ids):
            raise ValueError(
                "`edited_regions`, `reference_regions` and `pair_ids` must have the same length, got "
                f"{len(edited_regions)}, {len(reference_regions)}, {len(pair_ids)}"
            )
        if not pair_ids:
            return
        edited = self.embedder(list(edited_regions), normalize=False)
        reference = self.embedder(list(reference_regions), normalize=False)
        self.clip_score.append(clip_image_score(edited, reference).to(self.device, torch.float32))
        self.edited_embedding.append(edited.reshape(-1).to(self.device, torch.float32))
        self.reference_embedding.append(reference.reshape(-1).to(self.device, torch.float32))
        self.pair_key.append(torch.tensor([stable_pair_key(p) for p in pair_ids], dtype=torch.long,
                                          device=self.device))

    def compute(self) -> dict[str, Any]:
        """``{"clip_score", "fid_clip", "num_pairs"}`` over the de-duplicated pairs (see the class doc)."""
        states = self._cat_states()
        dim = self.embedder.embed_dim
        for name in ("edited_embedding", "reference_embedding"):
            states[name] = states[name].reshape(-1, dim)
        keep = first_occurrence(states["pair_key"])
        states = {name: value[keep] for name, value in states.items()}
        scores = states["clip_score"].double().cpu().tolist()
        return {
            "clip_score": math.fsum(scores) / len(scores) if scores else float("nan"),
            "fid_clip": frechet_distance(states["edited_embedding"], states["reference_embedding"]),
            "num_pairs": len(scores),
        }
