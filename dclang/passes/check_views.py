"""A network's `view` is `shared` or `own`; an ensemble has none (`dclang.views`).

`node a : resnet32 [view=own]` gives `a` its own random augmentation of each batch's images.
Any network may have one, a frozen teacher too (it then predicts on its own augmentation of
the images its students see). An ensemble reads no images: its members are computed on
their own views, so `view` on it is refused. With `augment = none` in the data block every
view is the same normalised images: an own view then changes nothing (a warning).
"""

from __future__ import annotations

from dclang.diagnostics import Diagnostic, did_you_mean, error, warning
from dclang.syntax import ast
from dclang.views import OWN, VIEWS


def check_views(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    own = []
    for decl in module.of(ast.NodeDecl):
        attr = decl.attribute("view")
        if attr is None:
            continue
        name = decl.name.text
        if decl.is_ensemble:
            out.append(error("E361", f"`view` on the ensemble `{name}`", attr.name.span,
                             "an ensemble reads no images",
                             help="it combines its members' outputs, each computed on the member's own view: "
                                  "give `view` to the members instead"))
            continue
        if attr.value is None:
            out.append(error("E400", "`view` needs a value", attr.span, help="write `[view=own]` or `[view=shared]`"))
            continue
        values = attr.value.options if isinstance(attr.value, ast.Choice) else (attr.value,)
        if not values:
            out.append(error("E403", "empty `choice()` for `view`", attr.value.span, "nothing to choose from",
                             help="list at least one option: `choice(shared, own)`"))
        for value in values:
            if not isinstance(value, ast.Ident):
                out.append(error("E400", "`view` must be a name", value.span, "wrong kind of value",
                                 help="write `shared` or `own`"))
            elif value.name not in VIEWS:
                out.append(error("E360", f"unknown view `{value.name}`", value.span, "no such view",
                                 help=did_you_mean(value.name, VIEWS, "views")))
            elif value.name == OWN:
                own.append(value)
    out += _no_augmentation(module, own)
    return out


def _no_augmentation(module: ast.Module, own: list[ast.Ident]) -> list[Diagnostic]:
    """`view=own` where the data block says `augment = none`: every view is the same images."""
    blocks = module.of(ast.DataBlock)
    setting = next((s for b in blocks[:1] for s in b.settings if s.key.text == "augment"), None)
    if not own or setting is None or not (isinstance(setting.value, ast.Ident) and setting.value.name == "none"):
        return []
    return [warning("W360", "`view=own` with `augment = none`: every view is the same images", value.span,
                    "no different augmentation to see", help="augment the data (`augment = pad_crop`, ...), "
                                                             "or drop `view=own`") for value in own]
