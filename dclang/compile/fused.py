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

from dclang.compile.common import StepStats, TrainStep
from dclang.compile.optim import build_optimizer, build_scheduler
from dclang.losses import edge_loss, node_loss


class FusedStep(TrainStep):
    engine = "fused"

    def __init__(self, graph: nx.DiGraph, models: dict[str, nn.Module], *, device: torch.device,
                 steps_per_epoch: int, epochs: int):
        super().__init__(graph, models, device=device, steps_per_epoch=steps_per_epoch, epochs=epochs)
        train = graph.graph["train"]
        self.optimizer = build_optimizer(train.optimizer, self.parameters_to_update(), foreach=True)
        self.optimizers["all"] = self.optimizer
        self.schedulers["all"] = build_scheduler(train.schedule, self.optimizer, epochs)

    def parameters_to_update(self) -> list[nn.Parameter]:
        """What the one optimizer updates: every trainable node's parameters, in node order.
        The HFTA variant (`dclang.compile.accelerate.HftaStep`) updates fused tensors instead."""
        return [p for name in self.trainable for p in self.models[name].parameters()]

    def step(self, images: Tensor, labels: Tensor, k: int) -> StepStats:
        logits = self.forward(images)
        edge_results = {edge.key: edge_loss(edge, *self.edge_inputs(edge, logits), labels, k=k, k_end=self.k_end)
                        for edge in self.edges}
        node_losses = {t: node_loss([edge_results[e.key][0] for e in self.edges if e.target == t])
                       for t in self.trainable}
        self.optimizer.zero_grad()
        torch.stack(list(node_losses.values())).sum().backward()
        self.optimizer.step()
        return self.stats(logits, labels, node_losses, edge_results)
