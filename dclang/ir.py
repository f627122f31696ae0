"""The IR: a NetworkX `MultiDiGraph` whose node and edge attributes are typed specs.

`build_graph` lowers an AST to the IR. It resolves what can be resolved (bulk `edges` are
expanded to one edge per ordered pair, defaults filled in, values converted to Python) and
reports what cannot, but it judges nothing: the rules of the language are the passes in
`dclang.passes`. Everything behind this module (drawing, compiling, training, search)
reads only the IR.

Graph attributes: `name`, `data` (DataSpec), `train` (TrainSpec), `target` (node name or
None), `sites` (tuple of Site: the `choice(...)` parameters of a template).
Node attributes: `spec` (NodeSpec). The reserved source `label` is a node too.
Edge attributes: `spec` (EdgeSpec). Every edge is in the graph, `cutoff` ones included, keyed
by `EdgeSpec.key` (`s->t`, or `s.layer3->t.layer3` for an edge between layers): two nodes
may be joined by their outputs and by several layers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from dclang import loss_catalogue, registry
from dclang.diagnostics import Span
from dclang.ensembles import DEFAULT_COMBINE
from dclang.syntax import ast
from dclang.syntax.format import format_call
from dclang.views import SHARED

LABEL = registry.LABEL
#: the option of an ensemble node's `choice(...)` that leaves the node out of the trial
NO_NODE = "none"


@dataclass(frozen=True)
class Open:
    """A value a template leaves open: `choice(...)` at a named search site."""

    site: str
    options: tuple[Any, ...]
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class Site:
    """A search parameter: its stable name, its options as written, where it is."""

    name: str
    options: tuple[Any, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Derived:
    """How a network node is made from another node's: `ema(s, decay=0.999)` (kind `ema`: its
    weights the moving average of `s`'s) or `branch(b1, from=layer3)` (kind `branch`: `b1`'s
    modules before `layer3` shared, its own from there). `args` are the other arguments as
    Python values (an Open where a template leaves one open), the defaults not filled in."""

    kind: str
    source: str
    args: tuple[tuple[str, Any], ...] = ()
    span: Span | None = field(default=None, compare=False, repr=False)

    def arg(self, key: str, default: Any = None) -> Any:
        return dict(self.args).get(key, default)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    # str (`resnet32`, `torchvision.resnet18(weights="DEFAULT")`), Open, or tuple of member names for an ensemble
    model: Any
    target: bool = False
    combine: Any = None  # an ensemble's `combine` (str or Open); None for other nodes
    view: Any = SHARED  # a network's `view`: `shared` or `own` (str or Open), `dclang.views`
    declared_frozen: bool = False
    frozen: bool = False  # declared, or every incoming edge is cutoff (paper 3.4)
    init: str | None = None
    span: Span | None = field(default=None, compare=False)
    model_span: Span | None = field(default=None, compare=False)
    # a network made from another node's (`ema(...)`, `branch(...)`): how; `model` is then the
    # architecture of the network it is made from, followed to the first node that is not
    # derived (None where that is not a network: an unknown node, an ensemble, a cycle)
    derived: Derived | None = None

    @property
    def is_ema(self) -> bool:
        """A mean teacher `ema(s)`, or a template's node whose `choice(...)` offers one."""
        return bool(ema_options(self))

    @property
    def is_branch(self) -> bool:
        return self.derived is not None and self.derived.kind == "branch"

    @property
    def is_label(self) -> bool:
        return self.name == LABEL

    @property
    def is_ensemble(self) -> bool:
        """An ensemble node, or a template's node whose `choice(...)` offers ensembles."""
        if isinstance(self.model, Open):
            return any(isinstance(o, tuple) for o in self.model.options)
        return isinstance(self.model, tuple)

    @property
    def members(self) -> tuple[str, ...]:
        """An ensemble's members; for a template's choice, every node any option joins."""
        if isinstance(self.model, Open):
            return tuple(dict.fromkeys(m for o in self.model.options if isinstance(o, tuple) for m in o))
        return self.model if isinstance(self.model, tuple) else ()


