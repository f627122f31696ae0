"""Training a checked graph: the loop, teachers, the run directory, metrics, and the CLI.

    >>> from dclang.train import train_graph
    >>> result = train_graph(dclang.load("examples/quickstart.kt"), run_dir=Path("runs/quickstart"))

The CLI imports `dclang.train.command` at start-up, which imports this package first, so it
must not import torch: the names below are imported on first use (PEP 562 `__getattr__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dclang.lazy import lazy_exports

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from dclang.train.loop import RunResult, train_graph
    from dclang.train.run import Run, resolve_device
    from dclang.train.rundir import RunDir, graph_key, graph_text
    from dclang.train.teachers import default_cache

_LAZY = {
    "train_graph": "dclang.train.loop", "RunResult": "dclang.train.loop", "resolve_device": "dclang.train.run",
    "Run": "dclang.train.run",
    "RunDir": "dclang.train.rundir", "graph_text": "dclang.train.rundir", "graph_key": "dclang.train.rundir",
    "default_cache": "dclang.train.teachers",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
