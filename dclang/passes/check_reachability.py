"""A node with no path to the target cannot change the target's result.

It still trains and is still reported, so this is a warning; search trials may drop such
nodes without building them (dead-node elimination).
"""

from __future__ import annotations

import networkx as nx

from dclang.diagnostics import Diagnostic, warning
from dclang.ir import LABEL, Derived, Open, ema_options, live_edges


def influencing_nodes(graph: nx.DiGraph) -> set[str]:
    """Nodes with a path of live (non-cutoff) edges to the target, the target included."""
    target = graph.graph.get("target")
    if target is None:
        return set(graph.nodes)
    live = nx.DiGraph()
    live.add_nodes_from(graph.nodes)
    live.add_edges_from((e.source, e.target) for e in live_edges(graph))  # open gates count as live
    # an ensemble's members reach whatever the ensemble reaches: an ensemble is live when it
    # teaches a live node or is the target, and then so are its members (of every option)
    live.add_edges_from((m, n) for n, spec in graph.nodes(data="spec") if spec.is_ensemble
                        for m in spec.members if m in live)
    # a mean teacher's weights are its source's averaged: the source reaches what it reaches
    live.add_edges_from((o.source, n) for n, spec in graph.nodes(data="spec") for o in ema_options(spec)
                        if o.source in live)
    # a branch and its source share a trunk: each one's loss trains what the other computes
    live.add_edges_from(pair for n, spec in graph.nodes(data="spec") for s in _branch_sources(spec) if s in live
                        for pair in ((s, n), (n, s)))
    return nx.ancestors(live, target) | {target}


def _branch_sources(spec) -> list[str]:
    """The nodes whose trunk a node shares: its `branch(...)`'s source, or each one its choice may take."""
    if spec.is_label:
        return []
    options = spec.model.options if isinstance(spec.model, Open) else [spec.derived]
    return [o.source for o in options if isinstance(o, Derived) and o.kind == "branch"]


def check_reachability(module, graph: nx.DiGraph) -> list[Diagnostic]:
    if graph.graph.get("target") is None:
        return []
    reach = influencing_nodes(graph)
    out = []
    for name, spec in graph.nodes(data="spec"):
        if name == LABEL or name in reach:
            continue
        out.append(warning("W500", f"`{name}` has no path to the target `{graph.graph['target']}`", spec.span,
                           "cannot affect the target's accuracy",
                           help="add an edge from it towards the target, or remove it to save its training time"))
    return out