@dataclass(frozen=True)
class EdgeSpec:
    source: str
    target: str
    gate: Any  # str or Open
    loss: Any  # a name of `dclang.loss_catalogue.LOSSES` ("ce" from label, "kl" between nodes), or Open
    T: Any = 1.0  # float or Open
    weight: Any = 1.0  # float or Open
    bulk: bool = False
    span: Span | None = field(default=None, compare=False)
    gate_span: Span | None = field(default=None, compare=False)
    args: tuple[tuple[str, Any], ...] = ()  # the loss's other arguments, defaults filled: dkd's alpha, at's p
    source_layer: Any = None  # a module path of the source (`layer3`), Open, or None for its logits
    target_layer: Any = None

    @property
    def key(self) -> str:
        """`s->t` for an edge between outputs, `s.layer3->t.layer3` between layers: unique per edge."""
        return f"{endpoint_text(self.source, self.source_layer)}->{endpoint_text(self.target, self.target_layer)}"

    @property
    def on_layers(self) -> bool:
        return self.source_layer is not None or self.target_layer is not None

    def loss_args(self) -> dict[str, Any]:
        """Every argument of the loss but `weight` (which scales any loss): `T` and `args`."""
        from dclang.loss_catalogue import LOSSES

        info = LOSSES.get(self.loss) if isinstance(self.loss, str) else None
        return {**({"T": self.T} if info is not None and "T" in info.args else {}), **dict(self.args)}


def ema_options(spec: NodeSpec | None) -> list[Derived]:
    """The `ema(...)` a node is, or each one its template's `choice(...)` offers."""
    if spec is None:  # `label`
        return []
    if spec.derived is not None:
        options: tuple = (spec.derived,)
    else:
        options = spec.model.options if isinstance(spec.model, Open) else ()
    return [o for o in options if isinstance(o, Derived) and o.kind == "ema"]


def endpoint_text(node: str, layer: Any) -> str:
    """An edge end as the language writes it: `n`, `n.layer3`, or `n.{layer2|layer3}` for a
    layer left open by a template."""
    if layer is None:
        return node
    if isinstance(layer, Open):
        return f"{node}.{{{'|'.join(str(o) for o in layer.options)}}}"
    return f"{node}.{layer}"


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class DataSpec:
    dataset: Any  # str or Open
    val_split: Any = 0.1
    split_seed: int = 0
    augment: Any = None  # None: the dataset's default
    pad: Any = 4
    path: str | None = None
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TrainSpec:
    epochs: Any = 200
    batch: Any = 64
    optimizer: OptimizerSpec = OptimizerSpec("sgd", {})
    schedule: ScheduleSpec = ScheduleSpec("constant", {})
    seed: Any = 0


def is_open(value: Any) -> bool:
    return isinstance(value, Open)


# ---------------------------------------------------------------- values


def _options_text(v: ast.Value) -> Any:
    """A value as plain Python (for options of a choice and for resolved settings)."""
    if isinstance(v, (ast.Number, ast.String, ast.Bool)):
        return v.value
    if isinstance(v, ast.Ident):
        return v.name
    if isinstance(v, ast.ListValue):
        return tuple(_options_text(i) for i in v.items)
    if isinstance(v, ast.Call):
        return (v.name.text, {a.name.text: _options_text(a.value) for a in v.args})
    if isinstance(v, ast.Choice):
        return Open("?", tuple(_options_text(o) for o in v.options), v.span)
    if isinstance(v, ast.Ensemble):  # an option of a node's choice: its members
        return tuple(m.text for m in v.members)
    if isinstance(v, ast.Derived):  # an option of a node's choice: `ema(s)`, `branch(b, from=l)`
        return Derived(v.kind, v.source.text, tuple((a.name.text, _options_text(a.value)) for a in v.args), v.span)
    raise TypeError(v)


