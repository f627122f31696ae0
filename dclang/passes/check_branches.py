"""A `branch(source, from=layer)` node must share a trunk that exists and splits cleanly.

`node b2 : branch(b1, from=layer3)` shares `b1`'s modules before `layer3` and owns the rest
(`dclang.models.branch`). The source is a declared network that is trained (a frozen trunk
would make the branch a frozen network's head: say so with a separate node), never `label`,
an ensemble or an `ema(...)` node; branches of branches are fine, cycles of them are not. The
only argument is `from`, a layer name (`layer3`) or module path (`"layer3.1"`) of the
architecture, as `dclang models NAME --data D` lists them; one forward on the meta device
(`find_split`) decides whether it splits the network into a trunk and a head, and says why
not. A branch is trained with its trunk: it is never `[frozen]` and has no `init` (its trunk
is its source's, its head starts as a separate network's), and it reads its source's view (its trunk is
computed once, on that view). Codes E350-E356.
"""

from __future__ import annotations

from typing import Any

from dclang.diagnostics import Diagnostic, did_you_mean, error, suggest
from dclang.ir import LABEL, Open
from dclang.syntax import ast

ARGS = ("from",)


def _branches(decl: ast.NodeDecl) -> list[ast.Derived]:
    """The `branch(...)` a node is, or each one its choice may be."""
    model = decl.model
    options = model.options if isinstance(model, ast.Choice) else [model]
    return [o for o in options if isinstance(o, ast.Derived) and o.kind == "branch"]


def check_branches(module: ast.Module, graph) -> list[Diagnostic]:
    declared: dict[str, ast.NodeDecl] = {}
    for decl in module.of(ast.NodeDecl):
        declared.setdefault(decl.name.text, decl)
    out: list[Diagnostic] = []
    for decl in module.of(ast.NodeDecl):
        for branch in _branches(decl):
            out += _check_one(decl, branch, declared, graph)
    return out


def _check_one(decl: ast.NodeDecl, branch: ast.Derived, declared: dict[str, ast.NodeDecl], graph) -> list[Diagnostic]:
    out = _check_args(branch)
    name, source = decl.name.text, branch.source.text
    out += _check_attributes(decl)
    own = graph.nodes[name]["spec"] if name in graph else None
    if own is not None and own.frozen and not own.declared_frozen and own.is_branch:
        out.append(error("E355", f"`{name}` is a branch that no edge trains: a frozen node would be pre-trained "
                                 "alone, but a branch is trained with its trunk", decl.name.span, "frozen branch",
                         help=f"add an edge into it (`label -> {name} : through`), or remove it"))
    if source == LABEL:
        return out + [error("E350", f"`{name}` is a branch of `label`, which is no network", branch.source.span,
                            "not a network", help="name a network node: a branch shares its modules")]
    if source not in declared:
        return out + [error("E350", f"`{name}` is a branch of `{source}`, which is not declared", branch.source.span,
                            "unknown node", help=did_you_mean(source, [n for n in declared if n != name], "nodes"))]
    cycle = _cycle(name, declared)
    if cycle:
        return out + [error("E351", f"`{name}` is a branch of itself: {' -> '.join(f'`{n}`' for n in cycle)}",
                            branch.source.span, "a cycle of branches",
                            help="one node of the chain must be a network of its own (`node b1 : resnet32`)")]
    src = declared[source]
    if src.is_ensemble:
        return out + [error("E350", f"`{name}` is a branch of the ensemble `{source}`, which has no modules",
                            branch.source.span, "not a network", help="name one of its members")]
    if isinstance(src.model, ast.Derived) and src.model.kind == "ema":
        return out + [error("E350", f"`{name}` is a branch of `{source}`, an `ema(...)` node, which is never trained",
                            branch.source.span, "not trained", help="branch from the network it averages")]
    spec = graph.nodes[source]["spec"] if source in graph else None
    if spec is not None and spec.frozen:
        why = "declared `[frozen]`" if spec.declared_frozen else "frozen: no edge into it carries a loss"
        out.append(error("E355", f"`{name}` is a branch of `{source}`, which is {why}", branch.source.span,
                         "a frozen trunk", help="a branch trains its trunk with its source: train the source, or "
                                                "declare a separate network for a frozen teacher's head"))
    return out + _check_layer(name, branch, graph)


