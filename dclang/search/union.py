"""The union step: K packed trials trained as one graph, one forward and one backward for all.

The K trials of a pack (`dclang.search.pack`) are K graphs; their union is one graph whose
components never exchange a gradient. `UnionStep` executes one training step of all of them:

- **Forward.** With HFTA on, trainable nodes of one architecture, batch size and optimizer rule
  are fused across trials (and within a trial) into one network (`dclang.models.fused`) that
  reads each node's own trial's batch: the K batches side by side in channels
  (`stack_inputs`). Other nodes run alone on their trial's batch; frozen ones without autograd.
- **Losses.** The edges of every trial with the same loss, gate and weight are one stacked
  computation (`losses.edge_losses`), each edge reading its own trial's labels; a linear gate's
  weight k / k_end is each trial's own (computed at k_end, then scaled, as the accelerated
  steps do). Node losses are one product of the edge losses with a 0/1 incidence matrix
  (eq. 3), and the sum of every trial's node losses gets one backward. Each trial's edges
  still detach their sources (paper 3.1), so each node's gradient is that of its own loss.
- **Update.** `SlicedOptimizer`: torch's update rule with each trial's own learning rate
  (its schedule's position) and update count, on tensors whose slices belong to different
  trials.
- **Statistics.** Every trial's step statistics land in one accumulator on the device
  (`_Sums`), each trial's block laid out as its `EpochStats` keys, read at that trial's
  epoch end.

So a step dispatches about as many operations for K trials as for one: the goal that makes
packing pay on an accelerator, where launches dominate small models (benchmarks/pack_ops.py).

What stays per trial: its models (each node's tensors are views of its fused slice, so the
trial's own `FusedStep` evaluates, counts and saves them unchanged), its optimizer state, its
schedule, its `k`, its data order. Trials whose graphs have edges between layers have their
losses computed by their own `FusedStep` (`losses`, `stats`) inside the same backward, their
layers captured from the fused networks where their nodes are fused; trials whose logits
differ in shape this step (one trial's last, partial batch) have their losses stacked apart
from their mates'; a fused group whose slices got batches of different sizes runs its slices
through the separate models that step, and their gradients are gathered into the fused tensors.

A pack's membership changes when a trial leaves or joins; the union is then rebuilt
(`UnionStep(..., carried=old.carry())`), every remaining trial keeping its weights, optimizer
state and the epoch's statistics so far.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dclang.compile.accelerate import alias_to_slice, convolutional, own_storage
from dclang.compile.fused import FusedStep
from dclang.compile.sliced_optim import STATE, SlicedOptimizer, rule_of
from dclang.ensembles import ensemble_outputs
from dclang.ir import LABEL
from dclang.losses import edge_group_key, edge_losses
from dclang.models.fused import fuse_models, stack_inputs


class Member(Protocol):
    """A trial in a union: its compiled plain fused step, its batch size and optimizer name."""

    step: FusedStep
    batch: int
    optimizer: str


@dataclass(eq=False)
class StepMember:
    """A compiled step of a graph as a union member, where no `TrialRun` holds it (the cost
    plan, benchmarks, tests)."""

    step: FusedStep
    batch: int
    optimizer: str

    @classmethod
    def of(cls, step: FusedStep, graph) -> StepMember:
        train = graph.graph["train"]
        return cls(step, train.batch, train.optimizer.name)


def stat_keys(step: FusedStep) -> list[tuple[str, str]]:
    """The (field, name) keys of a step's `StepStats`, in `StepStats.keys()` order."""
    edges = [e.key for e in step.edges]
    return ([("node_correct", n) for n in step.stacked_names] + [("node_loss", t) for t in step.trainable]
            + [(f, e) for f in ("edge_loss", "edge_gate", "edge_pass") for e in edges])


def _has_layer_edges(step: FusedStep) -> bool:
    return any(e.on_layers for e in step.edges)


@dataclass
class _Group:
    """Trainable nodes (member index, node) of one architecture computed by one fused network."""

    slices: list[tuple[int, str]]
    fused: nn.Module  # FusedModel


@dataclass
class Carried:
    """What a rebuilt union takes over from the one it replaces, per member: optimizer state by
    (node, parameter name), and the epoch's statistic sums so far."""

    optimizer: dict[tuple[Any, str, str], dict[str, Tensor]] = field(default_factory=dict)
    sums: dict[Any, tuple[Tensor, Tensor, int]] = field(default_factory=dict)


