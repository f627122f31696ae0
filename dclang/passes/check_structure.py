"""The shape of the graph must mean something the paper can train.

`label` is only a source (eq. 1); no node teaches itself; exactly one target, and it must be
trained (a frozen target could never improve); losses match their ends (cross-entropy from
`label`, a loss between outputs between nodes, a loss between layers between two layers: the
typed catalogue, `dclang.loss_catalogue`); a node declared `[frozen]` takes no live edge.
"""

from __future__ import annotations

from dclang import loss_catalogue
from dclang.diagnostics import Diagnostic, error, warning
from dclang.ir import LABEL, Open, expand_edges
from dclang.passes.check_learned_ensembles import may_learn
from dclang.syntax import ast

#: the most nodes a graph may declare: the paper's largest graphs have 7, every node is a
#: network trained in the same step, and `edges * -> *` joins every pair (3000 nodes would
#: make 9 million edges and fill any memory before a check ends)
MAX_NODES = 100


def too_many_nodes(module: ast.Module) -> list[Diagnostic]:
    """E311 at the first node past `MAX_NODES`; run before lowering, which expands bulk edges."""
    nodes = module.of(ast.NodeDecl)
    if len(nodes) <= MAX_NODES:
        return []
    return [error("E311", f"{len(nodes):,} nodes; a graph has at most {MAX_NODES}", nodes[MAX_NODES].name.span,
                  f"node {MAX_NODES + 1}", help="every node is a network trained in the same step; "
                                                 "split the study into several graphs")]


