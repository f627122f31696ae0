"""One key per experiment: a graph's key does not change when its non-target nodes are renamed.

In a template such as `examples/search3.kt` the nodes n2 and n3 are interchangeable: a sampled
graph and its mirror (n2 and n3 swapped, with their edges) train the same networks under the
same losses, so search trains only one of them. `canonical_key` is the key of a graph's
isomorphism class: graphs whose nodes map one to one onto each other, `label` onto `label`
and the target onto the target, preserving every attribute of every node and edge (model,
frozen-ness, `init`, ensemble members, gate, loss, T, weight, and whatever field the IR's
specs gain later) and the data and train settings. Two graphs get the same key exactly when
such a mapping exists. (One thing differs between a graph and its mirror: the models are built
in declaration order from one seed, so their initial weights are drawn in another order: the
same experiment under another draw of the random initialisation.)

Attributes are compared generically: every compared field of `NodeSpec` and `EdgeSpec` except
the names themselves. A value that names nodes (an ensemble's members) is renamed with the
nodes. `cutoff` edges are left out: such an edge is never computed and does not make its
target frozen, so a graph with one is the graph without it.

The canonical form: the nodes that may be renamed are split into classes by an invariant
signature (their own attributes and, refined, their neighbours' signatures with the edges'
attributes); the canonical text is the smallest serialisation over every ordering of the
nodes within each class. The classes are invariant under renaming, so the minimum is too. In
sampled graphs the classes are tiny (search3: n2 and n3, two orderings at most).

`count_distinct` enumerates a template's space on the IR (no parsing, no formatting) and
counts the samples, the trainable ones, and the distinct graphs by key, with and without
dead-node elimination: the numbers `dclang search --plan` prints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx

from dclang.ensembles import LEARNED
from dclang.ir import LABEL, NO_NODE, Derived, Open, as_number, derive_frozen_and_target, resolve_derived_models
from dclang.passes.check_reachability import influencing_nodes

#: fields that name a node or edge, compared through the mapping instead of by value; and
#: `bulk`, how an edge was written (every sampled edge is written out one per pair)
_NOT_COMPARED = {"name", "source", "target", "bulk"}
#: at most this many orderings are tried for one graph; beyond it the refined classes decide
MAX_ORDERINGS = 40320


def _plain(value: Any, rename: dict[str, str]) -> Any:
    """A JSON-able, order-stable form of a spec value; node names (ensemble members) renamed."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, tuple) and value and all(isinstance(v, str) and v in rename for v in value):
        return ["@nodes", *[rename[v] for v in value]]
    if isinstance(value, (tuple, list)):
        return [_plain(v, rename) for v in value]
    if isinstance(value, dict):
        return [[str(k), _plain(v, rename)] for k, v in sorted(value.items())]
    if isinstance(value, Open):
        return ["@open", value.site]
    if isinstance(value, Derived):  # `ema(s)`: its source renamed with the nodes
        return ["Derived", value.kind, ["@nodes", rename.get(value.source, value.source)], _plain(value.args, rename)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a derived node's `source` names a node
        return [type(value).__name__] + [[f.name, ["@node", rename[getattr(value, f.name)]]
                                          if f.name == "source" and getattr(value, f.name) in rename
                                          else _plain(getattr(value, f.name), rename)]
                                         for f in dataclasses.fields(value) if f.compare]
    return repr(value)


def _attrs(spec: Any, rename: dict[str, str]) -> list:
    """Every compared field of a NodeSpec or EdgeSpec but the names."""
    return [[f.name, _plain(getattr(spec, f.name), rename)] for f in dataclasses.fields(spec)
            if f.compare and f.name not in _NOT_COMPARED]


def _computed_edges(graph: nx.DiGraph) -> list[tuple[str, str, Any]]:
    return [(s, t, e) for s, t, e in graph.edges(data="spec") if e.gate != "cutoff"]


def _fixed(graph: nx.DiGraph) -> list[str]:
    """Nodes that keep their names: `label` and the target."""
    return [n for n in (LABEL, graph.graph.get("target")) if n is not None and n in graph]


def _classes(graph: nx.DiGraph, movable: list[str]) -> list[list[str]]:
    """The movable nodes in classes of equal invariant signature, classes in signature order.

    Signature: own attributes (node names inside them written as `*`), refined twice by the
    sorted multisets of (edge attributes, neighbour signature) in and out."""
    star = {n: "*" for n in graph}
    fixed = {n: f"={n}" for n in _fixed(graph)}
    signature = {n: json.dumps(_attrs(graph.nodes[n]["spec"], star)) for n in graph}
    signature.update(fixed)
    edges = [(s, t, json.dumps(_attrs(e, star))) for s, t, e in _computed_edges(graph)]  # parallel edges too
    for _ in range(2):
        signature = {n: json.dumps([signature[n],
                                    sorted([a, signature[s]] for s, t, a in edges if t == n),
                                    sorted([a, signature[t]] for s, t, a in edges if s == n)])
                     for n in graph}
        signature.update(fixed)
    by_signature: dict[str, list[str]] = {}
    for n in movable:
        by_signature.setdefault(signature[n], []).append(n)
    return [by_signature[sig] for sig in sorted(by_signature)]


def _serialize(graph: nx.DiGraph, rename: dict[str, str]) -> str:
    nodes = sorted([rename[n], _attrs(graph.nodes[n]["spec"], rename)] for n in graph)
    edges = sorted([rename[s], rename[t], _attrs(e, rename)] for s, t, e in _computed_edges(graph))
    settings = [_plain(graph.graph.get("data"), rename), _plain(graph.graph.get("train"), rename)]
    return json.dumps([settings, nodes, edges], separators=(",", ":"))


def canonical_form(graph: nx.DiGraph) -> tuple[str, dict[str, str]]:
    """The canonical serialisation of a concrete IR graph and the renaming that gives it
    (node name -> canonical name `#i`; `label` and the target keep theirs)."""
    fixed = _fixed(graph)
    movable = [n for n in graph if n not in fixed]
    classes = _classes(graph, movable)
    orderings = math.prod(math.factorial(len(c)) for c in classes)
    if orderings > MAX_ORDERINGS:  # never in a sampled graph of a few nodes: keep the classes' own order
        classes = [[n] for c in classes for n in c]
    best: tuple[str, dict[str, str]] | None = None
    for order in itertools.product(*(itertools.permutations(c) for c in classes)):
        rename = {n: n for n in fixed}
        rename.update((n, f"#{i}") for i, n in enumerate(n for group in order for n in group))
        text = _serialize(graph, rename)
        if best is None or text < best[0]:
            best = (text, rename)
    assert best is not None
    return best


def canonical_key(graph: nx.DiGraph) -> str:
    """sha256 of the canonical form: equal for two graphs exactly when they are the same
    experiment up to the names of their non-target nodes."""
    return hashlib.sha256(canonical_form(graph)[0].encode("utf-8")).hexdigest()


def same_up_to_names(a: nx.DiGraph, b: nx.DiGraph) -> dict[str, str] | None:
    """A renaming of a's nodes onto b's under which they are one graph, or None."""
    text_a, rename_a = canonical_form(a)
    text_b, rename_b = canonical_form(b)
    if text_a != text_b:
        return None
    back = {canonical: name for name, canonical in rename_b.items()}
    return {name: back[canonical] for name, canonical in rename_a.items()}


def without_dead_nodes(graph: nx.DiGraph) -> nx.DiGraph:
    """The graph without the nodes that have no live path to the target (what search trains)."""
    keep = influencing_nodes(graph) | {LABEL}
    if all(n in keep for n in graph):
        return graph
    return graph.subgraph([n for n in graph if n in keep]).copy()


# ---------------------------------------------------------------- counting a space


def _substitute(value: Any, picks: dict[str, Any]) -> Any:
    """`value` with every `Open` replaced by its pick, as lowering a sampled text would give it."""
    if isinstance(value, Open):
        return as_number(picks[value.site])
    if isinstance(value, dict):
        return {k: _substitute(v, picks) for k, v in value.items()}
    if isinstance(value, Derived):  # `ema(s, decay=choice(...))`
        return dataclasses.replace(value, args=tuple((k, _substitute(v, picks)) for k, v in value.args))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _substitute(getattr(value, f.name), picks) for f in dataclasses.fields(value)
                   if f.name != "span"}
        return dataclasses.replace(value, **{k: v for k, v in changes.items() if v is not getattr(value, k)})
    return value


