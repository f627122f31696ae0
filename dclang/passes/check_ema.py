"""A mean teacher `node t : ema(s, decay=0.999)` must have a network to follow.

Its source is a declared node that an optimizer trains: not `label`, not a frozen node (its
average would be a constant copy), not an ensemble or another EMA node (their weights are not
one network's, or are already an average: refused rather than given a meaning), not a
`branch(...)` (not supported yet). `decay` is a number in (0, 1) (`dclang.ranges.DECAY`), the
only argument. Nothing trains it, so no live edge points into it, and `[frozen]` / `[init=...]`
mean nothing on it (it starts as a copy of its source: give `init` to the source). In a
template, `choice(ema(s), none)` offers the mean teacher or no node: every option of its choice
is then an `ema(...)` or `none`, and a node that may be absent cannot be the target.
"""

from __future__ import annotations

from dclang import ranges
from dclang.diagnostics import Diagnostic, did_you_mean, error
from dclang.ema import ARGS
from dclang.ir import LABEL, NO_NODE, is_ema_decl
from dclang.syntax import ast
from dclang.syntax.format import format_value


def _emas(decl: ast.NodeDecl) -> list[ast.Derived]:
    """The `ema(...)` a node may be: itself, or each such option of its choice."""
    options = decl.model.options if isinstance(decl.model, ast.Choice) else (decl.model,)
    return [o for o in options if isinstance(o, ast.Derived) and o.kind == "ema"]


def check_ema(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    declared: dict[str, ast.NodeDecl] = {}
    for decl in module.of(ast.NodeDecl):
        declared.setdefault(decl.name.text, decl)
    for decl in module.of(ast.NodeDecl):
        if not is_ema_decl(decl):
            continue
        for ema in _emas(decl):
            out += _check_source(decl, ema, declared, graph)
            out += _check_args(ema)
        out += _check_choice(decl)
        out += _check_attributes(decl)
        name = decl.name.text
        for edge in (e for _, _, e in graph.in_edges(name, data="spec") if e.gate != "cutoff"):
            out.append(error("E345", f"an edge into the mean teacher `{name}`", edge.span,
                             f"`{name}` learns from no loss",
                             help=f"its weights are the moving average of its source's: make the gate `cutoff`, "
                                  f"or point the edge at `{_emas(decl)[0].source.text}`"))
    return out


def _check_source(decl: ast.NodeDecl, ema: ast.Derived, declared: dict[str, ast.NodeDecl],
                  graph) -> list[Diagnostic]:
    name, source = decl.name.text, ema.source.text
    span = ema.source.span
    if source == LABEL:
        return [error("E341", "`label` cannot be averaged", span, "not a network",
                      help="the source of `ema(...)` is a trained network: `ema(student)`")]
    if source not in declared or source not in graph:
        return [error("E340", f"unknown node `{source}`", span, "no node with this name",
                      help=did_you_mean(source, [n for n in declared if n != name], "nodes")
                      or "declare it first: `node NAME : MODEL`")]
    if source == name:
        return [error("E342", f"`{name}` is the moving average of itself", span, "this is the node itself",
                      help="average another, trained node: `ema(student)`")]
    src_decl, spec = declared[source], graph.nodes[source]["spec"]
    if src_decl.is_ensemble or is_ema_decl(src_decl):
        what = "an ensemble" if src_decl.is_ensemble else "a mean teacher itself"
        return [error("E342", f"`{source}` is {what}", span, "not a trained network",
                      help=f"average the trained network `{source}` is made from: an EMA of an ensemble or of an "
                           "EMA is not supported (average each member, or give the chain's first node a lower decay)")]
    if isinstance(src_decl.model, ast.Derived):  # a branch (`branch(b, from=layer)`)
        return [error("E347", f"`{source}` is a `{src_decl.model.kind}(...)` network", span,
                      "not supported as a mean teacher's source",
                      help="average a whole network declared by its model")]
    if spec.frozen:
        declared_frozen = src_decl.attribute("frozen") is not None
        why = ("declared `[frozen]`" if declared_frozen
               else "frozen: no live edge into it, so it is a pre-trained teacher that never changes")
        train = f"drop `[frozen]` from `{source}`" if declared_frozen else f"train `{source}` (an edge such as " \
            f"`label -> {source} : through`)"
        return [error("E341", f"`{source}` is {why}", span, "its average would never move",
                      help=f"{train}, or use `{source}` as a teacher directly")]
    return []


def _check_args(ema: ast.Derived) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[str] = set()
    for arg in ema.args:
        key = arg.name.text
        if key not in ARGS:
            out.append(error("E344", f"`ema` has no argument `{key}`", arg.name.span, "unknown argument",
                             help=did_you_mean(key, ARGS, "arguments")))
            continue
        if key in seen:
            out.append(error("E344", f"`{key}` given twice to `ema`", arg.name.span, "given again here",
                             help="keep one"))
            continue
        seen.add(key)
        values = arg.value.options if isinstance(arg.value, ast.Choice) else (arg.value,)
        for value in values:
            if not isinstance(value, ast.Number) or isinstance(value.value, bool):
                out.append(error("E343", f"`decay` must be a number, not `{format_value(value)}`", value.span,
                                 "not a number", help=f"`decay` {ranges.DECAY.rule}, e.g. `decay=0.999`"))
            elif value.value not in ranges.DECAY:
                out.append(error("E343", f"`decay` {ranges.DECAY.rule}, but got {value.text}", value.span,
                                 "out of range",
                                 help="the teacher keeps `decay` of its weights and takes the rest from its source "
                                      "after each update; 0.99 to 0.9999 are usual"))
    return out


def _check_choice(decl: ast.NodeDecl) -> list[Diagnostic]:
    """`choice(ema(s), none)`: ema options and `none` only; such a node is never the target."""
    if not isinstance(decl.model, ast.Choice):
        return []
    out: list[Diagnostic] = []
    name = decl.name.text
    absent = None
    for option in decl.model.options:
        if isinstance(option, ast.Ident) and option.name == NO_NODE:
            absent = option
        elif not (isinstance(option, ast.Derived) and option.kind == "ema"):
            out.append(error("E348", f"the choice for `{name}` mixes `ema(...)` and other options", option.span,
                             "not an `ema(...)` or `none`",
                             help="a mean teacher is one in every trial or absent: offer `ema(...)` options and "
                                  "`none`, and choose other models in a node of their own"))
        elif any(isinstance(a.value, ast.Choice) for a in option.args):
            out.append(error("E348", "a `choice(...)` inside an option of a choice", option.span,
                             "one site per choice",
                             help="list the decays as options: `choice(ema(s, decay=0.99), ema(s, decay=0.999), "
                                  "none)`"))
    if absent is not None and decl.attribute("target") is not None:
        out.append(error("E348", f"the target `{name}` may be left out of a trial", absent.span,
                         "`none` leaves no target", help="drop `none`, or make another node the target"))
    return out


def _check_attributes(decl: ast.NodeDecl) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    name = decl.name.text
    for key, why, hint in (("frozen", "its weights follow its source's every update",
                            "drop `frozen`; freeze the source instead (then it needs no mean teacher)"),
                           ("init", "it starts as an exact copy of its source",
                            "give `init` to the source instead")):
        attr = decl.attribute(key)
        if attr is not None:
            out.append(error("E346", f"`{key}` on the mean teacher `{name}`", attr.name.span, why, help=hint))
    return out

