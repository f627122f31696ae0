"""Losses over the batch's embeddings: relational KD (`rkd`) and probabilistic knowledge
transfer (`pkt`).

Their terms are pairs (or triplets) of samples, not single samples, so the paper's per-sample
gates (eq. 4-7, `dclang.gates`) cannot weigh a sample's own loss. Each term is weighed instead
by the smallest gate weight among its samples: with `correct`, a pair counts only when the
source classified both its samples correctly; with `linear` every term gets k / k_end, exactly
as a per-sample loss does; `through` changes nothing. The mean still runs over all B^2 pairs
(B^3 triplets), as a gated per-sample loss keeps its mean over all B samples. The batch
statistics a loss normalises by (RKD's mean distance, PKT's row sums) use every sample.

An embedding is a node's logits, or its layer flattened per sample; the functions take
(..., B, D) so that E edges between logits stacked as (E, B, C) are computed at once. The
source is detached here, whatever the caller passed.

Formulas, arguments and references: `dclang.loss_catalogue` and `docs/training.md`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pair_weights(weights: Tensor) -> Tensor:
    """min(g_i, g_j) of each pair, (..., B, B), from the gate weights g (..., B)."""
    return torch.minimum(weights.unsqueeze(-1), weights.unsqueeze(-2))


def distances(e: Tensor) -> Tensor:
    """||e_i - e_j|| of (..., B, D) embeddings, (..., B, B), divided by their mean over i != j.

    Written from the Gram matrix as the authors' code does: a difference of one sample with
    itself is clamped to 1e-12 before the square root (so its gradient is 0, not 0/0), then
    the diagonal is set to 0."""
    square = e.pow(2).sum(dim=-1)
    d2 = square.unsqueeze(-1) + square.unsqueeze(-2) - 2 * e @ e.transpose(-1, -2)
    off = 1 - torch.eye(e.shape[-2], dtype=e.dtype, device=e.device)
    d = d2.clamp_min(1e-12).sqrt() * off
    b = e.shape[-2]
    mean = d.sum(dim=(-1, -2), keepdim=True) / max(b * (b - 1), 1)
    return d / mean.clamp_min(1e-12)  # a batch of one sample has no pair: its distances stay 0


def angles(e: Tensor) -> Tensor:
    """cos(e_j - e_i, e_k - e_i) of (..., B, D) embeddings, (..., B, B, B) indexed [i, j, k];
    0 where j or k is i (F.normalize maps a zero difference to 0)."""
    diff = F.normalize(e.unsqueeze(-3) - e.unsqueeze(-2), dim=-1)  # [i, j] = e_j - e_i, unit length
    return diff @ diff.transpose(-1, -2)


def rkd_loss(source: Tensor, target: Tensor, weights: Tensor, *, distance: float, angle: float) -> Tensor:
    """Relational KD (Park et al. 2019): distance * mean over pairs of min(g_i, g_j) x
    huber(d_t,ij - d_s,ij) + angle * mean over triplets of min(g_i, g_j, g_k) x
    huber(c_t,ijk - c_s,ijk); shape (...) for embeddings (..., B, D)."""
    source = source.detach()
    loss = source.new_zeros(source.shape[:-2])
    if distance:
        terms = F.smooth_l1_loss(distances(target), distances(source), reduction="none")
        loss = loss + distance * (pair_weights(weights) * terms).mean(dim=(-1, -2))
    if angle:
        terms = F.smooth_l1_loss(angles(target), angles(source), reduction="none")
        triplets = torch.minimum(pair_weights(weights).unsqueeze(-1), weights.unsqueeze(-2).unsqueeze(-2))
        loss = loss + angle * (triplets * terms).mean(dim=(-1, -2, -3))
    return loss


def conditional_probabilities(e: Tensor, eps: float = 1e-7) -> Tensor:
    """p_j|i = K_ij / sum_m K_im with K_ij = (1 + cos(e_i, e_j)) / 2, (..., B, B); the cosine
    as the authors' code computes it, each embedding divided by (its norm + eps)."""
    unit = e / (e.norm(dim=-1, keepdim=True) + eps)
    kernel = (unit @ unit.transpose(-1, -2) + 1) / 2
    return kernel / kernel.sum(dim=-1, keepdim=True)


def pkt_loss(source: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): the mean over pairs of
    min(g_i, g_j) x p_s,j|i log((p_s,j|i + eps) / (p_t,j|i + eps)), eps = 1e-7 as in the
    authors' code; summed over j it is KL(p_s,.|i || p_t,.|i). Shape (...)."""
    p_s, p_t = conditional_probabilities(source.detach()), conditional_probabilities(target)
    terms = p_s * ((p_s + 1e-7).log() - (p_t + 1e-7).log())
    return (pair_weights(weights) * terms).mean(dim=(-1, -2))


def pair_loss(name: str, args: dict, source: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """The gated loss of a loss over pairs, `name` one of the catalogue's `pairs` losses;
    embeddings (..., B, D), gate weights (..., B)."""
    if name == "rkd":
        return rkd_loss(source, target, weights, **args)
    if name == "pkt":
        return pkt_loss(source, target, weights)
    raise ValueError(f"`{name}` is not a loss over pairs of samples")


__all__ = ["angles", "conditional_probabilities", "distances", "pair_loss", "pair_weights", "pkt_loss", "rkd_loss"]
