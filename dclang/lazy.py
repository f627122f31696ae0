"""Lazy package exports (PEP 562), so importing a package does not import torch.

`dclang check` imports `dclang.data.catalog` and the CLI imports `dclang.train.command`;
Python runs each package's `__init__` first, so those must name their torch-based exports
without importing them. `lazy_exports` gives a package the `__getattr__` and `__dir__` that
import such a name on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose `names` map to the modules defining them."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
