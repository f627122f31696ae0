"""The run directory: what a training run leaves on disk, every file written atomically.

```
RUN_DIR/
  graph.kt              the resolved graph in canonical form (defaults, overrides, epochs and seed filled in)
  graph.svg             its drawing (when Graphviz's `dot` is installed)
  metrics.jsonl         one JSON record per finished epoch
  summary.json          the run so far: per-node accuracies, timings, versions (rewritten each epoch)
  checkpoints/last.pt   everything needed to resume at the end of the last finished epoch
  checkpoints/best.pt   the models at the epoch of the target's best validation accuracy
```

A kill at any moment leaves each file whole (old or new). Within an epoch the files are
written in the order metrics, summary, best, last: `last.pt` is the commit point, and a
resume truncates `metrics.jsonl` back to the epoch `last.pt` holds, so the two always agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import networkx as nx

from dclang.checkpoints import CheckpointError, atomic_save, atomic_write_text, load_safely
from dclang.diagnostics import Span, UserError
from dclang.syntax import ast
from dclang.syntax.format import format_module

RUN_FORMAT = "dclang-run/1"
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
                 else _name(spec.model))
        attrs = [ast.Attribute(_name(key), None, _NOWHERE)
                 for key, on in (("target", spec.target), ("frozen", spec.declared_frozen)) if on]
        if spec.init is not None:
            attrs.append(ast.Attribute(_name("init"), ast.String(spec.init, _NOWHERE), _NOWHERE))
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


# ---------------------------------------------------------------- the folder


class RunDir:
    """The files of one run under `root` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.graph_kt = self.root / "graph.kt"
        self.graph_svg = self.root / "graph.svg"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.last = self.root / "checkpoints" / "last.pt"
        self.best = self.root / "checkpoints" / "best.pt"

    def write_graph(self, graph: nx.DiGraph, text: str) -> None:
        """graph.kt, and graph.svg when `dot` can draw it (a picture is a convenience, never
        a reason to fail a run)."""
        atomic_write_text(text, self.graph_kt)
        if shutil.which("dot") is None:
            return
        try:
            from dclang.draw import render
        except ImportError:
            return
        render(graph, self.graph_svg)

    def write_metrics(self, records: list[dict]) -> None:
        """The whole file each epoch (a few hundred lines at most): an append could tear."""
        atomic_write_text("".join(json.dumps(r) + "\n" for r in records), self.metrics)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(json.dumps(summary, indent=2) + "\n", self.summary)

    def read_summary(self) -> dict | None:
        return json.loads(self.summary.read_text(encoding="utf-8")) if self.summary.is_file() else None

    def save_last(self, state: dict) -> None:
        atomic_save({"format": RUN_FORMAT, **state}, self.last)

    def save_best(self, state: dict) -> None:
        atomic_save({"format": RUN_FORMAT, **state}, self.best)

    def load_last(self) -> dict:
        """`checkpoints/last.pt`, or a UserError saying why it cannot resume this run."""
        try:
            state = load_safely(self.last)
        except CheckpointError as exc:
            raise UserError(f"cannot resume from {self.last}: it {exc}",
                            f"{exc.help}; delete {self.root} to start the run afresh") from exc
        if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
            raise UserError(f"cannot resume from {self.last}: it is not a dclang run checkpoint",
                            f"delete {self.root} to start the run afresh")
        return state

