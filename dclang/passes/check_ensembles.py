"""An ensemble node must be computable: declared members, at least two of them, no cycle.

`node e : ensemble(a, b) [combine=mean_probs]` averages the outputs of other nodes (see
`dclang.ensembles`; `combine=learned`'s edge rules are `check_learned_ensembles`'). Its
members are declared nodes, networks or other ensembles, each
listed once; an ensemble never contains itself, directly or through other ensembles. It has
no weights, so `frozen` and `init` mean nothing on it (and `combine` means nothing on a
network). In a template, `choice(none, ensemble(a, b), ...)` decides whether the node exists
and whom it joins: every option is then an ensemble or `none`, and a node that may be left
out can be neither the target nor another ensemble's member. Edges into an ensemble are
`check_structure`'s (E313).
"""

from __future__ import annotations

import networkx as nx

from dclang.diagnostics import Diagnostic, did_you_mean, error
from dclang.ensembles import COMBINES, trained_ensembles
from dclang.ir import LABEL, NO_NODE, is_ema_decl
from dclang.passes.check_learned_ensembles import may_learn
from dclang.syntax import ast


def _options(decl: ast.NodeDecl) -> list[ast.Ensemble]:
    """The ensembles a node may be: itself, or each ensemble option of its choice."""
    if isinstance(decl.model, ast.Ensemble):
        return [decl.model]
    if isinstance(decl.model, ast.Choice):
        return [o for o in decl.model.options if isinstance(o, ast.Ensemble)]
    return []


def _may_be_absent(decl: ast.NodeDecl) -> ast.Ident | None:
    """The `none` option of an ensemble's choice, if it has one."""
    if not (decl.is_ensemble and isinstance(decl.model, ast.Choice)):
        return None
    return next((o for o in decl.model.options if isinstance(o, ast.Ident) and o.name == NO_NODE), None)