def _check_args(branch: ast.Derived) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[str] = set()
    for arg in branch.args:
        key = arg.name.text
        if key not in ARGS:
            out.append(error("E352", f"`branch` takes no argument `{key}`", arg.name.span, "unknown argument",
                             help=f"{did_you_mean(key, ARGS, 'arguments')} `from=` names the first layer of the "
                                  "branch's own head"))
        elif key in seen:
            out.append(error("E352", f"`{key}` given twice to `branch`", arg.name.span, "repeated", help="keep one"))
        else:
            for value in (arg.value.options if isinstance(arg.value, ast.Choice) else [arg.value]):
                if not isinstance(value, (ast.Ident, ast.String)):
                    out.append(error("E352", "`from` names a layer: an identifier or a string", value.span,
                                     "not a layer name", help='e.g. `from=layer3` or `from="layer3.1"`'))
        seen.add(key)
    if "from" not in seen:
        out.append(error("E352", "`branch` needs `from=`, the layer where the branch's own head begins", branch.span,
                         "no `from`", help=f"e.g. `branch({branch.source.text}, from=layer3)`; "
                                           "`dclang models NAME --data D` lists the layers"))
    return out


def _check_attributes(decl: ast.NodeDecl) -> list[Diagnostic]:
    out = []
    for attr in decl.attributes:
        if attr.name.text in ("frozen", "init"):
            out.append(error("E355", f"a branch cannot be `{attr.name.text}`: it is trained with its trunk, its head "
                                     "initialised as a separate network's", attr.span,
                             f"`{attr.name.text}` on a branch",
                             help="declare a separate network for a frozen or loaded node"))
        elif attr.name.text == "view":
            out.append(error("E356", "a branch reads its source's view: its trunk is computed once, on that view",
                             attr.span, "`view` on a branch",
                             help="give the source `[view=own]` for the whole family, or declare a separate network "
                                  "on its own view"))
    return out


def _cycle(name: str, declared: dict[str, ast.NodeDecl]) -> list[str]:
    """The chain of branch sources from `name` back to itself, or [] where it ends."""
    chain, at = [name], name
    while True:
        model = declared[at].model if at in declared else None
        if not (isinstance(model, ast.Derived) and model.kind == "branch"):
            return []
        at = model.source.text
        if at == name:
            return [*chain, at]
        if at in chain:
            return []  # a cycle not through `name`: reported at its own nodes
        chain.append(at)


def _layer_values(branch: ast.Derived) -> list[tuple[str, Any]]:
    arg = branch.arg("from")
    if arg is None:
        return []
    values = arg.value.options if isinstance(arg.value, ast.Choice) else [arg.value]
    return [(v.name if isinstance(v, ast.Ident) else v.value, v.span) for v in values
            if isinstance(v, (ast.Ident, ast.String))]


def _check_layer(name: str, branch: ast.Derived, graph) -> list[Diagnostic]:
    model = graph.nodes[branch.source.text]["spec"].model if branch.source.text in graph else None
    if not isinstance(model, str) or isinstance(model, Open):
        return []  # an open or unknown architecture: checked per trial, or by check_models
    layers = _layer_values(branch)
    if not layers:
        return []
    from dclang.models.branch import NotASplit, probe_split
    from dclang.models.taps import graph_input

    classes, input_shape = graph_input(graph)
    out = []
    for layer, span in layers:
        found = probe_split(model, classes, input_shape, layer)
        if isinstance(found, NotASplit):
            out.append(error("E354", f"`from={layer}` does not split `{model}` into a trunk and a head: {found}",
                             span, "not a split point", help="pick a stage boundary (e.g. `layer2`, `layer3` of a "
                                                             "ResNet): a module the network applies in order, "
                                                             "with nothing routed around it"))
        elif isinstance(found, Exception):
            from dclang.models.taps import probe

            names = list(probe(model, classes, input_shape).names)
            best = suggest(layer, names)
            near = [n for n in names if "." not in n][:12]
            out.append(error("E353", f"`{model}` (the architecture of `{name}`) has no layer `{layer}`", span,
                             "no layer with this name",
                             help=(f"did you mean `{best}`? " if best else "") +
                                  f"layers of `{model}`: {', '.join(f'`{n}`' for n in near)}, or any module path"))
    return out
