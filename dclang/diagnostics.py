"""Diagnostics are data until the CLI renders them.

Every stage of dclang reports problems as `Diagnostic` values instead of raising at the
first one, so `dclang check` can show every mistake in a file at once and golden tests can
pin the exact text. `render` is the only place that turns them into words on a terminal.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence


@dataclass(frozen=True, order=True)
class Span:
    """A region of source text, 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def from_meta(cls, meta) -> "Span":
        return cls(meta.line, meta.column, meta.end_line, meta.end_column)

    @classmethod
    def from_token(cls, token) -> "Span":
        return cls(token.line, token.column, token.end_line, token.end_column)

    def join(self, other: "Span") -> "Span":
        start = min((self.line, self.column), (other.line, other.column))
        end = max((self.end_line, self.end_column), (other.end_line, other.end_column))
        return Span(start[0], start[1], end[0], end[1])


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Diagnostic:
    """One problem: a stable code, what is wrong, where, and what would be right."""

    code: str
    message: str
    span: Span | None
    label: str = ""
    help: str = ""
    severity: Severity = Severity.ERROR

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


def error(code: str, message: str, span: Span | None, label: str = "", help: str = "") -> Diagnostic:
    return Diagnostic(code, message, span, label, help, Severity.ERROR)


def warning(code: str, message: str, span: Span | None, label: str = "", help: str = "") -> Diagnostic:
    return Diagnostic(code, message, span, label, help, Severity.WARNING)


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt word, or None when nothing is close."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def did_you_mean(word: str, candidates: Iterable[str], what: str = "") -> str:
    """A help line: a suggestion when one is close, else the list of what is known."""
    candidates = sorted(set(candidates))
    best = suggest(word, candidates)
    if best is not None:
        return f"did you mean `{best}`?"
    if not candidates:
        return ""
    shown = ", ".join(f"`{c}`" for c in candidates[:12])
    more = f" and {len(candidates) - 12} more" if len(candidates) > 12 else ""
    return f"known {what or 'names'}: {shown}{more}"


@dataclass
class DiagnosticError(Exception):
    """Raised by API entry points (`dclang.load`) when a file has errors; carries them all."""

    diagnostics: Sequence[Diagnostic]
    path: str = "<input>"
    source: str = ""
    _text: str = field(default="", repr=False)

    def __str__(self) -> str:
        return render_all(self.diagnostics, self.source, self.path, color=False)


def _gutter_width(diagnostics: Sequence[Diagnostic]) -> int:
    lines = [d.span.end_line for d in diagnostics if d.span]
    return len(str(max(lines))) if lines else 1


def render(diag: Diagnostic, source: str, path: str, color: bool = False, width: int | None = None) -> str:
    """Render one diagnostic the way rustc does: header, location, line, caret, help."""

    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    sev_color = "1;31" if diag.is_error else "1;33"
    out = [paint(f"{diag.severity.value}[{diag.code}]", sev_color) + paint(f": {diag.message}", "1")]
    lines = source.splitlines()
    if diag.span is None:
        out.append(f"  --> {path}")
    else:
        sp = diag.span
        w = width or len(str(sp.line))
        pad = " " * w
        out.append(f"{pad}--> {path}:{sp.line}:{sp.column}")
        text = lines[sp.line - 1] if 0 < sp.line <= len(lines) else ""
        text = text.replace("\t", " ")
        if sp.end_line == sp.line:
            end = max(sp.end_column, sp.column + 1)
        else:
            end = len(text) + 1
        carets = "^" * max(1, min(end, len(text) + 1) - sp.column)
        out.append(f"{pad} |")
        out.append(f"{sp.line:>{w}} | {text}")
        marker = " " * (sp.column - 1) + paint(carets, sev_color)
        if diag.label:
            marker += " " + paint(diag.label, sev_color)
        out.append(f"{pad} | {marker}")
        if diag.help:
            out.append(f"{pad} |")
    if diag.help:
        out.append(f"{' ' * (width or (len(str(diag.span.line)) if diag.span else 1))} = help: {diag.help}")
    return "\n".join(out)


def sort_key(diag: Diagnostic):
    sp = diag.span
    return (sp.line, sp.column) if sp else (0, 0)


def render_all(diagnostics: Sequence[Diagnostic], source: str, path: str, color: bool = False) -> str:
    """Every diagnostic in source order, separated by blank lines."""
    ordered = sorted(diagnostics, key=sort_key)
    width = _gutter_width(ordered)
    return "\n\n".join(render(d, source, path, color, width) for d in ordered)


class UserError(Exception):
    """A mistake the user can fix (a missing file, a bad device): a message and what to do.

    The CLI prints it without a traceback; `--debug` shows one.
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message
