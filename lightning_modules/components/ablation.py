"""Many descriptor settings ("rows") over ONE extraction per image and featurizer variant.

Rows that differ only after extraction (layer subset, co-PCA dims, fusion, alpha, SD / DINO / fused)
share the features of each image; rows that need another extraction (timestep, prompt, input size) name
an SD variant, which shares the weights and is run once per image. Plain torch.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .dino_featurizer import DinoFeaturizer
from .feature_cache import FeatureCache, image_digest
from .descriptors import DescriptorSpec, describe_pairs
from .features import (
    BatchImage,
    ImageFeatures,
    default_annotation_size,
    extract_features,
    pair_features,
    unique_images,
)
from .keypoints import AnnotationSize, cell_distances, check_annotation_size, keypoint_cells
from .matchers import KeypointMatcher, NearestNeighbours
from .pose_alignment import PoseAlignment
from .prediction import PredictionSettings, describe_batch, predict_pair
from .refinements import MatchRefinement
from .sd_featurizer import SDFeaturizer

__all__ = ["AblationRow", "AblationCorrespondence"]


def _variants(
    kind: str, base: Any, overrides: Mapping[str, Mapping[str, Any]] | None, models: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"default": base, name: <featurizer>.variant(**overrides[name])}`` (no ``default`` without a base).

    A variant varies ``base`` unless its overrides name another featurizer with ``of: <sd_models /
    dino_models name>`` (e.g. DIFT's settings on SD 2-1): it then shares that model's weights.
    """
    bases = {**({"default": base} if base is not None else {}), **models}
    variants = {"default": base} if base is not None else {}
    for name, settings in (overrides or {}).items():
        settings = dict(settings)
        of = str(settings.pop("of", "default"))
        if of not in bases:
            raise ValueError(
                f"{kind}_variants[{name!r}] varies {of!r}, which is not a configured {kind} featurizer "
                f"(configured: {sorted(bases)}; without `of:` a variant varies the `{kind}` featurizer)"
            )
        variants[name] = bases[of].variant(**settings)
    return variants


