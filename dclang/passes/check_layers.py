"""Every layer an edge names exists, and the loss can compare the two layers' shapes.

Shapes are inferred statically, from the models built on torch's meta device for the
dataset's image shape (`dclang.models.taps.layer_shapes`): no data, no memory, no training.
Only a file with an edge between layers pays for importing torch here; every other file is
checked without it.
"""

from __future__ import annotations

import math
from typing import Any

from dclang.diagnostics import Diagnostic, error
from dclang.ir import Open
from dclang.syntax import ast


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _spatial(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape[1:]) or "no spatial size"


def check_layers(module: ast.Module, graph) -> list[Diagnostic]:
    edges = [(a["spec"], a["decl"]) for _, _, a in graph.edges(data=True) if a["spec"].on_layers]
    if not edges:
        return []
    from dclang.models.taps import graph_input, probe

    classes, input_shape = graph_input(graph)
    names: dict[str, list[str]] = {}

    def layers_of(node: str) -> dict[str, tuple[int, ...]] | None:
        model = graph.nodes[node]["spec"].model
        if not isinstance(model, str):
            return None  # an open model: checked per trial
        found = probe(model, classes, input_shape)
        if not found.built:
            return None  # a model that cannot be built: check_models or check_inputs says why
        names[model] = list(found.names)
        return found.shapes  # None when it cannot run on these images: check_inputs says why

    out: list[Diagnostic] = []
    for spec, decl in edges:
        ends = []
        for node, layer, expr in ((spec.source, spec.source_layer, decl.source_layer),
                                  (spec.target, spec.target_layer, decl.target_layer)):
            known = layers_of(node) if layer is not None and not graph.nodes[node]["spec"].is_ensemble else None
            if known is None:
                break
            options = _layer_options(layer, expr)
            for option, span in options:
                if option not in known:
                    out.append(_unknown_layer(node, graph.nodes[node]["spec"].model, option, span,
                                              names[graph.nodes[node]["spec"].model]))
            ends.append([(node, o, span, known.get(o)) for o, span in options])
        losses = ([o[0] for o in spec.loss.options if isinstance(o, tuple)] if isinstance(spec.loss, Open)
                  else [spec.loss])
        if len(ends) < 2:
            continue
        found = [_check_shapes(loss, s_end, t_end, decl) for loss in losses for s_end in ends[0]
                 for t_end in ends[1] if s_end[3] and t_end[3]]
        if found and all(found):  # an open edge is checked per trial, here only when none of its options fits
            out += found[0]
    return out


def _layer_options(layer: Any, expr: ast.LayerExpr) -> list[tuple[str, Any]]:
    """(layer name, span) for a layer, or for each option of a choice of layers."""
    if isinstance(layer, Open):
        return [(str(v), o.span) for v, o in zip(layer.options, expr.options)]
    return [(layer, expr.span)]


def _unknown_layer(node: str, model: str, layer: str, span, names: list[str]) -> Diagnostic:
    from dclang.diagnostics import suggest

    taps = [n for n in names if not n[:1].isdigit() and "." not in n][:8]
    best = suggest(layer, names)
    help_text = (f"did you mean `{best}`? " if best else "") + \
        f"layers of `{model}`: {', '.join(f'`{t}`' for t in taps)}, or any module path of `named_modules()`"
    return error("E230", f"`{node}` ({model}) has no layer `{layer}`", span, "no layer with this name", help=help_text)


def _check_shapes(loss: str, source, target, decl: ast.EdgeDecl) -> list[Diagnostic]:
    """The loss must be able to compare the two layers: `at`, `hint` and `nst` need one spatial
    size, `nst` feature maps with positions to compare its channels over, and `hint` on
    differing channels feature maps (N, C, H, W) for its 1x1 connector."""
    (s_node, s_layer, _, s_shape), (t_node, t_layer, _, t_shape) = source, target
    both = (f"`{s_node}.{s_layer}` is {_shape_text(s_shape)} and `{t_node}.{t_layer}` is {_shape_text(t_shape)} "
            "(channels, then spatial size)")
    if loss == "nst" and (len(s_shape) < 2 or math.prod(s_shape[1:]) < 2 or math.prod(t_shape[1:]) < 2):
        return [error("E321", f"`nst` compares each channel's map over its positions, but {both}", decl.span,
                      "no feature maps", help="pick convolutional layers (channels, height, width) before the "
                                              "pooling, e.g. `layer3`: one position per channel leaves nothing "
                                              "to compare")]
    if loss in ("at", "hint", "nst") and s_shape[1:] != t_shape[1:]:
        return [error("E321", f"`{loss}` compares layers of one spatial size, but {both}", decl.span,
                      f"{_spatial(s_shape)} against {_spatial(t_shape)}",
                      help="pick layers of the same resolution (e.g. `layer3` with `layer3`), or use `sp()`, "
                           "which compares any two shapes")]
    if loss == "hint" and s_shape[0] != t_shape[0] and len(s_shape) != 3:
        return [error("E321", f"`hint` needs feature maps (channels, height, width) to connect, but {both}",
                      decl.span, "no 1x1 connector fits",
                      help="pick convolutional layers, or layers with the same width")]
    return []
