"""The first checks of the own-images inputs (:func:`datamodules.own_images.read_image_pairs`): which options go
together and whether the files and folders they name exist.

Standard library only, so that ``cli.run_script`` can run them before torch and Lightning are imported and
answer a typo in a path at once; the full check (every image decoded, every point) runs them again, so each
message has one home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["check_input_paths", "no_such_image"]


def no_such_image(path: Path, where: str) -> FileNotFoundError:
    """The error for an image file that does not exist, naming the field (``where``) and the path."""
    return FileNotFoundError(f"{where}: no such image file {path}")


def check_input_paths(
    pairs: str | None = None,
    source: str | None = None,
    targets: str | None = None,
    source_keypoints: Any = None,
    grid: Any = 6,
) -> None:
    """Check the options of :class:`datamodules.ImagePairsDataModule` that need no image read: ``grid`` is
    positive, either ``pairs`` or ``source`` with ``targets`` is given (``source_keypoints`` only with
    ``source``), and the pairs file, the source image and the targets folder exist.

    Raises:
        FileNotFoundError: A file or folder that does not exist (named with its field).
        ValueError: Options that do not go together, or a grid that is not positive.
    """
    if int(grid) < 1:
        raise ValueError(f"data.grid must be a positive number of points per side, got {grid}")
    if (pairs is None) == (source is None):
        raise ValueError("give either data.pairs (a pairs file) or data.source with data.targets (a folder)")
    if pairs is not None:
        if targets is not None or source_keypoints is not None:
            raise ValueError("data.targets and data.source_keypoints go with data.source; a pairs file holds its own")
        file = Path(pairs).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"pairs file not found: {file}")
        return
    if targets is None:
        raise ValueError("data.source needs data.targets: the folder whose images it is matched to")
    image = Path(source).expanduser().resolve()  # type: ignore[arg-type]
    if not image.is_file():
        raise no_such_image(image, "data.source")
    folder = Path(targets).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.targets: no such folder {folder}")
