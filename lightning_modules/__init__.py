"""SD-DINO Lightning: semantic correspondence with fused Stable Diffusion and DINOv2 features."""

from .ablation import ZeroShotAblation
from .components.ablation import AblationRow
from .dense import DenseCorrespondence
from .point_transfer import PointTransfer
from .projection import ProjectionHeadTraining
from .swap import InstanceSwap
from .zero_shot import ZeroShotCorrespondence

__all__ = [
    "AblationRow",
    "DenseCorrespondence",
    "InstanceSwap",
    "PointTransfer",
    "ProjectionHeadTraining",
    "ZeroShotAblation",
    "ZeroShotCorrespondence",
]
