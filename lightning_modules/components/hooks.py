"""Forward hooks that capture intermediate activations and stop the network once all are captured.

Both featurizers need activations from the middle of a network (UNet decoder layers, a ViT block).
Running the rest of the network would waste time (the last UNet up-block at full resolution is the most
expensive one), so :func:`run_and_capture` raises an internal exception from the hook of the last
module it waits for and returns what it collected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["run_and_capture", "first_tensor"]


class _AllCaptured(Exception):
    """Raised inside a hook once every requested activation is captured."""


def first_tensor(output: Any) -> torch.Tensor:
    """Return the activation tensor of a module output (a tensor, a tuple or a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    for attr in ("sample", "last_hidden_state"):
        if hasattr(output, attr):
            return getattr(output, attr)
    raise TypeError(f"cannot find an activation tensor in module output of type {type(output).__name__}")


def run_and_capture(
    run: Callable[[], Any], modules: Mapping[str, nn.Module], stop_early: bool = True
) -> dict[str, torch.Tensor]:
    """Call ``run()`` and return the outputs of ``modules``, keyed like ``modules``.

    Args:
        run: Zero-argument callable that runs the network forward.
        modules: Name -> submodule whose forward output is captured.
        stop_early: Abort the forward pass once every module has produced its output.

    Returns:
        Name -> captured activation tensor.

    Raises:
        RuntimeError: If a module never ran during the forward pass.
    """
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = first_tensor(output)
            if stop_early and len(captured) == len(modules):
                raise _AllCaptured

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        run()
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(modules) - set(captured))
    if missing:
        raise RuntimeError(f"forward pass finished without reaching modules {missing}")
    return captured
