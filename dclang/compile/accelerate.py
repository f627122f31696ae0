"""Faster ways to execute the fused engine's step, each computing the same thing: `StepOptions`.

Every option keeps the fused engine's models, optimizer, checkpoints and `StepStats`; only
how a step is executed changes. `tests/test_accelerate.py` holds each one equal to the fused
engine on the CPU wherever it can run there; `dclang bench` measures which ones pay off.

- `hfta`: each group of >= 2 trainable nodes of one architecture runs as one horizontally
  fused network (`dclang.models.fused`, HFTA): one kernel per layer for the whole group
  instead of one per node (`HftaStep`). Exact up to the kernels' summation order. Edges
  between layers read a grouped node's layers from the fused network (`fused_slices`).
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
  first batch's shape; a batch of another shape (an epoch's last, partial one) runs eagerly:
  recompiling for it cost 25 s on digits, and Dynamo's automatic dynamic shapes would then
  run every later step with shape-generic kernels.
- `cuda_graph`: the whole step (forward, backward, optimizer step) captured once in a CUDA
  graph and replayed, so a step costs a handful of launches (CUDA only).

Compile and CUDA graphs must not see the update number `k` as a Python number: it changes
every step, which would recompile (compile) or be frozen into the graph (CUDA graph). Only
the `linear` gate (eq. 6) reads `k`, and its weight k / k_end is the same for every sample.
So `AcceleratedStep` has the fused engine compute a linear edge's loss with the gate's weight
at k_end (one) and multiply it by the weight `gates.gate_weights` gives for update k, kept in
a device tensor refilled before each step (`FusedStep.losses(linear_weight=...)`):
`(w * a).mean() == w * a.mean()` for a constant w, to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor, nn

from dclang.compile.bf16_weights import Bf16Weights
from dclang.compile.common import StepStats, frozen_forward
from dclang.compile.fused import FusedStep
from dclang.compile.thread_state import restored_on_failure
from dclang.diagnostics import UserError
from dclang.gates import gate_weights

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


@dataclass
class _Group:
    """Trainable nodes of one architecture computed by one `FusedModel`."""

    names: list[str]
    fused: nn.Module  # a dclang.models.fused.FusedModel


def hfta_groups(graph: nx.DiGraph, trainable: list[str]) -> list[list[str]]:
    """Trainable nodes with the same model, in groups of at least two, in declaration order."""
    by_model: dict[str, list[str]] = {}
    for name in trainable:
        by_model.setdefault(str(graph.nodes[name]["spec"].model).lower(), []).append(name)
    return [names for names in by_model.values() if len(names) >= 2]


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


class HftaStep(FusedStep):
    """The fused engine with each group of same-architecture trainable nodes fused (HFTA).

    `self.models` keeps one model per node for everything outside the step: each grouped
    node's parameters and buffers are rebound to its slice of the fused tensors, so the
    separate model always holds the fused network's current weights and saving, loading
    (in place), evaluating and counting parameters work unchanged, without copies. The
    optimizer updates the fused tensors; `state_dict` / `load_state_dict` translate its state
    to and from the fused engine's per-node layout, so the two engines' checkpoints are
    interchangeable and this one is still called `fused`.

    Frozen nodes, and architectures `dclang.models.fused` cannot fuse (with a warning), stay
    separate.
    """

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], *, device: torch.device,
                 steps_per_epoch: int, epochs: int):
        from dclang.ir import trainable_nodes
        from dclang.models.fused import fuse_models

        self.groups: list[_Group] = []
        for names in hfta_groups(graph, trainable_nodes(graph)):
            try:
                self.groups.append(_Group(names, fuse_models([models[n] for n in names])))
            except NotImplementedError as exc:
                warnings.warn(f"HFTA: {exc}; nodes {', '.join(names)} stay separate", stacklevel=2)
        self.grouped = {name: (group, k) for group in self.groups for k, name in enumerate(group.names)}
        self._alias(models)
        super().__init__(graph, models, device=device, steps_per_epoch=steps_per_epoch, epochs=epochs)

    def _alias(self, models: dict[str, nn.Module]) -> None:
        """Point each grouped node's parameters and buffers at its slice of the fused tensors."""
        for name, (group, k) in self.grouped.items():
            alias_to_slice(models[name], group.fused, k)

    label = "fused+hfta"

    def fused_slices(self) -> dict[str, tuple[nn.Module, int]]:
        """Every grouped node: its layers are its slice of the group's fused network's."""
        return {name: (group.fused, k) for name, (group, k) in self.grouped.items()}

    def parameters_to_update(self) -> list[nn.Parameter]:
        """The fused groups' parameters, then those of the trainable nodes left separate."""
        return [p for group in self.groups for p in group.fused.parameters()] + [
            p for name in self.trainable if name not in self.grouped for p in self.models[name].parameters()]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every node, each group in one fused forward; keyed in declaration order."""
        logits = {}
        for group in self.groups:
            out = group.fused(images)  # (K, B, classes)
            logits.update(zip(group.names, out.unbind(0)))
        for name, model in self.models.items():
            if name in self.grouped:
                continue
            logits[name] = frozen_forward(model, images) if name in self.frozen else model(images)
        return {name: logits[name] for name in self.models}

    def train(self) -> None:
        super().train()
        for group in self.groups:
            group.fused.train()

    def eval(self) -> None:
        super().eval()
        for group in self.groups:
            group.fused.eval()

    def to_memory_format(self, memory_format: torch.memory_format) -> None:
        """Convert the tensors the step computes with, then rebind the grouped nodes' views."""
        for group in self.groups:
            group.fused.to(memory_format=memory_format)
        for name, model in self.models.items():
            if name not in self.grouped:
                model.to(memory_format=memory_format)
        self._alias(self.models)

    def _layout(self) -> list[tuple[int, int | None, torch.Size | None]]:
        """For each parameter of the fused engine's optimizer, in its order: (index in this
        optimizer, node slice k or None when not grouped, the node's shape of that tensor)."""
        index = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        layout = []
        for name in self.trainable:
            if name in self.grouped:
                group, k = self.grouped[name]
                fused = dict(group.fused.net.named_parameters())
                layout += [(index[id(fused[key])], k, group.fused.node_shapes[key])
                           for key, _ in self.models[name].named_parameters()]
            else:
                layout += [(index[id(p)], None, None) for p in self.models[name].parameters()]
        return layout

    def state_dict(self) -> dict:
        state = super().state_dict()
        opt = state["optimizers"]["all"]
        params = self.optimizer.param_groups[0]["params"]
        per_node = {}
        for i, (j, k, shape) in enumerate(self._layout()):
            if j not in opt["state"]:
                continue
            if k is None:
                per_node[i] = opt["state"][j]
            else:  # node k's slice of every per-element tensor; shared scalars (a step count) as they are
                per_node[i] = {key: v.reshape(-1, *shape)[k].clone()
                               if torch.is_tensor(v) and v.shape == params[j].shape else v
                               for key, v in opt["state"][j].items()}
        groups = [{**opt["param_groups"][0], "params": list(range(len(self._layout())))}]
        state["optimizers"] = {"all": {"state": per_node, "param_groups": groups}}
        return state

    def load_state_dict(self, state: dict) -> None:
        opt = state["optimizers"]["all"]
        params = self.optimizer.param_groups[0]["params"]
        slices: dict[int, dict[int | None, dict]] = {}
        shapes: dict[int, torch.Size | None] = {}
        for i, (j, k, shape) in enumerate(self._layout()):
            if i in opt["state"]:
                slices.setdefault(j, {})[k] = opt["state"][i]
                shapes[j] = shape
        mine = {}
        for j, by_k in slices.items():
            if None in by_k:
                mine[j] = by_k[None]
                continue
            # stack the nodes' per-element tensors in slice order; shared scalars from node 0
            mine[j] = {key: torch.stack([by_k[k][key] for k in sorted(by_k)]).reshape(params[j].shape)
                       if torch.is_tensor(v) and v.shape == shapes[j] else v for key, v in by_k[0].items()}
        groups = [{**opt["param_groups"][0], "params": list(range(len(params)))}]
        super().load_state_dict({**state, "optimizers": {"all": {"state": mine, "param_groups": groups}}})