class UnionStep:
    """One step of every member at once; see the module's docstring."""

    def __init__(self, members: Sequence[Member], *, hfta: bool, carried: Carried | None = None,
                 channels_last: bool | None = None):
        carried = carried or Carried()
        self.members = list(members)
        if any(m.step.needs_indices for m in self.members):
            raise ValueError("a trial with a `crd` edge cannot be packed: its step reads each batch's positions "
                             "in the training split, which a packed step does not pass; search it without --pack")
        self.device = self.members[0].step.device
        for member in self.members:
            own_storage_of(member)  # let go of a previous union's fused tensors
        # what each member is, decided once: its optimizer rule, whether it has edges between layers
        self.rules = [rule_of(m.optimizer, m.step.optimizer.param_groups[0]) for m in self.members]
        self.layered = [_has_layer_edges(m.step) for m in self.members]
        self.groups = self._fuse() if hfta else []
        self.fused_nodes = {s for g in self.groups for s in g.slices}
        if channels_last is None:  # as `dclang run` decides it (`StepOptions.resolve`): measured to win there
            channels_last = self.device.type == "cpu" and convolutional(
                {f"{m}.{n}": model for m, member in enumerate(self.members) for n, model in member.step.models.items()})
        self.channels_last = channels_last
        if channels_last:
            self._to_channels_last()
        self.optimizers, self.slots = self._optimizers(carried.optimizer)
        self.sums = _Sums([stat_keys(m.step) for m in self.members], self.device,
                          [carried.sums.get(m) for m in self.members])
        self._plans: dict[tuple[int, ...], _BatchedLosses] = {}

    # ------------------------------------------------------------ building

    def _fuse(self) -> list[_Group]:
        """Trainable nodes grouped by architecture (the model's repr: a node carrying a `hint`
        connector differs), batch size and optimizer rule; groups of two or more fused."""
        by_key: dict[tuple, list[tuple[int, str]]] = {}
        for m, member in enumerate(self.members):
            step = member.step
            for node in step.trainable:
                by_key.setdefault((repr(step.models[node]), member.batch, self.rules[m]), []).append((m, node))
        groups = []
        for slices in by_key.values():
            if len(slices) < 2:
                continue
            models = [self.members[m].step.models[n] for m, n in slices]
            try:
                fused = fuse_models(models, shared_input=False)
            except (NotImplementedError, ValueError) as exc:
                warnings.warn(f"HFTA: {exc}; those nodes stay separate", stacklevel=3)
                continue
            for s, model in enumerate(models):
                alias_to_slice(model, fused, s)
            groups.append(_Group(slices, fused))
        self._capture_layers(groups)
        return groups

    def _capture_layers(self, groups: list[_Group]) -> None:
        """A member with edges between layers keeps its layers from the fused networks too
        (`LayerCapture(fused=...)`), replacing the capture its step (or a previous union) set."""
        from dclang.models.taps import LayerCapture

        slices: dict[int, dict[str, tuple[nn.Module, int]]] = {}
        for g in groups:
            for s, (m, node) in enumerate(g.slices):
                slices.setdefault(m, {})[node] = (g.fused, s)
        for m, member in enumerate(self.members):
            step = member.step
            if self.layered[m]:
                step.layers.remove()
                step.layers = LayerCapture(step.models, step.layer_ends(), fused=slices.get(m))

    def _to_channels_last(self) -> None:
        """NHWC weights (and inputs, in `step`): the fused networks, then every model left
        separate; each fused node's tensors re-pointed at its converted slice."""
        for g in self.groups:
            g.fused.to(memory_format=torch.channels_last)
            for s, (m, node) in enumerate(g.slices):
                alias_to_slice(self.members[m].step.models[node], g.fused, s)
        for m, member in enumerate(self.members):
            for node, model in member.step.models.items():
                if (m, node) not in self.fused_nodes:
                    model.to(memory_format=torch.channels_last)

    def _optimizers(self, carried: dict) -> tuple[list[SlicedOptimizer], list[list[list[tuple[Any, str, str]]]]]:
        """One `SlicedOptimizer` per optimizer rule, over the fused tensors and every trainable
        node left separate; `slots[o][i]` names each slice of tensor i as (member, node, parameter)."""
        by_rule: dict[tuple, list[tuple[nn.Parameter, list[int], list[tuple[Any, str, str]]]]] = {}
        for g in self.groups:
            for pname, param in g.fused.net.named_parameters():
                names = [(self.members[m], n, pname) for m, n in g.slices]
                by_rule.setdefault(self.rules[g.slices[0][0]], []).append((param, [m for m, _ in g.slices], names))
        for m, member in enumerate(self.members):
            for node in member.step.trainable:
                if (m, node) in self.fused_nodes:
                    continue
                for pname, param in member.step.models[node].named_parameters():
                    by_rule.setdefault(self.rules[m], []).append((param, [m], [(member, node, pname)]))
        optimizers, slots = [], []
        for key, entries in by_rule.items():
            params = [p for p, _, _ in entries]
            state = []
            for p, _, names in entries:
                parts = [carried.get(name) for name in names]
                state.append(None if all(x is None for x in parts) else {
                    k: torch.stack([(x or {}).get(k, torch.zeros(p.numel() // len(names), dtype=p.dtype,
                                                                  device=p.device)).reshape(-1)
                                    for x in parts]).reshape(p.shape)
                    for k in STATE[key[0]]})
            optimizers.append(SlicedOptimizer(key, params, [own for _, own, _ in entries], state))
            slots.append([names for _, _, names in entries])
        return optimizers, slots

    def carry(self, keep: Sequence[Member]) -> Carried:
        """What the union rebuilt for `keep` (members of this one, and new ones) takes over."""
        kept = set(map(id, keep))
        carried = Carried()
        for opt, slots in zip(self.optimizers, self.slots):
            for state, names in zip(opt.state, slots):
                for s, name in enumerate(names):
                    if id(name[0]) in kept:
                        carried.optimizer[name] = {k: v.reshape(len(names), -1)[s].clone() for k, v in state.items()}
        for m, member in enumerate(self.members):
            if id(member) in kept:
                carried.sums[member] = self.sums.take(m)
        return carried

    # ------------------------------------------------------------ one step

    def step(self, batches: Sequence[tuple[Tensor, Tensor, int]]) -> None:
        """One update of every member on its own (images, labels, k)."""
        images = [b[0] for b in batches]
        if self.channels_last:
            images = [x.contiguous(memory_format=torch.channels_last) for x in images]
        outputs, split = self._outputs(images)
        total, pieces = self._losses(outputs, [b[1] for b in batches], [b[2] for b in batches])
        for opt in self.optimizers:
            opt.zero_grad()
        for m, node in (s for g in split for s in g.slices):
            self.members[m].step.models[node].zero_grad(set_to_none=True)
        total.backward()
        for g in split:
            self._gather_gradients(g)
        lrs = [m.step.lr() for m in self.members]
        counts = [b[2] for b in batches]
        for opt in self.optimizers:
            opt.step(lrs, counts)
        self.sums.add(pieces, [len(b[1]) for b in batches], counts)

    def _outputs(self, images: list[Tensor]) -> tuple[list[dict[str, Tensor]], list[_Group]]:
        """Every member's outputs (networks, then ensembles), and the fused groups that ran
        their slices separately this step (batches of different sizes)."""
        logits: list[dict[str, Tensor]] = [{} for _ in self.members]
        split = []
        for g in self.groups:
            xs = [images[m] for m, _ in g.slices]
            if len({x.shape for x in xs}) == 1:
                for (m, node), out in zip(g.slices, g.fused(stack_inputs(xs)).unbind(0)):
                    logits[m][node] = out
            else:
                split.append(g)
                for m, node in g.slices:
                    logits[m][node] = self.members[m].step.models[node](images[m])
        outputs = []
        for m, member in enumerate(self.members):
            step = member.step
            for node, model in step.models.items():
                if node in logits[m]:
                    continue
                if node in step.frozen:
                    with torch.inference_mode():
                        logits[m][node] = model(images[m])
                else:
                    logits[m][node] = model(images[m])
            outputs.append(ensemble_outputs({n: logits[m][n] for n in step.models}, step.ensembles))
        return outputs, split

    def _gather_gradients(self, g: _Group) -> None:
        """Move the gradients of a group's separately run slices into its fused tensors."""
        for pname, fused in g.fused.net.named_parameters():
            grads = []
            for m, node in g.slices:
                param = self.members[m].step.models[node].get_parameter(pname)
                grads.append(param.grad if param.grad is not None else torch.zeros_like(param))
                param.grad = None
            fused.grad = torch.stack(grads).reshape(fused.shape)

    def _losses(self, outputs: list[dict[str, Tensor]], labels: list[Tensor], ks: list[int]
                ) -> tuple[Tensor, list[Tensor]]:
        """The sum of every member's node losses, and the step's statistics in member order
        (each member's block laid out as `stat_keys`), as float64 pieces to concatenate."""
        by_shape: dict[tuple, list[int]] = {}  # logits of one shape (batch, classes) stack together
        alone = []
        for m, member in enumerate(self.members):
            if self.layered[m]:
                alone.append(m)
            else:
                by_shape.setdefault(tuple(outputs[m][member.step.stacked_names[0]].shape), []).append(m)
        totals, pieces, order = [], [], []
        for ms in by_shape.values():
            idx = tuple(ms)
            if idx not in self._plans:
                self._plans[idx] = _BatchedLosses([self.members[m].step for m in idx])
            total, stats = self._plans[idx]([outputs[m] for m in idx], [labels[m] for m in idx],
                                            [ks[m] for m in idx])
            totals.append(total)
            pieces.append(stats)
            order += idx
        for m in alone:
            step = self.members[m].step
            node_losses, edge_results = step.losses(outputs[m], labels[m], k=ks[m])
            totals.append(torch.stack(list(node_losses.values())).sum())
            counts, means = step.stats(outputs[m], labels[m], node_losses, edge_results).vectors()
            pieces.append(torch.cat([counts.to(torch.float64), means.to(torch.float64)]))
            order.append(m)
        total = totals[0] if len(totals) == 1 else torch.stack(totals).sum()
        if order != sorted(order):
            pieces = self.sums.reorder(pieces, order)
        return total, pieces