def concrete(template: nx.DiGraph, picks: dict[str, Any]) -> nx.DiGraph:
    """The template's IR with one option picked per site, frozen-ness derived again: the IR
    of the sampled text, without parsing or formatting it."""
    g = nx.MultiDiGraph()  # as the IR: two nodes may be joined by their outputs and by layers
    g.graph.update(template.graph)
    g.graph["data"] = _substitute(template.graph["data"], picks)
    g.graph["train"] = _substitute(template.graph["train"], picks)
    g.graph["sites"] = ()
    for n, spec in template.nodes(data="spec"):
        picked = _substitute(dataclasses.replace(spec, frozen=spec.declared_frozen), picks)
        if isinstance(picked.model, Derived):  # `choice(ema(s), none)` picked the mean teacher
            picked = dataclasses.replace(picked, model=None, derived=picked.model)
        g.add_node(n, spec=picked)
    for s, t, spec in template.edges(data="spec"):
        picked = _substitute(spec, picks)
        g.add_edge(s, t, key=picked.key, spec=picked)
    # an ensemble or mean teacher whose choice picked `none` is left out of the trial, with its edges
    g.remove_nodes_from([n for n, spec in template.nodes(data="spec")
                         if (spec.is_ensemble or spec.is_ema) and g.nodes[n]["spec"].model == NO_NODE])
    # a `label` edge into an ensemble whose `combine` picked a mean is left out, as the trial leaves it out
    g.remove_edges_from([(s, t, k) for s, t, k in g.edges(keys=True) if s == LABEL
                         and isinstance(template.nodes[t]["spec"].combine, Open)
                         and g.nodes[t]["spec"].combine != LEARNED])
    resolve_derived_models(g)
    derive_frozen_and_target(g)
    return g


