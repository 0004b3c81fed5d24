"""SD-DINO Lightning: semantic correspondence with fused Stable Diffusion and DINOv2 features.

The LightningModules are imported on first use (module ``__getattr__``): ``lightning_modules.components``, the
plain-torch core, is then imported without Lightning (and without torchmetrics, which imports transformers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

#: Each public name and the submodule that defines it.
_WHERE = {
    "AblationRow": ".components.ablation",
    "DenseCorrespondence": ".dense",
    "InstanceSwap": ".swap",
    "PointTransfer": ".point_transfer",
    "ProjectionHeadTraining": ".projection",
    "ZeroShotAblation": ".ablation",
    "ZeroShotCorrespondence": ".zero_shot",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .ablation import ZeroShotAblation
    from .components.ablation import AblationRow
    from .dense import DenseCorrespondence
    from .point_transfer import PointTransfer
    from .projection import ProjectionHeadTraining
    from .swap import InstanceSwap
    from .zero_shot import ZeroShotCorrespondence


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
