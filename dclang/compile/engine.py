"""The fused engine: one training step over K members, each a graph (K = 1 for `dclang run`,
K packed trials for a search worker), one forward, one backward and one update for all.

The K graphs are one graph whose components never exchange a gradient, so one step computes
every member's step:

- **Forward.** With `hfta`, trainable nodes of one architecture, batch size and optimizer rule
  are fused (`dclang.models.fused`), within a member and across members (`fusable_groups`): a
  group inside one member reads its batch as a shared input, a group across members (or
  reading several of a member's views, `dclang.views`) reads its nodes' batches side by side
  in channels (`stack_inputs`). Other nodes run alone on their
  member's batch; frozen ones without autograd. A fused node's model keeps views of its slice
  of the fused tensors (`alias_to_slice`), so it evaluates, counts and saves unchanged. Nodes
  sharing a trunk (`branch(...)`) are never fused: each branch runs after its source and
  replays the trunk the source's forward computed (`dclang.models.branch.trunks_once`).
- **Losses.** One plan (`LossPlan`) for the members whose logits have one shape: the edges of
  every member with the same loss, gate and weight are one stacked computation
  (`losses.edge_losses`), each edge reading its own member's labels; an edge between layers is
  computed alone (its layers differ in shape from any other's), and so is a `crd` edge, with
  the batch's positions in the training split that `step(..., indices)` passes (an engine of
  one member, eagerly: packs and the fast paths but channels-last cannot pass them and are
  refused, `_refuse_positions`); every linear gate is computed
  at k_end and scaled by its member's k / k_end held in a device tensor (`linear_weights`), so
  no step sees `k` as a Python number (what compile and CUDA graphs need). Node losses are one
  product of the edge losses with a 0/1 incidence matrix (eq. 3), and their sum gets one
  backward. Every edge detaches its source (paper 3.1), so each node's gradient is its own
  loss's.
- **Update.** One graph whose tensors are its own for good (`dclang run`): torch's optimizer
  (`foreach`), a single parameter group over the fused tensors and the nodes left separate
  (exact: SGD, Adam and AdamW keep their state per element and every node has the same
  hyperparameters). A pack (`packed`: members join and leave): `SlicedOptimizer`, torch's
  rule with each member's own learning rate and update count on tensors whose slices belong
  to different members, its state handed from engine to engine (`carry`).
- **Statistics.** Every member's step statistics as one float64 vector, each member's block
  laid out as its `StepStats.keys()`: returned as `StepStats` for one member (`step`), summed
  per member on the device for several (`step_all`, read by `read(m)` at that member's epoch
  end).

So a step dispatches about as many operations for K members as for one (benchmarks/pack_ops.py).

The fast paths (`StepOptions`, `dclang.compile.accelerate`) apply to every K: channels-last,
bf16 autocast of the forward and the losses, torch.compile of them (compiled for the first
batch shapes; other shapes, an epoch's last batch, run eagerly) and CUDA-graph capture of the
whole step (captured after a few eager steps; a batch of other shapes runs eagerly, a new
learning rate or loaded state captures again). Membership changes between steps by building a
new engine (`Engine(members, options, carried=old.carry(members))`): every remaining member
keeps its weights, optimizer state and the epoch's statistics so far, and compiles and
captures anew.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dclang.compile import accelerate
from dclang.compile.accelerate import CUDA_GRAPH_WARMUP, StepOptions, alias_to_slice, fusable_groups, own_storage
from dclang.compile.bf16_weights import Bf16Weights
from dclang.compile.common import StatSums, StepStats, TrainStep, frozen_forward
from dclang.compile.ema import EmaUpdate
from dclang.compile.loss_plan import LossPlan, stat_keys
from dclang.compile.optim import build_optimizer
from dclang.compile.sliced_optim import SlicedOptimizer, rule_of
from dclang.compile.thread_state import restored_on_failure
from dclang.diagnostics import UserError
from dclang.ensembles import ensemble_outputs
from dclang.gates import gate_weights
from dclang.loss_catalogue import LOSSES
from dclang.models.branch import sharing_nodes, trunks_once
from dclang.models.fused import fuse_models, stack_inputs
from dclang.models.taps import LayerCapture
from dclang.registry import OPTIMIZER_KINDS
from dclang.views import as_views


class Member(Protocol):
    """A graph in an engine: its compiled member step (`compile_graph(member=True)`: models,
    schedule and evaluation, no optimizer of its own) and its batch size."""

    step: TrainStep
    batch: int


@dataclass(eq=False)
class StepMember:
    """A compiled member step as an engine member, where no run holds it (`dclang run`'s one
    graph, the cost plan, benchmarks, tests)."""

    step: TrainStep
    batch: int

    @classmethod
    def of(cls, step: TrainStep, graph) -> StepMember:
        return cls(step, graph.graph["train"].batch)


@dataclass
class _Group:
    """Trainable nodes (member index, node) of one architecture computed by one fused network;
    `shared`: all of one member and one view, reading that batch as one shared input."""

    slices: list[tuple[int, str]]
    fused: nn.Module  # FusedModel
    shared: bool


@dataclass
class Carried:
    """What a rebuilt engine takes over from the one it replaces, per member: optimizer state
    by (member, node, parameter name), and the epoch's statistic sums so far."""

    optimizer: dict[tuple[Any, str, str], dict[str, Tensor]] = field(default_factory=dict)
    sums: dict[Any, tuple[Tensor, Tensor, int]] = field(default_factory=dict)


