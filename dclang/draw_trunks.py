"""How `dclang draw` shows shared trunks (`branch(...)`, `dclang.models.branch`).

A source and its branches are drawn inside one dashed box, "shared trunk of b1", and each
branch gets a bold brown arrow from the node whose trunk it shares, labelled with where its
own head begins (`from=layer3`): the picture says which networks are one network up to a
layer. No torch: drawing stays on the parse/check path.
"""

from __future__ import annotations

import graphviz
import networkx as nx

_TRUNK_COLOR = "#8c5a1f"
_SHARES = {"style": "bold", "color": _TRUNK_COLOR, "fontcolor": _TRUNK_COLOR, "arrowhead": "odiamond"}


def _text(value) -> str:
    options = getattr(value, "options", None)
    return f"choice({', '.join(map(str, options))})" if options is not None else str(value)


def branch_line(spec) -> str | None:
    """The line a branch's circle adds under its model: where its own head begins."""
    if not spec.is_branch:
        return None
    return f"branch, from={_text(spec.derived.arg('from'))}"


def draw_trunks(dot: graphviz.Digraph, graph: nx.DiGraph) -> bool:
    """A box around every source and its branches (transitively), and an arrow from each
    branch's source to it; whether anything was drawn."""
    specs = {n: s for n, s in graph.nodes(data="spec") if not s.is_label}
    sources = {n: s.derived.source for n, s in specs.items() if s.is_branch and s.derived.source in specs}
    if not sources:
        return False

    def root(n: str) -> str:
        seen = {n}
        while n in sources and sources[n] not in seen:
            n = sources[n]
            seen.add(n)
        return n

    families: dict[str, list[str]] = {}
    for n in specs:
        if n in sources or n in sources.values():
            families.setdefault(root(n), []).append(n)
    for i, (top, members) in enumerate(families.items()):
        with dot.subgraph(name=f"cluster_trunk_{i}") as box:
            box.attr(label=f"shared trunk of {top}", style="dashed,rounded", color=_TRUNK_COLOR,
                     fontcolor=_TRUNK_COLOR, fontsize="10")
            for n in members:
                box.node(n)
    for branch, source in sources.items():
        dot.edge(source, branch, label=f"from={_text(specs[branch].derived.arg('from'))}", **_SHARES)
    return True


def legend_rows(row) -> list[str]:
    """The legend's rows for shared trunks (`row` is draw's row maker)."""
    return [row("&#9645;", "dashed box: networks sharing one trunk", _TRUNK_COLOR),
            row("&#8594;&#9671;", "branch: shares its source's modules before `from`", _TRUNK_COLOR)]