def own_storage_of(member: Member) -> None:
    """Every trainable node of `member` back on tensors of its own."""
    for node in member.step.trainable:
        own_storage(member.step.models[node])


class _BatchedLosses:
    """The losses and statistics of members whose batches have one size, computed together:
    a plan built once per set of members (row and edge indices, incidence matrix)."""

    def __init__(self, steps: list[FusedStep]):
        device = steps[0].device
        self.names = [(j, name) for j, step in enumerate(steps) for name in step.stacked_names]
        row = {key: i for i, key in enumerate(self.names)}
        self.row_member = torch.tensor([j for j, _ in self.names], device=device)
        grouped: dict[tuple, list[tuple[int, Any]]] = {}
        for j, step in enumerate(steps):
            for edge in step.edges:
                grouped.setdefault(edge_group_key(edge), []).append((j, edge))
        self.groups = []
        edge_index: dict[tuple[int, str], int] = {}
        for edges in grouped.values():
            for j, edge in edges:
                edge_index[(j, edge.key)] = len(edge_index)
            first = edges[0][1]
            self.groups.append((
                [e for _, e in edges],
                torch.tensor([row[(j, e.target)] for j, e in edges], device=device),
                None if first.source == LABEL else torch.tensor([row[(j, e.source)] for j, e in edges], device=device),
                torch.tensor([j for j, _ in edges], device=device),
                first.gate == "linear"))
        self.linear = any(g[4] for g in self.groups)
        trainable = [(j, t) for j, step in enumerate(steps) for t in step.trainable]
        incidence = torch.zeros(len(trainable), len(edge_index))
        for i, (j, t) in enumerate(trainable):
            for e in steps[j].edges:
                if e.target == t:
                    incidence[i, edge_index[(j, e.key)]] = 1.0
        self.incidence = incidence.to(device)
        # positions in [correct (R) | node losses (N) | edge losses (E) | gate means (E) | pass (E)]
        # of each member's block, laid out as its `stat_keys`
        R, N, E = len(self.names), len(trainable), len(edge_index)
        node_pos = {key: i for i, key in enumerate(trainable)}
        perm = []
        for j, step in enumerate(steps):
            perm += [row[(j, n)] for n in step.stacked_names]
            perm += [R + node_pos[(j, t)] for t in step.trainable]
            for offset in (R + N, R + N + E, R + N + 2 * E):
                perm += [offset + edge_index[(j, e.key)] for e in step.edges]
        self.perm = torch.tensor(perm, device=device)
        self.k_ends = [step.k_end for step in steps]

    def __call__(self, outputs: list[dict[str, Tensor]], labels: list[Tensor], ks: list[int]
                 ) -> tuple[Tensor, Tensor]:
        stacked = torch.stack([outputs[j][name] for j, name in self.names])  # (R, B, C)
        detached = stacked.detach()  # sources (paper 3.1)
        label_rows = torch.stack(labels)  # (members, B)
        linear_w = None
        if self.linear:
            linear_w = torch.tensor([k / k_end for k, k_end in zip(ks, self.k_ends)],
                                    dtype=stacked.dtype).to(stacked.device, non_blocking=True)
        losses, weights = [], []
        for edges, target_rows, source_rows, member_rows, linear in self.groups:
            targets = stacked.index_select(0, target_rows)
            sources = None if source_rows is None else detached.index_select(0, source_rows)
            edge_labels = label_rows.index_select(0, member_rows)
            loss, w = edge_losses(edges, sources, targets, edge_labels, k=1, k_end=1)
            if linear:  # computed at k_end (weight one), scaled by each edge's trial's k / k_end
                scale = linear_w.index_select(0, member_rows)
                loss, w = loss * scale, w * scale[:, None]
            losses.append(loss)
            weights.append(w)
        B = label_rows.shape[1]
        edge_loss = torch.cat(losses) if losses else stacked.new_zeros(0)
        edge_w = torch.cat(weights) if weights else stacked.new_zeros(0, B)
        node_losses = self.incidence.to(edge_loss.dtype) @ edge_loss
        with torch.no_grad():
            correct = (detached.argmax(dim=-1) == label_rows.index_select(0, self.row_member)).sum(dim=-1)
            flat = torch.cat([correct.to(edge_loss.dtype), node_losses.detach(), edge_loss.detach(),
                              edge_w.mean(dim=-1), (edge_w != 0).to(edge_w.dtype).mean(dim=-1)])
            stats = flat.to(torch.float64).index_select(0, self.perm)
        return node_losses.sum(), stats


