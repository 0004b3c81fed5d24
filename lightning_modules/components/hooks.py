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
    run: Callable[[], Any],
    modules: Mapping[str, nn.Module],
    stop_early: bool = True,
    inputs: Mapping[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Call ``run()`` and return the outputs of ``modules`` (and the inputs of ``inputs``) by name.

    Args:
        run: Zero-argument callable that runs the network forward.
        modules: Name -> submodule whose forward output is captured.
        stop_early: Abort the forward pass once everything has been captured.
        inputs: Name -> submodule whose first positional input is captured (a forward pre-hook).

    Returns:
        Name -> captured activation tensor.

    Raises:
        RuntimeError: If a module never ran during the forward pass.
    """
    captured: dict[str, torch.Tensor] = {}
    inputs = inputs or {}
    wanted = len(modules) + len(inputs)

    def store(name: str, value: Any) -> None:
        captured[name] = first_tensor(value)
        if stop_early and len(captured) == wanted:
            raise _AllCaptured

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store(name, output)

        return hook

    def make_pre_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any) -> None:
            store(name, args)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    handles += [module.register_forward_pre_hook(make_pre_hook(name)) for name, module in inputs.items()]
    try:
        run()
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted((set(modules) | set(inputs)) - set(captured))
    if missing:
        raise RuntimeError(f"forward pass finished without reaching modules {missing}")
    return captured