def check_ensembles(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    declared: dict[str, ast.NodeDecl] = {}
    for decl in module.of(ast.NodeDecl):
        declared.setdefault(decl.name.text, decl)

    for decl in module.of(ast.NodeDecl):
        out += _check_options(decl)
        out += _check_attributes(decl)
        for option in _options(decl):
            out += _check_members(decl, option, declared)
    cycles = _check_cycles(declared)
    out += cycles
    if not cycles:
        out += _check_frozen_target(declared, graph)
    return out


def _check_frozen_target(declared: dict[str, ast.NodeDecl], graph) -> list[Diagnostic]:
    """A target ensemble whose members are all frozen never changes, like a frozen target."""
    target = graph.graph.get("target")
    decl = declared.get(target) if target else None
    if decl is None or not isinstance(decl.model, ast.Ensemble):
        return []

    learning = set(trained_ensembles(graph))  # a learned ensemble's own weights learn (not frozen)

    def networks(name: str) -> set[str]:
        spec = graph.nodes[name]["spec"] if name in graph else None
        if spec is None:
            return set()
        if not spec.is_ensemble:
            return {name}
        return set().union(*(networks(m) for m in spec.members)) | ({name} & learning)

    members = networks(target)
    if not members or any(not graph.nodes[m]["spec"].frozen for m in members):
        return []
    return [error("E304", f"the target `{target}` is an ensemble of frozen nodes", decl.model.span,
                  "none of its members ever learns",
                  help="train at least one member (an edge such as `label -> NODE : through`), "
                       "or make a trained node the target")]


def _check_members(decl: ast.NodeDecl, option: ast.Ensemble, declared: dict[str, ast.NodeDecl]) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    name = decl.name.text
    seen: dict[str, ast.Name] = {}
    for member in option.members:
        text = member.text
        if text in seen:
            out.append(error("E332", f"`{text}` is a member of `{name}` twice", member.span, "listed again here",
                             help=f"list each member once; to weight `{text}` more, add another node"))
            continue
        seen[text] = member
        if text == name:
            out.append(error("E330", f"the ensemble `{name}` contains itself", member.span,
                             "this is the ensemble itself",
                             help="an ensemble's output is the mean of its members' outputs: it cannot be one of them"))
        elif text == LABEL:
            out.append(error("E201", "`label` cannot be an ensemble member", member.span, "not a network's output",
                             help="`label` is the ground truth; average it in with an edge `label -> NODE` instead"))
        elif text not in declared:
            out.append(error("E201", f"unknown node `{text}`", member.span, "no node with this name",
                             help=did_you_mean(text, [n for n in declared if n != name], "nodes")
                             or "declare it first: `node NAME : MODEL`"))
        elif _may_be_absent(declared[text]) is not None:
            out.append(error("E335", f"the member `{text}` may be left out of a trial", member.span,
                             f"`{text}` has the option `none`",
                             help=f"drop `none` from `{text}`'s choice, or make `{name}` a choice of member lists"))
    if len(option.members) == 1:
        out.append(error("E331", f"the ensemble `{name}` has one member", option.span, "an ensemble of one",
                         help=f"an ensemble of one node is that node: use `{option.members[0].text}` itself, "
                              "or add members"))
    return out


def _check_cycles(declared: dict[str, ast.NodeDecl]) -> list[Diagnostic]:
    """An ensemble reaching itself through other ensembles (its direct self-membership is E330)."""
    joins = nx.DiGraph()
    for name, decl in declared.items():
        for option in _options(decl):
            for member in option.members:
                if member.text != name and member.text in declared and declared[member.text].is_ensemble:
                    joins.add_edge(name, member.text, span=member.span)
    order = list(declared)
    out = []
    for cycle in sorted(nx.simple_cycles(joins), key=lambda c: min(order.index(n) for n in c)):
        first = min(cycle, key=order.index)
        at = cycle.index(first)
        cycle = cycle[at:] + cycle[:at]
        path = " -> ".join(cycle + [first])
        out.append(error("E330", f"the ensemble `{first}` contains itself through `{cycle[1]}`",
                         joins.edges[first, cycle[1]]["span"], f"membership cycle {path}",
                         help="ensembles may contain ensembles, but the members must not lead back to it"))
    return out


def _check_options(decl: ast.NodeDecl) -> list[Diagnostic]:
    """A node's choice offers ensembles (and `none`) or models, not both; `none` only there."""
    if not isinstance(decl.model, ast.Choice):
        return []
    out: list[Diagnostic] = []
    name = decl.name.text
    if decl.is_ensemble:
        for option in decl.model.options:
            if not (isinstance(option, ast.Ensemble) or (isinstance(option, ast.Ident) and option.name == NO_NODE)):
                out.append(error("E335", f"the choice for `{name}` mixes ensembles and other options", option.span,
                                 "not an `ensemble(...)` or `none`",
                                 help="a node is a network or an ensemble in every trial: offer ensembles and "
                                      "`none` here, and choose the model in a node of its own"))
        absent = _may_be_absent(decl)
        if absent is not None and decl.attribute("target") is not None:
            out.append(error("E335", f"the target `{name}` may be left out of a trial", absent.span,
                             "`none` leaves no target", help="drop `none`, or make another node the target"))
    elif not is_ema_decl(decl):  # `choice(ema(s), none)`: check_ema's
        for option in decl.model.options:
            if isinstance(option, ast.Ident) and option.name == NO_NODE:
                out.append(error("E335", f"`none` in the choice of models for `{name}`", option.span,
                                 "only an ensemble may be left out",
                                 help="`none` is an option of an ensemble's choice: "
                                      "`node e : choice(none, ensemble(a, b))`"))
    return out


def _check_attributes(decl: ast.NodeDecl) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    name = decl.name.text
    if decl.is_ensemble:
        frozen = decl.attribute("frozen")
        if frozen is not None and may_learn(decl):
            out.append(error("E333", f"the learned ensemble `{name}` is marked `frozen`", frozen.name.span,
                             "its weights are frozen by cutting its label edge",
                             help=f"write `label -> {name} : cutoff` to keep them at the mean of logits; "
                                  "to freeze its members, mark them `[frozen]`"))
        elif frozen is not None:
            out.append(error("E333", f"the ensemble `{name}` is marked `frozen`", frozen.name.span,
                             "an ensemble has no weights to freeze",
                             help="it follows its members: mark the members `[frozen]` instead"))
        init = decl.attribute("init")
        if init is not None:
            out.append(error("E334", f"`init` on the ensemble `{name}`", init.name.span,
                             "an ensemble has no weights to load",
                             help="give `init` to its members instead"))
    combine = decl.attribute("combine")
    if combine is None:
        return out
    if not decl.is_ensemble:
        out.append(error("E334", f"`combine` on `{name}`, which is not an ensemble", combine.name.span,
                         "only an ensemble combines outputs", help="drop it, or write `node NAME : ensemble(a, b)`"))
        return out
    if combine.value is None:
        return out + [error("E400", "`combine` needs a value", combine.span,
                            help="write `[combine=mean_logits]`, `[combine=mean_probs]` or `[combine=learned]`")]
    values = combine.value.options if isinstance(combine.value, ast.Choice) else (combine.value,)
    if not values:
        out.append(error("E403", "empty `choice()` for `combine`", combine.value.span, "nothing to choose from",
                         help="list at least one option: `choice(mean_logits, mean_probs)`"))
    for value in values:
        if not isinstance(value, ast.Ident):
            out.append(error("E400", "`combine` must be a name", value.span, "wrong kind of value",
                             help="write `mean_logits`, `mean_probs` or `learned`"))
        elif value.name not in COMBINES:
            out.append(error("E210", f"unknown combine `{value.name}`", value.span, "no such way to combine",
                             help=did_you_mean(value.name, COMBINES, "ways")))
    return out
