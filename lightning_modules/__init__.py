"""SD-DINO Lightning: semantic correspondence with fused Stable Diffusion and DINOv2 features."""

from .ablation import ZeroShotAblation
from .components.ablation import AblationRow
from .projection import ProjectionHeadTraining
from .zero_shot import ZeroShotCorrespondence

__all__ = ["AblationRow", "ProjectionHeadTraining", "ZeroShotAblation", "ZeroShotCorrespondence"]
