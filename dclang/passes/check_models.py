"""A node's model must be one dclang can build, with arguments its constructor takes.

Three kinds of model (dclang/models): built-in names (`resnet32`), a library's models
(`torchvision.resnet18`, `timm.mobilenetv3_small_100`) and the models installed packages
register (`dclang.models` entry points). Built-in names are checked against the registry
without importing anything; a library is imported only when the file names one of its models
(and is reported missing, with the command that installs it, when it is not installed); a
plugin's module only when the file uses its registered name. No other name is ever imported.
"""

from __future__ import annotations

from dclang import registry
from dclang.diagnostics import Diagnostic, did_you_mean, error
from dclang.ir import NO_NODE
from dclang.syntax import ast


def _words(expr) -> list[tuple[ast.Name | ast.Ident, ast.Call | None]]:
    """(name, call or None) for each model a node may be: its model, or each option of a choice."""
    if isinstance(expr, ast.Call):
        return [(expr.name, expr)]
    if isinstance(expr, ast.Name):
        return [(expr, None)]
    if isinstance(expr, ast.Choice):
        return [(o, None) for o in expr.options if isinstance(o, ast.Ident)]
    return []


def check_model(decl: ast.NodeDecl) -> list[Diagnostic]:
    """Every problem with the model of one node declaration."""
    from dclang.models import library, plugins

    if decl.is_ensemble:
        return []  # an ensemble, or a choice offering ensembles: check_ensembles
    out: list[Diagnostic] = []
    for word, call in _words(decl.model):
        text = word.text if isinstance(word, ast.Name) else word.name
        if text == NO_NODE:
            continue  # `choice(resnet32, none)`: search may leave the node out
        args = call.args if call is not None else ()
        opened = [a for a in args if isinstance(a.value, ast.Choice)]
        for arg in opened:
            out.append(error("E400", "a model's argument cannot be a `choice(...)`", arg.value.span,
                             help="search over whole models instead: `choice(resnet32, wrn16_2)`"))
        if opened:
            continue
        if registry.is_model(text):
            if args:
                out.append(error("E221", f"`{text}` takes no arguments", call.span,
                                 help=f"write `{text}` alone; built-in models are fitted to the data by dclang"))
            continue
        plugin_names = plugins.registered()
        if text in plugin_names:
            out += _argument_errors(call, lambda values, text=text: plugins.argument_problems(text, values))
            continue
        split = library.split(text)
        if split is None:
            out.append(error("E200", f"unknown model `{text}`", word.span, "no model with this name",
                             help=_hint(text, [*registry.MODELS, *plugin_names])))
            continue
        lib, model = split
        if lib not in library.LIBRARIES:
            out.append(error("E200", f"unknown model library `{lib}`", word.span, "no library with this name",
                             help=did_you_mean(lib, library.LIBRARIES, "libraries")))
            continue
        if not library.installed(lib):
            out.append(error("E220", f"`{text}` needs {lib}, which is not installed", word.span,
                             f"{lib} is not installed", help=f"install it: `{library.LIBRARIES[lib].install}`"))
            continue
        try:
            known = library.model_names(lib)
        except library.BrokenLibrary as exc:
            out.append(error("E220", exc.message, word.span, f"{lib} cannot be imported", help=exc.hint))
            continue
        if model not in known:
            out.append(error("E200", f"unknown {lib} model `{model}`", word.span, f"{lib} has no model with this name",
                             help=_hint(model, known)))
            continue
        out += _argument_errors(call, lambda values, lib=lib, model=model:
                                library.argument_problems(lib, model, values))
    return out


def _hint(word: str, known) -> str:
    """A did-you-mean, else where to look: the lists are too long to print here."""
    suggestion = did_you_mean(word, known)
    if suggestion.startswith("did you mean"):
        return suggestion
    return ("`dclang models` lists every model dclang can build "
            "(a library's are written `torchvision.NAME`, `timm.NAME`)")


def _argument_errors(call: ast.Call | None, problems) -> list[Diagnostic]:
    """E221 at each argument that `problems({name: value})` objects to; E407 for a repeat."""
    from dclang.ir import plain
    from dclang.passes.check_names import check_repeated_args

    if call is None or not call.args:
        return []
    out = check_repeated_args(call)
    found = problems({a.name.text: plain(a.value, a.name.text) for a in call.args})
    for arg in call.args:
        if arg.name.text in found:
            message, help_text = found.pop(arg.name.text)
            out.append(error("E221", message, arg.span, "", help=help_text))
    return out