def plain(v: ast.Value, site: str) -> Any:
    """A value as Python, or an `Open` named `site` when it is a `choice(...)`."""
    if isinstance(v, ast.Choice):
        return Open(site, tuple(_options_text(o) for o in v.options), v.span)
    return _options_text(v)


# ---------------------------------------------------------------- edges


def expand_edges(module: ast.Module) -> list[ast.EdgeDecl]:
    """One `EdgeDecl` per ordered pair, in source order of first mention.

    `edges * -> *` means every ordered pair (s, t), s != t, s any node or `label`, t any
    trainable node (not `label`, not a node declared `[frozen]`, not an ensemble). An
    explicit edge for the same pair overrides a bulk one, wherever it is written; two bulk
    forms covering one pair: the later wins. Duplicate explicit edges are both kept so the
    duplicate check can point at the second one.
    """
    nodes = [n for n in module.of(ast.NodeDecl)]
    names = [n.name.text for n in nodes]
    sources = [LABEL] + names
    targets = [n.name.text for n in nodes if n.attribute("frozen") is None and not n.is_ensemble
               and not is_ema_decl(n)]
    # a layer edge never overrides the bulk edge between the same nodes' outputs
    explicit = {(e.source.text, e.target.text) for e in module.of(ast.EdgeDecl) if not e.bulk and not e.on_layers}
    out: list[ast.EdgeDecl] = []
    bulk_index: dict[tuple[str, str], int] = {}
    for edge in module.of(ast.EdgeDecl):
        if not edge.bulk:
            out.append(edge)
            continue
        srcs = sources if edge.source.text == "*" else [edge.source.text]
        tgts = targets if edge.target.text == "*" else [edge.target.text]
        for s in srcs:
            for t in tgts:
                if s == t or (s, t) in explicit:
                    continue
                pair = ast.EdgeDecl(ast.Name(s, edge.source.span), ast.Name(t, edge.target.span),
                                    edge.gate, edge.loss, edge.span, bulk=True)
                if (s, t) in bulk_index:
                    out[bulk_index[(s, t)]] = pair
                else:
                    bulk_index[(s, t)] = len(out)
                    out.append(pair)
    return out


def is_ema_decl(decl: ast.NodeDecl) -> bool:
    """A node declared `ema(...)`, or a template's node whose `choice(...)` offers one: it
    learns from no loss, so `edges * -> *` never points into it."""
    options = decl.model.options if isinstance(decl.model, ast.Choice) else (decl.model,)
    return any(isinstance(o, ast.Derived) and o.kind == "ema" for o in options)


# ---------------------------------------------------------------- lowering


