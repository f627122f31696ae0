"""The run directory: what a training run leaves on disk, every file written atomically.

```
RUN_DIR/
  dclang-run.json       the manifest: marks the folder as a dclang run folder (written first)
  dclang-run.lock       held (flock) by the process training into the folder; says who it is
  graph.kt              the resolved graph in canonical form (defaults, overrides, epochs and seed filled in)
  graph.svg             its drawing (when Graphviz's `dot` is installed)
  metrics.jsonl         one JSON record per finished epoch
  summary.json          the run so far: per-node accuracies, timings, versions (rewritten each epoch)
  checkpoints/last.pt   everything needed to resume at the end of the last finished epoch
  checkpoints/previous.pt  last.pt of the epoch before (the fallback if last.pt is damaged)
  checkpoints/best.pt   the models at the epoch of the target's best validation accuracy
  curves/NODE.png       per node accuracy and loss over the epochs (`dclang run`, at its end: dclang.plots)
```

dclang never overwrites what it did not write: it writes a run only into a new or empty
folder, or one its manifest marks as a dclang run folder (`claim`, before any work), so
`-o .` beside the user's own files is refused rather than clobbering their `graph.kt`.

A run folder belongs to one process at a time: `claim` takes an exclusive `flock` on
`dclang-run.lock` and writes there who holds it (pid, host, command, since when), so a second
run into the folder (`dclang run -o X` twice, a `--resume` while the run goes on) is refused
with the other process named, instead of both writing one folder. The operating system
releases the lock when its process ends, however it ends, so a killed run leaves no stale
lock: the file stays, but nobody holds it. Never delete the file by hand while a run holds it.

A kill at any moment leaves each file whole (old or new). Within an epoch the files are
written in the order metrics, summary, best, last: `last.pt` is the commit point, and a
resume truncates `metrics.jsonl` back to the epoch `last.pt` holds, so the two always agree.
Every file read back is validated: a damaged one is a `UserError` naming it, what is wrong
and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

import networkx as nx

from dclang.checkpoints import CheckpointError, atomic_save, atomic_write_bytes, atomic_write_text, load_safely
from dclang.diagnostics import Span, UserError
from dclang.ema import DEFAULT_DECAY
from dclang.syntax import ast
from dclang.syntax.format import format_module, format_value
from dclang.views import SHARED

RUN_FORMAT = "dclang-run/1"
MANIFEST = "dclang-run.json"
LOCK = "dclang-run.lock"
#: the lock files this process holds, by resolved folder (a second claim of one folder by the
#: same process, a run trained again in one test, finds it held by itself)
_HELD: dict[str, IO[str]] = {}
#: what a run folder of a dclang without manifests held
_RUN_FILES = {"graph.kt", "graph.svg", "metrics.jsonl", "summary.json", "checkpoints", "curves"}
_NOWHERE = Span(0, 0, 0, 0)


# ---------------------------------------------------------------- graph.kt


def _value(v: Any) -> ast.Value:
    """A resolved Python setting value as an AST value (bare words are identifiers)."""
    if isinstance(v, bool):
        return ast.Bool(v, _NOWHERE)
    if isinstance(v, int):
        return ast.Number(v, str(v), _NOWHERE)
    if isinstance(v, float):
        return ast.Number(v, repr(v), _NOWHERE)
    if isinstance(v, str):
        return ast.Ident(v, _NOWHERE)
    if isinstance(v, (tuple, list)):
        return ast.ListValue(tuple(_value(i) for i in v), _NOWHERE)
    raise TypeError(f"cannot write {v!r} as a .kt value")


def _name(text: str) -> ast.Name:
    return ast.Name(text, _NOWHERE)


def _setting(key: str, value: ast.Value) -> ast.Setting:
    return ast.Setting(_name(key), value, _NOWHERE)


def _call(name: str, args: dict[str, Any]) -> ast.Value:
    if not args:
        return ast.Ident(name, _NOWHERE)
    return ast.Call(_name(name), tuple(ast.Argument(_name(k), _value(v), _NOWHERE) for k, v in args.items()),
                    _NOWHERE)


def _derived(derived) -> ast.Derived:
    """`ema(s, decay=0.999)` (the default written out), `branch(b, from=layer3)`."""
    args = dict(derived.args)
    if derived.kind == "ema":
        args.setdefault("decay", DEFAULT_DECAY)
    return ast.Derived(derived.kind, _name(derived.source),
                       tuple(ast.Argument(_name(k), _value(v), _NOWHERE) for k, v in args.items()), _NOWHERE)


def graph_module(graph: nx.DiGraph, *, with_seed: bool = True) -> ast.Module:
    """The IR as an AST with every value resolved, for the canonical formatter.

    Everything the IR fills in is written out (data and train defaults, optimizer and
    schedule arguments, one line per edge, `cutoff` ones included) so that `graph.kt`
    alone reproduces the run, whatever defaults a later dclang has. Comments are not kept:
    they are in the user's file, not in the IR.
    """
    data, train = graph.graph["data"], graph.graph["train"]
    data_settings = [_setting("val_split", _value(data.val_split)), _setting("split_seed", _value(data.split_seed)),
                     _setting("augment", _value(data.augment)), _setting("pad", _value(data.pad))]
    if data.path is not None:
        data_settings.append(_setting("path", ast.String(data.path, _NOWHERE)))
    train_settings = [_setting("epochs", _value(train.epochs)), _setting("batch", _value(train.batch)),
                      _setting("optimizer", _call(train.optimizer.name, train.optimizer.args)),
                      _setting("schedule", _call(train.schedule.name, train.schedule.args))]
    if with_seed:
        train_settings.append(_setting("seed", _value(train.seed)))
    items: list[ast.Item] = [
        ast.GraphDecl(_name(graph.graph["name"]), _NOWHERE),
        ast.DataBlock(_name(data.dataset), tuple(data_settings), _NOWHERE),
        ast.TrainBlock(tuple(train_settings), _NOWHERE),
    ]
    for name, spec in graph.nodes(data="spec"):
        if spec.is_label:
            continue
        model = (ast.Ensemble(tuple(_name(m) for m in spec.model), _NOWHERE) if spec.is_ensemble
                 else _derived(spec.derived) if spec.derived is not None else _name(spec.model))
        attrs = [ast.Attribute(_name(key), None, _NOWHERE)
                 for key, on in (("target", spec.target), ("frozen", spec.declared_frozen)) if on]
        if spec.init is not None:
            attrs.append(ast.Attribute(_name("init"), ast.String(spec.init, _NOWHERE), _NOWHERE))
        if spec.is_ensemble:
            attrs.append(ast.Attribute(_name("combine"), ast.Ident(spec.combine, _NOWHERE), _NOWHERE))
        if spec.view != SHARED:  # written only when own: a graph without own views keeps its text
            attrs.append(ast.Attribute(_name("view"), ast.Ident(spec.view, _NOWHERE), _NOWHERE))
        items.append(ast.NodeDecl(_name(name), model, tuple(attrs), _NOWHERE))
    for source, target, spec in graph.edges(data="spec"):
        args = {k: v for k, v in (*spec.loss_args().items(), ("weight", spec.weight)) if v != 1.0}
        loss = ast.Call(_name(spec.loss), tuple(ast.Argument(_name(k), _value(v), _NOWHERE)
                                                for k, v in args.items()), _NOWHERE) \
            if args or spec.loss not in ("ce", "kl") else None
        layers = {f"{end}_layer": _name(layer) for end, layer in (("source", spec.source_layer),
                                                                   ("target", spec.target_layer)) if layer}
        items.append(ast.EdgeDecl(_name(source), _name(target), _name(spec.gate), loss, _NOWHERE, **layers))
    return ast.Module(tuple(items))


def graph_text(graph: nx.DiGraph) -> str:
    """The canonical `.kt` text of a resolved IR: what `graph.kt` holds."""
    return format_module(graph_module(graph))


def graph_key(text: str) -> str:
    """The text of `graph.kt` without the train seed: runs of one graph over several seeds
    share it, which is how `dclang report` groups them."""
    from dclang.api import parse

    module = parse(text)
    items = tuple(ast.TrainBlock(tuple(s for s in item.settings if s.key.text != "seed"), item.span)
                  if isinstance(item, ast.TrainBlock) else item for item in module.items)
    return format_module(ast.Module(items, module.comments))


def graph_settings(text: str) -> dict[str, str]:
    """Every setting, node and edge of a canonical `.kt` text by name (`train.epochs`,
    `node s`, `edge t->s`), each as written: what a refused resume compares."""
    from dclang.api import parse

    out: dict[str, str] = {}
    for item in parse(text).items:
        if isinstance(item, ast.GraphDecl):
            out["graph"] = item.name.text
        elif isinstance(item, ast.DataBlock):
            out["data"] = item.dataset.text
            out.update({f"data.{s.key.text}": format_value(s.value) for s in item.settings})
        elif isinstance(item, ast.TrainBlock):
            out.update({f"train.{s.key.text}": format_value(s.value) for s in item.settings})
        elif isinstance(item, ast.NodeDecl):
            out[f"node {item.name.text}"] = _declared(item)
        elif isinstance(item, ast.EdgeDecl):
            out[f"edge {item.source.text}->{item.target.text}"] = _declared(item)
    return out


def _declared(item: ast.Item) -> str:
    """What a node or edge line says after its `:` (`cnn_tiny [target]`, `through kl(T=2)`)."""
    return " ".join(format_module(ast.Module((item,))).partition(" : ")[2].split())


def setting_changes(old: object, new: str) -> list[str]:
    """What differs between two canonical texts, one `name: was X, now Y` per setting ([]
    when `old` is not a graph text at all)."""
    from dclang.diagnostics import DiagnosticError

    try:
        before, after = graph_settings(old), graph_settings(new)
    except (DiagnosticError, TypeError, AttributeError):
        return []
    return [f"{key}: was {before.get(key, '(none)')}, now {after.get(key, '(none)')}"
            for key in [*before, *(k for k in after if k not in before)] if before.get(key) != after.get(key)]


# ---------------------------------------------------------------- the folder


class RunDir:
    """The files of one run under `root` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = self.root / MANIFEST
        self.lock = self.root / LOCK
        self.graph_kt = self.root / "graph.kt"
        self.graph_svg = self.root / "graph.svg"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.last = self.root / "checkpoints" / "last.pt"
        self.previous = self.root / "checkpoints" / "previous.pt"
        self.best = self.root / "checkpoints" / "best.pt"

    # ------------------------------------------------------------ claiming the folder

    def claim(self, graph_name: str) -> None:
        """Make `root` this run's folder, before any work: refuse a path that is a file or
        under one, and a folder that holds files dclang did not write (not empty, and no
        manifest); then write the manifest, which also proves the folder writable."""
        for folder in (self.root, *self.root.parents):
            if folder.exists() and not folder.is_dir():
                where = "is a file" if folder == self.root else f"is under {folder}, which is a file"
                raise UserError(f"cannot write the run folder {self.root}: it {where}",
                                "choose a folder for the run (dclang run -o DIR)")
        if self.root.is_dir() and not self.manifest.is_file():
            others = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
            if "checkpoints" in others and set(others) <= _RUN_FILES:
                raise UserError(f"{self.root} holds a run of an earlier dclang (it has no {MANIFEST}): its checkpoints "
                                "carry no content hash, so it can be neither resumed nor overwritten",
                                f"choose a new folder for the run (dclang run -o DIR), or delete {self.root}")
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                raise UserError(f"{self.root} holds files dclang did not write ({shown}); dclang writes a run only "
                                "into a new or empty folder, or a run folder of its own, so it never overwrites "
                                "your files", "choose a new folder for the run, e.g. dclang run FILE -o runs/NAME")
        if self.manifest.is_file():
            self._check_manifest()
        self._write(self.lock, self._take_lock, before_work=True)
        import dclang

        self._write(self.manifest, lambda: atomic_write_text(json.dumps(
            {"format": RUN_FORMAT, "graph": graph_name, "dclang": dclang.__version__}, indent=2) + "\n",
            self.manifest), before_work=True)

    def _take_lock(self) -> None:
        """Hold the folder's lock for this process, or refuse, naming the process that holds it."""
        key = str(self.root.resolve())
        if key in _HELD:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read()
            handle.close()
            raise UserError(f"{self.root} is in use: {_holder(holder)} is training into it",
                            "wait for that run to end (or stop it), then run again, with --resume to continue it; "
                            "or choose another folder (-o)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": shlex.join(["dclang", *sys.argv[1:]]),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}) + "\n")
        handle.flush()
        _HELD[key] = handle

    def release(self) -> None:
        """Let the folder go (the end of `train_graph`); the end of the process does it too."""
        handle = _HELD.pop(str(self.root.resolve()), None)
        if handle is not None:
            handle.close()

    def fresh(self) -> bool:
        """Whether the folder holds nothing yet: absent, or empty (what `abandon` may undo)."""
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    def abandon(self, *, made: bool) -> None:
        """Undo a `claim` of a fresh folder, for a run refused before any work: its manifest
        and lock go, and the folder too when this run `made` it and nothing else is in it."""
        self.release()
        for path in (self.manifest, self.lock):
            path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # something else was put there meanwhile: it stays
                self.root.rmdir()

    def _check_manifest(self) -> None:
        try:
            manifest = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            manifest = exc
        if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
            raise UserError(f"{self.manifest} is not a dclang run manifest (it should hold "
                            f'{{"format": "{RUN_FORMAT}", ...}}), so {self.root} may not be a dclang run folder',
                            "choose a new folder for the run (dclang run -o DIR), or delete that folder if it is "
                            "a damaged run of yours")

    # ------------------------------------------------------------ writing

    def _write(self, path: Path, write, *, before_work: bool = False) -> None:
        """Run `write` (an atomic write of `path`); an OSError (a full disk, a folder turned
        read-only) becomes a UserError. The atomic write left the old file in place, so every
        file of the last finished epoch is intact."""
        try:
            write()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = ("choose a folder you can write to (dclang run -o DIR)" if before_work else
                    "the files of the last finished epoch are intact: fix the cause (free some space), then "
                    "continue the run with --resume")
            raise UserError(f"cannot write {path}: {reason}", hint) from exc

    def write_graph(self, graph: nx.DiGraph, text: str) -> None:
        """graph.kt, and graph.svg when Graphviz's `dot` is installed (a missing `dot` is no
        reason to fail a run)."""
        self._write(self.graph_kt, lambda: atomic_write_text(text, self.graph_kt))
        if shutil.which("dot") is None:
            return
        try:
            from dclang.draw import render
        except ImportError:
            return
        self._write(self.graph_svg, lambda: render(graph, self.graph_svg))

    def write_metrics(self, records: list[dict]) -> None:
        """The whole file each epoch (a few hundred lines at most): an append could tear."""
        text = "".join(json.dumps(r) + "\n" for r in records)
        self._write(self.metrics, lambda: atomic_write_text(text, self.metrics))

    def write_summary(self, summary: dict) -> None:
        self._write(self.summary, lambda: atomic_write_text(json.dumps(summary, indent=2) + "\n", self.summary))

    def save_last(self, state: dict) -> None:
        """last.pt, the one before kept as previous.pt (a hard link: no copy)."""
        def save() -> None:
            if self.last.is_file():
                _link_over(self.last, self.previous)
            atomic_save({"format": RUN_FORMAT, **state}, self.last)

        self._write(self.last, save)

    def save_best(self, state: dict) -> None:
        self._write(self.best, lambda: atomic_save({"format": RUN_FORMAT, **state}, self.best))

    # ------------------------------------------------------------ reading back

    def _damaged(self, path: Path, what: str) -> UserError:
        return UserError(f"{path}: {what}", f"dclang writes this file whole, so something else changed it; restore "
                         f"it, or delete the run folder {self.root} and run again")

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl, each checked: a JSON object, epochs 1, 2, ... in turn."""
        if not self.metrics.is_file():
            return []
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise self._damaged(self.metrics, f"cannot be read ({exc})") from exc
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise self._damaged(self.metrics, f"line {number} is not a JSON record ({exc.msg} at column "
                                    f"{exc.colno})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("nodes"), dict):
                raise self._damaged(self.metrics, f"line {number} is not an epoch record (a JSON object with "
                                    f"`epoch` and `nodes`)")
            if record.get("epoch") != len(records) + 1:
                raise self._damaged(self.metrics, f"line {number} is epoch {record.get('epoch')!r}, expected "
                                    f"epoch {len(records) + 1}")
            records.append(record)
        return records

    def read_summary(self) -> dict | None:
        """summary.json (None when there is none yet), checked to be a run summary."""
        if not self.summary.is_file():
            return None
        try:
            summary = json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged(self.summary, f"is not valid JSON ({exc})") from exc
        if not isinstance(summary, dict) or not isinstance(summary.get("nodes"), dict):
            raise self._damaged(self.summary, "is not a run summary (a JSON object with `nodes`)")
        return summary

    def load_last(self) -> dict:
        """`checkpoints/last.pt`, or a UserError saying why it cannot resume this run and,
        when previous.pt is intact, that it can resume from there."""
        try:
            state = _run_checkpoint(self.last)
        except CheckpointError as exc:
            fallback = self._intact_previous()
            hint = (f"{self.previous} (epoch {fallback}) is intact: copy it over {self.last} to resume from "
                    f"epoch {fallback}, or delete {self.root} to start the run afresh" if fallback else
                    f"{exc.help}; delete {self.root} to start the run afresh")
            raise UserError(f"cannot resume from {self.last}: it {exc}", hint) from exc
        return state

    def _intact_previous(self) -> int | None:
        """The epoch of previous.pt when it is intact, else None."""
        if not self.previous.is_file():
            return None
        try:
            return _run_checkpoint(self.previous).get("epoch")
        except CheckpointError:
            return None


def _holder(text: str) -> str:
    """Who holds a run folder's lock, from what its lock file says."""
    try:
        who = json.loads(text)
        return f"process {who['pid']} on {who['host']} (`{who['command']}`, since {who['since']})"
    except (json.JSONDecodeError, TypeError, KeyError):
        return "another process (it has not yet written who it is)"


def _run_checkpoint(path: Path) -> dict:
    """A run checkpoint: its content hash checked, its format dclang's."""
    state = load_safely(path, require_hash=True)
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise CheckpointError("is not a dclang run checkpoint", "E601", "it was not written by dclang run")
    return state


def _link_over(source: Path, target: Path) -> None:
    """`target` becomes the file `source` is now, atomically (a hard link renamed over it;
    a copy where the file system has no hard links)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write_bytes(source.read_bytes(), target)
        return
    os.replace(tmp, target)
