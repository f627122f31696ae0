"""Lower a checked IR to a `TrainStep`: the models, their optimizers and one training step.

Two engines compute the same thing: `reference` is the paper's loop written plainly (the
oracle), `fused` (the default, `dclang.compile.engine.Engine`) does one forward, one backward
and one optimizer step for the whole graph, or for K packed graphs at once; tests hold them
equal. `options` (`StepOptions`, see `dclang.compile.accelerate`) execute the fused engine
faster (HFTA, torch.compile, bf16, channels-last, CUDA graphs).

    >>> step = compile_graph(graph, num_classes=10, in_channels=1, image_size=8,
    ...                      device=torch.device("cpu"), steps_per_epoch=20, epochs=2)
    >>> stats = step.step(images, labels, k=1)
"""

from __future__ import annotations

import networkx as nx
import torch

from dclang.compile.accelerate import StepOptions
from dclang.compile.common import StatSums, StepStats, TrainStep, build_models
from dclang.compile.engine import Engine, StepMember
from dclang.compile.fused import FusedStep
from dclang.compile.host_memory import keep_freed_memory
from dclang.compile.reference import ReferenceStep
from dclang.crd import check_crd
from dclang.ir import live_edges

ENGINES = ("fused", "reference")
_CLASSES: dict[str, type[TrainStep]] = {"fused": FusedStep, "reference": ReferenceStep}


def compile_graph(graph: nx.DiGraph, *, num_classes: int, in_channels: int, image_size: int,
                  device: torch.device, engine: str = "fused", init_states: dict[str, dict] | None = None,
                  seed: int = 0, steps_per_epoch: int, epochs: int,
                  options: StepOptions | None = None, member: bool = False,
                  train_size: int | None = None) -> TrainStep | Engine:
    """A `TrainStep` for a checked, concrete graph (no `choice(...)` left open).

    `init_states` maps node names to state_dicts loaded after the seeded construction
    (pre-trained teachers, resumed nodes); `steps_per_epoch * epochs` is k_end, the number
    of updates the linear gate (eq. 6) counts towards. `options` apply to the fused engine
    only (the reference engine stays the plain oracle); None is `StepOptions()`, the plain
    fused engine. The fused engine is an `Engine` of this one graph, which passes every
    attribute it does not have itself through to the graph's `FusedStep`.

    `member=True` returns the graph's `FusedStep` alone, for an engine over several graphs
    (`Engine([...members], options)`: packed trials) to execute: it has no optimizer of its
    own, and takes no `options` (the engine's are what apply).

    `train_size`, the number of training samples, sizes the memory banks of `crd` edges
    (`dclang.crd`); their steps take each batch's positions in the training split
    (`TrainStep.needs_indices`), on the plain engines of one graph only (`check_crd`).
    """
    if member and (engine != "fused" or options is not None):
        raise ValueError("a member of an engine is a plain fused step: the engine's options apply to it")
    options = options or StepOptions()
    if engine not in _CLASSES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine != "fused" and not options.plain:
        raise ValueError(f"step options apply to the fused engine, not {engine!r} (the plain oracle)")
    if graph.graph["sites"]:
        names = ", ".join(site.name for site in graph.graph["sites"])
        raise ValueError(f"the graph is a template with open choices ({names}): sample a trial first")
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"`steps_per_epoch >= 1` and `epochs >= 1` must hold, "
                         f"but got (steps_per_epoch={steps_per_epoch}, epochs={epochs})")
    crd = [e.key for e in live_edges(graph) if e.loss == "crd"]
    if crd:
        if train_size is None:
            raise ValueError(f"`crd` edges ({', '.join(crd)}) need train_size, the size of their memory banks")
        check_crd(graph, train_size=train_size, options=options)
    if device.type == "cpu":
        keep_freed_memory()  # process-wide: every engine's steps reuse their memory (see host_memory)
    models = build_models(graph, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                          device=device, init_states=init_states, seed=seed, train_size=train_size)
    step = _CLASSES[engine](graph, models, num_classes=num_classes, device=device, steps_per_epoch=steps_per_epoch,
                            epochs=epochs)
    if member or engine != "fused":
        return step
    return Engine([StepMember.of(step, graph)], options)


__all__ = ["ENGINES", "Engine", "StatSums", "StepMember", "StepOptions", "StepStats", "TrainStep", "compile_graph"]
