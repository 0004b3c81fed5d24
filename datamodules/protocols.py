"""The one place that decides, per benchmark, the PCK alphas, the threshold rule and the reported averages.

Readers compute each pair's ``threshold`` (in original pixels) with the rule named here; the metric and
the printed table take alphas, comparison and averages from here. Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METRICS", "Protocol", "PROTOCOLS", "SPAIR_VARIATIONS", "get_protocol"]

#: What a benchmark is scored with: PCK of keypoints (``lightning_modules.metrics.PCK``), PCK and end-point
#: error of dense flow over valid pixels (``DenseFlowPCK``), or J&F of propagated labels
#: (``lightning_modules.segmentation_metrics.JAndF``).
METRICS = ("keypoint_pck", "flow_pck", "label_jf")

#: Per-pair difficulty annotations of SPair-71k pair files, reported level by level.
SPAIR_VARIATIONS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")


@dataclass(frozen=True)
class Protocol:
    """A benchmark's scoring protocol.

    Attributes:
        name: Benchmark name.
        alphas: PCK thresholds as fractions of the per-pair ``threshold``.
        threshold: The rule giving each pair's ``threshold`` in pixels (documentation; readers apply it).
        averages: The scalar averages reported, in table order; the first is the paper's headline.
        inclusive: ``error <= alpha * threshold`` counts as correct (dense flow benchmarks); otherwise
            the keypoint convention ``error < alpha * threshold``.
        metric: What the benchmark is scored with, one of :data:`METRICS`.
        groups: Per-pair attributes that ``results.json`` breaks the PCK down by.
        group_label: What the per-group dictionary of the results is called.
        flip_pairs: The name of the benchmark's left/right keypoint table for test-time pose alignment
            (``lightning_modules.components.pose_alignment.FLIP_TABLES``), or None when its keypoints have no
            fixed semantic ids.
    """

    name: str
    alphas: tuple[float, ...]
    threshold: str
    averages: tuple[str, ...]
    metric: str = "keypoint_pck"
    inclusive: bool = False
    groups: tuple[str, ...] = ()
    group_label: str = "per_category"
    flip_pairs: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"protocol {self.name!r}: unknown metric {self.metric!r}; choose one of {list(METRICS)}")


PROTOCOLS: dict[str, Protocol] = {
    "spair": Protocol(
        name="SPair-71k",
        alphas=(0.01, 0.05, 0.1),
        threshold="max(w, h) of the target bbox",
        averages=("category_mean", "weighted", "per_point", "per_image"),
        groups=SPAIR_VARIATIONS,
        flip_pairs="spair",
    ),
    "pfpascal": Protocol(
        # sd-dino load_pascal_data: thresholds None -> alpha * image size; `err < threshold` (strict).
        name="PF-Pascal",
        alphas=(0.05, 0.1, 0.15),
        threshold="max(w, h) of the target image",
        averages=("weighted", "category_mean", "per_point", "per_image"),
    ),
    "pfwillow": Protocol(
        # HPF (data/pfwillow.py, thres='bbox'): max side of the box around the TARGET keypoints, and
        # `torch.le` (inclusive) in its correct_kps, as weakalign and DenseMatching (`epe.le`); HPF
        # reports the mean over pairs (per_image).
        name="PF-Willow",
        alphas=(0.05, 0.1, 0.15),
        threshold="max(w, h) of the box around the target keypoints",
        averages=("per_image", "per_point", "category_mean"),
        inclusive=True,
    ),
    "cub": Protocol(
        name="CUB-200-2011 (ASIC)",
        alphas=(0.1, 0.05, 0.01),
        # Keypoints live in the protocol's 256 px square crops (datamodules/cub.py), so every pair's
        # threshold is the crop side: PCK@alpha counts error < alpha * 256 (ASIC's compute_pck).
        threshold="alpha * 256 (the side of the ASIC square crop)",
        # ASIC scores one class per run (per-point pooled); the paper's single number over the first three
        # classes is their mean: category_mean is the headline, per_category holds ASIC's per-run numbers.
        averages=("category_mean", "per_point", "per_image"),
        flip_pairs="cub",
    ),
    "tss": Protocol(
        name="TSS",
        alphas=(0.05,),
        threshold="max(H, W) of the source image",
        averages=("per_image", "per_pixel", "dataset_mean"),
        metric="flow_pck",
        inclusive=True,
        group_label="per_dataset",
    ),
    "davis": Protocol(
        # label propagation (supplementary B.1): the first frame's annotation carried to every later frame;
        # J = region IoU and F = boundary F-measure per object (the DAVIS-2017 toolkit's definitions)
        name="DAVIS-2017 label propagation",
        alphas=(),
        threshold="none: J is IoU, F matches boundaries within 0.008 x the image diagonal",
        averages=("JF_mean", "J_mean", "F_mean"),
        metric="label_jf",
        group_label="per_sequence",
    ),
}


def get_protocol(name: str) -> Protocol:
    """Look a protocol up by its key (``spair``, ``pfpascal``, ``pfwillow``, ``cub``, ``tss``, ``davis``)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}") from None
