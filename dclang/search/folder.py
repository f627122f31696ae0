"""`search.json`: what `dclang search --resume -o OUT` needs to find the study of OUT.

It holds the study's name, its storage and, for the reader, the template's path. A path is stored relative
to OUT, so a search folder that is copied resumes its own study (not the original's) and one
that is moved still finds it; an absolute path would tie the folder to where it was made.
A URL (PostgreSQL) is stored without its password. The file is checked when it is read: a
damaged one is an error naming it and what to do, never a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dclang.diagnostics import UserError

RECORD = "search.json"


@dataclass(frozen=True)
class SearchRecord:
    """The study of a search folder: `storage` is a URL or a journal path, resolved against
    the folder (as the current process can open it)."""

    study: str
    storage: str


def is_url(storage: str) -> bool:
    return "://" in storage


def _relative(path: str | Path, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), folder.resolve())


def make_folder(folder: Path) -> None:
    """Create the output folder of a new search before any work, or say why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dclang-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the search folder {folder}: {exc.strerror or exc}",
                        "give a folder you can write to with -o") from None


def write_record(folder: Path, *, study: str, storage: str, template: Path) -> None:
    """search.json of a new search; journal and template paths relative to `folder`."""
    from dclang.checkpoints import atomic_write_text
    from dclang.search.study import redact

    stored = redact(storage) if is_url(storage) else _relative(storage, folder)
    record = {"study": study, "storage": stored, "template": _relative(template, folder)}
    atomic_write_text(json.dumps(record, indent=2) + "\n", folder / RECORD)


def read_record(folder: Path) -> SearchRecord | None:
    """The folder's search record (None when it has no search.json); UserError when the file
    cannot be read or is not one dclang wrote."""
    path = folder / RECORD
    if not path.exists():
        return None
    fix = (f"restore {path} from a copy, or resume with --storage STORAGE --study NAME (a folder's journal is "
           f"{folder / 'study.journal'}; `optuna studies --storage ...` lists the names)")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}", fix) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is damaged: it is not JSON ({exc})", fix) from None
    problem = _problem(record)
    if problem:
        raise UserError(f"{path} is damaged: {problem}", fix)
    storage = record["storage"]
    if not is_url(storage):
        storage = str(folder / storage)  # an absolute path stays absolute
    return SearchRecord(record["study"], storage)


def _problem(record) -> str:
    """What makes `record` no search record ("" when nothing does)."""
    if not isinstance(record, dict):
        return f"it holds a JSON {type(record).__name__}, not an object with `study` and `storage`"
    for key in ("study", "storage"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"`{key}` is missing or not a non-empty string"
    if "template" in record and not isinstance(record["template"], str):
        return "`template` is not a string"
    return ""


__all__ = ["RECORD", "SearchRecord", "is_url", "make_folder", "read_record", "write_record"]