def check_structure(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    nodes = {d.name.text: d for d in module.of(ast.NodeDecl)}

    for edge in expand_edges(module):
        s, t = edge.source.text, edge.target.text
        if t == LABEL:
            out.append(error("E302", "an edge into `label`", edge.target.span, "`label` can only be a source",
                             help="`label` is the ground truth (paper eq. 1): nothing can teach it"))
        elif s == t and not edge.bulk:
            out.append(error("E303", f"self-edge `{s} -> {s}`", edge.span, "a node cannot teach itself",
                             help="the KL divergence of a node with itself is always zero"))
        target = nodes.get(t)
        if target is not None and target.is_ensemble and s != LABEL and not may_learn(target):  # else E370-E372
            out.append(error("E313", f"an edge into the ensemble `{t}`", edge.target.span,
                             "an ensemble is only a source",
                             help="an ensemble is the mean of its members' outputs; it has no weights to train"))

    for edge in module.of(ast.EdgeDecl):  # each written edge once, a bulk one included
        out += _check_loss_fits(edge, nodes)

    targets = [d for d in nodes.values() if d.attribute("target") is not None]
    if not targets and nodes:
        first = next(iter(nodes.values()))
        out.append(error("E305", "no target node", first.name.span, "mark one node `[target]`",
                         help="the target is the node whose accuracy search maximises and the report leads with"))
    for extra in targets[1:]:
        out.append(error("E306", "more than one target", extra.attribute("target").span,
                         f"`{targets[0].name.text}` is already the target (line {targets[0].span.line})",
                         help="one node is the target; every node's accuracy is reported anyway"))

    for name, decl in nodes.items():
        spec = graph.nodes[name]["spec"] if name in graph else None
        if spec is None:
            continue
        if decl.is_ensemble:
            continue  # no weights, never frozen: its own rules are check_ensembles'
        frozen_attr = decl.attribute("frozen")
        live = [e for _, _, e in graph.in_edges(name, data="spec") if e.gate != "cutoff"]
        if frozen_attr is not None:
            for e in live:
                if not isinstance(e.gate, Open):
                    out.append(error("E308", f"an edge into the frozen node `{name}`", e.span,
                                     f"`{name}` is never updated",
                                     help=f"make the gate `cutoff`, or drop `frozen` from `{name}` "
                                          f"(line {decl.span.line})"))
        if spec.frozen and spec.target:
            span = (frozen_attr.span if frozen_attr is not None else decl.attribute("target").span)
            why = ("it is declared `[frozen]`" if frozen_attr is not None
                   else "no edge into it can carry a loss, so it is a frozen pre-trained node (paper 3.4)")
            out.append(error("E304", f"the target `{name}` is frozen", span, "a frozen node never learns",
                             help=f"{why}; give it an edge such as `label -> {name} : through`"))
        elif spec.frozen and frozen_attr is None and not any(isinstance(e.gate, Open) for e in live):
            out.append(warning("W503", f"`{name}` has no live incoming edge, so it is a frozen teacher",
                               decl.name.span, "pre-trained on labels, then never updated",
                               help=f"write `[frozen]` to say so, or add `label -> {name} : through` to train it"))
    return out


def _check_loss_fits(edge: ast.EdgeDecl, nodes: dict[str, ast.NodeDecl]) -> list[Diagnostic]:
    """Each loss (or each option of a choice of losses) takes the edge's kind of ends
    (`dclang.loss_catalogue`): cross-entropy from `label`, a loss between outputs between
    nodes, a loss between layers between two layers. A bulk edge adapts `ce`/`kl` to each
    pair, so only a loss between layers is wrong there."""
    out: list[Diagnostic] = []
    s = edge.source.text
    if edge.on_layers:
        for end, layer in ((edge.source, edge.source_layer), (edge.target, edge.target_layer)):
            decl = nodes.get(end.text)
            if layer is not None and (end.text == LABEL or (decl is not None and isinstance(decl.model, ast.Ensemble))):
                what = "`label`" if end.text == LABEL else f"the ensemble `{end.text}`"
                out.append(error("E320", f"{what} has no layers", layer.span, "not a network",
                                 help="a layer edge joins two networks' layers: `teacher.layer3 -> student.layer3`"))
                return out
        if edge.source_layer is None or edge.target_layer is None:
            missing = edge.source if edge.source_layer is None else edge.target
            return out + [error("E320", "an edge between layers names a layer at both ends", missing.span,
                                "no layer here",
                                help=f"write `{missing.text}.layer3` (or another layer), "
                                     "or drop the other end's layer")]
        if edge.loss is None:
            return out + [error("E320", "an edge between layers must name its loss", edge.span, "",
                                help="losses between layers: " + ", ".join(
                                    f"`{n}`" for n in loss_catalogue.losses_for("layer")) + ", e.g. `at(p=2)`")]
    for call in edge.loss_calls():
        info = loss_catalogue.LOSSES.get(call.name.text)
        if info is None:
            continue  # reported by check_names
        name = info.name
        if info.on_layers != edge.on_layers and not (edge.on_layers and info.takes("layer")):
            if info.on_layers:
                message = f"`{name}` compares two layers, but this edge joins the nodes' outputs"
                hint = (f"name a layer at each end, e.g. `{s}.layer3 -> {edge.target.text}.layer3`; losses between "
                        f"outputs: " + ", ".join(f"`{n}`" for n in loss_catalogue.losses_for("logits")))
            else:
                message = f"`{name}` compares outputs (logits), but this edge joins layers"
                hint = "losses between layers: " + ", ".join(f"`{n}`" for n in loss_catalogue.losses_for("layer"))
            out.append(error("E320", message, call.name.span, "wrong kind of loss for these ends", help=hint))
        elif edge.bulk or edge.on_layers:
            continue
        elif s == LABEL and info.endpoints != "label":
            out.append(error("E312", f"an edge from `label` uses cross-entropy, not `{name}`", call.name.span,
                             help="write `ce(...)` or leave the loss out; `T` has no meaning for one-hot labels"))
        elif s != LABEL and info.endpoints == "label":
            out.append(error("E312", "an edge between nodes uses `kl`, not `ce`", call.name.span,
                             help="write `kl(T=2)` or leave the loss out for KL at T = 1"))
    return out
