"""Lightning callbacks: output writers, visualisation, progress and W&B logging."""

from .config_logging import LoggerSaveConfigCallback
from .match_writer import MatchWriter
from .picture_writer import PictureWriter
from .prediction_writer import CorrespondenceWriter
from .progress import PairProgressBar
from .viewer_writer import ViewerWriter
from .visualization import CorrespondenceVisualizer
from .wandb_logging import AutoWandbLogger, WandbResults

__all__ = [
    "AutoWandbLogger",
    "CorrespondenceVisualizer",
    "CorrespondenceWriter",
    "LoggerSaveConfigCallback",
    "MatchWriter",
    "PairProgressBar",
    "PictureWriter",
    "ViewerWriter",
    "WandbResults",
]
