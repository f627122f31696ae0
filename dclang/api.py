"""The public entry points: parse, check, load.

`check` never raises for a user's mistake: it returns the graph (or None) and every
diagnostic. `load` is for programs: it raises `DiagnosticError` carrying all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from dclang.diagnostics import Diagnostic, DiagnosticError, sort_key
from dclang.ir import build_graph
from dclang.syntax import ast
from dclang.syntax.parser import parse_module


@dataclass(frozen=True)
class Checked:
    """What checking a file gives: its text, AST, IR and every diagnostic, in source order."""

    path: str
    source: str
    module: ast.Module | None
    graph: nx.DiGraph | None
    diagnostics: tuple[Diagnostic, ...]

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors


def parse(text: str) -> ast.Module:
    """Parse `.kt` text to an AST; raises DiagnosticError on a syntax error."""
    module, diags = parse_module(text)
    if module is None:
        raise DiagnosticError(diags, "<input>", text)
    return module


def check(text: str, path: str = "<input>") -> Checked:
    """Parse, lower and run every pass; collect all diagnostics."""
    from dclang.passes import PASSES

    module, diags = parse_module(text)
    if module is None:
        return Checked(path, text, None, None, tuple(diags))
    graph = build_graph(module)
    graph.graph["path"] = path
    found = []
    for run_pass in PASSES:
        found += run_pass(module, graph)
    found.sort(key=sort_key)
    return Checked(path, text, module, graph, tuple(found))


def read_source(path: str | Path) -> str:
    """The text of a `.kt` file (UTF-8; a leading byte order mark is dropped, as editors on
    Windows write one); DiagnosticError E001 when it cannot be read or decoded."""
    from dclang.diagnostics import error, not_a_file

    path = Path(path)
    problem = not_a_file(path)
    if problem is not None:
        raise DiagnosticError([error("E001", f"cannot read {path}: it {problem}", None)], str(path), "")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            line = exc.object[:exc.start].count(b"\n") + 1
            reason = (f"byte {exc.object[exc.start]:#04x} on line {line} is not UTF-8; save the file as UTF-8 "
                      "(text editors offer it under Save As / Encoding)")
        else:
            reason = exc.strerror or str(exc)
        raise DiagnosticError([error("E001", f"cannot read {path}: {reason}", None)], str(path), "") from None


def check_file(path: str | Path) -> Checked:
    try:
        text = read_source(path)
    except DiagnosticError as exc:
        return Checked(str(path), "", None, None, tuple(exc.diagnostics))
    return check(text, str(path))


def load(path: str | Path) -> nx.DiGraph:
    """A checked IR from a file, or DiagnosticError with every problem in it."""
    checked = check_file(path)
    if not checked.ok:
        raise DiagnosticError(checked.diagnostics, checked.path, checked.source)
    return checked.graph
