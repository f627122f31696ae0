"""Every value must have the right type and a sensible range.

Rules are stated with the values that broke them ("`T` must be in (0, 100], but got 0"); every
number has a range (`dclang.ranges`, the command line's where an option sets the same thing),
so no setting can ask for a run that never ends or a number no tensor can hold. Each option
of a `choice(...)` is checked as if it had been written alone, so a template cannot hide a
bad value behind a choice, and an empty `choice()` is an error of its own.
"""

from __future__ import annotations

import math

from dclang import loss_catalogue, registry
from dclang.diagnostics import Diagnostic, clip, did_you_mean, error, warning
from dclang.ir import is_ema_decl
from dclang.syntax import ast

_KIND_WORDS = {
    "int": "a whole number", "float": "a number", "number": "a number", "bool": "`true` or `false`",
    "name": "a name", "str": 'a string in double quotes', "int_list": "a list of whole numbers like [60, 120]",
    "call": "a name or a call like `sgd(lr=0.1)`",
}

def _out_of_range(key: str, number: ast.Number, bounds) -> Diagnostic:
    """E401 for a temperature, E402 for a loss weight, E404 for any other number, at the number."""
    code = {"T": "E401", "weight": "E402"}.get(key, "E404")
    return error(code, f"`{key}` {bounds.rule}, but got {clip(number.text, 40)}", number.span, "out of range")


#: whole numbers beyond this overflow the 64-bit integers of torch and NumPy
_INT_LIMIT = 2 ** 63 - 1


def _representable(number: int | float) -> bool:
    """Finite (`1e309` reads as infinity) and, for a whole number, within 64 bits."""
    return abs(number) <= _INT_LIMIT if isinstance(number, int) else math.isfinite(number)


def _has_kind(value: ast.Value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, ast.Number) and isinstance(value.value, int)
    if kind in ("float", "number"):
        return isinstance(value, ast.Number)
    if kind == "bool":
        return isinstance(value, ast.Bool)
    if kind == "name":
        return isinstance(value, ast.Ident)
    if kind == "str":
        return isinstance(value, ast.String)
    if kind == "int_list":
        return isinstance(value, ast.ListValue) and all(
            isinstance(i, ast.Number) and isinstance(i.value, int) for i in value.items)
    if kind == "call":
        return isinstance(value, (ast.Call, ast.Ident))
    raise ValueError(kind)


def check_value(value: ast.Value, kind: str, key: str, where: str, bounds=None) -> list[Diagnostic]:
    """Check one value (or each option of a choice) against its kind and `bounds`, a
    `dclang.ranges` range (of each item, for a list)."""
    if isinstance(value, ast.Choice):
        if not value.options:
            return [error("E403", f"empty `choice()` for {where}", value.span, "nothing to choose from",
                          help="list at least one option: `choice(a, b)`")]
        return [d for option in value.options for d in check_value(option, kind, key, where, bounds)]
    if not _has_kind(value, kind):
        return [error("E400", f"{where} must be {_KIND_WORDS[kind]}", value.span, "wrong kind of value")]
    if isinstance(value, ast.Number) and not _representable(value.value):
        return [error("E404", f"{where} must be a finite number of sensible size, but got {clip(value.text, 40)}",
                      value.span, "too large to compute with",
                      help=f"floating point numbers end near 1.8e308 and whole numbers at {_INT_LIMIT:.1e}")]
    if bounds is not None:
        numbers = value.items if isinstance(value, ast.ListValue) else (value,)
        return [_out_of_range(key, number, bounds) for number in numbers
                if isinstance(number, ast.Number) and number.value not in bounds]
    if key == "augment" and isinstance(value, ast.Ident) and value.name not in registry.AUGMENTS:
        return [error("E209", f"unknown augmentation `{value.name}`", value.span,
                      help=did_you_mean(value.name, registry.AUGMENTS, "augmentations"))]
    return []


def _check_call(value: ast.Value, table: dict, key: str) -> list[Diagnostic]:
    if not isinstance(value, ast.Call) or value.name.text not in table:
        return []
    options = table[value.name.text]
    return [d for arg in value.args if arg.name.text in options
            for d in check_value(arg.value, options[arg.name.text].type, arg.name.text,
                                 f"`{value.name.text}` option `{arg.name.text}`", options[arg.name.text].range)]