def trainable_sample(graph: nx.DiGraph) -> bool:
    """What makes a sample of a valid template untrainable: its target came out frozen
    (every gate into it `cutoff`, error E304). `tests/test_equivalence.py` holds this equal to
    the full check on every sample of a small template."""
    target = graph.graph.get("target")
    return target is not None and not graph.nodes[target]["spec"].frozen


def assignments(template: nx.DiGraph) -> Iterator[dict[str, Any]]:
    """Every assignment of the template's sites, in site order."""
    sites = template.graph["sites"]
    for values in itertools.product(*(site.options for site in sites)):
        yield dict(zip((site.name for site in sites), values))


def space_size(template: nx.DiGraph) -> int:
    return math.prod(len(site.options) for site in template.graph["sites"])


@dataclass(frozen=True)
class SpaceCount:
    """How many graphs a template's space holds, counted three more ways."""

    samples: int  # every assignment of the sites
    trainable: int  # of them, samples that can be trained (the target is not frozen)
    equivalent: int  # distinct up to renaming non-target nodes
    dead_dropped: int  # distinct once dead nodes are dropped (names kept)
    equivalent_dead_dropped: int  # both: the most graphs a search of this template trains


def count_distinct_slowly(template: nx.DiGraph) -> SpaceCount:
    """`count_distinct` on the IR itself, sample by sample (about 1 ms each): the reference
    the fast count is tested against, and the count for templates it does not cover."""
    trainable = 0
    keys: dict[str, set[str]] = {"equivalent": set(), "dead_dropped": set(), "equivalent_dead_dropped": set()}
    for picks in assignments(template):
        graph = concrete(template, picks)
        if not trainable_sample(graph):
            continue
        trainable += 1
        keys["equivalent"].add(canonical_form(graph)[0])
        trained = without_dead_nodes(graph)
        keys["dead_dropped"].add(_serialize(trained, {n: n for n in trained}))
        keys["equivalent_dead_dropped"].add(canonical_form(trained)[0])
    return SpaceCount(space_size(template), trainable, **{k: len(v) for k, v in keys.items()})


