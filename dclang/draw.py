"""IR to a Graphviz picture that reads like the paper's Fig. 3.

The target is red, frozen (pre-trained) nodes are blue, `label` is the ground-truth source,
and every edge carries its gate (and its loss options when they are not the default).
Cutoff edges carry nothing, so they are left out unless `show_cutoff` draws them dashed.
Two edges between the same pair that say the same thing (mutual learning) are drawn as one
two-headed arrow with one label, as the paper's Fig. 1b does. A value left open by a
template (`choice(...)`) is drawn dashed with its options listed; each direction of an
open pair keeps its own arrow, since each is a search site of its own. An edge between layers
is teal and dashed with an open arrowhead, labelled with its two layers and its loss.

A network on its own view (`[view=own]`, its own augmentation of each batch) has a double
outline and `view=own` under its model. An ensemble node is a green hexagon (red when it is
the target) with a dotted grey arrow from each member; a learned one (`combine=learned`) has
a double outline and says `learned`. A mean teacher (`ema(s)`) is lilac (red when it is the
target), with a dashed purple arrow from its source, labelled with its decay: not an edge, its
weights are the source's averaged. Networks sharing a trunk (`branch(...)`) are boxed
together, each branch with a bold arrow from its source (`dclang.draw_trunks`). Every drawing
carries a legend of what it uses, and only that: the kinds of node by colour, the kinds of
arrow, and what each of its gates does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import graphviz
import networkx as nx

from dclang import loss_catalogue
from dclang.diagnostics import UserError, unwritable
from dclang.draw_trunks import branch_line, draw_trunks, legend_rows
from dclang.ema import DEFAULT_DECAY, decay_of
from dclang.ensembles import LEARNED
from dclang.ir import LABEL, Derived, EdgeSpec, NodeSpec, Open, ema_options
from dclang.views import SHARED

FORMATS = ("svg", "png", "pdf", "dot")

_TARGET = {"style": "filled", "fillcolor": "#e8474b", "fontcolor": "white", "color": "#a32024"}
_FROZEN = {"style": "filled", "fillcolor": "#3b6fd4", "fontcolor": "white", "color": "#1f4596"}
_PLAIN = {"style": "filled", "fillcolor": "white", "color": "black"}
_LABEL = {"shape": "box", "style": "rounded,filled", "fillcolor": "#f2f2f2", "color": "#555555"}
_ENSEMBLE = {"shape": "hexagon", "style": "filled", "fillcolor": "#5aa469", "fontcolor": "white", "color": "#2f6b3a"}
_LEARNED = {"peripheries": "2"}  # a learned ensemble: its hexagon drawn twice
_MEMBER = {"style": "dotted", "color": "#777777", "arrowhead": "empty", "arrowsize": "0.6"}
_EMA = {"style": "filled", "fillcolor": "#e6dcf5", "color": "#6a3fa0"}
_EMA_COLOR = "#6a3fa0"
#: from a mean teacher's source to it: not an edge (no loss), the weights averaged
_AVERAGED = {"style": "dashed", "color": _EMA_COLOR, "fontcolor": _EMA_COLOR, "arrowhead": "odiamond",
             "penwidth": "1.4"}


def _node_style(spec: NodeSpec) -> dict[str, str]:
    if spec.is_label:
        return _LABEL
    if spec.is_ensemble:  # a hexagon whatever its role (doubled when learned); the target's is red
        return {**_ENSEMBLE, **(_LEARNED if _learned(spec) else {}),
                **({k: _TARGET[k] for k in ("fillcolor", "fontcolor", "color")} if spec.target else {})}
    return _TARGET if spec.target else _FROZEN if spec.frozen else _EMA if spec.is_ema else _PLAIN


def _learned(spec: NodeSpec) -> bool:
    """A learned ensemble, or one whose `combine` a template may pick as `learned`."""
    return spec.combine == LEARNED or (isinstance(spec.combine, Open) and LEARNED in spec.combine.options)


def _own_view(spec: NodeSpec) -> bool:
    """A network on its own view (`[view=own]`), or whose view a template leaves open."""
    return spec.view != SHARED


def _text(value, per_line: int = 1) -> str:
    if isinstance(value, Open):
        options = [str(o) for o in value.options]
        rows = [" | ".join(options[i:i + per_line]) for i in range(0, len(options), per_line)]
        return " |\n".join(rows) if rows else "choice()"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def edge_label(spec: EdgeSpec) -> str:
    """The gate, the loss when it is not the paper's (`ce` from label, `kl` between nodes),
    then any loss option that differs from its default (`T`, `weight`, ...)."""
    parts = [_text(spec.gate, per_line=2)]
    if isinstance(spec.loss, Open):
        parts.append(" | ".join(_loss_text(o) for o in spec.loss.options))
    elif spec.loss not in ("ce", "kl"):
        parts.append(spec.loss)
    if isinstance(spec.loss, str):
        defaults = loss_catalogue.defaults(spec.loss) if spec.loss in loss_catalogue.LOSSES else {}
        parts += [f"{k}={_text(v)}" for k, v in spec.loss_args().items() if v != defaults.get(k, 1.0)]
    if spec.weight != 1.0:
        parts.append(f"×{_text(spec.weight)}")
    return " ".join(parts)


def _loss_text(option) -> str:
    name, args = option if isinstance(option, tuple) else (str(option), {})
    return name + "(" + ", ".join(f"{k}={_text(v)}" for k, v in args.items()) + ")"


def _is_open_edge(spec: EdgeSpec) -> bool:
    """Open edges are never merged: each direction is a search site of its own."""
    return any(isinstance(v, Open) for v in (spec.gate, spec.T, spec.weight, spec.loss, spec.source_layer,
                                             spec.target_layer, *(v for _, v in spec.args)))


def node_label(spec: NodeSpec, params: dict[str, int] | None = None) -> str:
    if spec.is_label:
        return "Label"
    if isinstance(spec.model, tuple):
        model = "ensemble(" + ", ".join(spec.model) + ")"
    elif spec.is_ema and not isinstance(spec.model, Open):  # its architecture, then what it averages
        lines = [spec.name, str(spec.model), f"ema of {spec.derived.source}", f"decay={_text(decay_of(spec))}"]
        return "\n".join(lines + ([f"{params[spec.name] / 1e6:.2f}M params"] if params and spec.name in params
                                  else []))
    else:  # a name, or a template's options (ensembles, mean teachers written as such)
        model = _text(Open(spec.model.site, tuple(_option_text(o) for o in spec.model.options), spec.model.span)
                      if isinstance(spec.model, Open) else spec.model)
    # a model's arguments one per line under its name, so a circle stays small
    name, _, args = model.partition("(") if isinstance(spec.model, str) else (model, "", "")
    lines = [spec.name, name, *(args[:-1].split(", ") if args else [])]
    if branch_line(spec):  # a branch: where its own head begins (dclang.draw_trunks)
        lines.append(branch_line(spec))
    if spec.is_ensemble:
        lines.append(_text(spec.combine).replace("\n", " "))
    if _own_view(spec):
        lines.append("view=" + _text(spec.view).replace("\n", " "))
    if params and spec.name in params:
        lines.append(f"{params[spec.name] / 1e6:.2f}M params")
    return "\n".join(lines)


def _option_text(option) -> str:
    """An option of a node's choice: a model's name, `ensemble(a, b)`, `ema(s, decay=0.99)`."""
    if isinstance(option, tuple):
        return f"ensemble({', '.join(option)})"
    if isinstance(option, Derived):
        return f"{option.kind}({', '.join([option.source, *(f'{k}={_text(v)}' for k, v in option.args)])})"
    return option


def _averaged(dot: graphviz.Digraph, graph: nx.DiGraph) -> bool:
    """The dashed arrow from each mean teacher's source (every option's, in a template) to it,
    labelled with its decay; whether there was one."""
    found = False
    for name, spec in graph.nodes(data="spec"):
        for option in ema_options(spec):
            if option.source in graph:
                dot.edge(option.source, name, label=f"ema {_text(option.arg('decay', DEFAULT_DECAY))}", **_AVERAGED)
                found = True
    return found


def to_graphviz(graph: nx.DiGraph, *, show_cutoff: bool = False,
                params: dict[str, int] | None = None) -> graphviz.Digraph:
    dot = graphviz.Digraph(graph.graph.get("name", "graph"))
    dot.attr(rankdir="TB", nodesep="0.6", ranksep="0.8", fontname="Helvetica", labelloc="t",
             label=graph.graph.get("name", ""))
    dot.attr("node", shape="circle", fontname="Helvetica", fontsize="11", width="1.1", fixedsize="false")
    dot.attr("edge", fontname="Helvetica", fontsize="10", arrowsize="0.8")
    for name, spec in graph.nodes(data="spec"):
        style = _node_style(spec)
        if isinstance(spec.model, Open):  # a model left open by a template: dashed outline
            style = {**style, "style": style["style"] + ",dashed"}
        if _own_view(spec):  # its own augmentation of each batch: a double outline
            style = {**style, "peripheries": "2"}
        dot.node(name, node_label(spec, params), **style)
    with dot.subgraph() as top:  # the paper draws the label source above the models
        top.attr(rank="min")
        top.node(LABEL)
    drawn: dict[tuple[str, str], dict[str, str]] = {}
    layer_edges = []
    for source, target, spec in graph.edges(data="spec"):
        if spec.gate == "cutoff":
            if not show_cutoff:
                continue
            attrs = {"label": "cutoff", "style": "dashed", "color": "#999999", "fontcolor": "#999999"}
        else:
            attrs = {"label": edge_label(spec), **({"style": "dashed"} if isinstance(spec.gate, Open) else {})}
        if spec.on_layers:
            layer_edges.append((source, target, {**attrs, **_layer_edge_style(spec, attrs)}))
            continue
        back = drawn.get((target, source))
        if back is not None and back == attrs and not _is_open_edge(spec):
            back["dir"] = "both"  # mutual edges that say the same thing: one two-headed arrow
            continue
        drawn[(source, target)] = attrs
    for (source, target), attrs in drawn.items():
        dot.edge(source, target, **attrs)
    for source, target, attrs in layer_edges:
        dot.edge(source, target, **attrs)
    ensembles = [spec for _, spec in graph.nodes(data="spec") if spec.is_ensemble]
    for spec in ensembles:  # membership: what each ensemble averages (every option's members)
        for member in spec.members:
            if member in graph:
                dot.edge(member, spec.name, **_MEMBER)
    averaged = _averaged(dot, graph)
    trunks = draw_trunks(dot, graph)  # a box per shared trunk, an arrow to each branch
    shown = [spec for source, target, spec in graph.edges(data="spec") if (source, target) in drawn or spec.on_layers]
    shown = [spec for spec in shown if show_cutoff or spec.gate != "cutoff"]
    _legend(dot, graph, Drawn(
        gates={g for spec in shown for g in (spec.gate.options if isinstance(spec.gate, Open) else [spec.gate])},
        outputs=any(not spec.on_layers for spec in shown),
        mutual=any(attrs.get("dir") == "both" for attrs in drawn.values()),
        open_edges=any(_is_open_edge(spec) for spec in shown if not spec.on_layers),
        cutoff=any(spec.gate == "cutoff" for spec in shown),
        layers=bool(layer_edges), ensembles=bool(ensembles), averaged=averaged, trunks=trunks))
    return dot


_LAYER_COLOR = "#1b7f79"


def _layer_edge_style(spec: EdgeSpec, attrs: dict[str, str]) -> dict[str, str]:
    """An edge between layers: teal and dashed (dotted when a value is left open), labelled
    `layer3 → layer3` above the gate and loss, so it never reads as an edge between outputs."""
    layers = f"{_text(spec.source_layer)} → {_text(spec.target_layer)}"
    style = "dotted" if attrs.get("style") == "dashed" or _is_open_edge(spec) else "dashed"
    return {"label": f"{layers}\n{attrs['label']}", "style": style, "color": _LAYER_COLOR,
            "fontcolor": _LAYER_COLOR, "arrowhead": "onormal"}


@dataclass(frozen=True)
class Drawn:
    """What a drawing shows besides its nodes, so its legend lists that and nothing more."""

    gates: set = field(default_factory=set)
    outputs: bool = False  # an edge between outputs
    mutual: bool = False  # a two-headed arrow
    open_edges: bool = False  # a value left to search
    cutoff: bool = False  # a cutoff edge, drawn grey (--show-cutoff)
    layers: bool = False
    ensembles: bool = False
    averaged: bool = False  # a mean teacher's arrow from its source
    trunks: bool = False  # a shared trunk (branch(...))


#: what each gate does, in the legend's few words (docs/language.md has the equations)
GATE_MEANING = {"through": "every sample's loss", "linear": "weight grows from 0 to 1 over training",
                "correct": "only samples the source gets right", "cutoff": "nothing flows"}


def _row(swatch: str, text: str, color: str = "") -> str:
    font = (f'<font color="{color}">', "</font>") if color else ("", "")
    return f'<tr><td>{font[0]}{swatch}{font[1]}</td><td align="left">{font[0]}{text}{font[1]}</td></tr>'


def _legend(dot: graphviz.Digraph, graph: nx.DiGraph, drawn: Drawn) -> None:
    """A key (one HTML-table node) of what this drawing uses: the kinds of nodes it has (by
    colour), the kinds of arrows, and what each gate on its edges does."""
    specs = [spec for _, spec in graph.nodes(data="spec") if not spec.is_label]
    kinds = [("target: the node the run is for", _TARGET, any(s.target for s in specs)),
             ("trained", _PLAIN, any(not (s.target or s.frozen or s.is_ensemble or s.is_ema) for s in specs)),
             ("mean teacher: never trained, its source's weights averaged", _EMA,
              any(s.is_ema and not s.target for s in specs)),
             ("frozen: pre-trained, never updated", _FROZEN, any(s.frozen and not s.is_ensemble for s in specs)),
             ("hexagon: an ensemble, the mean of its members",
              _ENSEMBLE if any(s.is_ensemble and not s.target for s in specs) else _TARGET, drawn.ensembles)]
    rows = [f'<tr><td bgcolor="{style["fillcolor"]}" border="1" width="18"> </td><td align="left">{word}</td></tr>'
            for word, style, present in kinds if present]
    if any(isinstance(s.model, Open) for s in specs):
        rows.append(_row("&#9711;", "dashed outline: a model left to search"))
    if any(s.is_ensemble and _learned(s) for s in specs):
        rows.append(_row("&#11042;&#11042;", "double outline: a learned ensemble, its members' weights trained "
                                             "from the label"))
    if any(_own_view(s) for s in specs):
        rows.append(_row("&#9678;", "double outline: view=own, its own augmentation of each batch "
                                    "(or a view left to search)"))
    if drawn.ensembles:
        rows.append(_row("&#8943;&#9655;", "member of an ensemble", "#777777"))
    if drawn.averaged:
        rows.append(_row("&#8674;&#9671;", "exponential moving average of (no loss: the weights averaged)",
                         _EMA_COLOR))
    if drawn.outputs:
        rows.append(_row("&#8594;", "edge between outputs: gate, then loss when not ce / kl"))
    if drawn.mutual:
        rows.append(_row("&#8596;", "the same edge both ways"))
    if drawn.open_edges:
        rows.append(_row("&#8674;", "dashed: a value left to search (its options listed)"))
    if drawn.cutoff:
        rows.append(_row("&#8674;", "grey dashed: cutoff", "#999999"))
    if drawn.layers:
        rows.append(_row("&#8674;", "between layers: source layer &#8594; target layer, then gate and loss",
                         _LAYER_COLOR))
    if drawn.trunks:
        rows += legend_rows(_row)
    rows += [_row(f"<i>{gate}</i>", GATE_MEANING[gate]) for gate in GATE_MEANING if gate in drawn.gates]
    if not rows:
        return
    table = ('<<table border="1" cellborder="0" cellspacing="2" color="#bbbbbb">'
             '<tr><td colspan="2"><b>legend</b></td></tr>' + "".join(rows) + "</table>>")
    with dot.subgraph() as bottom:
        bottom.attr(rank="sink")
        bottom.node("legend", table, shape="plaintext", fontsize="9")


#: edges a picture may have: `dot` lays out 900 edges (31 nodes, `edges * -> *`) in about a
#: minute and 10,000 in more than five, and a picture of a few hundred is already unreadable
MAX_DRAWN_EDGES = 400


def render(graph: nx.DiGraph, out: str | Path, *, show_cutoff: bool = False,
           params: dict[str, int] | None = None) -> Path:
    """Write the drawing; the suffix of `out` picks the format (svg, png, pdf or dot)."""
    from dclang.checkpoints import atomic_write_bytes

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        what = f"unknown format `.{fmt}`" if fmt else "it has no suffix to say the format"
        raise UserError(f"cannot draw to `{out.name}`: {what}",
                        "give the output a suffix of " + ", ".join(f".{f}" for f in FORMATS))
    dot = to_graphviz(graph, show_cutoff=show_cutoff, params=params)
    if fmt == "dot":
        data = dot.source.encode("utf-8")
    else:
        drawn = sum("->" in line for line in dot.body)
        if drawn > MAX_DRAWN_EDGES:
            raise UserError(f"{drawn} edges are too many to lay out in a picture (at most {MAX_DRAWN_EDGES}: "
                            "Graphviz takes minutes on such a graph, and nobody could read it)",
                            f"draw to `{out.with_suffix('.dot').name}` (the graph's text, written at once)"
                            + (", or leave out the cutoff edges (no --show-cutoff)" if show_cutoff else ""))
        try:
            data = dot.pipe(format=fmt)
        except graphviz.ExecutableNotFound as exc:
            raise UserError("Graphviz's `dot` program is not installed, so no picture can be drawn",
                            "install it (Debian/Ubuntu: `apt-get install graphviz`, macOS: `brew install graphviz`), "
                            f"or draw to `{out.with_suffix('.dot').name}`, which needs no `dot`") from exc
    try:
        atomic_write_bytes(data, out)
    except OSError as exc:
        raise unwritable(out, exc) from exc
    return out
