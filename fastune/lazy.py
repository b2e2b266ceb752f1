"""Names a package exports without importing them until first use (PEP 562), so that
light entry points (``fastune --version``, the config loader, the layout module) do
not import torch through a package ``__init__``."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``table[name]`` (a module path) on first
    access of ``name`` and returns that module's attribute of the same name."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