class _Compiled:
    """A template's IR as strings with holes for its sites: a sample's node and edge
    attributes are the constant text plus the picked options, compared as strings. Exact for
    templates without ensembles (whose member names would need renaming inside the text)."""

    def __init__(self, template: nx.DiGraph):
        sites = template.graph["sites"]
        self.site_index = {site.name: i for i, site in enumerate(sites)}
        self.nodes = [n for n in template if n != LABEL]
        self.target = template.graph["target"]
        ident = {n: n for n in template}

        def holes(spec: Any, drop: tuple[str, ...] = ()) -> tuple[str, tuple[int, ...]]:
            text = json.dumps([a for a in _attrs(spec, ident) if a[0] not in drop])
            used = list(_opens(spec))
            for v in used:  # the site's name differs from node to node; the hole is what counts
                text = text.replace(json.dumps(["@open", v.site]), '"@hole"')
            return text, tuple(self.site_index[v.site] for v in used)

        self.node_attrs = {n: holes(template.nodes[n]["spec"], ("frozen",)) for n in self.nodes}
        self.declared_frozen = {n: template.nodes[n]["spec"].declared_frozen for n in self.nodes}
        self.edges = []  # (source, target, attrs holes, gate: constant or site index)
        for s, t, e in template.edges(data="spec"):
            gate = ("site", self.site_index[e.gate.site]) if isinstance(e.gate, Open) else ("const", e.gate)
            self.edges.append((s, t, holes(e), gate))
        self.settings = holes(_Settings(template.graph["data"], template.graph["train"]))

    def count(self, assignment: tuple[str, ...]) -> tuple[str, str, str] | None:
        """(equivalent key, dead-dropped key, equivalent dead-dropped key) of one assignment,
        given as the options' texts (`raw`: as values); None for an untrainable sample."""
        def filled(h: tuple[str, tuple[int, ...]]) -> str:
            return h[0] + "|" + "|".join(assignment[i] for i in h[1])

        live = [(s, t, filled(h)) for s, t, h, gate in self.edges
                if (gate[1] if gate[0] == "const" else self.raw[gate[1]]) != "cutoff"]
        fed = {t for _, t, _ in live}
        frozen = {n: self.declared_frozen[n] or n not in fed for n in self.nodes}
        if frozen[self.target]:
            return None
        nodes = {n: filled(self.node_attrs[n]) + ("|F" if frozen[n] else "|L") for n in self.nodes}
        settings = filled(self.settings)
        reach, todo = {self.target}, [self.target]
        while todo:
            n = todo.pop()
            for s, t, _ in live:
                if t == n and s not in reach and s != LABEL:
                    reach.add(s)
                    todo.append(s)
        whole = self._canonical(nodes, live, settings)
        kept = {n: a for n, a in nodes.items() if n in reach}
        kept_live = [e for e in live if e[1] in reach and (e[0] in reach or e[0] == LABEL)]
        by_name = "\n".join([settings, *sorted(f"{n}:{a}" for n, a in kept.items()),
                              *sorted(f"{s}>{t}:{a}" for s, t, a in kept_live)])
        return whole, by_name, whole if len(kept) == len(nodes) else self._canonical(kept, kept_live, settings)

    def _canonical(self, nodes: dict[str, str], live: list, settings: str) -> str:
        movable = [n for n in nodes if n != self.target]
        classes: dict[str, list[str]] = {}
        for n in movable:
            classes.setdefault(nodes[n], []).append(n)
        groups = [classes[a] for a in sorted(classes)]
        best = None
        for order in itertools.product(*(itertools.permutations(g) for g in groups)):
            rename = {self.target: self.target, LABEL: LABEL}
            rename.update((n, f"#{i}") for i, n in enumerate(n for g in order for n in g))
            text = "\n".join([settings, *sorted(f"{rename[n]}:{a}" for n, a in nodes.items()),
                               *sorted(f"{rename[s]}>{rename[t]}:{a}" for s, t, a in live)])
            if best is None or text < best:
                best = text
        return best

    raw: tuple[Any, ...] = ()


@dataclass(frozen=True)
class _Settings:
    data: Any
    train: Any


def _opens(value: Any) -> Iterator[Open]:
    """Every `Open` inside a spec, in field order."""
    if isinstance(value, Open):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _opens(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _opens(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.compare:
                yield from _opens(getattr(value, f.name))


def count_distinct(template: nx.DiGraph, *, limit: int | None = None) -> SpaceCount:
    """Enumerate the template's space (an IR with sites) and count its distinct graphs.

    Raises ValueError when the space holds more than `limit` samples. Templates with
    ensemble or mean-teacher nodes are counted by `count_distinct_slowly`."""
    size = space_size(template)
    if limit is not None and size > limit:
        raise ValueError(f"the space holds {size:,} samples, more than the {limit:,} counted here")
    if any(spec.is_ensemble or spec.is_ema for _, spec in template.nodes(data="spec")):
        return count_distinct_slowly(template)
    compiled = _Compiled(template)
    sites = template.graph["sites"]
    texts = [[json.dumps(_plain(as_number(o), {})) for o in site.options] for site in sites]
    trainable = 0
    keys: tuple[set[bytes], set[bytes], set[bytes]] = (set(), set(), set())  # digests: millions of graphs
    for index in itertools.product(*(range(len(site.options)) for site in sites)):
        compiled.raw = tuple(site.options[i] for site, i in zip(sites, index))
        found = compiled.count(tuple(texts[k][i] for k, i in enumerate(index)))
        if found is None:
            continue
        trainable += 1
        for bucket, key in zip(keys, found):
            bucket.add(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest())
    return SpaceCount(size, trainable, *(len(k) for k in keys))


__all__ = ["SpaceCount", "canonical_form", "canonical_key", "concrete", "count_distinct", "count_distinct_slowly",
           "same_up_to_names", "space_size", "trainable_sample", "without_dead_nodes"]


def main(argv: list[str] | None = None) -> None:
    """`python -m dclang.search.equivalence T.kt`: count a template's distinct graphs, all of
    them (search3's 2.4 million samples take a few minutes)."""
    import sys
    import time

    from dclang.api import check

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m dclang.search.equivalence TEMPLATE.kt")
    path = args[0]
    with open(path, encoding="utf-8") as f:
        checked = check(f.read(), path)
    if not checked.ok:
        raise SystemExit(f"{path} does not check: run `dclang check {path}`")
    started = time.perf_counter()
    c = count_distinct(checked.graph)
    print(f"{path}: {c.samples:,} samples, {c.trainable:,} trainable; distinct: {c.equivalent:,} up to renaming, "
          f"{c.dead_dropped:,} with dead nodes dropped, {c.equivalent_dead_dropped:,} both "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
