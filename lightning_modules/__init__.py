"""SD-DINO Lightning: semantic correspondence with fused Stable Diffusion and DINOv2 features.

The LightningModules are imported on first use (module ``__getattr__``): ``lightning_modules.components``, the
plain-torch core, is then imported without Lightning (and without torchmetrics, which imports transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
