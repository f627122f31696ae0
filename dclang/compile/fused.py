"""The fused engine (the default): one forward, one backward, one optimizer step per batch.

Summing every node's loss into one scalar and calling backward once gives each node exactly
the gradient of its own loss, because every edge detaches its source (paper 3.1): node t's
parameters only appear in L_t. One optimizer with a single parameter group then updates all
trainable nodes with multi-tensor (`foreach`) kernels. A single group is exact, not an
approximation: the `train` block gives every node the same hyperparameters, and SGD, Adam
and AdamW keep their state (momentum, moments, step count) per parameter, so one optimizer
over all nodes computes what one optimizer per node does.

`step` reads no tensor back to the host, so a GPU never waits for Python inside it.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import Tensor, nn

from dclang.compile.common import StepStats, TrainStep, computed_alone
from dclang.compile.optim import build_optimizer, build_scheduler
from dclang.ir import LABEL
from dclang.losses import edge_group_key, edge_losses, node_loss


class FusedStep(TrainStep):
    engine = "fused"

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], *, device: torch.device,
                 steps_per_epoch: int, epochs: int):
        super().__init__(graph, models, device=device, steps_per_epoch=steps_per_epoch, epochs=epochs)
        train = graph.graph["train"]
        self.optimizer = build_optimizer(train.optimizer, self.parameters_to_update(), foreach=True)
        self.optimizers["all"] = self.optimizer
        self.schedulers["all"] = build_scheduler(train.schedule, self.optimizer, epochs)
        groups: dict[tuple, list] = {}
        for edge in self.edges:
            if not computed_alone(edge):  # an edge between layers, or crd, is computed alone (`layer_edge_result`)
                groups.setdefault(edge_group_key(edge), []).append(edge)
        self.edge_groups = list(groups.values())
        # each group's rows of the stacked logits (networks, then ensembles): targets, then
        # sources (None from `label`)
        self.stacked_names = [*models, *(name for name, _, _ in self.ensembles)]
        row = {name: i for i, name in enumerate(self.stacked_names)}
        self.group_rows = [(self._rows([row[e.target] for e in group]),
                            None if group[0].source == LABEL else self._rows([row[e.source] for e in group]))
                           for group in self.edge_groups]

    def _rows(self, rows: list[int]) -> Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def parameters_to_update(self) -> list[nn.Parameter]:
        """What the one optimizer updates: every trainable node's parameters, in node order.
        The HFTA variant (`dclang.compile.accelerate.HftaStep`) updates fused tensors instead."""
        return [p for name in self.trainable for p in self.models[name].parameters()]

    def step(self, images: Tensor, labels: Tensor, k: int, indices: Tensor | None = None) -> StepStats:
        logits = self.outputs(images)
        node_losses, edge_results = self.losses(logits, labels, k=k, indices=indices)
        self.optimizer.zero_grad()
        torch.stack(list(node_losses.values())).sum().backward()
        self.optimizer.step()
        return self.stats(logits, labels, node_losses, edge_results)

    def losses(self, logits: dict[str, Tensor], labels: Tensor, *, k: int, linear_weight: Tensor | None = None,
               indices: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Every trainable node's loss and every live edge's (loss, gate weights), keyed as the
        reference engine keys them.

        Edges sharing source kind, loss, T, gate and weight are computed as one stacked tensor
        (`losses.edge_losses`): a handful of operations per group instead of per edge; an edge
        between layers is computed alone, its layers differing in shape from any other's. With
        `linear_weight` (a 0-d tensor holding k / k_end) every gate is evaluated at k_end and
        the linear edges are scaled by the tensor: the form torch.compile and CUDA graphs
        need, where k must not be a Python number (see `dclang.compile.accelerate`).
        """
        results: dict[str, tuple[Tensor, Tensor]] = {}
        gate_k = self.k_end if linear_weight is not None else k
        stacked = torch.stack([logits[name] for name in self.stacked_names])  # (nodes, B, C): one gradient per node
        detached = stacked.detach()  # sources (paper 3.1)
        for group, (target_rows, source_rows) in zip(self.edge_groups, self.group_rows):
            targets = stacked.index_select(0, target_rows)
            sources = None if source_rows is None else detached.index_select(0, source_rows)
            loss, weights = edge_losses(group, sources, targets, labels, k=gate_k, k_end=self.k_end)
            loss, weights = _linear_scaled(group[0], loss, weights, linear_weight)
            results.update((e.key, lw) for e, lw in zip(group, zip(loss.unbind(0), weights.unbind(0))))
        for edge in self.edges:
            if computed_alone(edge):
                loss, weights = self.layer_edge_result(edge, logits, labels, k=gate_k, indices=indices)
                results[edge.key] = _linear_scaled(edge, loss, weights, linear_weight)
        edge_results = {e.key: results[e.key] for e in self.edges}
        node_losses = {t: node_loss([edge_results[e.key][0] for e in self.edges if e.target == t])
                       for t in self.trainable}
        return node_losses, edge_results


def _linear_scaled(edge, loss: Tensor, weights: Tensor, linear_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """A linear edge's (loss, weights) computed at k_end, scaled by the tensor k / k_end."""
    if linear_weight is None or edge.gate != "linear":
        return loss, weights
    w = linear_weight.to(loss.dtype)
    return loss * w, weights * w