class Engine:
    """One step of every member at once, executed with `options`; see the module's docstring.

    With one member it is that graph's `TrainStep` (what `compile_graph` returns for the fused
    engine): `step(images, labels, k)` returns its `StepStats`, and every attribute it does
    not have itself (models, evaluation, edges, ...) is the member step's.
    """

    engine = "fused"

    def __init__(self, members: Sequence[Member], options: StepOptions | None = None, *,
                 carried: Carried | None = None, packed: bool = False):
        """`packed`: members join and leave (a search worker's pack): the sliced optimizer even
        for one member, whose state `carry` hands to the engine that replaces this one."""
        carried = carried or Carried()
        self.members = list(members)
        self.steps = [m.step for m in self.members]
        self.device = self.steps[0].device
        for step in self.steps:  # let go of a previous engine's fused tensors
            for node in step.trainable:
                own_storage(step.models[node])
        models = {(m, n): model for m, step in enumerate(self.steps) for n, model in step.models.items()}
        self.options = (options or StepOptions()).resolve(self.device, models)
        self._refuse_positions(packed)
        if self.options.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, but the step is on {self.device}")
        # where each member's views begin in a step's list of images (`_input`)
        self.first_view = [sum(s.view_count for s in self.steps[:m]) for m in range(len(self.steps))]
        self.rules = [rule_of(s.optimizer_spec.name, s.optimizer_spec.args) for s in self.steps]
        self.groups = self._fuse() if self.options.hfta else []
        self.fused_nodes = {s for g in self.groups for s in g.slices}
        self._capture_layers()
        if self.options.channels_last:
            self._to_channels_last()
        # mean teachers: their lists of tensors taken now that no source's tensors move again
        self.ema_update = EmaUpdate((step.models[t], step.models[s], decay)
                                    for step in self.steps for t, (s, decay) in step.ema.items())
        self.solo = len(self.members) == 1 and not packed
        if self.solo:  # every tensor is this member's, for good: torch's own optimizer
            self.optimizer = build_optimizer(self.steps[0].optimizer_spec, self._parameters(), foreach=True)
            self.optimizer.param_groups[0]["lr"] = self.steps[0].lr()
            if self.options.cuda_graph and "capturable" in self.optimizer.param_groups[0]:
                self.optimizer.param_groups[0]["capturable"] = True  # Adam's step count on the device
            self.sliced, self.slots = [], []
        else:
            self.sliced, self.slots = self._sliced(carried.optimizer)
        self.keys = [stat_keys(s) for s in self.steps]
        self.sums = StatSums(self.keys, self.device, [carried.sums.get(m) for m in self.members])
        self.linear = [any(e.gate == "linear" for e in s.edges) for s in self.steps]
        self._linear_host = [1.0] * len(self.members)
        self.linear_weights = torch.ones(len(self.members), dtype=torch.float64, device=self.device)
        self._plans: dict[tuple[int, ...], tuple[LossPlan, Tensor | None]] = {}
        # torch.compile: static shapes, compiled for the first batch shapes (see `_eager_step`)
        if self.options.compile:
            accelerate.quiet_cpu_compiler(self.device)
        self.compiled = torch.compile(self._forward_losses, dynamic=False) if self.options.compile else None
        self.compiled_shapes: tuple | None = None
        self.eager_steps = 0
        self.graph: accelerate.CapturedStep | None = None
        self.first_shapes: list | None = None  # what a CUDA graph is captured for
        # the one stream the warm-up steps and the capture run on (`accelerate.side_stream`)
        self.side = torch.cuda.Stream(self.device) if self.options.cuda_graph else None
        # bf16 weights cast all at once (not under compile, which fuses autocast's casts itself)
        self.bf16_weights = (Bf16Weights(self._computing_modules()) if self.options.precision == "bf16"
                             and not self.options.compile else None)
        self.train()

    # ------------------------------------------------------------ building

    def _fuse(self) -> list[_Group]:
        """Trainable nodes grouped by architecture (the model's repr: a node carrying a `hint`
        connector differs), batch size and optimizer rule; each group fused."""
        sharing = [sharing_nodes(step.models) for step in self.steps]  # a shared trunk is no whole network
        signatures = {(m, node): (repr(step.models[node]), self.members[m].batch, self.rules[m])
                      for m, step in enumerate(self.steps) for node in step.trainable if node not in sharing[m]}
        groups = []
        for slices in fusable_groups(signatures):
            models = [self.steps[m].models[n] for m, n in slices]
            shared = len({(m, self.steps[m].view_index[n]) for m, n in slices}) == 1  # one member, one view
            try:
                fused = fuse_models(models, shared_input=shared)
            except (NotImplementedError, ValueError) as exc:
                warnings.warn(f"HFTA: {exc}; nodes {', '.join(n for _, n in slices)} stay separate", stacklevel=3)
                continue
            for s, model in enumerate(models):
                alias_to_slice(model, fused, s)
            groups.append(_Group(slices, fused, shared))
        return groups

    def _computing_modules(self) -> list[nn.Module]:
        """The modules the forward runs: the fused networks in place of their nodes' models."""
        return [g.fused for g in self.groups] + [
            model for m, step in enumerate(self.steps) for node, model in step.models.items()
            if (m, node) not in self.fused_nodes]

    def _capture_layers(self) -> None:
        """A member with edges between layers keeps them with forward hooks, a fused node's from
        its fused network (`LayerCapture(fused=...)`), replacing the capture its step (or a
        previous engine) set."""
        slices: dict[int, dict[str, tuple[nn.Module, int]]] = {}
        for g in self.groups:
            for s, (m, node) in enumerate(g.slices):
                slices.setdefault(m, {})[node] = (g.fused, s)
        for m, step in enumerate(self.steps):
            if any(e.on_layers for e in step.edges):
                step.layers.remove()
                step.layers = LayerCapture(step.models, step.layer_ends(), fused=slices.get(m))

    def _to_channels_last(self) -> None:
        """NHWC weights (and inputs, in `step`): the fused networks, then every model left
        separate; each fused node's tensors re-pointed at its converted slice."""
        for g in self.groups:
            g.fused.to(memory_format=torch.channels_last)
            for s, (m, node) in enumerate(g.slices):
                alias_to_slice(self.steps[m].models[node], g.fused, s)
        for m, step in enumerate(self.steps):
            for node, model in step.models.items():
                if (m, node) not in self.fused_nodes:
                    model.to(memory_format=torch.channels_last)

    def _parameters(self) -> list[nn.Parameter]:
        """What a solo engine's optimizer updates: the fused groups' tensors, then those of the
        trainable nodes left separate, in node order, then every learned ensemble's w."""
        step = self.steps[0]
        return [p for g in self.groups for p in g.fused.parameters()] + [
            p for node in step.trainable if (0, node) not in self.fused_nodes for p in step.models[node].parameters()
        ] + [p for node in step.learned for p in step.ensemble_weights[node].parameters()]

    def _sliced(self, carried: dict) -> tuple[list[SlicedOptimizer], list[list[list[tuple[Any, str, str]]]]]:
        """One `SlicedOptimizer` per optimizer rule, over the fused tensors and every trainable
        node left separate; `slots[o][i]` names each slice of tensor i as (member, node, parameter)."""
        by_rule: dict[tuple, list[tuple[nn.Parameter, list[int], list[tuple[Any, str, str]]]]] = {}
        for g in self.groups:
            for pname, param in g.fused.net.named_parameters():
                names = [(self.members[m], n, pname) for m, n in g.slices]
                by_rule.setdefault(self.rules[g.slices[0][0]], []).append((param, [m for m, _ in g.slices], names))
        for m, step in enumerate(self.steps):
            for node in step.trainable:
                if (m, node) in self.fused_nodes:
                    continue
                for pname, param in step.models[node].named_parameters():
                    by_rule.setdefault(self.rules[m], []).append((param, [m], [(self.members[m], node, pname)]))
            for node in step.learned:  # a learned ensemble's w (dclang.learned_ensembles)
                for pname, param in step.ensemble_weights[node].named_parameters():
                    by_rule.setdefault(self.rules[m], []).append((param, [m], [(self.members[m], node, pname)]))
        optimizers, slots = [], []
        for rule, entries in by_rule.items():
            state = []
            for p, _, names in entries:
                parts = [carried.get(name) for name in names]
                state.append(None if all(x is None for x in parts) else {
                    k: torch.stack([(x or {}).get(k, torch.zeros(p.numel() // len(names), dtype=p.dtype,
                                                                  device=p.device)).reshape(-1)
                                    for x in parts]).reshape(p.shape)
                    for k in OPTIMIZER_KINDS[rule[0]].state})
            optimizers.append(SlicedOptimizer(rule, [p for p, _, _ in entries], [own for _, own, _ in entries], state))
            slots.append([names for _, _, names in entries])
        return optimizers, slots

    def _refuse_positions(self, packed: bool) -> None:
        """A member with `crd` edges needs each batch's positions in the training split, which
        only the eager step of an engine of that one member passes (`step(indices=...)`): no
        pack, no HFTA, torch.compile, bf16 or CUDA graph."""
        crd = [e.key for s in self.steps for e in s.edges if LOSSES[e.loss].needs_indices]
        if not crd:
            return
        o = self.options
        why = [what for what, on in (("a pack of trials", packed or len(self.members) > 1), ("--hfta", o.hfta),
                                     ("--compile", o.compile), ("--precision bf16", o.precision == "bf16"),
                                     ("--cuda-graph", o.cuda_graph)) if on]
        if why:
            raise UserError(f"`crd` edges ({', '.join(crd)}) read each batch's positions in the training split, "
                            f"which {', '.join(why)} cannot pass", "train such a graph alone, without fast paths other "
                                                                  "than --channels-last")

    def carry(self, keep: Sequence[Member]) -> Carried:
        """What the engine rebuilt for `keep` (members of this one, and new ones) takes over."""
        kept = set(map(id, keep))
        carried = Carried()
        for opt, slots in zip(self.sliced, self.slots):
            for state, names in zip(opt.state, slots):
                for s, name in enumerate(names):
                    if id(name[0]) in kept:
                        carried.optimizer[name] = {k: v.reshape(len(names), -1)[s].clone() for k, v in state.items()}
        for m, member in enumerate(self.members):
            if id(member) in kept:
                carried.sums[member] = self.sums.take(m)
        return carried

    # ------------------------------------------------------------ one member: a TrainStep

    def __getattr__(self, name: str):
        if name == "steps":  # not set yet (copying, unpickling): no member to ask
            raise AttributeError(name)
        if len(self.steps) != 1:
            raise AttributeError(f"{name!r}: an engine of {len(self.steps)} members has no one member's attributes")
        return getattr(self.steps[0], name)

    @property
    def label(self) -> str:
        """What executes the step, fast paths named (`summary.json`'s `step`, the bench's names)."""
        return self.options.label

    @property
    def optimizers(self) -> dict:
        return {"all": self.optimizer} if self.solo else {}

    def step(self, images: Tensor, labels: Tensor, k: int, indices: Tensor | None = None) -> StepStats:
        """One update of the one member on this batch; `k` is its 1-based update number;
        `indices` the samples' positions in the training split, for the edges that read them
        (`needs_indices`: `crd`, computed alone by the loss plan)."""
        if len(self.members) != 1:
            raise ValueError(f"`step` steps an engine of one member; this one has {len(self.members)}: use `step_all`")
        flat = self._step([(images, labels, k)], None if indices is None else [(indices, k)])
        keys = self.keys[0]
        counts = sum(f == "node_correct" for f, _ in keys)
        return StepStats.from_vectors(keys, flat[:counts].to(torch.long), flat[counts:])

    def step_all(self, batches: Sequence[tuple[Tensor, Tensor, int]]) -> None:
        """One update of every member on its own (images, labels, k); the statistics are summed
        per member on the device (`read`)."""
        self.sums.add(self._step(batches), [len(b[1]) for b in batches], [b[2] for b in batches])

    def read(self, m: int) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        """`EpochStats.read` of member m's epoch so far, its sums then reset."""
        return self.sums.read(m)

    def end_epoch(self) -> None:
        """Advance the one member's schedule; a captured step holds the old learning rate, so
        it is captured again when the rate changed."""
        step = self.steps[0]
        step.end_epoch()
        if self.optimizer.param_groups[0]["lr"] != step.lr():
            self.optimizer.param_groups[0]["lr"] = step.lr()
            self.graph = None

    def train(self) -> None:
        for step in self.steps:
            step.train()
        for g in self.groups:
            g.fused.train()

    def eval(self) -> None:
        for step in self.steps:
            step.eval()
        for g in self.groups:
            g.fused.eval()

    def fused_slices(self) -> dict[str, tuple[nn.Module, int]]:
        """The one member's nodes computed inside a fused network, with (that `FusedModel`, the
        node's slice): evaluation runs each such group once per batch, as the step does."""
        return {node: (g.fused, s) for g in self.groups if g.shared for s, (_, node) in enumerate(g.slices)}

    def state_dict(self) -> dict:
        """The one member's `state_dict`, its optimizer state in the per-node layout (the same
        with HFTA or without: the checkpoints are interchangeable)."""
        state = self.steps[0].state_dict()
        opt = self.optimizer.state_dict()
        params = self.optimizer.param_groups[0]["params"]
        per_node = {}
        layout = self._layout()
        for i, (j, s, shape) in enumerate(layout):
            if j not in opt["state"]:
                continue
            if s is None:
                per_node[i] = opt["state"][j]
            else:  # node s's slice of every per-element tensor; shared scalars (a step count) as they are
                per_node[i] = {key: v.reshape(-1, *shape)[s].clone()
                               if torch.is_tensor(v) and v.shape == params[j].shape else v
                               for key, v in opt["state"][j].items()}
        groups = [{**opt["param_groups"][0], "params": list(range(len(layout)))}]
        return {**state, "optimizers": {"all": {"state": per_node, "param_groups": groups}}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (in place: fused nodes keep their views)."""
        self.steps[0].load_state_dict(state)
        opt = state["optimizers"]["all"]
        params = self.optimizer.param_groups[0]["params"]
        slices: dict[int, dict[int | None, dict]] = {}
        shapes: dict[int, torch.Size | None] = {}
        for i, (j, s, shape) in enumerate(self._layout()):
            if i in opt["state"]:
                slices.setdefault(j, {})[s] = opt["state"][i]
                shapes[j] = shape
        mine = {}
        for j, by_slice in slices.items():
            if None in by_slice:
                mine[j] = by_slice[None]
                continue
            # stack the nodes' per-element tensors in slice order; shared scalars from the first
            first = by_slice[min(by_slice)]
            mine[j] = {key: torch.stack([by_slice[s][key] for s in sorted(by_slice)]).reshape(params[j].shape)
                       if torch.is_tensor(v) and v.shape == shapes[j] else v for key, v in first.items()}
        groups = [{**opt["param_groups"][0], "params": list(range(len(params)))}]
        self.optimizer.load_state_dict({"state": mine, "param_groups": groups})
        self.optimizer.param_groups[0]["lr"] = self.steps[0].lr()
        self.graph = None  # a captured step holds the old state tensors

    def _layout(self) -> list[tuple[int, int | None, torch.Size | None]]:
        """For each parameter of the per-node layout (trainable nodes in order, each node's
        parameters in order, then each learned ensemble's w): (index in this optimizer, the
        node's slice or None when not fused, the node's shape of that tensor)."""
        step = self.steps[0]
        index = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        where = {node: (g, s) for g in self.groups for s, (_, node) in enumerate(g.slices)}
        layout = []
        for node in step.trainable:
            if node in where:
                g, s = where[node]
                fused = dict(g.fused.net.named_parameters())
                layout += [(index[id(fused[key])], s, g.fused.node_shapes[key])
                           for key, _ in step.models[node].named_parameters()]
            else:
                layout += [(index[id(p)], None, None) for p in step.models[node].parameters()]
        for node in step.learned:
            layout += [(index[id(p)], None, None) for p in step.ensemble_weights[node].parameters()]
        return layout

    # ------------------------------------------------------------ one step

    def _step(self, batches: Sequence[tuple[Tensor, Tensor, int]],
              positions: list[tuple[Tensor, int] | None] | None = None) -> Tensor:
        """One update of every member; its statistics (float64, member order). `positions`:
        per member, (the batch's positions in the training split, k) for `crd` edges, which
        only the eager step of one member passes (`_refuse_positions`)."""
        images = [x for b, s in zip(batches, self.steps) for x in as_views(b[0], s.view_count)]  # `_input`
        if self.options.channels_last:
            images = [x.contiguous(memory_format=torch.channels_last) for x in images]
        labels = [b[1] for b in batches]
        ks = [b[2] for b in batches]
        if self.options.cuda_graph:
            return self._graph_step(images, labels, ks)
        return self._eager_step(images, labels, ks, positions)

    def prepare_update(self, ks: list[int]) -> None:
        """The numbers of this update on the device, refilled in place (no step sees them as
        Python numbers): each member's linear-gate weight k / k_end (eq. 6, from gates.py, which
        checks 1 <= k <= k_end) and, packed, each member's learning rate and update count."""
        self._set_linear_weights(ks)
        lrs = [s.lr() for s in self.steps]
        for opt in self.sliced:
            opt.prepare(lrs, ks)

    def _set_linear_weights(self, ks: list[int]) -> None:
        if any(self.linear):
            for m, k in enumerate(ks):
                if self.linear[m]:
                    self._linear_host[m] = float(gate_weights("linear", source_logits=None, labels=_NO_LABELS, k=k,
                                                              k_end=self.steps[m].k_end, batch=1,
                                                              dtype=torch.float64)[0])
            self.linear_weights.copy_(torch.tensor(self._linear_host, dtype=torch.float64), non_blocking=True)

    def node_losses(self, images: Tensor, labels: Tensor, k: int) -> dict[str, Tensor]:
        """Every trainable node's loss L_t (eq. 3) of the one member on this batch (a learned
        ensemble's too), as the step computes it, with autograd: nothing is updated."""
        self._set_linear_weights([k])
        (_, (plan, _)), = self._plans_for([labels])
        losses, _ = plan(self._outputs(list(as_views(images, self.steps[0].view_count))), [labels], self.linear_weights)
        return dict(zip(self.steps[0].loss_nodes, losses.unbind(0)))

    def zero_grad(self) -> None:
        if self.solo:
            self.optimizer.zero_grad(set_to_none=True)
        for opt in self.sliced:
            opt.zero_grad()

    def apply_update(self) -> None:
        """The optimizer step (after `prepare_update`), then every EMA node's average of its
        source's new weights (`dclang.compile.ema`), so a CUDA graph captures both."""
        if self.solo:
            self.optimizer.step()
        for opt in self.sliced:
            opt.step()
        if self.ema_update:
            self.ema_update()

    def _eager_step(self, images: list[Tensor], labels: list[Tensor], ks: list[int],
                    positions: list[tuple[Tensor, int] | None] | None = None) -> Tensor:
        self.prepare_update(ks)
        self.zero_grad()
        shapes = tuple((tuple(x.shape), x.stride()) for x in images) + tuple(tuple(y.shape) for y in labels)
        if self.compiled is not None and self.compiled_shapes is None:
            stats = self._first_compiled(images, labels)  # compiles for these shapes, the only ones
            self.compiled_shapes = shapes
        else:  # other shapes (an epoch's last, partial batch) run eagerly
            stats = self.forward_backward(images, labels, compiled=shapes == self.compiled_shapes,
                                          positions=positions)
        self.apply_update()
        self.eager_steps += 1
        return stats

    def _autocast(self):
        if self.options.precision == "bf16":
            # a CUDA graph must not capture autocast's weight cache (it is rebuilt every step)
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.options.cuda_graph)
        return contextlib.nullcontext()

    def forward_backward(self, images: list[Tensor], labels: list[Tensor], *, compiled: bool = True,
                         positions: list[tuple[Tensor, int] | None] | None = None) -> Tensor:
        """Forward, losses (compiled where they are) and backward; every gradient in the
        tensors the optimizer updates. The step's statistics."""
        split = self._split(images)
        for m, node in (s for g in split for s in g.slices):
            self.steps[m].models[node].zero_grad(set_to_none=True)
        losses = self.compiled if compiled and self.compiled is not None else self._forward_losses
        self._plans_for(labels)
        weights = self.bf16_weights.in_use() if self.bf16_weights is not None else contextlib.nullcontext()
        with self._autocast(), weights:
            total, stats = losses(images, labels, self.linear_weights, positions)
        total.backward()
        if self.bf16_weights is not None:
            self.bf16_weights.gradients_back()
        for g in split:
            self._gather_gradients(g)
        # the layers this forward captured hold its autograd graph, and with it each parameter's
        # AccumulateGrad node, bound to the stream it was made on: kept past the step, they make
        # the next step's gradients cross streams (torch warns; a capture runs on its own stream).
        # Nothing reads them after the backward.
        for step in self.steps:
            step.layers.features.clear()
        return stats

    def _first_compiled(self, images: list[Tensor], labels: list[Tensor]) -> Tensor:
        """The compiled forward-backward, or, when compiling fails, the eager one (for good).

        Nothing is updated before the optimizer step, except BatchNorm's running statistics
        in the forward, which are restored before the eager retry, as is torch's thread state
        (`dclang.compile.thread_state`). An eager step failing after that is a UserError that
        names both failures.
        """
        buffers = [{(n, k): b.clone() for n, model in step.models.items() for k, b in model.named_buffers()}
                   for step in self.steps]
        try:
            with restored_on_failure():  # what a failed trace leaves in torch's thread state, put back
                return self.forward_backward(images, labels)
        except Exception as exc:  # noqa: BLE001 (whatever the compiler raises; the eager retry re-raises real errors)
            failure = _first_line(exc)
            warnings.warn(f"torch.compile failed, running the step eagerly: {failure}", stacklevel=4)
            self.compiled = None
            with torch.no_grad():
                for step, saved in zip(self.steps, buffers):
                    for n, model in step.models.items():
                        for k, b in model.named_buffers():
                            b.copy_(saved[(n, k)])
            self.zero_grad()
        try:
            return self.forward_backward(images, labels)
        except Exception as exc:  # noqa: BLE001 (said as a UserError: what failed, and what to do)
            raise UserError(f"torch.compile failed ({failure}), and the eager step after it failed too "
                            f"({_first_line(exc)})", "run without --compile; `dclang --debug` shows the traceback"
                            ) from exc

    def _graph_step(self, images: list[Tensor], labels: list[Tensor], ks: list[int]) -> Tensor:
        """Replay the captured step; or capture it, after the warm-up, for the batch shapes of
        the engine's first step (full batches: an epoch's short last one is never captured);
        batches of other shapes run eagerly."""
        if self.graph is not None and self.graph.fits(images, labels):
            return self.graph.replay(images, labels, ks)
        shapes = [(x.shape, x.stride()) for x in images] + [y.shape for y in labels]
        if self.first_shapes is None:
            self.first_shapes = shapes
        if self.eager_steps >= CUDA_GRAPH_WARMUP and self.graph is None and shapes == self.first_shapes:
            self.graph = accelerate.CapturedStep(self, images, labels, ks)
            return self.graph.replay(images, labels, ks)
        if self.eager_steps >= CUDA_GRAPH_WARMUP:
            return self._eager_step(images, labels, ks)
        with accelerate.side_stream(self.side):  # warm-up: what a capture must find allocated
            return self._eager_step(images, labels, ks)

    def _split(self, images: list[Tensor]) -> list[_Group]:
        """Fused groups across members whose batches differ in shape this step: their slices
        run through the separate models (`_outputs`)."""
        return [g for g in self.groups if not g.shared and len({self._input(images, m, n).shape
                                                                 for m, n in g.slices}) > 1]

    def _input(self, images: list[Tensor], m: int, node: str) -> Tensor:
        """What member m's network `node` reads: its view of the member's batch (`dclang.views`).
        `images` holds every member's views in member order, each member's as its step lays
        them out (one per member where no network has a view of its own)."""
        return images[self.first_view[m] + self.steps[m].view_index[node]]

    def _gather_gradients(self, g: _Group) -> None:
        """Move the gradients of a group's separately run slices into its fused tensors."""
        for pname, fused in g.fused.net.named_parameters():
            grads = []
            for m, node in g.slices:
                param = self.steps[m].models[node].get_parameter(pname)
                grads.append(param.grad if param.grad is not None else torch.zeros_like(param))
                param.grad = None
            fused.grad = torch.stack(grads).reshape(fused.shape)

    def _forward_losses(self, images: list[Tensor], labels: list[Tensor], linear_weights: Tensor,
                        positions: list[tuple[Tensor, int] | None] | None = None) -> tuple[Tensor, Tensor]:
        """The forward of every member and every loss: (the sum of every node loss, the
        statistics in member order as one float64 vector). What compile compiles and a CUDA
        graph captures, with the forward of the backward."""
        outputs = self._outputs(images)
        totals, pieces, order = [], [], []
        for idx, (plan, rows) in self._plans_for(labels):
            node_losses, stats = plan([outputs[m] for m in idx], [labels[m] for m in idx],
                                      linear_weights if rows is None else linear_weights.index_select(0, rows),
                                      None if positions is None else [positions[m] for m in idx])
            totals.append(node_losses.sum())
            pieces.append(stats)
            order += idx
        total = totals[0] if len(totals) == 1 else torch.stack(totals).sum()
        if order != sorted(order):
            pieces = self.sums.reorder(pieces, order)
        return total, pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _plans_for(self, labels: list[Tensor]) -> list[tuple[tuple[int, ...], tuple[LossPlan, Tensor | None]]]:
        """The loss plans of this step: one per set of members whose outputs have one shape
        (batch, classes), with the set's rows of the member vectors (None: all members). Built
        the first time the set is seen, before a compiled or captured step reads them (building
        one inside would compile again, or copy to the device inside a CUDA graph)."""
        by_shape: dict[tuple[int, int], list[int]] = {}
        for m, step in enumerate(self.steps):
            by_shape.setdefault((len(labels[m]), step.num_classes), []).append(m)
        out = []
        for ms in by_shape.values():
            idx = tuple(ms)
            if idx not in self._plans:
                rows = None if len(idx) == len(self.steps) else torch.tensor(idx, device=self.device)
                self._plans[idx] = (LossPlan([self.steps[m] for m in idx]), rows)
            out.append((idx, self._plans[idx]))
        return out

    def _outputs(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Every member's outputs: networks (fused groups in one forward each), each on its
        view of its member's batch, then ensembles."""
        logits: list[dict[str, Tensor]] = [{} for _ in self.members]
        split = self._split(images)
        for g in self.groups:
            if g in split:
                for m, node in g.slices:
                    logits[m][node] = self.steps[m].models[node](self._input(images, m, node))
                continue
            inputs = [self._input(images, m, n) for m, n in g.slices]
            x = inputs[0] if g.shared else stack_inputs(inputs)
            for (m, node), out in zip(g.slices, g.fused(x).unbind(0)):
                logits[m][node] = out
        outputs = []
        for m, step in enumerate(self.steps):
            with trunks_once(step.tapes):  # each shared trunk computed once, in its source's forward
                for node in step.order:
                    if node in logits[m]:
                        continue
                    model = step.models[node]
                    x = self._input(images, m, node)
                    logits[m][node] = frozen_forward(model, x) if node in step.detached else model(x)
            outputs.append(ensemble_outputs({n: logits[m][n] for n in step.models}, step.ensembles))
        return outputs


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


_NO_LABELS = torch.empty(0, dtype=torch.long)  # gate_weights' device for the host-side linear weight


__all__ = ["Carried", "Engine", "Member", "StepMember"]
