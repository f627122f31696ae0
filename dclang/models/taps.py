"""Taps: the intermediate layers of a model that an edge can name (`teacher.layer3`).

A layer is any module of the model, named by its path in `named_modules()` (`layer3`,
`layer3.0.conv2`), so every model, a library's included, has layers without declaring
anything. A built-in model also documents its *taps*, a few names worth transferring from,
in a `taps` attribute mapping a tap to a module path: the CIFAR ResNets and WideResNets tap
`layer1`, `layer2`, `layer3` (the three stages' outputs) and `pool` (the pooled features);
the small CNNs tap their conv blocks (`conv1`, ...) and `pool`, which `nn.Sequential` would
otherwise only number. A layer's value is its module's output in the forward pass.

Layers are captured with forward hooks during the one forward every node runs per step
(`LayerCapture`): no second forward, no model rewritten, and any `nn.Module` works, whereas
torch.fx feature extraction must trace the model symbolically (which data-dependent
Python in a library model can break) and builds a second module whose parameters are not
the node's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Iterable

import torch
from torch import Tensor, nn

from dclang.diagnostics import did_you_mean


class UnknownLayer(KeyError):
    """A layer name the model does not have; the message carries a did-you-mean."""

    def __str__(self) -> str:
        return str(self.args[0])


def taps(model: nn.Module) -> dict[str, str]:
    """The model's documented taps: tap name -> module path (empty for undocumented models)."""
    return dict(getattr(model, "taps", {}) or {})


def layer_names(model: nn.Module) -> list[str]:
    """Every name an edge may use for this model: its taps first, then every module path."""
    names = list(taps(model))
    names += [name for name, _ in model.named_modules() if name and name not in names]
    return names


def layer_path(model: nn.Module, name: str) -> str:
    """The module path a layer name stands for: a tap, else a path of `named_modules()`.

    Raises UnknownLayer with a did-you-mean over the taps and the top-level modules (a
    model has hundreds of module paths; listing them all would not help anyone)."""
    path = taps(model).get(name, name)
    modules = dict(model.named_modules())
    if path and path in modules:
        return path
    near = list(taps(model)) + [n for n in modules if n and "." not in n]
    raise UnknownLayer(f"no layer `{name}`; {did_you_mean(name, near, 'layers')}")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module a layer name stands for (`layer_path`)."""
    return model.get_submodule(layer_path(model, name))


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...], names: Iterable[str] | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """The output shape of each layer (all of `layer_names` by default) for one input of
    `input_shape` (C, H, W), without the batch dimension.

    Inferred on the meta device: the model's parameters and buffers are swapped for meta
    tensors of the same shapes for one forward of a batch of two, so nothing is allocated,
    no data is needed and the model itself is not touched (its weights, its mode)."""
    names = layer_names(model) if names is None else list(names)
    state = {k: torch.empty_like(v, device="meta") for k, v in
             [*model.named_parameters(), *model.named_buffers()]}
    with LayerCapture({"m": model}, [("m", n) for n in names]) as capture, torch.no_grad():
        torch.func.functional_call(model, state, (torch.empty(2, *input_shape, device="meta"),))
    return {name: tuple(capture.features[("m", name)].shape[1:]) for name in names
            if ("m", name) in capture.features}


@dataclass(frozen=True)
class Probe:
    """What building a model for some images and running it once on the meta device found:
    its layer names and their shapes, or why it could not be built or run (the library's or
    torch's words, `problem`; `built` says which step failed)."""

    names: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...]] | None = None
    problem: str = ""
    built: bool = True


@lru_cache(maxsize=64)
def probe(model: str, classes: int, input_shape: tuple[int, int, int]) -> Probe:
    """Build `model` (a library's without its pre-trained weights) on the meta device for
    `classes` and images of `input_shape` (C, H, W), and run one forward (`layer_shapes`):
    no data, no memory. Cached: a meta forward dispatches every operation through Python (a
    second or two for a WideResNet), and a search checks the same models for every trial."""
    from dclang.diagnostics import UserError
    from dclang.models import build_model

    with warnings.catch_warnings():  # a library's notes about its own defaults are not the user's business
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                net = build_model(model, classes, input_shape[0], input_shape[1], pretrained=False)
        # unknown names and arguments (KeyError, UserError: reported by check_models), and what a
        # constructor asserts about the images (a ViT's patch size)
        except (KeyError, ValueError, AssertionError, RuntimeError, UserError) as exc:
            return Probe(problem=_words(exc), built=False)
        names = tuple(layer_names(net))
        try:
            return Probe(names, layer_shapes(net, input_shape))
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:  # what torch's layers raise
            return Probe(names, problem=_words(exc))


def _words(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def graph_input(graph) -> tuple[int, tuple[int, int, int]]:
    """(classes, (channels, size, size)) of an IR's dataset, from its catalog entry: what
    models are built for before any data is loaded (10 classes, 3x32x32 where the dataset
    does not fix them)."""
    from dclang.registry import dataset_info

    data = graph.graph.get("data")
    info = dataset_info(data.dataset) if data is not None else None
    classes = (info.num_classes if info else None) or 10
    channels = (info.channels if info else None) or 3
    size = (info.image_size if info else None) or 32
    return classes, (channels, size, size)


class LayerCapture:
    """Forward hooks that keep the outputs of chosen layers of the last forward.

    `features[(node, layer)]` is that layer's output in the most recent forward of the
    node's model: what a layer edge compares. Hooks stay registered until `remove` (or the
    end of a `with` block), so the engines pay one dictionary write per captured layer
    per forward and nothing else."""

    def __init__(self, models: dict[str, nn.Module], wanted: Iterable[tuple[str, str]],
                 fused: dict[str, tuple[nn.Module, int]] | None = None):
        """`fused` maps a node computed inside a fused network (HFTA) to (its `FusedModel`,
        its slice): its layers are also that network's, each output cut down to the node's part
        (`FusedModel.node_output`); the layer names are the node's own model's. Whichever of
        the two forwards ran last (the fused network's, or the node's own model's where a
        step runs it alone) is what is kept."""
        self.features: dict[tuple[str, str], Tensor] = {}
        self.handles = []
        from dclang.models.branch import layer_module  # a branch's trunk layer is its source's module

        for node, layer in dict.fromkeys(wanted):
            hooks = [(layer_module(models[node], layer), None)]
            if fused and node in fused:
                path = layer_path(models[node], layer)
                network, k = fused[node]
                hooks.append((network.net.get_submodule(path), partial(network.node_output, path, k=k)))
            for module, cut in hooks:
                self.handles.append(module.register_forward_hook(partial(self._keep, (node, layer), cut)))

    def _keep(self, key: tuple[str, str], cut, module: nn.Module, inputs, output: Tensor) -> None:
        self.features[key] = output if cut is None else cut(output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["LayerCapture", "Probe", "UnknownLayer", "graph_input", "layer_names", "layer_path", "layer_shapes", "probe",
           "resolve_layer", "taps"]
