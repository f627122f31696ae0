"""The public entry points: parse, check, load.

`check` never raises for a user's mistake: it returns the graph (or None) and every
diagnostic. `load` is for programs: it raises `DiagnosticError` carrying all of them.
"""

from __future__ import annotations

import codecs
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
    from dclang.passes.check_structure import too_many_nodes

    module, diags = parse_module(text)
    if module is None:
        return Checked(path, text, None, None, tuple(diags))
    too_large = too_many_nodes(module)
    if too_large:
        return Checked(path, text, module, None, tuple(too_large))
    graph = build_graph(module)
    graph.graph["path"] = path
    found = []
    for run_pass in PASSES:
        found += run_pass(module, graph)
    found.sort(key=sort_key)
    return Checked(path, text, module, graph, tuple(found))


#: the largest `.kt` file read: a graph is a few KB, a large search template a few dozen;
#: anything near this is the wrong file (a log, a dataset), and would take minutes to check
MAX_SOURCE_BYTES = 1 << 20


def read_source(path: str | Path) -> str:
    """The text of a `.kt` file (UTF-8; a leading byte order mark is dropped, as editors on
    Windows write one; line ends read as `\n`, as Python reads text); DiagnosticError E001
    when it cannot be read, is not a regular file, is larger than `MAX_SOURCE_BYTES`, or is
    not UTF-8 text (UTF-16, or binary bytes such as NUL), each said in words."""
    from dclang.diagnostics import error, not_a_file

    path = Path(path)

    def refuse(reason: str) -> DiagnosticError:
        return DiagnosticError([error("E001", f"cannot read {path}: {reason}", None)], str(path), "")

    problem = not_a_file(path)
    if problem is not None:
        raise refuse(f"it {problem}")
    try:
        size = path.stat().st_size
        if size > MAX_SOURCE_BYTES:
            raise refuse(f"it is {size / 2**20:,.1f} MiB, and a .kt file is at most {MAX_SOURCE_BYTES >> 20} MiB "
                         "(a graph is a few KB): is it the right file?")
        raw = path.read_bytes()
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise refuse("it is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8 (text editors "
                     "offer it under Save As / Encoding)")
    raw = raw.removeprefix(codecs.BOM_UTF8)
    nul = raw.find(b"\x00")
    try:
        text = raw.decode("utf-8")
        bad = len(raw)
    except UnicodeDecodeError as exc:
        bad = exc.start
    if 0 <= nul < bad:
        line = raw[:nul].count(b"\n") + 1
        raise refuse(f"byte 0x00 (NUL) on line {line}: a .kt file is text, and NUL is in no text; if it is UTF-16, "
                     "save it as UTF-8")
    if bad < len(raw):
        line = raw[:bad].count(b"\n") + 1
        raise refuse(f"byte {raw[bad]:#04x} on line {line} is not UTF-8; save the file as UTF-8 "
                     "(text editors offer it under Save As / Encoding)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
