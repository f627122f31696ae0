"""The shape of the graph must mean something the paper can train.

`label` is only a source (eq. 1); no node teaches itself; exactly one target, and it must be
trained (a frozen target could never improve); losses match their source (cross-entropy from
`label`, KL between nodes); a node declared `[frozen]` takes no live edge.
"""

from __future__ import annotations

from dclang.diagnostics import Diagnostic, error, warning
from dclang.ir import LABEL, Open, expand_edges
from dclang.syntax import ast


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
        if edge.loss is not None and not edge.bulk:
            name = edge.loss.name.text
            if s == LABEL and name == "kl":
                out.append(error("E312", "an edge from `label` uses cross-entropy, not `kl`", edge.loss.name.span,
                                 help="write `ce(...)` or leave the loss out; `T` has no meaning for one-hot labels"))
            elif s != LABEL and s != "*" and name == "ce":
                out.append(error("E312", "an edge between nodes uses `kl`, not `ce`", edge.loss.name.span,
                                 help="write `kl(T=2)` or leave the loss out for KL at T = 1"))
        target = nodes.get(t)
        if target is not None and target.is_ensemble:
            out.append(error("E313", f"an edge into the ensemble `{t}`", edge.target.span,
                             "an ensemble is only a source",
                             help="an ensemble is the mean of its members' outputs; it has no weights to train"))

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
        live = [graph.edges[e]["spec"] for e in graph.in_edges(name) if graph.edges[e]["spec"].gate != "cutoff"]
        if frozen_attr is not None:
            for e in live:
                if not isinstance(e.gate, Open):
                    out.append(error("E308", f"an edge into the frozen node `{name}`", e.span,
                                     f"`{name}` is never updated",
                                     help=f"make the gate `cutoff`, or drop `frozen` from `{name}` (line {decl.span.line})"))
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
