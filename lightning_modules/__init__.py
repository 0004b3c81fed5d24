"""SD-DINO Lightning: semantic correspondence with fused Stable Diffusion and DINOv2 features."""

from .zero_shot import ZeroShotCorrespondence

__all__ = ["ZeroShotCorrespondence"]
