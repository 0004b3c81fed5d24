"""One helper for the end-of-run gathers of Python objects (records, pictures, ids) across processes."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["gather_from_ranks"]


def gather_from_ranks(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process).

    A collective under DDP: every process must call it, the same number of times.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