class _Sums:
    """Every member's epoch sums of its step statistics in one device vector, each member's
    block laid out as its `stat_keys` (counts, then batch means weighted by batch size), with
    the first update each became non-finite: `EpochStats` for all members at once."""

    def __init__(self, keys: list[list[tuple[str, str]]], device: torch.device,
                 carried: list[tuple[Tensor, Tensor, int] | None]):
        self.keys = keys
        sizes = [len(k) for k in keys]
        self.offsets = [sum(sizes[:m]) for m in range(len(sizes) + 1)]
        total = self.offsets[-1]
        self.sums = torch.zeros(total, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(total, dtype=torch.long, device=device)
        self.samples = [0] * len(keys)
        self.is_mean = torch.tensor([f != "node_correct" for ks in keys for f, _ in ks], device=device)
        self.sizes = torch.tensor(sizes, device=device)
        self.total = total
        for m, given in enumerate(carried):
            if given is not None:
                sums, bad, samples = given
                self.sums[self.offsets[m]:self.offsets[m + 1]] = sums
                self.first_bad[self.offsets[m]:self.offsets[m + 1]] = bad
                self.samples[m] = samples
        self._weights: dict[tuple[int, ...], Tensor] = {}
        self._orders: dict[tuple[int, ...], Tensor] = {}

    def _per_slot(self, values: Sequence[int], dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(self.sums.device, non_blocking=True).repeat_interleave(
            self.sizes, output_size=self.total)

    def add(self, pieces: list[Tensor], batch_sizes: list[int], ks: list[int]) -> None:
        """Add one step's statistics (member order, float64 pieces); no host sync."""
        values = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        key = tuple(batch_sizes)
        if key not in self._weights:
            self._weights[key] = torch.where(self.is_mean, self._per_slot(batch_sizes, torch.float64), 1.0)
        k = self._per_slot(ks, torch.long)
        self.first_bad = torch.where(~torch.isfinite(values) & (self.first_bad == 0), k, self.first_bad)
        self.sums += values * self._weights[key]
        for m, b in enumerate(batch_sizes):
            self.samples[m] += b

    def take(self, m: int) -> tuple[Tensor, Tensor, int]:
        """Member m's sums, first non-finite updates and sample count so far; its block reset."""
        block = slice(self.offsets[m], self.offsets[m + 1])
        out = (self.sums[block].clone(), self.first_bad[block].clone(), self.samples[m])
        self.sums[block] = 0
        self.first_bad[block] = 0
        self.samples[m] = 0
        return out

    def read(self, m: int) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        """`EpochStats.read` for member m (its epoch's means, first non-finite update per key),
        and its block reset for the next epoch."""
        sums, bad, samples = self.take(m)
        means = {key: s / samples for key, s in zip(self.keys[m], sums.tolist())}
        return means, {key: b for key, b in zip(self.keys[m], bad.tolist()) if b}

    def reorder(self, pieces: list[Tensor], order: list[int]) -> list[Tensor]:
        """Pieces holding several members' blocks each (in `order`) as one vector in member order."""
        flat = torch.cat(pieces)
        key = tuple(order)
        if key not in self._orders:  # one permutation per arrangement of the members (few): kept
            starts, at = {}, 0
            for m in order:
                starts[m] = at
                at += self.offsets[m + 1] - self.offsets[m]
            perm = [starts[m] + i for m in range(len(order)) for i in range(self.offsets[m + 1] - self.offsets[m])]
            self._orders[key] = torch.tensor(perm, device=flat.device)
        return [flat.index_select(0, self._orders[key])]


__all__ = ["Carried", "Member", "StepMember", "UnionStep", "stat_keys"]