def build_graph(module: ast.Module) -> nx.DiGraph:
    """Lower a Module to the IR. Lowering judges nothing: every problem is a pass's
    (`dclang.passes`), run on the Module and this graph."""
    g = nx.MultiDiGraph()  # parallel edges: `t -> s` and `t.layer3 -> s.layer3` are two edges
    graph_decls = module.of(ast.GraphDecl)
    g.graph["name"] = graph_decls[0].name.text if graph_decls else "graph"
    g.graph["data"] = _data_spec(module)
    g.graph["train"] = _train_spec(module)
    g.graph["target"] = None

    g.add_node(LABEL, spec=NodeSpec(LABEL, None))
    for decl in module.of(ast.NodeDecl):
        name = decl.name.text
        if name in g:
            continue  # reported by passes.check_names
        model: Any = None
        derived = None
        if isinstance(decl.model, ast.Derived):  # `model` is its source's, resolved below
            derived = Derived(decl.model.kind, decl.model.source.text,
                              tuple((a.name.text, plain(a.value, f"{name}.{a.name.text}")) for a in decl.model.args),
                              decl.model.span)
        elif isinstance(decl.model, ast.Ensemble):
            model = tuple(m.text for m in decl.model.members)
        elif isinstance(decl.model, ast.Choice):
            model = plain(decl.model, f"{name}.model")
        elif isinstance(decl.model, ast.Call):  # the canonical text is the model's identity
            model = format_call(decl.model)
        else:
            model = decl.model.text
        init = decl.attribute("init")
        g.add_node(name, spec=NodeSpec(
            name, model,
            target=decl.attribute("target") is not None,
            combine=_combine(decl),
            view=_view(decl),
            declared_frozen=decl.attribute("frozen") is not None,
            init=plain(init.value, f"{name}.init") if init and init.value is not None else None,
            span=decl.name.span, model_span=decl.model.span, derived=derived,
        ), decl=decl)
    resolve_derived_models(g)

    for decl in expand_edges(module):
        s, t = decl.source.text, decl.target.text
        if s not in g or t not in g:
            continue  # unknown endpoints are reported by passes.check_names
        spec = _edge_spec(decl)
        if g.has_edge(s, t, spec.key):
            continue  # duplicates are reported by passes.check_names
        g.add_edge(s, t, key=spec.key, spec=spec, decl=decl)

    derive_frozen_and_target(g)
    g.graph["sites"] = tuple(collect_sites(g))
    return g


def resolve_derived_models(g: nx.MultiDiGraph) -> None:
    """Give each `ema(...)` / `branch(...)` node the architecture of the network it is made
    from (through a chain of derived nodes), or None where the chain does not end at a
    network: the passes say why."""
    for name, attrs in g.nodes(data=True):
        spec: NodeSpec = attrs["spec"]
        if spec.derived is None:
            continue
        seen, source = {name}, spec.derived.source
        while source in g and source not in seen and g.nodes[source]["spec"].derived is not None:
            seen.add(source)
            source = g.nodes[source]["spec"].derived.source
        root = g.nodes[source]["spec"] if source in g and source not in seen else None
        ok = root is not None and not root.is_label and not root.is_ensemble
        attrs["spec"] = NodeSpec(**{**spec.__dict__, "model": root.model if ok else None})


def _combine(decl: ast.NodeDecl) -> Any:
    """An ensemble's `combine` (the default when not written); None for other nodes."""
    if not decl.is_ensemble:
        return None
    attr = decl.attribute("combine")
    if attr is None or attr.value is None:
        return DEFAULT_COMBINE
    return plain(attr.value, f"{decl.name.text}.combine")


def _view(decl: ast.NodeDecl) -> Any:
    """A node's `view` (`shared` when not written, or written without a value: check_views says so)."""
    attr = decl.attribute("view")
    return SHARED if attr is None or attr.value is None else plain(attr.value, f"{decl.name.text}.view")


def _layer(expr: ast.LayerExpr | None, site: str) -> Any:
    if expr is None:
        return None
    return plain(expr, site) if isinstance(expr, ast.Choice) else expr.text


