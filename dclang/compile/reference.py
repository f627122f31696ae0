"""The reference engine: the paper's Algorithm 1 as a plain loop, the oracle for `fused`.

Like the authors' code: one forward of every node, then for each trainable node its own
loss, its own backward and its own optimizer step. All outputs are computed before any
update, so every node learns from the same predictions (paper 3.4). After the last
optimizer step, every mean teacher (`ema(s, decay)`) averages its source's new weights.

Nodes sharing a trunk (`branch(...)`) are one *family*: the source and its branches, their
losses summed into one backward and one optimizer over the family's parameters (each tensor
once), so the trunk's gradient is the sum of every member's loss's. Each branch runs its whole
forward through the shared modules (`TrainStep.forward`: no replay, the fused engine's replay
is what this checks), the trunk's buffers left as its source's forward left them.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import Tensor, nn

from dclang.compile.common import StepStats, TrainStep, computed_alone
from dclang.compile.optim import build_optimizer
from dclang.losses import edge_loss, node_loss
from dclang.models.branch import families


class ReferenceStep(TrainStep):
    engine = "reference"

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], **kwargs):
        super().__init__(graph, models, **kwargs)
        train = graph.graph["train"]
        self.families = families(self.trainable, models)
        for root, members in self.families.items():
            params = [p for name in members for p in models[name].parameters()]
            self.optimizers[root] = build_optimizer(train.optimizer, params)
        for name in self.learned:  # a learned ensemble's w, trained like a node (dclang.learned_ensembles)
            self.optimizers[name] = build_optimizer(train.optimizer, self.ensemble_weights[name].parameters())

    def step(self, images: Tensor, labels: Tensor, k: int, indices: Tensor | None = None) -> StepStats:
        logits = self.outputs(images)  # every node's logits, then every ensemble's output
        edge_results: dict[str, tuple[Tensor, Tensor]] = {}
        node_losses: dict[str, Tensor] = {}
        for target in self.loss_nodes:
            losses = []
            for edge in self.edges:
                if edge.target == target and computed_alone(edge):
                    edge_results[edge.key] = self.layer_edge_result(edge, logits, labels, k=k, indices=indices)
                    losses.append(edge_results[edge.key][0])
                elif edge.target == target:
                    source_logits, target_logits = self.edge_inputs(edge, logits)
                    edge_results[edge.key] = edge_loss(edge, source_logits, target_logits, labels,
                                                       k=k, k_end=self.k_end)
                    losses.append(edge_results[edge.key][0])
            node_losses[target] = node_loss(losses)
        for root, members in self.families.items():
            optimizer = self.optimizers[root]
            optimizer.zero_grad()
            sum(node_losses[name] for name in members).backward()
            optimizer.step()
        for name in self.learned:  # a learned ensemble's w: its own loss, its own optimizer
            optimizer = self.optimizers[name]
            optimizer.zero_grad()
            node_losses[name].backward()
            optimizer.step()
        self._update_ema()
        return self.stats(logits, labels, node_losses, edge_results)

    def _update_ema(self) -> None:
        """Each mean teacher (`ema(s, decay)`) after every optimizer step, tensor by tensor:
        p_t = decay * p_t + (1 - decay) * p_s for parameters and floating-point buffers, the
        integer buffers copied (the oracle of `dclang.compile.ema`)."""
        with torch.no_grad():
            for name, (source, decay) in self.ema.items():
                teacher, student = self.models[name], self.models[source]
                tensors = [(p, student.get_parameter(key)) for key, p in teacher.named_parameters()]
                tensors += [(b, student.get_buffer(key)) for key, b in teacher.named_buffers()]
                for mine, theirs in tensors:
                    mine.copy_(decay * mine + (1 - decay) * theirs if mine.is_floating_point() else theirs)
