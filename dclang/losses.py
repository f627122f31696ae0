"""The paper's losses (section 3.2): per-sample CE and KL, the edge loss, the node loss.

The source of an edge is always detached: "errors are not back-propagated to the source
node" (paper 3.1). That is what lets the fused engine sum every node's loss and call
backward once: each node's gradient can only come from its own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dclang.gates import gate_weights
from dclang.ir import LABEL, EdgeSpec


def ce_per_sample(logits_t: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(logits_t)[y] per sample: shape (B,) for logits (B, C), (E, B) for the
    stacked logits (E, B, C) of E edges.

    Eq. 1: against a one-hot label, cross-entropy equals KL(p_label || p_t), so an edge from
    `label` is the same kind of loss as an edge between nodes.
    """
    if logits_t.dim() == 2:
        return F.cross_entropy(logits_t, labels, reduction="none")
    return F.cross_entropy(logits_t.transpose(1, 2), labels.expand(logits_t.shape[:2]), reduction="none")


def kl_per_sample(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    """T^2 * KL(p_s || p_t) per sample, shape (B,), with p = softmax(logits / T) (eq. 2);
    (E, B) for the stacked logits (E, B, C) of E edges.

    Written with log_softmax on both sides, so no probability is logged after it has
    underflowed. The T^2 factor (Hinton et al., 2015) keeps the gradient's scale independent
    of T. The source is detached here, whatever the caller passed.
    """
    log_p_s = F.log_softmax(logits_s.detach() / T, dim=-1)
    log_p_t = F.log_softmax(logits_t / T, dim=-1)
    return T * T * (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1)


def edge_loss(edge: EdgeSpec, source_logits: Tensor | None, target_logits: Tensor, labels: Tensor,
              *, k: int, k_end: int) -> tuple[Tensor, Tensor]:
    """L_{s,t} (eq. 2) and the gate weights it used: `edge_losses` for one edge."""
    loss, weights = edge_losses([edge], None if source_logits is None else source_logits[None], target_logits[None],
                                labels, k=k, k_end=k_end)
    return loss[0], weights[0]


def edge_losses(edges: list[EdgeSpec], source_logits: Tensor | None, target_logits: Tensor, labels: Tensor,
                *, k: int, k_end: int) -> tuple[Tensor, Tensor]:
    """L_{s,t} (eq. 2) of E edges at once, shape (E,), and the gate weights they used, (E, B).

    The edges share their loss, temperature, gate and weight (`edge_group_key`); `source_logits` and
    `target_logits` are their sources' and targets' logits stacked, (E, B, C), the sources
    None for edges from `label`. Computing a group of edges as one tensor is what keeps a
    step's operation count from growing with its edges (K(K-1) of them between K nodes).

    L_{s,t} = mean over the batch of weight * G_{s,t}(a_n), a_n the sample's loss: `ce` from
    `label`, `kl` at temperature `edge.T` between nodes. Eq. 2 writes a sum over the batch;
    like the authors' reference implementation we take the mean, which only rescales the
    learning rate by the batch size.
    """
    first = edges[0]
    if any(edge_group_key(e) != edge_group_key(first) for e in edges):
        raise ValueError(f"edges of one group must share source kind, loss, T, gate and weight: "
                         f"{[e.key for e in edges]}")
    if first.loss == "ce":
        per_sample = ce_per_sample(target_logits, labels)
    else:
        per_sample = kl_per_sample(source_logits, target_logits, first.T)
    weights = gate_weights(first.gate, source_logits=source_logits, labels=labels, k=k, k_end=k_end,
                           batch=labels.shape[0], dtype=per_sample.dtype).expand(per_sample.shape)
    return (first.weight * weights * per_sample).mean(dim=-1), weights


def edge_group_key(edge: EdgeSpec) -> tuple:
    """What edges computed together in `edge_losses` share: whether the source is `label`,
    the loss, its temperature, the gate and the weight (a Python number, so that a step
    creates no tensor from host values: a CUDA graph could not capture that)."""
    return (edge.source == LABEL, edge.loss, edge.T, edge.gate, edge.weight)


def node_loss(edge_losses: list[Tensor]) -> Tensor:
    """L_t = sum of the losses on the node's incoming edges (eq. 3)."""
    return torch.stack(edge_losses).sum()
