"""`dclang models`: every model a node can name, and one model's size and layers for a dataset.

Without a name it lists the three kinds (dclang/models/__init__.py): the built-in models with
what they are, each installed library's models (timm's ~1,400 only with `--library timm`),
and the models installed packages register. With a name (as a node writes it, arguments
included) it builds the model for the dataset's shape on the meta device (no memory, no
weights) and prints its parameter count and every layer with its output shape: the names an
edge between layers uses (`teacher.layer3 -> student.layer2`).
"""

from __future__ import annotations

import textwrap

import click

from dclang.diagnostics import UserError


def _wrapped(names, width: int = 96) -> list[str]:
    return textwrap.wrap(", ".join(names), width, initial_indent="    ", subsequent_indent="    ")


def catalogue(library_name: str | None = None) -> list[str]:
    """The lines of the listing: every kind, or one library's every model."""
    from dclang import registry
    from dclang.models import library, plugins

    if library_name is not None:
        if library_name not in library.LIBRARIES:
            raise UserError(f"unknown model library `{library_name}`",
                            "known: " + ", ".join(library.LIBRARIES))
        if not library.installed(library_name):
            raise UserError(f"{library_name} is not installed", library.LIBRARIES[library_name].install)
        return [f"{library_name}.{name}" for name in library.model_names(library_name)]
    lines = [f"built-in ({len(registry.MODELS)}, and any wrn{{depth}}_{{width}} with depth = 6n+4):"]
    width = max(len(n) for n in registry.MODELS)
    lines += [f"    {info.name:<{width}}  {info.description}" for info in registry.MODELS.values()]
    for name, lib in library.LIBRARIES.items():
        if not library.installed(name):
            lines += ["", f"{name}: not installed ({lib.install})"]
            continue
        names = library.model_names(name)
        lines += ["", f"{name} ({len(names)}, written `{name}.NAME`): {lib.description}"]
        if len(names) > 200:
            lines.append(f"    `dclang models --library {name}` lists them")
        else:
            lines += _wrapped(names)
    found = plugins.registered()
    lines += ["", f"plugins ({len(found)}, the `{plugins.GROUP}` entry points of installed packages):"]
    if not found:
        lines.append("    none installed (docs/models.md: your own models)")
    for name, ep in sorted(found.items()):
        shadowed = "  (shadowed by the built-in model of that name)" if registry.is_model(name) else ""
        lines.append(f"    {name}  {ep.value}" + (f"  from {ep.dist.name}" if ep.dist else "") + shadowed)
    return lines


def describe(model: str, dataset: str) -> list[str]:
    """Parameter count and layers (name, type, output shape) of `model` built for `dataset`."""
    import torch

    from dclang.api import check
    from dclang.diagnostics import DiagnosticError
    from dclang.models import build_model, count_parameters
    from dclang.models.taps import layer_names, layer_shapes, taps
    from dclang.registry import dataset_info, dataset_names

    info = dataset_info(dataset)
    if info is None:
        raise UserError(f"unknown dataset `{dataset}`", "known: " + ", ".join(dataset_names()))
    # the model checked as a node declares it: the same messages, pointing into this text
    text = f"graph models\ndata {dataset} {{ }}\nnode m : {model} [target]\nlabel -> m : through\n"
    checked = check(text, "<model>")
    if checked.errors:
        raise DiagnosticError(checked.errors, "<model>", text)
    classes, channels, size = info.num_classes or 10, info.channels or 3, info.image_size or 32
    spec = checked.graph.nodes["m"]["spec"].model
    with torch.device("meta"):
        net = build_model(spec, classes, channels, size, pretrained=False)
    shapes = layer_shapes(net, (channels, size, size))
    modules, tapped = dict(net.named_modules()), taps(net)
    names = [n for n in layer_names(net) if n in shapes]
    width = max([len(n) for n in names] + [5])
    # a tap (a documented name, listed first) is shown with the module it stands for
    kind = {n: type(modules[tapped.get(n, n)]).__name__ + (f" = {tapped[n]}" if n in tapped else "")
            for n in names}
    kwidth = max([len(k) for k in kind.values()] + [4])
    out = [f"{spec} for {dataset} ({classes} classes, {channels}x{size}x{size} images): "
           f"{count_parameters(net):,} parameters", "",
           f"    {'layer':<{width}}  {'type':<{kwidth}}  output (per image)"]
    out += [f"    {n:<{width}}  {kind[n]:<{kwidth}}  {'x'.join(map(str, shapes[n]))}" for n in names]
    return out


@click.command("models")
@click.argument("model", required=False)
@click.option("--data", "dataset", default="cifar100", show_default=True,
              help="The dataset whose classes, channels and image size the model is built for.")
@click.option("--library", "library_name", metavar="LIB", help="List every model of one library (torchvision, timm).")
def models_command(model: str | None, dataset: str, library_name: str | None) -> None:
    """List every model a node can name; with MODEL, its parameters and layers for a dataset.

    MODEL is written as in a node, arguments included: `resnet32`,
    `torchvision.resnet18`, `'timm.resnet10t(drop_rate=0.1)'`. Its layers are the names edges
    between layers use (`teacher.layer3 -> student.layer2`).
    """
    lines = describe(model, dataset) if model else catalogue(library_name)
    click.echo("\n".join(lines))
