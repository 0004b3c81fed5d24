"""Names of a package imported on first use (a module ``__getattr__``, PEP 562): importing the package stays
light, and each public name is still where it was. Used by ``lightning_modules/__init__.py`` (so the plain-torch
core imports without Lightning) and ``datamodules/__init__.py`` (so the CLI's early checks import without torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose public names live in the submodules ``where``
    names (``{name: ".submodule"}``); a name is imported once, on first use, then kept in the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook's own name
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*namespace, *where})

    return __getattr__, __dir__
