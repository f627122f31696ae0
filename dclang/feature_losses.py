"""The losses between layers (`teacher.layer3 -> student.layer3 : through at(p=2)`).

Each is written per sample, a_n of shape (B,), so the paper's gates (eq. 4-7) weight it
exactly as they weight a loss between outputs (a loss over pairs of samples, `rkd` or `pkt`
on flattened layers, gates each pair: `dclang.relational_losses`): `layer_edge_loss` is `losses.edge_losses`
for an edge between layers, the gate decided by the source node's logits (`correct`: the
source classified the sample correctly). The source's features are detached here, whatever
the caller passed: no gradient reaches a source through a layer edge either.

Formulas, arguments and references: `dclang.loss_catalogue` and `docs/training.md`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dclang.gates import gate_weights
from dclang.ir import EdgeSpec
from dclang.loss_catalogue import LOSSES
from dclang.relational_losses import pair_loss


def attention_map(features: Tensor, p: float) -> Tensor:
    """q = Q / ||Q||_2 with Q_j = mean_c |A_c,j|^p: the normalised spatial attention of
    (B, C, *spatial) features, shape (B, positions) (Zagoruyko & Komodakis 2017)."""
    powered = features.pow(2) if p == 2 else features.abs().pow(p)  # |a|^2 = a^2, one operation fewer
    return F.normalize(powered.mean(dim=1).flatten(1), dim=1)


def at_per_sample(source: Tensor, target: Tensor, p: float) -> Tensor:
    """Attention transfer: mean over positions of (q_s - q_t)^2; channel counts may differ."""
    return (attention_map(source.detach(), p) - attention_map(target, p)).pow(2).mean(dim=1)


def hint_per_sample(source: Tensor, target: Tensor, connector: nn.Module | None = None) -> Tensor:
    """FitNets: mean squared error between the source's layer and the target's, the target
    passed through its connector (1x1 conv + BN) where the channel counts differ."""
    regressed = target if connector is None else connector(target)
    return (regressed - source.detach()).pow(2).flatten(1).mean(dim=1)


def similarity(features: Tensor) -> Tensor:
    """G = A A^T over the batch, each row L2-normalised (Tung & Mori 2019), shape (B, B)."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_per_sample(source: Tensor, target: Tensor) -> Tensor:
    """Similarity preserving: row n of (G_s - G_t)^2, averaged over the batch; the mean over
    n is the paper's (1/B^2) ||G_s - G_t||_F^2. Any two layer shapes compare."""
    return (similarity(source.detach()) - similarity(target)).pow(2).mean(dim=1)


def channel_maps(features: Tensor) -> Tensor:
    """Each channel's map of (B, C, *spatial) features, L2-normalised over its positions:
    (B, C, positions), the neurons' selectivity patterns of Huang & Wang 2017."""
    return F.normalize(features.flatten(2), dim=2)


def nst_per_sample(source: Tensor, target: Tensor) -> Tensor:
    """Neuron selectivity transfer: MMD^2 with the kernel k(x, y) = (x . y)^2 between the
    source's and the target's sets of channel maps of each sample, (B,). Channel counts may
    differ; the maps must have one number of positions."""
    f_s, f_t = channel_maps(source.detach()), channel_maps(target)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return kernel_mean(f_t, f_t) + kernel_mean(f_s, f_s) - 2 * kernel_mean(f_s, f_t)


def layer_per_sample(edge: EdgeSpec, source: Tensor, target: Tensor, connector: nn.Module | None) -> Tensor:
    """a_n of an edge between layers, by its loss."""
    if edge.loss == "at":
        return at_per_sample(source, target, edge.loss_args()["p"])
    if edge.loss == "hint":
        return hint_per_sample(source, target, connector)
    if edge.loss == "sp":
        return sp_per_sample(source, target)
    if edge.loss == "nst":
        return nst_per_sample(source, target)
    raise ValueError(f"`{edge.loss}` is not a loss between layers")


def layer_edge_loss(edge: EdgeSpec, source: Tensor, target: Tensor, source_logits: Tensor, labels: Tensor, *,
                    k: int, k_end: int, connector: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """L_{s,t} of an edge between layers and the gate weights it used, (B,): the batch mean
    of weight x G(a_n), the gate decided by the source node's logits."""
    weights = gate_weights(edge.gate, source_logits=source_logits.detach(), labels=labels, k=k, k_end=k_end,
                           batch=labels.shape[0], dtype=target.dtype)
    if LOSSES[edge.loss].pairs:  # a loss over pairs of samples: each pair gated (`dclang.relational_losses`)
        return edge.weight * pair_loss(edge.loss, edge.loss_args(), source.flatten(1), target.flatten(1),
                                       weights), weights
    per_sample = layer_per_sample(edge, source, target, connector)
    return (edge.weight * weights * per_sample).mean(), weights


__all__ = ["at_per_sample", "attention_map", "channel_maps", "hint_per_sample", "layer_edge_loss",
           "layer_per_sample", "nst_per_sample", "similarity", "sp_per_sample"]
