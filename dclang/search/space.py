"""The search space of a template, and one concrete graph sampled from it.

    >>> template = dclang.parse(open("examples/quickstart_search.kt").read())
    >>> [p.name for p in search_space(template)][:3]
    ['n2.model', 'n3.model', 'label->n1.gate']
    >>> trial = realize(template, {p.name: p.choices[0] for p in search_space(template)})
    >>> trial.ok, trial.key[:12]

Every `choice(...)` of a template is one categorical parameter, named by the IR
(`dclang.ir.collect_sites`: `n2.model`, `label->n1.gate`, `n2->n1.T`, `train.optimizer.lr`),
so the names users read in the leaderboard are the names `dclang check` reports. Nothing here
names a site: the walker below meets each `choice(...)` in the AST next to the IR's `Open` for
it and takes the name from there.

A sample is an AST again, not an IR: it is printed with the canonical formatter, so a trial's
`.kt` is a file a person can read, check and run. Bulk edges are written out one per pair,
because after sampling each pair has its own gate.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import networkx as nx

from dclang import registry
from dclang.api import Checked, check
from dclang.diagnostics import Span, UserError, render_all
from dclang.ensembles import LEARNED
from dclang.ir import LABEL, NO_NODE, DataSpec, Open, TrainSpec, build_graph
from dclang.passes.check_reachability import influencing_nodes
from dclang.syntax import ast
from dclang.syntax.format import format_module, format_value


@dataclass(frozen=True)
class Parameter:
    """One search parameter: a `choice(...)` site of the template.

    `choices` are what Optuna stores and the leaderboard shows: an option itself when it is a
    number, a bare word, a string or a boolean, else its text (`sgd(lr=0.1)`), because a
    categorical parameter holds only scalars. `options` are the same options as written, put
    back into the module when a trial picks one.
    """

    name: str
    choices: tuple[Any, ...]
    options: tuple[ast.Value, ...]

    def option(self, value: Any) -> ast.Value:
        """The option as written for a stored parameter value."""
        for choice, option in zip(self.choices, self.options):
            if choice == value and type(choice) is type(value):
                return option
        raise ValueError(f"`{self.name}` has no option {value!r}; its options are {list(self.choices)}")


def _choice_value(option: ast.Value) -> Any:
    if isinstance(option, (ast.Number, ast.String, ast.Bool)):
        return option.value
    if isinstance(option, ast.Ident):
        return option.name
    return format_value(option)


# ---------------------------------------------------------------- the walker

Pick = Callable[[ast.Choice, Open], ast.Value]


def _substitute(module: ast.Module, graph: nx.DiGraph, pick: Pick) -> ast.Module:
    """The module with every `choice(...)` that the IR lowered to an `Open` replaced by
    `pick(choice, open)`, and every edge written out per pair (the IR's edges, in its order).

    The IR is the source of the site names: a node's model is `spec.model`, an edge's gate is
    `spec.gate`, a setting is the field of `DataSpec`/`TrainSpec` it became. A `choice` the IR
    did not lower to a site is left in place (`search_space` reports it).
    """
    data: DataSpec | None = graph.graph["data"]
    train: TrainSpec = graph.graph["train"]

    def value(v: ast.Value, lowered: Any) -> ast.Value:
        return pick(v, lowered) if isinstance(v, ast.Choice) and isinstance(lowered, Open) else v

    def name(v: Any, lowered: Any) -> Any:
        """A model or gate: written as a bare name, which the AST holds as `Name`, not `Ident`
        (an `ensemble(...)` picked for a node stays one)."""
        picked = value(v, lowered)
        if isinstance(picked, (ast.Name, ast.Choice, ast.Ensemble, ast.Derived)):
            return picked
        text = picked.name if isinstance(picked, ast.Ident) else format_value(picked)
        return ast.Name(text, picked.span)  # a number here is reported by `check` as an unknown name

    def call_args(v: ast.Value, lowered_args: dict[str, Any]) -> ast.Value:
        if not isinstance(v, ast.Call):
            return v
        args = tuple(dataclasses.replace(a, value=value(a.value, lowered_args.get(a.name.text))) for a in v.args)
        return dataclasses.replace(v, args=args)

    def setting(s: ast.Setting, spec: Any) -> ast.Setting:
        key = s.key.text
        if key in ("optimizer", "schedule"):
            return dataclasses.replace(s, value=call_args(s.value, getattr(spec, key).args))
        return dataclasses.replace(s, value=value(s.value, getattr(spec, key, None)))

    items: list[ast.Item] = []
    absent: set[str] = set()  # ensembles, mean teachers whose choice picked `none`: left out with their edges
    # ensembles whose choice of `combine` picked a mean: the `label` edge that would learn it left out
    unlearned: set[str] = set()
    for item in module.items:
        if isinstance(item, ast.DataBlock) and data is not None:
            item = dataclasses.replace(item, settings=tuple(setting(s, data) for s in item.settings))
        elif isinstance(item, ast.TrainBlock):
            item = dataclasses.replace(item, settings=tuple(setting(s, train) for s in item.settings))
        elif isinstance(item, ast.NodeDecl):
            spec = graph.nodes[item.name.text]["spec"]
            lowered = {"init": spec.init, "combine": spec.combine, "view": spec.view}
            attrs = tuple(dataclasses.replace(a, value=value(a.value, lowered[a.name.text]))
                          if a.name.text in lowered and a.value is not None else a for a in item.attributes)
            model = name(item.model, spec.model) if isinstance(item.model, ast.Choice) else item.model
            if isinstance(model, ast.Derived) and spec.derived is not None:  # `branch(b1, from=choice(...))`
                model = dataclasses.replace(model, args=tuple(
                    dataclasses.replace(a, value=value(a.value, spec.derived.arg(a.name.text))) for a in model.args))
            if isinstance(model, ast.Name) and model.text == NO_NODE and (spec.is_ensemble or spec.is_ema):
                absent.add(item.name.text)
                continue
            combine = next((a.value for a in attrs if a.name.text == "combine"), None)
            if isinstance(spec.combine, Open) and not (isinstance(combine, ast.Ident) and combine.name == LEARNED):
                unlearned.add(item.name.text)
            item = dataclasses.replace(item, model=model, attributes=attrs)
        elif isinstance(item, ast.EdgeDecl):
            continue  # written below, one per pair
        items.append(item)
    for source, target, attrs in graph.edges(data=True):
        decl: ast.EdgeDecl = attrs["decl"]
        spec = attrs["spec"]
        gate = name(decl.gate, spec.gate)
        loss = _edge_loss(decl, spec, value, call_args)
        source_layer = _layer(decl.source_layer, spec.source_layer, value)
        target_layer = _layer(decl.target_layer, spec.target_layer, value)
        if source in absent or target in absent or (source == LABEL and target in unlearned):
            continue  # picked all the same: every site is met whatever the others picked
        items.append(ast.EdgeDecl(ast.Name(source, decl.source.span), ast.Name(target, decl.target.span),
                                  gate, loss, decl.span, bulk=False, source_layer=source_layer,
                                  target_layer=target_layer))
    return ast.Module(tuple(items), module.comments)


def _layer(expr: ast.LayerExpr | None, lowered: Any, value: Callable) -> ast.LayerExpr | None:
    """A layer endpoint with its choice picked: a layer name is written as a `Name`."""
    picked = value(expr, lowered) if expr is not None else None
    if isinstance(picked, (ast.Ident, ast.String)):
        return ast.Name(picked.name if isinstance(picked, ast.Ident) else picked.value, picked.span)
    return picked


def _edge_loss(decl: ast.EdgeDecl, spec: Any, value: Callable, call_args: Callable) -> ast.LossExpr | None:
    """The edge's loss with its choices picked: a choice of losses, then the loss's arguments."""
    loss = value(decl.loss, spec.loss) if isinstance(decl.loss, ast.Choice) else decl.loss
    if isinstance(loss, ast.Choice):
        return None  # a bulk choice of node losses, on a pair from `label`: cross-entropy (eq. 1)
    if isinstance(loss, ast.Call) and isinstance(spec.loss, str) and loss.name.text != spec.loss \
            and spec.loss in registry.LOSSES:
        # a bulk edge's `kl(...)` is cross-entropy on the pairs from `label` (and the reverse):
        # the IR keeps the pair's own loss and the options it has; so does the explicit edge
        args = tuple(a for a in loss.args if a.name.text in registry.LOSSES[spec.loss])
        loss = ast.Call(ast.Name(spec.loss, loss.name.span), args, loss.span) if args else None
    if isinstance(loss, ast.Call) and isinstance(spec.loss, str):
        loss = call_args(loss, {**spec.loss_args(), "weight": spec.weight})
    return loss


def _choices_in(obj: Any) -> Iterator[ast.Choice]:
    """Every `choice(...)` anywhere in an AST value or node."""
    if isinstance(obj, ast.Choice):
        yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _choices_in(getattr(obj, f.name))
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _choices_in(item)


# ---------------------------------------------------------------- the space


def search_space(module: ast.Module) -> list[Parameter]:
    """The template's parameters in the IR's stable site order.

    Raises UserError for a `choice(...)` where search cannot pick (a whole optimizer, a
    choice inside a list): the template says something the search would silently ignore.
    """
    graph = build_graph(module)
    found: dict[str, Parameter] = {}

    def record(choice: ast.Choice, site: Open) -> ast.Value:
        found[site.site] = Parameter(site.site, tuple(_choice_value(o) for o in choice.options), choice.options)
        return choice.options[0] if choice.options else choice

    first = _substitute(module, graph, record)
    left = next(_choices_in(first.items), None)
    if left is not None:
        raise UserError(f"line {left.span.line}, column {left.span.column}: search cannot pick this `choice(...)`",
                        "a choice can stand for a node's model, ensemble (or `none`), `init`, `combine` or `view`, an "
                        "edge's gate, its loss or one argument of the loss, a layer of an edge's end, a setting's "
                        "value, or one argument of the optimizer or schedule")
    order = [site.name for site in graph.graph["sites"]]
    return [found[name] for name in order if name in found]


def sample(module: ast.Module, params: dict[str, Any], space: list[Parameter] | None = None) -> ast.Module:
    """The concrete module for one assignment of every parameter: choices replaced by the
    options picked, bulk edges expanded into one explicit edge per pair."""
    space = search_space(module) if space is None else space
    by_name = {p.name: p for p in space}
    missing = [name for name in by_name if name not in params]
    if missing:
        raise KeyError(f"no value for the search parameter(s) {', '.join(missing)}")
    graph = build_graph(module)
    return _substitute(module, graph, lambda choice, site: by_name[site.site].option(params[site.site]))


# ---------------------------------------------------------------- preparing a template


def prepare_template(module: ast.Module, *, epochs: int | None, base: Path) -> ast.Module:
    """The template a study stores: `epochs` written into the train block when given, and
    every `init="..."` made absolute (relative paths are relative to the template file, and a
    trial's `.kt` is written elsewhere)."""
    nowhere = Span(0, 0, 0, 0)

    def absolute(v: ast.Value) -> ast.Value:
        if isinstance(v, ast.String):
            return dataclasses.replace(v, value=str((base / v.value).resolve()))
        if isinstance(v, ast.Choice):
            return dataclasses.replace(v, options=tuple(absolute(o) for o in v.options))
        return v

    items: list[ast.Item] = []
    for item in module.items:
        if isinstance(item, ast.NodeDecl):
            attrs = tuple(dataclasses.replace(a, value=absolute(a.value)) if a.name.text == "init" and a.value else a
                          for a in item.attributes)
            item = dataclasses.replace(item, attributes=attrs)
        items.append(item)
    if epochs is not None:
        number = ast.Number(epochs, str(epochs), nowhere)
        trains = [i for i in items if isinstance(i, ast.TrainBlock)]
        if not trains:
            items.append(ast.TrainBlock((ast.Setting(ast.Name("epochs", nowhere), number, nowhere),), nowhere))
        else:
            block = trains[0]
            settings = block.settings
            if any(s.key.text == "epochs" for s in settings):
                settings = tuple(dataclasses.replace(s, value=dataclasses.replace(number, span=s.value.span))
                                 if s.key.text == "epochs" else s for s in settings)
            else:
                settings = (ast.Setting(ast.Name("epochs", nowhere), number, nowhere),) + settings
            items[items.index(block)] = dataclasses.replace(block, settings=settings)
    return ast.Module(tuple(items), module.comments)


# ---------------------------------------------------------------- a trial's graph


def drop_dead_nodes(module: ast.Module, graph: nx.DiGraph) -> tuple[ast.Module, list[str]]:
    """The module without the nodes that have no live path to the target (and their edges),
    and the names dropped.

    Such a node cannot change the target's accuracy (`influencing_nodes`), so training it is
    waste; a frozen one would even be pre-trained first. Comments on a dropped node's lines
    and the comment lines right above it go with it.
    """
    keep = influencing_nodes(graph)
    dropped = [n.name.text for n in module.of(ast.NodeDecl) if n.name.text not in keep]
    if not dropped:
        return module, []
    gone: set[int] = set()
    comment_lines = {c.span.line for c in module.comments}
    items = []
    for item in module.items:
        if isinstance(item, ast.NodeDecl) and item.name.text in dropped:
            gone.update(range(item.span.line, item.span.end_line + 1))
            line = item.span.line - 1
            while line in comment_lines:
                gone.add(line)
                line -= 1
        elif isinstance(item, ast.EdgeDecl) and (item.source.text in dropped or item.target.text in dropped):
            continue
        else:
            items.append(item)
    comments = tuple(c for c in module.comments if c.span.line not in gone)
    return ast.Module(tuple(items), comments), dropped


def graph_key(module: ast.Module) -> str:
    """sha256 of the module's canonical text without comments: two trials with one key train
    the same graph with the same settings, so the second need not train."""
    return hashlib.sha256(format_module(ast.Module(module.items)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Realized:
    """One sampled graph, ready to train or to be turned down.

    `text` is the sampled graph (what `trials/NNNN.kt` holds); `trained_text` is what is
    trained: the same graph without its dead nodes (`dropped`). `key` identifies the trained
    graph (`graph_key`). `problem` is the rendered error diagnostics when the sample cannot
    be trained (a frozen target, for instance); then `checked` is None.
    """

    text: str
    trained_text: str
    dropped: tuple[str, ...]
    key: str
    checked: Checked | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def realize(template: ast.Module, params: dict[str, Any], *, space: list[Parameter] | None = None,
            path: str = "<trial>") -> Realized:
    """Sample, format, check, drop dead nodes and check again what will be trained.

    `path` is where the trained graph's relative paths are resolved from (`check(text, path)`).
    """
    sampled = sample(template, params, space)
    text = format_module(sampled)
    checked = check(text, path)
    if not checked.ok:
        return Realized(text, text, (), graph_key(sampled), None, render_all(checked.errors, text, path))
    trained, dropped = drop_dead_nodes(checked.module, checked.graph)
    trained_text = format_module(trained) if dropped else text
    trained_checked = check(trained_text, path) if dropped else checked
    if not trained_checked.ok:  # dropping nodes that cannot reach the target never breaks a valid graph
        raise AssertionError(render_all(trained_checked.errors, trained_text, path))
    return Realized(text, trained_text, tuple(dropped), graph_key(trained), trained_checked, None)


__all__ = ["Parameter", "Realized", "drop_dead_nodes", "graph_key", "prepare_template", "realize", "sample",
           "search_space"]
