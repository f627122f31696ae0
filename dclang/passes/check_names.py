"""Every name in the file must mean something: models, gates, losses, datasets, nodes, keys.

Unknown names get a did-you-mean; duplicates point at the second declaration and name the
line of the first.
"""

from __future__ import annotations

from dclang import registry
from dclang.diagnostics import Diagnostic, did_you_mean, error, suggest
from dclang.ir import LABEL, expand_edges
from dclang.passes.check_models import check_model
from dclang.syntax import ast
from dclang.syntax.format import format_endpoint, format_value


def _choice_names(expr) -> list[ast.Ident | ast.Name]:
    """The words a name-valued site may take: one name, or each option of a choice."""
    if isinstance(expr, ast.Choice):
        return [o for o in expr.options if isinstance(o, ast.Ident)]
    if isinstance(expr, (ast.Name, ast.Ident)):
        return [expr]
    return []


def _text(word) -> str:
    return word.text if isinstance(word, ast.Name) else word.name


def check_names(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    nodes = module.of(ast.NodeDecl)
    declared: dict[str, ast.NodeDecl] = {}
    for decl in nodes:
        name = decl.name.text
        if name == LABEL:
            out.append(error("E307", "`label` is reserved", decl.name.span, "cannot declare a node named `label`",
                             help="`label` is the built-in source of the ground-truth labels (paper eq. 1)"))
        elif name in declared:
            first = declared[name].name.span.line
            out.append(error("E300", f"duplicate node `{name}`", decl.name.span, "declared again here",
                             help=f"`{name}` is first declared on line {first}; give this node another name"))
        else:
            declared[name] = decl

    for decl in nodes:
        out += check_model(decl)
        seen_attrs: set[str] = set()
        for attr in decl.attributes:
            key = attr.name.text
            if key not in registry.NODE_ATTRIBUTES:
                out.append(error("E208", f"unknown node attribute `{key}`", attr.name.span,
                                 help=did_you_mean(key, registry.NODE_ATTRIBUTES, "attributes")))
            elif key in seen_attrs:
                out.append(error("E407", f"attribute `{key}` given twice", attr.name.span))
            seen_attrs.add(key)

    endpoints = set(declared) | {LABEL}
    for edge in module.of(ast.EdgeDecl):
        for end in (edge.source, edge.target):
            if end.text == "*" and edge.bulk:
                continue
            if end.text not in endpoints:
                best = suggest(end.text, endpoints)
                if best in declared:
                    hint = f"did you mean `{best}` (declared on line {declared[best].name.span.line})?"
                elif best:
                    hint = f"did you mean `{best}`?"
                else:
                    hint = ""
                out.append(error("E201", f"unknown node `{end.text}`", end.span, "no node with this name",
                                 help=hint or "declare it first: `node NAME : MODEL`"))
        for word in _choice_names(edge.gate):
            if _text(word) not in registry.GATES:
                out.append(error("E202", f"unknown gate `{_text(word)}`", word.span, "no gate with this name",
                                 help=did_you_mean(_text(word), registry.GATES, "gates")))
        for call in edge.loss_calls():  # the loss, or each option of a choice of losses
            name = call.name.text
            if name not in registry.LOSSES:
                out.append(error("E203", f"unknown loss `{name}`", call.name.span, "no loss with this name",
                                 help=did_you_mean(name, registry.LOSSES, "losses")))
            else:
                out += check_repeated_args(call)
                for arg in call.args:
                    if arg.name.text not in registry.LOSSES[name]:
                        out.append(error("E206", f"`{name}` has no option `{arg.name.text}`", arg.name.span,
                                         help=did_you_mean(arg.name.text, registry.LOSSES[name], "options")))

    seen_pairs: dict[tuple[str, str], ast.EdgeDecl] = {}
    for edge in expand_edges(module):
        if edge.bulk:
            continue
        pair = (format_endpoint(edge.source, edge.source_layer), format_endpoint(edge.target, edge.target_layer))
        if pair in seen_pairs:
            first = seen_pairs[pair].span.line
            out.append(error("E301", f"duplicate edge `{pair[0]} -> {pair[1]}`", edge.span, "declared again here",
                             help=f"first declared on line {first}; one edge per ordered pair"))
        seen_pairs[pair] = edge

    out += _check_blocks(module)
    return out


def _check_blocks(module: ast.Module) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for kind, what in ((ast.GraphDecl, "graph"), (ast.DataBlock, "data"), (ast.TrainBlock, "train")):
        for extra in module.of(kind)[1:]:
            out.append(error("E309", f"a second `{what}` declaration", extra.span, "only one per file"))
    data = module.of(ast.DataBlock)
    if not data:
        out.append(error("E310", "no `data` block", None,
                         help="say what to train on, for example `data digits { val_split = 300 }`"))
    for block in data[:1]:
        known = registry.dataset_names()
        if block.dataset.text not in known:
            out.append(error("E204", f"unknown dataset `{block.dataset.text}`", block.dataset.span,
                             "no dataset with this name", help=did_you_mean(block.dataset.text, known, "datasets")))
        out += _check_keys(block.settings, registry.DATA_SETTINGS, "data")
    for block in module.of(ast.TrainBlock)[:1]:
        out += _check_keys(block.settings, registry.TRAIN_SETTINGS, "train")
        for setting in block.settings:
            key = setting.key.text
            table = {"optimizer": registry.OPTIMIZERS, "schedule": registry.SCHEDULES}.get(key)
            if table is None:
                continue
            value = setting.value
            name = (value.name.text if isinstance(value, ast.Call)
                    else value.name if isinstance(value, ast.Ident) else None)
            span = value.name.span if isinstance(value, ast.Call) else value.span
            if name is None:
                continue  # a wrong kind of value: check_values says so
            if name not in table:
                out.append(error("E207", f"unknown {key} `{name}`", span, f"no {key} with this name",
                                 help=did_you_mean(name, table, f"{key}s")))
            elif isinstance(value, ast.Call):
                out += check_repeated_args(value)
                for arg in value.args:
                    if arg.name.text not in table[name]:
                        out.append(error("E206", f"`{name}` has no option `{arg.name.text}`", arg.name.span,
                                         help=did_you_mean(arg.name.text, table[name], "options")))
    return out


def check_repeated_args(call: ast.Call) -> list[Diagnostic]:
    """`kl(T=2, T=3)`: only one of them could be meant, so neither silently wins."""
    out: list[Diagnostic] = []
    seen: dict[str, ast.Argument] = {}
    for arg in call.args:
        key = arg.name.text
        if key in seen:
            out.append(error("E407", f"`{key}` given twice to `{call.name.text}`", arg.name.span,
                             help=f"first given as `{key}={format_value(seen[key].value)}`; keep one"))
        seen.setdefault(key, arg)
    return out


def _check_keys(settings, table, block: str) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: dict[str, ast.Setting] = {}
    for setting in settings:
        key = setting.key.text
        if key not in table:
            other = registry.TRAIN_SETTINGS if block == "data" else registry.DATA_SETTINGS
            other_block = "train" if block == "data" else "data"
            near_other = suggest(key, other)
            if key in other:
                hint = f"`{key}` belongs in the `{other_block}` block"
            elif suggest(key, table) is None and near_other is not None:
                hint = f"did you mean `{near_other}`? it belongs in the `{other_block}` block"
            else:
                hint = did_you_mean(key, table, f"{block} settings")
            out.append(error("E205", f"unknown {block} setting `{key}`", setting.key.span, help=hint))
        elif key in seen:
            out.append(error("E407", f"`{key}` set twice", setting.key.span,
                             help=f"first set on line {seen[key].span.line}"))
        seen.setdefault(key, setting)
    return out