def _edge_spec(decl: ast.EdgeDecl) -> EdgeSpec:
    """The EdgeSpec of one (expanded) edge: its layers, gate, loss and the loss's arguments
    with the catalogue's defaults filled in. A `choice(...)` becomes an Open at a site named
    after the edge (`n2->n1.gate`, `t.layer3->s.layer3.p`, `t->s.loss`)."""
    s, t = decl.source.text, decl.target.text
    layers = [_layer(decl.source_layer, "?"), _layer(decl.target_layer, "?")]
    key = f"{endpoint_text(s, layers[0])}->{endpoint_text(t, layers[1])}"
    source_layer = _layer(decl.source_layer, f"{key}.source_layer")
    target_layer = _layer(decl.target_layer, f"{key}.target_layer")
    gate = plain(decl.gate, f"{key}.gate") if isinstance(decl.gate, ast.Choice) else decl.gate.text
    natural = loss_catalogue.NATURAL["label" if s == LABEL else "logits"]
    common = dict(bulk=decl.bulk, span=decl.span, gate_span=decl.gate.span, source_layer=source_layer,
                  target_layer=target_layer)
    if isinstance(decl.loss, ast.Choice):
        if decl.bulk and s == LABEL:  # a bulk choice of node losses: label pairs stay cross-entropy (eq. 1)
            return EdgeSpec(s, t, gate, natural, **common)
        return EdgeSpec(s, t, gate, plain(decl.loss, f"{key}.loss"), **common)
    loss_name = decl.loss.name.text if decl.loss else natural
    given = {a.name.text: a for a in decl.loss.args} if decl.loss else {}
    info = loss_catalogue.LOSSES.get(loss_name)
    if decl.bulk and info is not None and not info.on_layers and loss_name not in loss_catalogue.losses_for(
            "label" if s == LABEL else "logits"):
        # `edges * -> * : through kl(T=2)` covers label edges too: those stay cross-entropy
        # (eq. 1) and keep only the options cross-entropy has; node pairs stay KL likewise.
        loss_name, info = natural, loss_catalogue.LOSSES[natural]
        given = {k: a for k, a in given.items() if k in info.args}
    values = {k: as_number(plain(a.value, f"{key}.{k}")) for k, a in given.items()}
    full = {**(loss_catalogue.defaults(loss_name) if info else {}), **values}
    args = tuple((k, v) for k, v in full.items() if k not in ("T", "weight") and (info is None or k in info.args))
    return EdgeSpec(s, t, gate, loss_name, full.get("T", 1.0), full.get("weight", 1.0), args=args, **common)


