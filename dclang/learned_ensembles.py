"""A learned ensemble's weights: `node e : ensemble(a, b, c) [combine=learned]`.

One weight vector per ensemble, not a per-sample gate: z_e = sum_i softmax(w)_i z_i over
the members' detached outputs z_i, with w a vector of M numbers (one per member) initialised
to zeros, so the ensemble starts as `mean_logits` and learns which members to trust. ONE's
gate (Lan et al. 2018) is per sample, a small network on the first member's pooled features;
it needs the features of a named layer of one member and is not built: the weight vector is
what the language can say with the ensemble's members alone, needs no layer capture, and
costs M numbers and one softmax per step.

w trains like a network's weights, from its own loss: the edges into the ensemble, which
the passes allow only from `label` (`label -> e : through`, cross-entropy of z_e against the
labels, eq. 1). Gradient reaches w alone: the members' outputs are detached before they are
combined (`dclang.ensembles.combine`), and every edge from the ensemble detaches it as a
source (paper 3.1), so a learned ensemble never moves its members and its members' losses
never move w. The optimizer is the train block's, like every trainable node's (weight decay
included: it pulls w towards 0, the plain mean); checkpoints hold w (`TrainStep.state_dict`'s
`ensembles`) and its optimizer state.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import Tensor, nn

from dclang.ensembles import LEARNED


class LearnedWeights(nn.Module):
    """The w of one learned ensemble of M members; called on the stacked detached member
    outputs (M, B, C), it returns z_e (B, C)."""

    def __init__(self, members: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(members))

    def forward(self, stacked: Tensor) -> Tensor:
        # an elementwise product and a sum, not a matmul: autocast leaves both in the outputs' dtype
        weights = torch.softmax(self.w, dim=0).to(stacked.dtype)
        return (weights[:, None, None] * stacked).sum(dim=0)


def learned_weights(graph: nx.DiGraph, device: torch.device) -> dict[str, LearnedWeights]:
    """The weights of every learned ensemble of the graph, at w = 0 (no random draw: building
    them moves no random stream), in declaration order. One whose edges are all `cutoff` has
    them too, never updated, so every learned ensemble's checkpoint reads the same way."""
    return {n: LearnedWeights(len(s.model)).to(device) for n, s in graph.nodes(data="spec")
            if s.is_ensemble and s.combine == LEARNED}
