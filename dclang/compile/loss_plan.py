"""The fused engine's losses and statistics for a set of graphs whose outputs have one shape:
one plan, whatever the number of graphs (`dclang.compile.engine`).

Edges of every graph with the same loss, gate and weight are one stacked computation
(`losses.edge_losses`), each edge reading its own graph's labels; an edge between layers is
computed alone (its layers differ in shape from any other's), and so is a `crd` edge (its
module and memory bank are its own; it reads the batch's positions in the training split and
draws the negatives of its update, `computed_alone`); a linear gate is computed at
k_end and scaled by its graph's k / k_end, given as a device tensor; node losses are one
product of the edge losses with a 0/1 incidence matrix (eq. 3). The statistics come out as
one float64 vector, each graph's block laid out as its `StepStats.keys()` (`stat_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dclang.compile.common import TrainStep, computed_alone
from dclang.ir import LABEL
from dclang.losses import edge_group_key, edge_losses


def stat_keys(step: TrainStep) -> list[tuple[str, str]]:
    """The (field, name) keys of a member's `StepStats`, in `StepStats.keys()` order: correct
    counts of every network and ensemble, then the batch means."""
    edges = [e.key for e in step.edges]
    return ([("node_correct", n) for n in stacked_names(step)] + [("node_loss", t) for t in step.loss_nodes]
            + [(f, e) for f in ("edge_loss", "edge_gate", "edge_pass") for e in edges])


def stacked_names(step: TrainStep) -> list[str]:
    """A member's outputs as the losses stack them: networks, then ensembles."""
    return [*step.models, *(name for name, _, _ in step.ensembles)]



class LossPlan:
    """The losses and statistics of members whose logits have one shape, computed together:
    built once per set of members (row and edge indices, incidence matrix). A call gives
    every trainable node's loss (members in order, each member's `loss_nodes` in order: its
    networks, then its learned ensembles, whose output rows carry w's gradient) and the
    statistics (float64, each member's block laid out as its `stat_keys`)."""

    def __init__(self, steps: list[TrainStep]):
        device = steps[0].device
        self.steps = steps
        self.names = [(j, name) for j, step in enumerate(steps) for name in stacked_names(step)]
        row = {key: i for i, key in enumerate(self.names)}
        self.row_member = torch.tensor([j for j, _ in self.names], device=device)
        grouped: dict[tuple, list[tuple[int, Any]]] = {}
        self.layer_edges: list[tuple[int, Any]] = []  # computed alone, after the groups
        for j, step in enumerate(steps):
            for edge in step.edges:
                if computed_alone(edge):
                    self.layer_edges.append((j, edge))
                else:
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
        for j, edge in self.layer_edges:
            edge_index[(j, edge.key)] = len(edge_index)
        trainable = [(j, t) for j, step in enumerate(steps) for t in step.loss_nodes]
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
            perm += [row[(j, n)] for n in stacked_names(step)]
            perm += [R + node_pos[(j, t)] for t in step.loss_nodes]
            for offset in (R + N, R + N + E, R + N + 2 * E):
                perm += [offset + edge_index[(j, e.key)] for e in step.edges]
        self.perm = torch.tensor(perm, device=device)

    def __call__(self, outputs: list[dict[str, Tensor]], labels: list[Tensor], linear_weights: Tensor,
                 positions: Sequence[tuple[Tensor, int] | None] | None = None) -> tuple[Tensor, Tensor]:
        """`positions`: per member, (the batch's positions in the training split, the update
        number) where an edge reads them (`TrainStep.needs_indices`), else None."""
        stacked = torch.stack([outputs[j][name] for j, name in self.names])  # (R, B, C)
        detached = stacked.detach()  # sources (paper 3.1)
        label_rows = torch.stack(labels)  # (members, B)
        losses, weights = [], []
        for edges, target_rows, source_rows, member_rows, linear in self.groups:
            targets = stacked.index_select(0, target_rows)
            sources = None if source_rows is None else detached.index_select(0, source_rows)
            edge_labels = label_rows.index_select(0, member_rows)
            loss, w = edge_losses(edges, sources, targets, edge_labels, k=1, k_end=1)
            if linear:  # computed at k_end (weight one), scaled by each edge's member's k / k_end
                scale = linear_weights.index_select(0, member_rows).to(loss.dtype)
                loss, w = loss * scale, w * scale[:, None]
            losses.append(loss)
            weights.append(w)
        for j, edge in self.layer_edges:
            step = self.steps[j]
            indices, update = (positions[j] if positions and positions[j] is not None else (None, None))
            loss, w = step.layer_edge_result(edge, outputs[j], labels[j], k=step.k_end, indices=indices,
                                             update=update)
            if edge.gate == "linear":
                scale = linear_weights[j].to(loss.dtype)
                loss, w = loss * scale, w * scale
            losses.append(loss[None])
            weights.append(w[None])
        B = label_rows.shape[1]
        edge_loss = torch.cat(losses) if losses else stacked.new_zeros(0)
        edge_w = torch.cat(weights) if weights else stacked.new_zeros(0, B)
        node_losses = self.incidence.to(edge_loss.dtype) @ edge_loss
        with torch.no_grad():
            correct = (detached.argmax(dim=-1) == label_rows.index_select(0, self.row_member)).sum(dim=-1)
            flat = torch.cat([correct.to(edge_loss.dtype), node_losses.detach(), edge_loss.detach(),
                              edge_w.mean(dim=-1), (edge_w != 0).to(edge_w.dtype).mean(dim=-1)])
            stats = flat.to(torch.float64).index_select(0, self.perm)
        return node_losses, stats


__all__ = ["LossPlan", "stacked_names", "stat_keys"]
