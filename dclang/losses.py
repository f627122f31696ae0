"""The losses between outputs: the paper's (section 3.2) per-sample CE and KL, DKD and
logit-standardised KD from the catalogue (`dclang.loss_catalogue`), the edge loss, the node
loss. Losses between layers are `dclang.feature_losses`.

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
from dclang.loss_catalogue import LOSSES
from dclang.relational_losses import pair_loss


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


def dkd_per_sample(logits_s: Tensor, logits_t: Tensor, labels: Tensor, *, alpha: float, beta: float,
                   T: float) -> Tensor:
    """Decoupled KD (Zhao et al. 2022) per sample, (B,) or (E, B) for stacked logits.

    T^2 (alpha TCKD + beta NCKD): TCKD is the KL between the binary distributions
    (p_y, 1 - p_y) of source and target, NCKD the KL between their distributions over the
    non-target classes, all at temperature T. The label's class is masked with the dtype's
    lowest number rather than -inf, so its zero probability never meets a log as 0 * -inf.
    The source is detached here, whatever the caller passed.
    """
    z_s, z_t = logits_s.detach() / T, logits_t / T
    gt = F.one_hot(labels, z_s.shape[-1]).bool()  # (B, C): broadcasts over the stacked edges

    def binary(z: Tensor) -> Tensor:
        """log (p_y, 1 - p_y), shape (..., 2)."""
        all_ = torch.logsumexp(z, dim=-1)
        rest = torch.logsumexp(z.masked_fill(gt, torch.finfo(z.dtype).min), dim=-1)
        return torch.stack([(z * gt).sum(dim=-1) - all_, rest - all_], dim=-1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)

    tckd = kl(binary(z_s), binary(z_t))
    non_target = lambda z: F.log_softmax(z.masked_fill(gt, torch.finfo(z.dtype).min), dim=-1)  # noqa: E731
    nckd = kl(non_target(z_s), non_target(z_t))
    return T * T * (alpha * tckd + beta * nckd)


def standardize(logits: Tensor) -> Tensor:
    """Z-score of each sample's logits over the classes (Sun et al. 2024): mean 0, standard
    deviation 1 (Bessel-corrected, + 1e-7 as in the authors' code)."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + 1e-7)


def lskd_per_sample(logits_s: Tensor, logits_t: Tensor, T: float) -> Tensor:
    """Logit-standardised KD (Sun et al. 2024) per sample: `kl_per_sample` of the Z-scored
    logits, so the target matches the source's logit *shape*, not its scale."""
    return kl_per_sample(standardize(logits_s.detach()), standardize(logits_t), T)


def logit_per_sample(edge: EdgeSpec, source_logits: Tensor | None, target_logits: Tensor, labels: Tensor) -> Tensor:
    """a_n of an edge between outputs, by its loss (`dclang.loss_catalogue`)."""
    args = edge.loss_args()
    if edge.loss == "ce":
        return ce_per_sample(target_logits, labels)
    if edge.loss == "kl":
        return kl_per_sample(source_logits, target_logits, args["T"])
    if edge.loss == "dkd":
        return dkd_per_sample(source_logits, target_logits, labels, **args)
    if edge.loss == "lskd":
        return lskd_per_sample(source_logits, target_logits, args["T"])
    raise ValueError(f"`{edge.loss}` is not a loss between outputs")


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
    None for edges from `label`; `labels` (B,) are shared by the edges, or (E, B) are each
    edge's own (edges of different packed trials, `dclang.compile.loss_plan`). Computing a group of
    edges as one tensor is what keeps a step's operation count from growing with its edges
    (K(K-1) of them between K nodes).

    L_{s,t} = mean over the batch of weight * G_{s,t}(a_n), a_n the sample's loss: `ce` from
    `label`, `kl`, `dkd` or `lskd` between nodes (`logit_per_sample`); a loss over pairs of
    samples (`rkd`, `pkt`) weighs each pair by its samples' smallest gate weight instead
    (`dclang.relational_losses`). Eq. 2 writes a sum over the batch;
    like the authors' reference implementation we take the mean, which only rescales the
    learning rate by the batch size.
    """
    first = edges[0]
    if any(edge_group_key(e) != edge_group_key(first) for e in edges):
        raise ValueError(f"edges of one group must share source kind, loss and its arguments, gate and weight: "
                         f"{[e.key for e in edges]}")
    weights = gate_weights(first.gate, source_logits=source_logits, labels=labels, k=k, k_end=k_end,
                           batch=labels.shape[-1], dtype=target_logits.dtype).expand(target_logits.shape[:-1])
    if LOSSES[first.loss].pairs:  # a loss over pairs of samples weighs each pair (`dclang.relational_losses`)
        return first.weight * pair_loss(first.loss, first.loss_args(), source_logits, target_logits, weights), weights
    per_sample = logit_per_sample(first, source_logits, target_logits, labels)
    return (first.weight * weights * per_sample).mean(dim=-1), weights


def edge_group_key(edge: EdgeSpec) -> tuple:
    """What edges computed together in `edge_losses` share: whether the source is `label`,
    the loss and its arguments, the gate and the weight (a Python number, so that a step
    creates no tensor from host values: a CUDA graph could not capture that)."""
    return (edge.source == LABEL, edge.loss, edge.T, edge.args, edge.gate, edge.weight)


def node_loss(edge_losses: list[Tensor]) -> Tensor:
    """L_t = sum of the losses on the node's incoming edges (eq. 3)."""
    return torch.stack(edge_losses).sum()
