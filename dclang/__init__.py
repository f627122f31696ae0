"""dclang: a declarative language and compiler for knowledge transfer graphs.

    >>> import dclang
    >>> graph = dclang.load("examples/kd_dml.kt")      # parsed and checked, or DiagnosticError
    >>> sorted(graph.nodes)
    ['label', 'peer', 'student', 'teacher']

The public API is a handful of functions; heavy imports (torch, optuna) happen only when a
function that needs them is called.
"""

from dclang.api import check, load, parse
from dclang.diagnostics import Diagnostic, DiagnosticError, Span

__all__ = ["parse", "load", "check", "Diagnostic", "DiagnosticError", "Span"]
__version__ = "0.1.0"
