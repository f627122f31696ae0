"""Every model a node can name, built by name: `build_model` (see `dclang.models`).

Built-in builders share the signature ``(num_classes, in_channels, image_size)`` so
that configuration files only need a model name plus the data set's shape.
Names are lowercase. Besides the fixed entries of ``BUILDERS``,
``build_model`` accepts any ``wrn{d}_{k}`` whose depth is 6m+4.

The ``*_tiny`` aliases build exactly the same networks as their CIFAR
counterparts: the paper's Tiny-ImageNet models are the CIFAR ones with a
stride-1 first convolution, which ours already have, and global average
pooling absorbs the 64x64 input. The aliases exist so that a configuration
can say which setting it means.
"""

from collections.abc import Callable

import torch
from torch import nn

from . import library, plugins
from .cifar_resnet import CifarResNet
from .small import cnn_small, cnn_tiny, mlp
from .wide_resnet import WideResNet, parse_wrn_name

Builder = Callable[[int, int, int], nn.Module]


def _resnet(depth: int) -> Builder:
    """Builder for CIFAR ResNet-``depth``; ``image_size`` does not change it."""

    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels)

    return build


def _wrn(depth: int, widen_factor: int) -> Builder:
    """Builder for WRN-``depth``-``widen_factor``; ``image_size`` does not change it."""

    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return WideResNet(depth, widen_factor, num_classes, in_channels)

    return build


BUILDERS: dict[str, Builder] = {
    **{f"resnet{d}": _resnet(d) for d in (20, 32, 44, 56, 110)},
    **{
        f"wrn{d}_{k}": _wrn(d, k)
        for d, k in [(16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (28, 10), (40, 2)]
    },
    "resnet32_tiny": _resnet(32),
    "resnet110_tiny": _resnet(110),
    "wrn28_2_tiny": _wrn(28, 2),
    "mlp": mlp,
    "cnn_tiny": cnn_tiny,
    "cnn_small": cnn_small,
}


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, *, pretrained: bool = True
) -> nn.Module:
    """Build the model a node names: ``name`` is the IR's canonical text of it.

    Built-in names (case-insensitive) come first, then a library's models
    (``torchvision.resnet18(weights="DEFAULT")``, see ``library``), then the models
    installed packages register (``plugins``). Raises KeyError for a name that is none of
    these, ValueError for arguments given to a built-in model. ``pretrained=False`` leaves a
    library model's pre-trained weights out (for shapes and parameter counts).
    """
    from dclang.registry import model_ref

    base, args = model_ref(name)
    key = base.lower()
    if key in BUILDERS:
        builder = BUILDERS[key]
    elif (dk := parse_wrn_name(key)) is not None:
        builder = _wrn(*dk)
    elif library.split(base) is not None and library.split(base)[0] in library.LIBRARIES:
        return library.build(base, args, num_classes, in_channels, image_size, pretrained=pretrained)
    elif base in plugins.registered():
        return plugins.build(base, args, num_classes, in_channels, image_size)
    else:
        raise KeyError(f"unknown model {name!r}; known: {sorted(BUILDERS)} or wrn{{d}}_{{k}}, "
                       "torchvision.NAME, timm.NAME, or a registered plugin")
    if args:
        raise ValueError(f"the built-in model {base!r} takes no arguments")
    return builder(num_classes, in_channels, image_size)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_counts(graph) -> list[tuple[str, str, int]]:
    """(node, model, parameters) for every model node of an IR, built on the meta device; a
    branch's count is its own head's (its trunk is counted once, in its source).

    The meta device allocates nothing, so `dclang check` can show sizes of ResNet110s
    instantly. Class count and input shape come from the dataset's catalog entry (10 classes,
    3x32x32 when the dataset does not fix them).
    """
    from dclang.crd import add_crd
    from dclang.ir import model_nodes
    from dclang.models.branch import share_trunks
    from dclang.models.connector import add_connectors
    from dclang.models.taps import graph_input

    classes, (channels, size, _) = graph_input(graph)
    names = model_nodes(graph)
    with torch.device("meta"):
        models = {name: build_model(graph.nodes[name]["spec"].model, classes, channels, size, pretrained=False)
                  for name in names}
        share_trunks(graph, models)  # a branch counts its own head: the shared trunk is its source's
        add_connectors(graph, models, (channels, size, size))  # a target's FitNets connectors are its parameters
        add_crd(graph, models, (channels, size, size), classes, None)  # and CRD's heads
    return [(name, graph.nodes[name]["spec"].model, count_parameters(models[name])) for name in names]