def as_number(v: Any) -> Any:
    """A number as a float (so `T=2` and `T=2.0` are one value); anything else as it is.
    Search's graph keys read options the same way."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def derive_frozen_and_target(g: nx.DiGraph) -> None:
    """A node with no incoming edge that could be non-cutoff is a frozen teacher (paper 3.4).
    An ensemble is never frozen: it follows its members, and a learned one's own weights train
    exactly when a live `label` edge enters it (`dclang.ensembles.trained_ensembles`). Search's
    graph keys derive it again after removing dead nodes."""
    targets = []
    for name, attrs in g.nodes(data=True):
        spec: NodeSpec = attrs["spec"]
        if spec.is_label:
            continue
        live_in = [e for _, _, e in g.in_edges(name, data="spec") if e.gate != "cutoff"]
        # an EMA node (`ema(s)`) is never frozen: its weights follow its source's every update
        frozen = spec.declared_frozen or (not live_in and not spec.is_ensemble and not spec.is_ema)
        if frozen != spec.frozen:
            attrs["spec"] = NodeSpec(**{**spec.__dict__, "frozen": frozen})
        if spec.target:
            targets.append(name)
    g.graph["target"] = targets[0] if len(targets) == 1 else None


def _settings(block) -> dict[str, ast.Setting]:
    out: dict[str, ast.Setting] = {}
    for s in block.settings if block else ():
        out.setdefault(s.key.text, s)
    return out


def _data_spec(module: ast.Module) -> DataSpec | None:
    blocks = module.of(ast.DataBlock)
    if not blocks:
        return None
    block = blocks[0]
    s = _settings(block)
    get = lambda key, default: plain(s[key].value, f"data.{key}") if key in s else default  # noqa: E731
    return DataSpec(
        dataset=block.dataset.text,
        val_split=get("val_split", registry.DATA_SETTINGS["val_split"].default),
        split_seed=get("split_seed", 0),
        augment=get("augment", None),
        pad=get("pad", 4),
        path=get("path", None),
        span=block.dataset.span,
    )


def _train_spec(module: ast.Module) -> TrainSpec:
    blocks = module.of(ast.TrainBlock)
    s = _settings(blocks[0]) if blocks else {}
    get = lambda key, default: plain(s[key].value, f"train.{key}") if key in s else default  # noqa: E731

    def call_spec(key: str, table: dict, default: str, cls):
        if key not in s:
            return cls(default, {k: o.default for k, o in table[default].items()})
        value = s[key].value
        if isinstance(value, ast.Ident):
            name, given = value.name, {}
        elif isinstance(value, ast.Call):
            name = value.name.text
            given = {a.name.text: plain(a.value, f"train.{key}.{a.name.text}") for a in value.args}
        elif isinstance(value, ast.Choice):
            return cls(plain(value, f"train.{key}"), {})  # rejected by check_values (E400)
        else:
            return cls(str(_options_text(value)), {})
        defaults = {k: o.default for k, o in table.get(name, {}).items()}
        return cls(name, {**defaults, **given})

    return TrainSpec(
        epochs=get("epochs", 200),
        batch=get("batch", 64),
        optimizer=call_spec("optimizer", registry.OPTIMIZERS, "sgd", OptimizerSpec),
        schedule=call_spec("schedule", registry.SCHEDULES, "constant", ScheduleSpec),
        seed=get("seed", 0),
    )


def collect_sites(g: nx.DiGraph) -> list[Site]:
    """Every `choice(...)` in the IR as a named search parameter, in a stable order."""
    found: list[Site] = []

    def visit(value: Any) -> None:
        if isinstance(value, Open):
            found.append(Site(value.site, value.options, value.span))
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    data: DataSpec | None = g.graph["data"]
    if data:
        for v in (data.val_split, data.split_seed, data.augment, data.pad, data.path):
            visit(v)
    train: TrainSpec = g.graph["train"]
    for v in (train.epochs, train.batch, train.seed, train.optimizer.args, train.schedule.args):
        visit(v)
    for _, spec in g.nodes(data="spec"):
        if spec.derived is None:  # a derived node's model is its source's, visited there
            visit(spec.model)
        else:
            for _, value in spec.derived.args:
                visit(value)
        visit(spec.init)
        visit(spec.combine)
        visit(spec.view)
    for _, _, spec in g.edges(data="spec"):
        for v in (spec.source_layer, spec.target_layer, spec.gate, spec.loss, spec.T, spec.weight,
                  *(value for _, value in spec.args)):
            visit(v)
    return sorted(found, key=lambda site: (site.span.line, site.span.column, site.name))


def trainable_nodes(g: nx.DiGraph) -> list[str]:
    """Every node an optimizer updates: not `label`, frozen, an ensemble or an EMA node."""
    return [n for n, s in g.nodes(data="spec")
            if not s.is_label and not s.frozen and not s.is_ensemble and not s.is_ema]


def ema_nodes(g: nx.DiGraph) -> list[str]:
    """Every `ema(...)` node (a mean teacher: its weights the moving average of its source's),
    in declaration order."""
    return [n for n, s in g.nodes(data="spec") if s.is_ema]


def frozen_nodes(g: nx.DiGraph) -> list[str]:
    return [n for n, s in g.nodes(data="spec") if not s.is_label and s.frozen]


def model_nodes(g: nx.DiGraph) -> list[str]:
    """Every node that is a network (not `label`, not an ensemble), in declaration order."""
    return [n for n, s in g.nodes(data="spec") if not s.is_label and not s.is_ensemble]


def ensemble_nodes(g: nx.DiGraph) -> list[str]:
    """Every ensemble node, in declaration order."""
    return [n for n, s in g.nodes(data="spec") if s.is_ensemble]


def reported_nodes(g: nx.DiGraph) -> list[str]:
    """Every node whose accuracy is evaluated and reported: the networks, then the ensembles."""
    return model_nodes(g) + ensemble_nodes(g)


def live_edges(g: nx.DiGraph) -> list[EdgeSpec]:
    """Edges that contribute a loss: everything but `cutoff` (which is never computed)."""
    return [e for _, _, e in g.edges(data="spec") if e.gate != "cutoff"]