def check_values(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for block, table in ((module.of(ast.DataBlock)[:1], registry.DATA_SETTINGS),
                         (module.of(ast.TrainBlock)[:1], registry.TRAIN_SETTINGS)):
        for b in block:
            for setting in b.settings:
                option = table.get(setting.key.text)
                if option is None:
                    continue
                if setting.key.text in ("optimizer", "schedule") and isinstance(setting.value, ast.Choice):
                    out.append(error("E400", f"`{setting.key.text}` cannot be a `choice(...)`", setting.value.span,
                                     "not a search site",
                                     help="keep the name fixed and put the choice on its options, for example "
                                          + ("`sgd(lr=choice(0.1, 0.05))`" if setting.key.text == "optimizer"
                                             else "`step(milestones=[60, 120, 180], gamma=choice(0.1, 0.2))`")))
                    continue
                out += check_value(setting.value, option.type, setting.key.text, f"`{setting.key.text}`",
                                   option.range)
                if setting.key.text in ("optimizer", "schedule"):
                    sub = registry.OPTIMIZERS if setting.key.text == "optimizer" else registry.SCHEDULES
                    out += _check_call(setting.value, sub, setting.key.text)
    out += _check_milestones(module)
    out += _check_pad(module, graph)
    for decl in module.of(ast.NodeDecl):
        # an empty choice, or an option not a model name
        if isinstance(decl.model, ast.Choice) and not decl.is_ensemble and not is_ema_decl(decl):
            # an `ema(...)` / `branch(...)` option is a network made from another's: its own pass checks it
            named = [o for o in decl.model.options if not isinstance(o, ast.Derived)]
            out += [d for o in named for d in check_value(o, "name", "model", f"the model of `{decl.name.text}`")] \
                if len(named) < len(decl.model.options) else \
                check_value(decl.model, "name", "model", f"the model of `{decl.name.text}`")
        init = decl.attribute("init")
        if init is not None:
            if init.value is None:
                out.append(error("E400", "`init` needs a checkpoint path", init.span,
                                 help='write `init="teacher.pt"`'))
            else:
                out += check_value(init.value, "str", "init", "`init`")
        for flag in ("target", "frozen"):
            attr = decl.attribute(flag)
            if attr is not None and attr.value is not None:
                out.append(error("E400", f"`{flag}` takes no value", attr.value.span,
                                 help=f"write `[{flag}]`"))
    for edge in module.of(ast.EdgeDecl):
        if isinstance(edge.gate, ast.Choice):  # empty, or an option that is not a gate name
            out += check_value(edge.gate, "name", "gate", "the gate")
        out += _check_loss(edge)
        for layer in (edge.source_layer, edge.target_layer):
            if isinstance(layer, ast.Choice):
                out += _check_layer_choice(layer)
    return out


def _check_loss(edge: ast.EdgeDecl) -> list[Diagnostic]:
    """A choice of losses lists losses; each loss argument is a number in its catalogue range."""
    out: list[Diagnostic] = []
    if isinstance(edge.loss, ast.Choice):
        if not edge.loss.options:
            out.append(error("E403", "empty `choice()` for the loss", edge.loss.span, "nothing to choose from",
                             help="list at least one loss: `choice(kl(T=2), dkd())`"))
        for option in edge.loss.options:
            if not isinstance(option, ast.Call):
                out.append(error("E400", "a choice of losses lists losses written as calls", option.span,
                                 "not a loss", help="write each option with parentheses: `choice(kl(T=2), lskd())`"))
            elif any(isinstance(a.value, ast.Choice) for a in option.args):
                out.append(error("E400", "a `choice(...)` inside a choice of losses", option.span,
                                 "one choice at a time",
                                 help="write the options out: `choice(at(p=1), at(p=2), sp())`"))
    for call in edge.loss_calls():
        info = loss_catalogue.LOSSES.get(call.name.text)
        for arg in call.args if info is not None else ():
            if arg.name.text in info.args:
                spec = info.args[arg.name.text]
                out += check_value(arg.value, spec.kind, arg.name.text, f"`{arg.name.text}`", spec.range)
    return out


def _check_layer_choice(layer: ast.Choice) -> list[Diagnostic]:
    if not layer.options:
        return [error("E403", "empty `choice()` for a layer", layer.span, "nothing to choose from",
                      help="list at least one layer: `teacher.choice(layer2, layer3)`")]
    return [error("E400", "a choice of layers lists layer names", o.span, "not a layer name",
                  help='write names like `layer3`, or a module path in quotes: `"layer3.0.conv2"`')
            for o in layer.options if not isinstance(o, (ast.Ident, ast.String))]


def _check_milestones(module: ast.Module) -> list[Diagnostic]:
    """Milestones past the last epoch never fire: almost always a copy-paste from a longer run."""
    out: list[Diagnostic] = []
    for block in module.of(ast.TrainBlock)[:1]:
        settings = {s.key.text: s.value for s in block.settings}
        epochs, schedule = settings.get("epochs"), settings.get("schedule")
        if not (isinstance(epochs, ast.Number) and isinstance(schedule, ast.Call)):
            continue
        milestones = schedule.arg("milestones")
        if milestones is None or not isinstance(milestones.value, ast.ListValue):
            continue
        values = [i.value for i in milestones.value.items if isinstance(i, ast.Number)]
        if values != sorted(values):
            out.append(error("E404", "`milestones` must increase", milestones.value.span))
        late = [v for v in values if isinstance(v, int) and v >= epochs.value]
        if late:
            out.append(warning("W504", f"milestone {late[0]} is not before the last epoch ({epochs.value})",
                               milestones.value.span, "never reached",
                               help="a milestone is the epoch at which the learning rate is multiplied by `gamma`"))
    return out


def _check_pad(module: ast.Module, graph) -> list[Diagnostic]:
    """Reflect padding needs images larger than the padding: where the dataset fixes the image
    size (8x8 digits), a `pad` as large is an error here, not in the first training step.
    `flip` and `none` do not crop, so their `pad` is never used."""
    from dclang.ir import is_open

    data = graph.graph.get("data") if graph is not None else None
    if data is None or is_open(data.dataset) or data.augment in ("flip", "none"):
        return []
    info = registry.dataset_info(data.dataset)
    size = info.image_size if info is not None else None
    setting = next((s for b in module.of(ast.DataBlock)[:1] for s in b.settings if s.key.text == "pad"), None)
    if size is None or setting is None:
        return []
    options = setting.value.options if isinstance(setting.value, ast.Choice) else (setting.value,)
    return [error("E404", f"`pad` must be smaller than the images of `{data.dataset}` ({size}x{size} pixels), "
                          f"but got {option.text}", option.span, "as large as the image",
                  help=f"reflect padding mirrors the image inside its border: use a `pad` of at most {size - 1} "
                       f"(a crop of {size}x{size} then shifts by up to that many pixels), or `augment = flip` or "
                       "`none`")
            for option in options if isinstance(option, ast.Number) and isinstance(option.value, int)
            and option.value >= size]
