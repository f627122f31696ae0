"""Diagnostics are data until the CLI renders them.

Every stage of dclang reports problems as `Diagnostic` values instead of raising at the
first one, so `dclang check` can show every mistake in a file at once and golden tests can
pin the exact text. `render` is the only place that turns them into words on a terminal.
"""

from __future__ import annotations

import difflib
import errno
import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
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


#: at most this many diagnostics are rendered; the rest are counted (rustc and Elm stop too:
#: past the first few dozen, more of the same helps nobody, and a generated file can hold
#: tens of thousands)
MAX_SHOWN = 50
#: a source line is shown in a window of at most this many characters around the caret
EXCERPT_WIDTH = 100
#: a message, label or help line is cut to this many characters (it can quote a long name)
MAX_TEXT = 300
_MORE = "..."


#: control characters as the Unicode pictures of them (NUL as U+2400), one column wide each:
#: a NUL or an escape sequence in a file is shown, never sent to the terminal to act on
_VISIBLE = {**{code: 0x2400 + code for code in range(32) if code != 0x0A}, 0x09: 0x20, 0x7F: 0x2421}


def visible(text: str) -> str:
    """`text` with its control characters (but line ends) shown as symbols; tabs as spaces."""
    return text.translate(_VISIBLE)


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, or its start and end around `...` when it is longer than `limit`."""
    text = visible(text)
    if len(text) <= limit:
        return text
    keep = limit - len(_MORE)
    return text[:keep - keep // 3] + _MORE + text[len(text) - keep // 3:]


def excerpt(text: str, start: int, end: int, width: int = EXCERPT_WIDTH) -> tuple[str, int, int]:
    """A window of at most `width` characters of a source line, around the 0-based columns
    [start, end) it underlines: (shown text, start and end within it). A window that does
    not reach an end of the line says so with `...`; the underline keeps pointing at the
    same characters, cut to the window when it is wider."""
    if len(text) <= width:
        return text, start, end
    room = width - 2 * len(_MORE)
    left = max(0, min(start - room // 3, len(text) - room))
    right = min(len(text), left + room)
    if left <= len(_MORE):  # no window needs `...` for fewer characters than it hides
        left, right = 0, width - len(_MORE)
    elif right >= len(text) - len(_MORE):
        left, right = len(text) - (width - len(_MORE)), len(text)
    shown = (_MORE if left else "") + text[left:right] + (_MORE if right < len(text) else "")
    offset = len(_MORE) if left else 0
    first = start - left + offset
    last = min(end, right) - left + offset
    return shown, first, max(last, first + 1)


def render(diag: Diagnostic, source: str, path: str, color: bool = False, width: int | None = None,
           lines: Sequence[str] | None = None) -> str:
    """Render one diagnostic the way rustc does: header, location, line, caret, help.

    `lines` are the source's lines when the caller has split them already (once per file,
    not once per diagnostic)."""

    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    sev_color = "1;31" if diag.is_error else "1;33"
    out = [paint(f"{diag.severity.value}[{diag.code}]", sev_color) + paint(f": {clip(diag.message)}", "1")]
    lines = source.splitlines() if lines is None else lines
    if diag.span is None:
        out.append(f"  --> {path}")
    else:
        sp = diag.span
        w = width or len(str(sp.line))
        pad = " " * w
        out.append(f"{pad}--> {path}:{sp.line}:{sp.column}")
        text = lines[sp.line - 1] if 0 < sp.line <= len(lines) else ""
        text = visible(text)
        end = max(sp.end_column, sp.column + 1) if sp.end_line == sp.line else len(text) + 1
        start = min(sp.column, len(text) + 1) - 1
        text, start, stop = excerpt(text, start, max(start + 1, min(end, len(text) + 1) - 1))
        out.append(f"{pad} |")
        out.append(f"{sp.line:>{w}} | {text}")
        marker = " " * start + paint("^" * (stop - start), sev_color)
        if diag.label:
            marker += " " + paint(clip(diag.label), sev_color)
        out.append(f"{pad} | {marker}")
        if diag.help:
            out.append(f"{pad} |")
    if diag.help:
        out.append(f"{' ' * (width or (len(str(diag.span.line)) if diag.span else 1))} = help: {clip(diag.help)}")
    return "\n".join(out)


def sort_key(diag: Diagnostic):
    sp = diag.span
    return (sp.line, sp.column) if sp else (0, 0)


def render_all(diagnostics: Sequence[Diagnostic], source: str, path: str, color: bool = False,
               limit: int = MAX_SHOWN) -> str:
    """The first `limit` diagnostics in source order, separated by blank lines, then how many
    more there are (errors and warnings counted apart)."""
    ordered = sorted(diagnostics, key=sort_key)
    shown, rest = ordered[:limit], ordered[limit:]
    width = _gutter_width(shown)
    lines = source.splitlines()
    out = [render(d, source, path, color, width, lines) for d in shown]
    if rest:
        errors = sum(d.is_error for d in rest)
        counts = [f"{n:,} more {word}{'s' * (n != 1)}"
                  for n, word in ((errors, "error"), (len(rest) - errors, "warning")) if n]
        out.append(f"note: {' and '.join(counts)} in {path} not shown (dclang shows the first {limit}); "
                   "fix these and check again")
    return "\n\n".join(out)


_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def _mode(path: str | os.PathLike) -> int | str:
    """The file's mode, or why there is none, in words that fit after its name."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def _kind(mode: int) -> str:
    return next((word for test, word in _KINDS if test(mode)), "something else")


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file, in words that fit after its name ("does not
    exist", "is a directory", "is a character device, not a regular file"); None when it is
    a regular file. A device such as /dev/zero would never end, so it is refused unread."""
    mode = _mode(path)
    if isinstance(mode, str):
        return mode
    if stat.S_ISREG(mode):
        return None
    return "is a directory" if stat.S_ISDIR(mode) else f"is {_kind(mode)}, not a regular file"


def not_a_folder(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a folder ("does not exist", "is a file, not a folder");
    None when it is one."""
    mode = _mode(path)
    if isinstance(mode, str):
        return mode
    return None if stat.S_ISDIR(mode) else f"is {_kind(mode)}, not a folder"


def unwritable(path: str | os.PathLike, exc: OSError, *, folder: bool = False) -> UserError:
    """The UserError for an output that could not be written (`folder`: a folder to write
    files into): what is in the way (a file where a folder should be, a folder where the file
    should be, a folder without write permission, a read-only or full disk), named by its path."""
    path = Path(path)
    here = path if folder and path.is_dir() else next((p for p in path.parents if os.path.lexists(p)), Path("."))
    if not folder and path.is_dir():
        why, fix = f"{path} is a folder", "give the path of a file in it"
    elif (folder or exc.errno == errno.EEXIST) and os.path.lexists(path) and not path.is_dir():
        why, fix = f"{path} is a file, not a folder", f"write somewhere else, or move {path} out of the way"
    elif not here.is_dir():
        why, fix = f"{here} is a file, not a folder", f"write somewhere else, or move {here} out of the way"
    elif exc.errno == errno.EROFS:
        why, fix = f"{here} is on a read-only file system", "write to a folder on a writable disk"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why, fix = (f"there is no permission to write in {here}",
                    "write to a folder you own, or change its permissions")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = f"the disk holding {here} is full", "free some space, or write to another disk"
    else:
        why, fix = exc.strerror or str(exc), "write to another folder"
    return UserError(f"cannot write {'into ' if folder else ''}{path}: {why}", fix)


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
