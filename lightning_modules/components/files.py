"""Output files written whole or not at all: a temporary name in the same folder, synced, then renamed.

A reader (a person, a resumed run, W&B) never finds a torn file where it looks: a write that fails (a full
disk, a file-size limit, a killed process) leaves the previous file, or none, and no temporary file when the
process lives to clean up. Plain Python.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

__all__ = ["OutputWriteError", "save_image_atomically", "write_atomically"]


class OutputWriteError(OSError):
    """An output file could not be written (its message names the file and the system's reason)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno N]" prefix


def write_atomically(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` through ``.<name>.<pid>.tmp`` beside it, renamed over ``path`` once complete.

    Raises:
        OutputWriteError: The data could not be written (``path`` is then as before and the temporary file is
            removed); its ``errno`` is the system's (ENOSPC: the disk is full, EFBIG: a file-size limit).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(err.errno, f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_image_atomically(picture: Any, path: str | os.PathLike, **options: Any) -> None:
    """``picture.save(path, **options)`` (a PIL image; the format from the suffix) through :func:`write_atomically`."""
    buffer = io.BytesIO()
    picture.save(buffer, format=options.pop("format", None) or _format(path), **options)
    write_atomically(path, buffer.getvalue())


def _format(path: str | os.PathLike) -> str:
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    if suffix not in Image.EXTENSION:
        raise ValueError(f"cannot tell the image format of {path} from its suffix")
    return Image.EXTENSION[suffix]