def _models(kind: str, models: Mapping[str, Any], variants: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra featurizers by name; a name may not also be a variant or ``default``."""
    clash = sorted(set(models) & ({"default"} | set(variants or {})))
    if clash:
        raise ValueError(f"{kind}_models names {clash} clash with variant names")
    return dict(models)


#: A row's old field name -> its name now (the pipeline's ``pca_dims`` and ``annotation_size``; a fixed
#: ``layer_projection``, not to be confused with the trained projection head).
RENAMED_ROW_FIELDS = {"pca_dim": "pca_dims", "eval_size": "annotation_size", "projection": "layer_projection"}


@dataclass
class AblationRow:
    """One row of an ablation table.

    Attributes:
        name: Row label, as in the paper's table.
        sd: SD variant the row uses (``"default"`` = the configured featurizer), or None for no SD.
        dino: DINO variant the row uses (``"default"`` = the configured featurizer), or None for no DINO.
        alpha: Weight of the SD block when both are used.
        fusion: ``concat_l2`` (the paper's), ``concat``, ``sum_l2`` or ``sum``.
        sd_layers: The SD layers used (None: all of the variant's).
        pca_dims: Co-PCA dimension of each used SD layer, as the pipeline's ``pca_dims``: one number for every
            used layer, or one per used layer; None keeps the raw channels.
        annotation_size: Keypoint-to-cell square of this row ("annotation resolution"; None: the module's).
        layer_projection: Path of a fixed per-layer linear map used instead of co-PCA (Table 3's ODISE
            projection layer; see ``DescriptorSpec.layer_projection``).
        soft_argmax_window: Beyond the paper: window soft-argmax half-width in cells (None: off).
        soft_argmax_temperature: Its softmax temperature (also of the recorded confidence).
        mutual_check: Beyond the paper: record whether each match is a mutual nearest neighbour.
        pose_alignment: Beyond the paper: also match from the mirrored source and keep the orientation whose
            instance features agree better (:mod:`.pose_alignment`).
        pca_solver: Co-PCA's randomised PCA (:data:`.fusion.PCA_SOLVERS`; the reference's ``torch1.13``).
    """

    name: str
    sd: str | None = "default"
    dino: str | None = "default"
    alpha: float = 0.5
    fusion: str = "concat_l2"
    sd_layers: list[int] | None = None
    pca_dims: int | list[int] | None = 256
    annotation_size: AnnotationSize | None = None
    layer_projection: str | None = None
    soft_argmax_window: int | None = None
    soft_argmax_temperature: float = 0.04
    mutual_check: bool = False
    pose_alignment: bool = False
    pca_solver: str = "torch1.13"
    #: Renamed fields (see :data:`RENAMED_ROW_FIELDS`), kept for a while with a one-line notice; -1: not given.
    pca_dim: int | None = -1
    eval_size: AnnotationSize | None = -1
    projection: str | int | None = -1

    def __post_init__(self) -> None:
        for old, new in RENAMED_ROW_FIELDS.items():
            if getattr(self, old) != -1:
                warnings.warn(f"ablation row {self.name!r}: {old} is now {new}; {old} works for a while",
                              FutureWarning, stacklevel=3)
                setattr(self, new, getattr(self, old))
                setattr(self, old, -1)

    def refinement(self) -> MatchRefinement:
        """The row's test-time refinements of the keypoint transfer (all off by default)."""
        return MatchRefinement(self.soft_argmax_window, float(self.soft_argmax_temperature), bool(self.mutual_check))

    def spec(self, layers: Sequence[int]) -> DescriptorSpec:
        """The row's descriptor settings (alpha forced to 1 / 0 for SD-only / DINO-only rows)."""
        if self.sd is None and self.dino is None:
            raise ValueError(f"row {self.name!r} uses neither SD nor DINO")
        alpha = 0.0 if self.sd is None else 1.0 if self.dino is None else float(self.alpha)
        used = len(self.sd_layers if self.sd_layers is not None else layers)
        if self.pca_dims is None or isinstance(self.pca_dims, int):
            dims = None if self.pca_dims is None else (int(self.pca_dims),) * used
        else:
            dims = tuple(int(d) for d in self.pca_dims)
        sd_layers = None if self.sd_layers is None else tuple(int(i) for i in self.sd_layers)
        return DescriptorSpec(
            alpha=alpha, pca_dims=dims, fusion=self.fusion, sd_layers=sd_layers, layer_projection=self.layer_projection,
            pca_solver=self.pca_solver,
        )


class AblationCorrespondence(nn.Module):
    """Evaluate many rows per pair over shared extractions.

    Args:
        rows: The table's rows.
        sd: The SD featurizer (its weights serve every variant), or None.
        dino: The DINO featurizer, or None.
        sd_variants: Variant name -> extraction overrides of ``sd`` (see ``SDFeaturizer.variant``),
            e.g. ``{"t0": {"timestep": 0}}``; ``"default"`` is ``sd`` itself. ``of: <sd_models name>`` varies
            that model instead (sharing its weights).
        dino_variants: The same for ``dino`` (``layer``, ``image_size``, ``facet``, ...).
        sd_models: Further SD featurizers with their own weights (other SD versions), usable by rows
            under their names like variants.
        dino_models: Further DINO featurizers with their own weights (DINOv1, iBOT, DINOv2-S, ...).
        annotation_size: Keypoint-to-cell square (default: the DINO input size, else the SD one).
        cache: Per-image feature cache (keyed by each variant's settings, so variants never mix); None
            extracts the images of every batch anew.
        flip_pairs: Left/right keypoint id pairs per category for the rows with ``pose_alignment``, or a table
            name (see :class:`.pose_alignment.PoseAlignment`; SPair-71k's by default).
        matcher: How every row's source keypoints find their target points (:class:`.matchers.KeypointMatcher`);
            None is the paper's nearest neighbours.

    Attributes:
        extraction_passes: Images run through each featurizer variant so far (cache misses only).
    """

    def __init__(
        self,
        rows: Sequence[AblationRow],
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        sd_variants: Mapping[str, Mapping[str, Any]] | None = None,
        dino_variants: Mapping[str, Mapping[str, Any]] | None = None,
        annotation_size: AnnotationSize | None = None,
        sd_models: Mapping[str, SDFeaturizer] | None = None,
        dino_models: Mapping[str, DinoFeaturizer] | None = None,
        cache: FeatureCache | None = None,
        flip_pairs: Mapping[str, Sequence[Sequence[int]]] | str = "spair",
        matcher: KeypointMatcher | None = None,
    ) -> None:
        super().__init__()
        self.cache = cache
        self.matcher = matcher
        self.pose_aligner = PoseAlignment(flip_pairs)
        if not rows:
            raise ValueError("an ablation needs at least one row")
        names = [row.name for row in rows]
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique: {names}")
        self.rows = list(rows)
        self.sd, self.dino = sd, dino
        self.sd_models = nn.ModuleDict(dict(sd_models or {}))  # registered: they move with the module
        self.dino_models = nn.ModuleDict(dict(dino_models or {}))
        self.variants = {
            **_variants("sd", sd, sd_variants, self.sd_models), **_models("sd", self.sd_models, sd_variants)
        }
        self.dino_variants = {
            **_variants("dino", dino, dino_variants, self.dino_models),
            **_models("dino", self.dino_models, dino_variants),
        }
        for row in self.rows:
            for kind, name, known in (("SD", row.sd, self.variants), ("DINO", row.dino, self.dino_variants)):
                if name is not None and name not in known:
                    raise ValueError(f"row {row.name!r} uses {kind} variant {name!r}; configured: {sorted(known)}")
        self.specs = [row.spec(self.variants[row.sd].layers if row.sd else ()) for row in self.rows]
        for row, spec in zip(self.rows, self.specs):
            if row.sd is not None:
                spec.layer_positions(self.variants[row.sd].layers)  # fail at start-up, not mid-run
        self.annotation_size = check_annotation_size(annotation_size)
        # a featurizer runs only for rows that give it a weight (an alpha-1 row with DINO set skips DINO)
        self.used_variants = sorted({r.sd for r, sp in zip(self.rows, self.specs) if sp.uses_sd})
        self.used_dino_variants = sorted({r.dino for r, sp in zip(self.rows, self.specs) if sp.uses_dino})
        # the variants whose features of mirrored sources some row needs (only those extract them)
        posed = [(r, sp) for r, sp in zip(self.rows, self.specs) if r.pose_alignment]
        self.mirrored_variants = {f"sd:{r.sd}" for r, sp in posed if sp.uses_sd} | {
            f"dino:{r.dino}" for r, sp in posed if sp.uses_dino
        }
        self.extraction_passes = {
            **{f"sd:{v}": 0 for v in self.used_variants}, **{f"dino:{v}": 0 for v in self.used_dino_variants}
        }
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device the module lives on."""
        return self._device_marker.device

    @torch.no_grad()
    def predict_pairs(
        self, samples: Sequence[Mapping[str, Any]], detail_rows: Collection[str] = ()
    ) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Predictions of every row for a batch of pairs; each image is extracted once per variant.

        Args:
            samples: Pair dicts (images, paths, category, ``src_kps``; ``trg_kps`` for ``detail_rows``).
            detail_rows: Rows that also return, per pair, ``cell_distances`` ``[N, G*G]`` (each source
                keypoint's feature distance to every target cell) and ``gt_cells`` ``[N]`` (the target
                keypoints' cells), for the A.10 analysis.

        Returns:
            Row name -> per pair ``{"pred_kps": [N, 2] original target pixels, "distance": [N], ...}``.
        """
        unique = unique_images(samples, mirrored_sources=bool(self.mirrored_variants))
        digests = None if self.cache is None else {key: image_digest(i.image) for key, i in unique.items()}
        plain = list(unique_images(samples))  # without the mirrors
        sd_feats = {}
        for variant in self.used_variants:
            keys = list(unique) if f"sd:{variant}" in self.mirrored_variants else plain
            sd_feats[variant] = self._extract("sd", variant, keys, unique, digests)
        dino_feats = {}
        for variant in self.used_dino_variants:
            keys = list(unique) if f"dino:{variant}" in self.mirrored_variants else plain
            dino_feats[variant] = self._extract("dino", variant, keys, unique, digests)
        outputs: dict[str, list[dict[str, torch.Tensor]]] = {}
        for row, spec in zip(self.rows, self.specs):
            settings = self.row_settings(row, spec)
            keys = list(unique) if row.pose_alignment else plain
            features = {key: self._combine(row, spec, sd_feats, dino_feats, key) for key in keys}
            outputs[row.name] = []
            for s, descriptors in zip(samples, describe_batch(features, samples, settings)):
                out = predict_pair(features, s, settings, descriptors)
                if row.name in detail_rows:
                    src, trg = pair_features(features, s)
                    if descriptors is None:
                        descriptors = settings.describe_pair(src, trg)
                    side = descriptors.shape[-1]
                    src_cells = keypoint_cells(src, s["src_kps"].to(descriptors.device), settings.annotation_size, side)
                    out["cell_distances"] = cell_distances(descriptors, src_cells)
                    trg_kps = s["trg_kps"].to(descriptors.device)
                    out["gt_cells"] = keypoint_cells(trg, trg_kps, settings.annotation_size, side)
                outputs[row.name].append(out)
        return outputs

    def row_settings(self, row: AblationRow, spec: DescriptorSpec) -> PredictionSettings:
        """How a row makes one prediction (:class:`.prediction.PredictionSettings`, as the pipeline's): its
        descriptors (co-PCA and fusion by ``spec`` over its variants' layers and grid, batched over the pairs),
        its ``annotation_size`` and refinements, the module's matcher, and pose alignment where the row asks for it."""
        layers = self.variants[row.sd].layers if spec.uses_sd else []
        grid = self.dino_variants[row.dino].grid_size if spec.uses_dino else None
        return PredictionSettings(
            describe_pairs=functools.partial(describe_pairs, spec=spec, sd_layer_ids=layers, grid=grid),
            annotation_size=self.row_annotation_size(row),
            matcher=(self.matcher or NearestNeighbours()).refined(row.refinement()),
            pose_aligner=self.pose_aligner if row.pose_alignment else None,
        )

    def _extract(
        self,
        kind: str,
        variant: str,
        keys: Sequence[str],
        unique: Mapping[str, BatchImage],
        digests: Mapping[str, str] | None,
    ) -> dict[str, ImageFeatures]:
        """Features of the batch's images ``keys`` (:func:`.features.sample_image_key`) from one SD or DINO
        variant (cache misses counted)."""
        sd = self.variants[variant] if kind == "sd" else None
        dino = self.dino_variants[variant] if kind == "dino" else None
        images = [unique[k] for k in keys]
        feats, passes = extract_features(
            sd, dino, [i.image for i in images], [i.category for i in images], self.device, self.cache,
            None if digests is None else [digests[k] for k in keys], files=[i.file for i in images],
        )
        self.extraction_passes[f"{kind}:{variant}"] += passes[kind]
        return dict(zip(keys, feats))

    def row_annotation_size(self, row: AblationRow) -> AnnotationSize:
        """The row's keypoint-to-cell square: its own ``annotation_size``, else the module's, else the input size
        of the row's DINO featurizer (the base one for SD-only rows, as the reference maps keypoints at
        the DINOv2 size even without fusion), else its SD featurizer's (:func:`default_annotation_size`)."""
        chosen = check_annotation_size(row.annotation_size, f"row {row.name!r} annotation_size") or self.annotation_size
        if chosen:
            return chosen
        dino = self.dino_variants.get(row.dino or "default")
        return default_annotation_size(self.variants.get(row.sd or "default"), dino)

    @staticmethod
    def _combine(
        row: AblationRow,
        spec: DescriptorSpec,
        sd_feats: Mapping[str, Mapping[str, ImageFeatures]],
        dino_feats: Mapping[str, Mapping[str, ImageFeatures]],
        key: str,
    ) -> ImageFeatures:
        """The features of one image (by :func:`.features.sample_image_key`) that a row uses."""
        sd = sd_feats[row.sd][key] if spec.uses_sd else None
        dino = dino_feats[row.dino][key] if spec.uses_dino else None
        base = sd or dino
        assert base is not None
        return ImageFeatures(
            sd=sd.sd if sd else None, dino=dino.dino if dino else None, width=base.width, height=base.height
        )
