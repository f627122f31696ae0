"""The fast paths of the fused engine (`dclang.compile.engine.Engine`), each computing the same
thing, for one graph as for K packed ones: `StepOptions`, and the pieces that execute them.

`tests/test_accelerate.py` holds each one equal to the plain engine on the CPU wherever it can
run there; `dclang bench` measures which ones pay off.

- `hfta`: each group of >= 2 trainable nodes of one architecture (within a graph and across
  packed graphs: `fusable_groups`) runs as one horizontally fused network
  (`dclang.models.fused`, HFTA): one kernel per layer for the whole group instead of one per
  node. Exact up to the kernels' summation order. Edges between layers read a fused node's
  layers from the fused network.
- `channels_last`: NHWC weights and activations, the layout oneDNN's CPU convolutions and
  tensor cores read fastest. Exact up to summation order. Left unset it is on where it was
  measured to win: on the CPU, for graphs with convolutions (`StepOptions.resolve`).
- `precision="bf16"`: forward and losses under bf16 autocast; weights, gradients and the
  optimizer stay fp32. Rounds, by design: close to fp32, not equal. The convolutions' and
  linear layers' weights are cast to bf16 all at once per step, and their gradients back
  (`dclang.compile.bf16_weights`), not one kernel per tensor as autocast alone would.
- `compile`: torch.compile of the forward and the losses (AOTAutograd compiles the matching
  backward); the optimizer step stays eager, already a few multi-tensor kernels. Compilation
  failing falls back to eager with a warning. Compiled once, with static shapes, for the
  first batch shapes; batches of other shapes (an epoch's last, partial one) run eagerly:
  recompiling for them cost 25 s on digits, and Dynamo's automatic dynamic shapes would then
  run every later step with shape-generic kernels. An engine of other members compiles anew.
- `cuda_graph`: the whole step (forward, backward, optimizer step) captured in a CUDA graph
  (`CapturedStep`) after `CUDA_GRAPH_WARMUP` eager steps and replayed, so a step costs a
  handful of launches (CUDA only). Batches of other shapes run eagerly; a new learning rate
  of a lone graph (its optimizer holds it as a number) or loaded state captures again.

Compile and CUDA graphs must not see the update number `k` as a Python number: it changes
every step, which would recompile (compile) or be frozen into the graph (CUDA graph). Only
the `linear` gate (eq. 6) reads `k`, and its weight k / k_end is the same for every sample.
So the engine computes a linear edge's loss with the gate's weight at k_end (one) and
multiplies it by the weight `gates.gate_weights` gives for update k, kept in a device tensor
refilled before each step: `(w * a).mean() == w * a.mean()` for a constant w, to rounding.
Likewise a packed engine's per-member learning rates and update counts reach the sliced
optimizer as device tensors refilled before each step (`SlicedOptimizer.prepare`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16")

#: eager steps before a CUDA graph is captured: they initialise the optimizer state and the
#: libraries' workspaces, which a capture must find already allocated
CUDA_GRAPH_WARMUP = 3


@dataclass(frozen=True)
class StepOptions:
    """How the fused engine executes a step; the defaults are the plain fused engine, with
    channels-last where `resolve` finds it a win.

    `hfta` is off unless asked for: fusion pays where kernel launches dominate (several
    small models on a GPU) and can lose on a CPU, where one grouped convolution is slower
    than K dense ones. Turn it on where `dclang bench` shows that it wins.
    """

    compile: bool = False
    precision: str = "fp32"
    channels_last: bool | None = None  # None: decided by `resolve`
    hfta: bool = False
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")

    @property
    def plain(self) -> bool:
        """No fast path asked for: the plain fused engine, channels-last left to `resolve`."""
        return not self.channels_last and dataclasses.replace(self, channels_last=None) == StepOptions()

    def resolve(self, device: torch.device, models: dict[str, nn.Module]) -> StepOptions:
        """These options with `channels_last` decided where it was left unset: on for a CPU
        step with a 2-D convolution in any node, where oneDNN's NHWC kernels were measured
        faster (ResNet32 1.19x, ResNet110, WRN-16-2, cnn_small; benchmarks/README.md); off
        on CUDA, where it is not measured yet, and for graphs of MLPs, where it means nothing."""
        if self.channels_last is not None:
            return self
        return dataclasses.replace(self, channels_last=device.type == "cpu" and convolutional(models))

    @property
    def label(self) -> str:
        """`fused` and every option that is on, e.g. `fused+hfta+compile` (the bench's names)."""
        on = (["hfta"] * self.hfta + ["compile"] * self.compile + ["bf16"] * (self.precision == "bf16")
              + ["channels_last"] * bool(self.channels_last) + ["cudagraph"] * self.cuda_graph)
        return "+".join(["fused", *on])


def convolutional(models: dict[str, nn.Module]) -> bool:
    """Whether any model has a 2-D convolution, the only layer a memory format changes."""
    return any(isinstance(m, nn.Conv2d) for model in models.values() for m in model.modules())


# ---------------------------------------------------------------- HFTA


def fusable_groups(signatures: dict[Hashable, Hashable]) -> list[list[Hashable]]:
    """HFTA's one grouping rule: the keys whose signatures are equal, in groups of at least two,
    in the given order (the engine's keys are (member, node), its signatures the model's
    repr, the batch size and the optimizer rule)."""
    by_signature: dict[Hashable, list[Hashable]] = {}
    for key, signature in signatures.items():
        by_signature.setdefault(signature, []).append(key)
    return [keys for keys in by_signature.values() if len(keys) >= 2]


def hfta_groups(graph: nx.DiGraph, trainable: list[str]) -> list[list[str]]:
    """Trainable nodes of one graph with the same model, in groups of at least two, in
    declaration order: where HFTA can apply, read from the graph before any model is built."""
    return fusable_groups({name: str(graph.nodes[name]["spec"].model).lower() for name in trainable})


def alias_to_slice(model: nn.Module, fused: nn.Module, k: int) -> None:
    """Point `model`'s parameters and buffers at node `k`'s slice of the fused tensors
    (`FusedModel.node_state_dict`): the model then always holds the fused network's current
    weights, without copies. Its parameters stay its own leaves: a gradient computed through
    the model lands in their `.grad`, not in the fused tensors'."""
    views = fused.node_state_dict(k)
    for key, param in model.named_parameters():
        param.data = views[key]
    for key, _ in list(model.named_buffers()):
        owner, _, leaf = key.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = views[key]


def own_storage(model: nn.Module) -> None:
    """Give `model` its own copy of every parameter and buffer (undoing `alias_to_slice`), so
    the fused tensors it pointed into can be let go."""
    for param in model.parameters():
        param.data = param.data.clone()
    for module in model.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[leaf] = buffer.clone()


def quiet_cpu_compiler(device: torch.device) -> None:
    """torch.compile's CPU build (inductor) imports `torch.utils.cpp_extension`, which logs "No
    CUDA runtime is found" when a CUDA toolkit is installed but torch has no CUDA runtime: no
    news on a CPU, so that logger says only errors there."""
    if device.type == "cpu":
        import logging

        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# ---------------------------------------------------------------- CUDA graphs


def side_stream(stream: torch.cuda.Stream | None):
    """Run the block on `stream`, a side stream on CUDA (as torch.cuda.graphs asks of warm-up),
    ordered after and before the current stream's work; nothing without one (another device).
    An engine keeps one such stream for its warm-up steps and its capture alike: the gradients
    the warm-up makes, and their AccumulateGrad nodes, belong to the stream the capture runs on."""
    if stream is None:
        return contextlib.nullcontext()
    return _on_side_stream(stream)


@contextlib.contextmanager
def _on_side_stream(side: torch.cuda.Stream):
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


class CapturedStep:
    """One step of an engine captured in a CUDA graph, with its static inputs and output.

    Inputs are copied into the static buffers before each replay, and the update's numbers
    (learning rates, update counts) into the optimizer's device tensors
    (`Engine.prepare_update`); the statistics come out as one static vector, cloned once per
    replay so that a step's statistics survive the next replay.
    """

    def __init__(self, engine, images: list[Tensor], labels: list[Tensor], ks: list[int]):
        self.images, self.labels = [x.clone() for x in images], [y.clone() for y in labels]
        engine.prepare_update(ks)
        engine.zero_grad()  # gradients are allocated inside the graph
        self.engine = engine
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=engine.side):  # the warm-up's stream
            self.stats = engine.forward_backward(self.images, self.labels)
            engine.apply_update()

    def fits(self, images: list[Tensor], labels: list[Tensor]) -> bool:
        return all(x.shape == s.shape and x.stride() == s.stride() for x, s in zip(images, self.images)) and all(
            y.shape == s.shape for y, s in zip(labels, self.labels))

    def replay(self, images: list[Tensor], labels: list[Tensor], ks: list[int]) -> Tensor:
        for static, x in zip([*self.images, *self.labels], [*images, *labels]):
            static.copy_(x)
        self.engine.prepare_update(ks)
        self.graph.replay()
        return self.stats.clone()