# ---------------------------------------------------------------- the accelerated step


def computing_modules(step: FusedStep) -> list[nn.Module]:
    """The modules a step's forward runs: HFTA's fused networks in place of their nodes' models."""
    if isinstance(step, HftaStep):
        return [group.fused for group in step.groups] + [
            model for name, model in step.models.items() if name not in step.grouped]
    return list(step.models.values())


def to_channels_last(step: FusedStep) -> None:
    """Convert a step's models (their 4-D weights) to channels-last, in place."""
    if isinstance(step, HftaStep):
        step.to_memory_format(torch.channels_last)
    else:
        for model in step.models.values():
            model.to(memory_format=torch.channels_last)


class AcceleratedStep:
    """A fused (or HFTA) step executed with `options`: compile, bf16, channels-last, CUDA graph.

    Everything but `step` (models, optimizer, schedules, evaluation, checkpoints) is the
    wrapped step's: attribute reads pass through to it, so a checkpoint of an accelerated
    step is a plain `fused` checkpoint.
    """

    def __init__(self, inner: FusedStep, options: StepOptions):
        options = options.resolve(inner.device, inner.models)
        if options.cuda_graph and inner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, but the step is on {inner.device}")
        if options.hfta != isinstance(inner, HftaStep):
            raise ValueError("`hfta` is chosen when the step is built: use compile_graph(options=...)")
        self.inner, self.options = inner, options
        if options.channels_last:
            to_channels_last(inner)
        # bf16 weights cast all at once (not under compile, which fuses autocast's casts itself)
        self.bf16_weights = (Bf16Weights(computing_modules(inner)) if options.precision == "bf16"
                             and not options.compile else None)
        self.has_linear = any(edge.gate == "linear" for edge in inner.edges)
        self.linear_weight = torch.ones((), device=inner.device)
        # static shapes: one compilation, for the first batch's shape (see _eager_step)
        self.compiled = torch.compile(self._losses, dynamic=False) if options.compile else None
        self.compiled_shape: tuple | None = None
        self.eager_steps = 0
        self.graph: _CapturedStep | None = None
        self.side: torch.cuda.Stream | None = None  # the one stream the warm-up and the capture run on
        if options.cuda_graph:
            for group in inner.optimizer.param_groups:
                if "capturable" in group:  # Adam/AdamW keep their step count on the device then
                    group["capturable"] = True

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copying, unpickling): no wrapped step to ask
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def label(self) -> str:
        return self.options.label

    def step(self, images: Tensor, labels: Tensor, k: int) -> StepStats:
        if self.has_linear:  # eq. 6's weight for update k, from gates.py (which checks 1 <= k <= k_end)
            weight = gate_weights("linear", source_logits=None, labels=_NO_LABELS, k=k, k_end=self.inner.k_end,
                                  batch=1, dtype=torch.float64)
            self.linear_weight.fill_(float(weight[0]))  # a scalar kernel argument: no copy, no sync
        if self.options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.options.cuda_graph:
            return self._graph_step(images, labels)
        return self._eager_step(images, labels)

    def end_epoch(self) -> None:
        """Advance the schedules; a captured step holds the old learning rate, so recapture."""
        lr = self.inner.lr()
        self.inner.end_epoch()
        if self.graph is not None and self.inner.lr() != lr:
            self.graph = None

    def load_state_dict(self, state: dict) -> None:
        """Load in place; a captured step holds the old optimizer state tensors, so recapture."""
        self.inner.load_state_dict(state)
        self.graph = None

    def _autocast(self):
        if self.options.precision == "bf16":
            # a CUDA graph must not capture autocast's weight cache (it is rebuilt every step)
            return torch.autocast(self.inner.device.type, dtype=torch.bfloat16,
                                  cache_enabled=not self.options.cuda_graph)
        return contextlib.nullcontext()

    def _losses(self, images: Tensor, labels: Tensor, linear_weight: Tensor):
        """The fused engine's forward and losses, with the linear gates' weight as a tensor."""
        logits = self.inner.outputs(images)
        node_losses, edge_results = self.inner.losses(logits, labels, k=self.inner.k_end, linear_weight=linear_weight)
        return logits, node_losses, edge_results

    def _forward_backward(self, images: Tensor, labels: Tensor, *, compiled: bool = True):
        losses = self.compiled if compiled and self.compiled is not None else self._losses
        weights = self.bf16_weights.in_use() if self.bf16_weights is not None else contextlib.nullcontext()
        with self._autocast(), weights:
            logits, node_losses, edge_results = losses(images, labels, self.linear_weight)
        torch.stack(list(node_losses.values())).sum().backward()
        if self.bf16_weights is not None:
            self.bf16_weights.gradients_back()
        # the layers this forward captured hold its autograd graph, and with it each parameter's
        # AccumulateGrad node, which is bound to the stream it was made on: kept past the step it
        # makes the next step's gradients cross streams (torch warns; a CUDA graph's capture
        # runs on a stream of its own). Nothing reads them after the backward.
        self.inner.layers.features.clear()
        return logits, node_losses, edge_results

    def _eager_step(self, images: Tensor, labels: Tensor) -> StepStats:
        self.inner.optimizer.zero_grad()
        shape = (tuple(images.shape), images.dtype, images.stride())
        if self.compiled is not None and self.compiled_shape is None:
            out = self._first_compiled(images, labels)  # compiles for this input shape, the only one
            self.compiled_shape = shape
        else:  # another shape (an epoch's last, partial batch) runs eagerly
            out = self._forward_backward(images, labels, compiled=shape == self.compiled_shape)
        self.inner.optimizer.step()
        self.eager_steps += 1
        return self.inner.stats(labels=labels, logits=out[0], node_loss=out[1], edge_results=out[2])

    def _first_compiled(self, images: Tensor, labels: Tensor):
        """The compiled forward-backward, or, when compiling fails, the eager one (for good).

        Nothing is updated before the optimizer step, except BatchNorm's running statistics
        in the forward, which are restored before the eager retry, as is torch's thread state
        (`dclang.compile.thread_state`).
        """
        buffers = {name: {k: b.clone() for k, b in model.named_buffers()} for name, model in self.inner.models.items()}
        try:
            with restored_on_failure():  # what a failed trace leaves in torch's thread state, put back
                return self._forward_backward(images, labels)
        except Exception as exc:  # noqa: BLE001 (whatever the compiler raises; the eager retry re-raises real errors)
            failure = _first_line(exc)
            warnings.warn(f"torch.compile failed, running the step eagerly: {failure}", stacklevel=3)
            self.compiled = None
            with torch.no_grad():
                for name, model in self.inner.models.items():
                    for k, b in model.named_buffers():
                        b.copy_(buffers[name][k])
            self.inner.optimizer.zero_grad()
        try:
            return self._forward_backward(images, labels)
        except Exception as exc:  # noqa: BLE001 (said as a UserError: what failed, and what to do)
            raise UserError(f"torch.compile failed ({failure}), and the eager step after it failed too "
                            f"({_first_line(exc)})", "run without --compile; `dclang --debug` shows the traceback"
                            ) from exc

    def _graph_step(self, images: Tensor, labels: Tensor) -> StepStats:
        if self.graph is not None and self.graph.fits(images, labels):
            return self.graph.replay(images, labels)
        if self.eager_steps < CUDA_GRAPH_WARMUP or self.graph is not None:
            # warm-up steps, and batches of another shape (an epoch's last) than the captured one
            if self.eager_steps >= CUDA_GRAPH_WARMUP:
                return self._eager_step(images, labels)
            # PyTorch's whole-network capture: warm up (forward, backward, optimizer step, the
            # gradients made there) on one side stream, the stream the capture then runs on
            return self._on_side_stream(self._eager_step, images, labels)
        self.graph = _CapturedStep(self, images, labels)  # captured on `self.side` too
        return self.graph.replay(images, labels)

    def _on_side_stream(self, fn, *args):
        """`fn(*args)` on the step's side stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.inner.device)
        if self.side is None:
            self.side = torch.cuda.Stream(self.inner.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = fn(*args)
        current.wait_stream(self.side)
        return out


class _CapturedStep:
    """One training step captured in a CUDA graph, with its static inputs and outputs.

    Inputs are copied into the static buffers before each replay; the statistics come out as
    two flat static vectors (counts, means), cloned once per replay so that a step's
    `StepStats` survive the next replay.
    """

    def __init__(self, step: AcceleratedStep, images: Tensor, labels: Tensor):
        inner = step.inner
        self.images, self.labels = images.clone(), labels.clone()
        self.lr = inner.lr()
        inner.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=step.side):
            logits, node_losses, edge_results = step._forward_backward(self.images, self.labels)
            inner.optimizer.step()
            stats = inner.stats(logits, self.labels, node_losses, edge_results)
            self.keys = stats.keys()
            self.counts, self.means = stats.vectors()

    def fits(self, images: Tensor, labels: Tensor) -> bool:
        return (images.shape == self.images.shape and images.stride() == self.images.stride()
                and labels.shape == self.labels.shape)

    def replay(self, images: Tensor, labels: Tensor) -> StepStats:
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return StepStats.from_vectors(self.keys, self.counts.clone(), self.means.clone())


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


_NO_LABELS = torch.empty(0, dtype=torch.long)  # gate_weights' device for the host-side linear weight


def apply_options(step: FusedStep, options: StepOptions) -> FusedStep | AcceleratedStep:
    """`step` executed with `options`, resolved for its device and models (`hfta` must already
    be reflected in how it was built)."""
    options = options.resolve(step.device, step.models)
    if dataclasses.replace(options, hfta=False).plain:
        return step
    return AcceleratedStep(step, options)


def _with(step: FusedStep | AcceleratedStep, **changes) -> AcceleratedStep:
    if isinstance(step, AcceleratedStep):
        return AcceleratedStep(step.inner, dataclasses.replace(step.options, **changes))
    return AcceleratedStep(step, StepOptions(hfta=isinstance(step, HftaStep), **changes))


def compile_step(step: FusedStep | AcceleratedStep) -> AcceleratedStep:
    """`step` with its forward and losses compiled by torch.compile (eager if that fails)."""
    return _with(step, compile=True)
