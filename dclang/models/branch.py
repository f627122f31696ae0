"""Shared trunks: `node b2 : branch(b1, from=layer3)` (ONE, OKDDip).

A branch is built as a separate network of its source's architecture would be (the same
seed, so its head starts as a separate node's would), then every module of its *trunk* that
holds parameters or buffers (the modules registered before the `from` module, at every
level of the path to it: `conv1`, `bn1`, `layer1`, `layer2` for `from=layer3`) is replaced by
a `Shared` module standing for the source's module of that path. The branch then owns only
its head: its `parameters()` and `state_dict()` hold no trunk tensor, so every optimizer,
checkpoint and parameter count holds the trunk once, in the source, and the gradients of both
nodes' losses add up in it. Stateless trunk modules (activations, pooling) stay the branch's
own: they hold nothing to share and recompute nothing but a pointwise operation.

A `Shared` module either *replays* or *runs*:

- inside `trunks_once(...)` (the fused engine's step and evaluation), the source's forward
  records its trunk modules' outputs on a `Tape` (forward hooks), and each branch, forwarded
  after its source (`forward_order`), returns those outputs: the trunk is computed once per
  batch for all its branches, and its BatchNorm layers see the batch once;
- elsewhere (the reference engine, a branch forwarded alone) it calls the source's module:
  the branch's whole forward, with the shared modules. The reference engine keeps the shared
  buffers as the source's forward left them (`source_buffers_kept`), so both engines update
  BatchNorm statistics once per step.

Whether a layer splits a network into a trunk and a head is decided by one forward on the
meta device (`find_split`): the trunk's modules must all run, in order, before the `from`
module starts, the head's after it, and after it starts nothing may read a tensor the trunk
computed other than the `from` module's input (a skip connection around it, as inside a
residual block). That forward makes replaying exact: every trunk module of a branch gets the
inputs its source's got.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from dclang.models.taps import layer_path, taps


class NotASplit(ValueError):
    """A layer that does not split the network into a trunk and a head; the message says why."""


@dataclass(frozen=True)
class Split:
    """Where `from=` cuts a network: the module path it names, and the trunk's module paths
    (the children registered before the path, at every level of it)."""

    path: str
    trunk: tuple[str, ...]


def trunk_paths(net: nn.Module, path: str) -> list[str]:
    """The modules registered before `path` at each level of it: `conv1, bn1, layer1, layer2`
    for `layer3`; `..., layer2, layer3.0` for `layer3.1`."""
    parts = path.split(".")
    out = []
    for depth, child in enumerate(parts):
        parent = ".".join(parts[:depth])
        for name, _ in net.get_submodule(parent).named_children():
            if name == child:
                break
            out.append(f"{parent}.{name}" if parent else name)
    return out


def _head_paths(net: nn.Module, path: str) -> list[str]:
    """The modules registered after `path` at each level of it (the head's other modules)."""
    parts = path.split(".")
    out = []
    for depth, child in enumerate(parts):
        parent = ".".join(parts[:depth])
        names = [name for name, _ in net.get_submodule(parent).named_children()]
        out += [f"{parent}.{name}" if parent else name for name in names[names.index(child) + 1:]]
    return out


class _Flow(TorchFunctionMode):
    """Watches one meta forward: which tensors the trunk computed, and whether anything after
    the `from` module starts reads one of them other than that module's input."""

    def __init__(self):
        super().__init__()
        self.in_head = False
        self.trunk: dict[int, Tensor] = {}  # id -> tensor (kept alive, so ids stay unique)
        self.allowed: set[int] = set()
        self.stack: list[str] = []
        self.crossing: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_head:
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.trunk[id(t)] = t
        elif self.crossing is None and isinstance(out, Tensor):
            if any(isinstance(t, Tensor) and id(t) in self.trunk and id(t) not in self.allowed
                   for t in tree_leaves((args, kwargs))):
                self.crossing = self.stack[-1] if self.stack else ""
        return out


def find_split(net: nn.Module, layer: str, input_shape: tuple[int, ...]) -> Split:
    """The split `from=layer` makes in `net` (built on the meta device), checked by one meta
    forward of a batch of two; UnknownLayer (with a did-you-mean) or NotASplit (saying why)."""
    path = layer_path(net, layer)
    shown = f"`{layer}`" if path == layer else f"`{layer}` (`{path}`)"
    if not path:
        raise NotASplit(f"{shown} is the whole network: nothing is left for the branch's own head")
    trunk = trunk_paths(net, path)
    if not trunk:
        raise NotASplit(f"{shown} is the network's first module: there is nothing before it to share")
    head = _head_paths(net, path)
    starts: dict[str, list[bool]] = {p: [] for p in (*trunk, path, *head)}  # per call: in the head?
    flow = _Flow()
    handles = []
    names = {id(m): name for name, m in net.named_modules()}

    def before(module, args, name):
        if name in starts:
            starts[name].append(flow.in_head)
        if name == path and not flow.in_head:
            flow.in_head = True
            flow.allowed = {id(t) for t in tree_leaves(args) if isinstance(t, Tensor)}
        flow.stack.append(name)

    def after(module, args, output):
        flow.stack.pop()

    for module in net.modules():
        handles.append(module.register_forward_pre_hook(partial(before, name=names[id(module)])))
        handles.append(module.register_forward_hook(after))
    try:
        with flow, torch.no_grad():
            net(torch.empty(2, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    if not starts[path]:
        raise NotASplit(f"{shown} does not run in the network's forward")
    if len(starts[path]) > 1:
        raise NotASplit(f"{shown} runs {len(starts[path])} times in one forward: no one point splits the network")
    late = [p for p in trunk if any(starts[p])]
    if late:
        raise NotASplit(f"`{late[0]}` comes before {shown} among the modules but runs after it starts: "
                        "the forward does not apply them in order")
    early = [p for p in head if starts[p] and not all(starts[p])]
    if early:
        raise NotASplit(f"`{early[0]}` comes after {shown} among the modules but runs before it: "
                        "the forward does not apply them in order")
    if flow.crossing is not None:
        where = f"`{flow.crossing}`" if flow.crossing else "the network"
        raise NotASplit(f"a skip connection goes around {shown}: after it starts, {where} reads a tensor "
                        "the layers before it computed, other than its input (as inside a residual block)")
    return Split(path, tuple(trunk))


@lru_cache(maxsize=64)
def probe_split(model: str, classes: int, input_shape: tuple[int, int, int], layer: str
                ) -> Split | Exception | None:
    """`find_split` for a model by name, built on the meta device: the Split, why not (the
    UnknownLayer's or NotASplit's exception), or None where the model cannot be built or run on
    these images (`check_models` and `check_inputs` say why). Cached, as `taps.probe`: a
    search checks the same models for every trial."""
    from dclang.diagnostics import UserError
    from dclang.models import build_model
    from dclang.models.taps import UnknownLayer

    try:
        with torch.device("meta"):
            net = build_model(model, classes, input_shape[0], input_shape[1], pretrained=False)
        return find_split(net, layer, input_shape)
    except (UnknownLayer, NotASplit) as exc:
        return exc
    except (KeyError, ValueError, AssertionError, RuntimeError, IndexError, UserError):
        return None


# ---------------------------------------------------------------- at run time


class Tape:
    """A source network's trunk outputs in the current forward, recorded by forward hooks on
    its trunk modules while `active` (inside `trunks_once`), for its branches to replay."""

    def __init__(self, source: nn.Module):
        self.source = source
        self.active = False
        self.generation = 0  # one per `trunks_once`: a Shared module's call count restarts
        self.outputs: dict[str, list] = {}
        self.handles: dict[str, object] = {}

    def watch(self, path: str) -> None:
        if path not in self.handles:
            self.handles[path] = self.source.get_submodule(path).register_forward_hook(partial(self._keep, path))

    def _keep(self, path: str, module: nn.Module, inputs, output) -> None:
        if self.active:
            self.outputs.setdefault(path, []).append(output)


class Shared(nn.Module):
    """A branch's trunk module: the source's module at `path`, replayed from the tape inside
    `trunks_once`, else called. Holds no parameter or buffer of its own; the tape is a plain
    attribute, so the source's tensors are never the branch's."""

    def __init__(self, tape: Tape, path: str, source_name: str):
        super().__init__()
        self.tape, self.path, self.source_name = tape, path, source_name
        self._generation, self._calls = -1, 0

    def forward(self, *args, **kwargs):
        tape = self.tape
        kept = tape.outputs.get(self.path) if tape.active else None
        if kept is not None:
            if self._generation != tape.generation:
                self._generation, self._calls = tape.generation, 0
            if self._calls < len(kept):
                self._calls += 1
                return kept[self._calls - 1]
        return tape.source.get_submodule(self.path)(*args, **kwargs)

    def target(self) -> nn.Module:
        """The module that computes: the source's, through a chain of branches."""
        module = self.tape.source.get_submodule(self.path)
        return module.target() if isinstance(module, Shared) else module

    def extra_repr(self) -> str:
        return f"{self.source_name}.{self.path}"


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def share_trunk(branch: nn.Module, source: nn.Module, source_name: str, layer: str,
                tapes: dict[int, Tape]) -> list[str]:
    """Replace the trunk modules of `branch` that hold state by `Shared` ones standing for
    `source`'s (one `Tape` per source, kept in `tapes` by the source's id); the paths
    replaced."""
    path = layer_path(branch, layer)
    tape = tapes.setdefault(id(source), Tape(source))
    replaced = []
    for p in trunk_paths(branch, path):
        if not _holds_state(branch.get_submodule(p)):
            continue
        parent, _, child = p.rpartition(".")
        tape.watch(p)
        setattr(branch.get_submodule(parent), child, Shared(tape, p, source_name))
        replaced.append(p)
    return replaced


def share_trunks(graph, models: dict[str, nn.Module]) -> None:
    """Every `branch(...)` node of the graph made to share its source's trunk, sources first
    (a branch of a branch shares what its source shares)."""
    branches = {n: graph.nodes[n]["spec"].derived for n in models if graph.nodes[n]["spec"].is_branch}
    tapes: dict[int, Tape] = {}
    done: set[str] = set()
    while len(done) < len(branches):
        ready = [n for n, d in branches.items() if n not in done and d.source not in set(branches) - done]
        if not ready:
            raise ValueError(f"branches in a cycle: {sorted(set(branches) - done)}")
        for name in ready:
            d = branches[name]
            share_trunk(models[name], models[d.source], d.source, str(d.arg("from")), tapes)
            done.add(name)


def shared_modules(model: nn.Module) -> list[Shared]:
    return [m for m in model.modules() if isinstance(m, Shared)]


def sources_of(models: dict[str, nn.Module]) -> dict[str, set[str]]:
    """Per node, the nodes whose trunk it shares (directly)."""
    by_id = {id(m): n for n, m in models.items()}
    return {n: {by_id[id(s.tape.source)] for s in shared_modules(m) if id(s.tape.source) in by_id}
            for n, m in models.items()}


def sharing_nodes(models: dict[str, nn.Module]) -> set[str]:
    """The nodes that share a trunk: every branch and every source of one."""
    sources = sources_of(models)
    return {n for n, s in sources.items() if s} | {s for ss in sources.values() for s in ss}


def families(trainable: Iterable[str], models: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Trainable nodes grouped by the trunk they share (a source and its branches, through
    chains), keyed by the group's first node, in `trainable`'s order; a node alone where it
    shares nothing. What one backward and one optimizer step together where each node's are
    otherwise its own (the reference engine, the bench's floor)."""
    sources = sources_of(models)

    def root(n: str) -> str:
        while sources.get(n):
            n = min(sources[n])
        return n

    out: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for name in trainable:
        out.setdefault(first.setdefault(root(name), name), []).append(name)
    return out


def forward_order(models: dict[str, nn.Module], names: Iterable[str] | None = None) -> list[str]:
    """`names` (every model by default) with each branch after its source, otherwise in their
    order: a source's forward records the trunk its branches replay."""
    names = list(models if names is None else names)
    sources = sources_of(models)
    out: list[str] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        placed.add(name)
        for s in sorted(sources.get(name, ())):
            if s in names:
                place(s)
        out.append(name)

    for name in names:
        place(name)
    return out


def tapes_of(models: Iterable[nn.Module]) -> list[Tape]:
    found: dict[int, Tape] = {}
    for model in models:
        for s in shared_modules(model):
            found.setdefault(id(s.tape), s.tape)
    return list(found.values())


@contextlib.contextmanager
def trunks_once(tapes: Iterable[Tape]) -> Iterator[None]:
    """Inside: each source's forward records its trunk, each branch forwarded after it replays
    it (the trunk computed once). The recordings are let go on leaving (the autograd graph
    holds what the backward needs)."""
    tapes = list(tapes)
    for tape in tapes:
        tape.active = True
        tape.generation += 1
    try:
        yield
    finally:
        for tape in tapes:
            tape.active = False
            tape.outputs.clear()


@contextlib.contextmanager
def source_buffers_kept(model: nn.Module) -> Iterator[None]:
    """A branch's whole forward (the reference engine's) that leaves the shared trunk's
    BatchNorm statistics as its source's forward left them: its BatchNorm layers in training
    mode normalise by the batch without tracking it (`track_running_stats` off for the
    forward), so they see each batch once, as in the fused engine, and no tensor the source's
    backward saved is changed in place."""
    norms = [m for s in shared_modules(model) for m in s.target().modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def standalone_state(model: nn.Module) -> dict:
    """A node's weights as a whole network of its architecture: a branch's own state with its
    shared trunk's filled in from the source (what a node checkpoint, `best.pt`, holds, so a
    branch can be deployed or loaded with `init` like any network)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, Shared):
            state.update({f"{name}.{k}": v for k, v in standalone_state(module.target()).items()})
    return state


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module a layer name stands for in a node's model, following a branch's `Shared`
    trunk modules into the source's (a layer inside the shared trunk is the source's)."""
    path = taps(model).get(layer, layer)
    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, Shared):
            module = module.tape.source.get_submodule(module.path)
        module = module.get_submodule(part)
    return module


__all__ = ["NotASplit", "Shared", "Split", "Tape", "families", "find_split", "forward_order", "layer_module",
           "probe_split", "share_trunk", "share_trunks", "shared_modules", "sharing_nodes", "source_buffers_kept",
           "standalone_state", "tapes_of", "trunk_paths", "trunks_once"]
