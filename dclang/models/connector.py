"""FitNets connectors: the 1x1 conv + BN that maps a target's layer to its source's channels;
and where a target keeps any module an edge into it owns (a connector, CRD's heads and banks).

A `hint()` edge regresses the target's layer onto the source's (Romero et al. 2015). Where
the two have different channel counts the target needs a regressor; it is part of what the
target learns, so it is a submodule of the target's model, under `CONNECTORS`: the target's
optimizer trains it, its checkpoints save it and its parameter count includes it, with no
change to the training loop. Where the channel counts agree no connector is made.
"""

from __future__ import annotations

import networkx as nx
from torch import nn

from dclang.ir import EdgeSpec, live_edges

#: the submodule of a target model holding its connectors (a prefix of their state_dict keys)
CONNECTORS = "dclang_connectors"


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution without bias, then BatchNorm: FitNets' regressor as torchdistill and
    mdistiller build it for ResNets."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


def connector_name(edge: EdgeSpec) -> str:
    """The connector's key in the target's `CONNECTORS` (a module name may not hold `.`)."""
    return f"{edge.source}__{edge.source_layer}__{edge.target_layer}".replace(".", "_")


def connector_of(model: nn.Module, edge: EdgeSpec) -> nn.Module | None:
    """The connector the target `model` owns for `edge`, or None (same channels, or no hint)."""
    owned = getattr(model, CONNECTORS, None)
    if owned is None:
        return None
    return owned[connector_name(edge)] if connector_name(edge) in owned else None


def add_connectors(graph: nx.MultiDiGraph, models: dict[str, nn.Module], input_shape: tuple[int, int, int]) -> None:
    """Give each target of a live `hint` edge whose layers differ in channels its connector.

    Shapes come from `taps.layer_shapes` (meta device), so this allocates only the connectors.
    The caller seeds the random stream: connectors are created in edge order, after the models.
    """
    from dclang.models.taps import layer_shapes

    for edge in live_edges(graph):
        if edge.loss != "hint":
            continue
        source = layer_shapes(models[edge.source], input_shape, [edge.source_layer])[edge.source_layer]
        target = layer_shapes(models[edge.target], input_shape, [edge.target_layer])[edge.target_layer]
        if source[0] == target[0]:
            continue
        own(models[edge.target], edge, connector(target[0], source[0]))


def own(model: nn.Module, edge: EdgeSpec, module: nn.Module) -> None:
    """Make `module` the part of the target `model` that `edge` needs (a connector, a CRD
    head): trained by its optimizer, saved in its checkpoints, never run by its forward."""
    if not hasattr(model, CONNECTORS):
        _skip_connectors_in_forward(model)
        model.add_module(CONNECTORS, nn.ModuleDict())
    getattr(model, CONNECTORS)[connector_name(edge)] = module


def _skip_connectors_in_forward(model: nn.Module) -> None:
    """`nn.Sequential` runs every submodule in its forward, so a Sequential that owns
    connectors becomes a subclass whose forward iterates only its own layers. Any other
    module only runs the submodules its forward names, connectors never among them."""
    if isinstance(model, nn.Sequential):
        base = type(model)

        def layers(self):
            return iter([m for name, m in self._modules.items() if name != CONNECTORS])

        model.__class__ = type(base.__name__, (base,), {"__iter__": layers, "__module__": base.__module__})


def without_connectors(state: dict) -> dict:
    """A node's state_dict without its connectors: what another graph can load it as."""
    return {k: v for k, v in state.items() if not k.startswith(CONNECTORS + ".")}


def load_node_state(model: nn.Module, state: dict) -> None:
    """Load `state` into a node's model; connectors the state lacks keep their fresh weights
    (a checkpoint from a graph without this `hint` edge), every other key must match."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(CONNECTORS + ".")]
    if missing or unexpected:
        raise RuntimeError(f"the state does not fit the model: missing {missing}, unexpected {unexpected}")


__all__ = ["CONNECTORS", "add_connectors", "connector", "connector_name", "connector_of", "load_node_state", "own",
           "without_connectors"]
