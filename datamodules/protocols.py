"""What a benchmark's scoring protocol is: the PCK alphas, the threshold rule, the comparison, the reported
averages, the left/right keypoint table, and the metric that scores it (:meth:`Protocol.make_metric`).

Each benchmark defines its own ``PROTOCOL`` beside its reader (``spair.py``, ``pfpascal.py``, ...), and its
DataModule carries it (``protocol``); readers compute each pair's ``threshold`` (in original pixels) with the
rule it names, and the modules take the metric, alphas and averages from it. Adding a benchmark touches its own
file (and one line of :data:`BENCHMARK_MODULES` for the lookup by key). Plain Python: torch and the metrics
are imported only when a metric is made.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["BENCHMARK_MODULES", "METRICS", "Protocol", "PROTOCOLS", "SPAIR_VARIATIONS", "get_protocol"]

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
        key: Its key (``spair``, ...: :func:`get_protocol`, ``PairDataModule.protocol_name``).
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
    key: str
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

    def as_record(self) -> dict[str, Any]:
        """The protocol as ``results.json`` records it: every field but :attr:`key` (the benchmark names it)."""
        record = dataclasses.asdict(self)
        del record["key"]
        return record

    def make_metric(self, categories: Sequence[str], alphas: Sequence[float] | None = None, groups: bool = True) -> Any:
        """The metric that scores this benchmark (a torchmetrics ``Metric``): keypoint PCK
        (:class:`lightning_modules.metrics.PCK`, broken down by :attr:`groups` unless ``groups`` is False), flow
        PCK (:class:`lightning_modules.metrics.DenseFlowPCK`) or J&F
        (:class:`lightning_modules.segmentation_metrics.JAndF`), with this protocol's comparison.

        Args:
            categories: The categories (TSS: sub-datasets; DAVIS: sequences) the metric groups by.
            alphas: PCK alphas other than the protocol's (a run's ``alphas`` setting); None: :attr:`alphas`.
            groups: Break keypoint PCK down by :attr:`groups` (SPair-71k's variations).
        """
        chosen = list(self.alphas if alphas is None else alphas)
        if self.metric == "keypoint_pck":
            from lightning_modules.metrics import PCK

            return PCK(chosen, categories, groups=self.groups if groups else (), inclusive=self.inclusive)
        if self.metric == "flow_pck":
            from lightning_modules.metrics import DenseFlowPCK

            return DenseFlowPCK(chosen, categories, inclusive=self.inclusive)
        from lightning_modules.segmentation_metrics import JAndF

        return JAndF(sequences=list(categories))


#: Where each benchmark's protocol is defined: beside its reader and DataModule (``<module>.PROTOCOL``, the
#: DataModule's ``protocol``). :func:`get_protocol` and :data:`PROTOCOLS` look them up by key.
BENCHMARK_MODULES = {"spair": "spair", "pfpascal": "pfpascal", "pfwillow": "pfwillow", "cub": "cub", "tss": "tss",
                     "davis": "davis"}


def __getattr__(name: str) -> Any:
    """``PROTOCOLS``: every benchmark's protocol by key, gathered from the benchmark modules on first use."""
    if name == "PROTOCOLS":
        return {key: get_protocol(key) for key in BENCHMARK_MODULES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_protocol(name: str) -> Protocol:
    """Look a protocol up by its key (``spair``, ``pfpascal``, ``pfwillow``, ``cub``, ``tss``, ``davis``): the
    ``PROTOCOL`` of that benchmark's module (:data:`BENCHMARK_MODULES`)."""
    if name not in BENCHMARK_MODULES:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(BENCHMARK_MODULES)}")
    return importlib.import_module(f"{__package__}.{BENCHMARK_MODULES[name]}").PROTOCOL
