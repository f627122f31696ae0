"""Contrastive representation distillation (Tian et al. 2020): the module an edge
`teacher.pool -> student.pool : through crd()` owns.

CRD makes the target's embedding of a sample close to the source's embedding of the *same*
sample and far from the source's embeddings of other samples of the training set. It owns:

- two embedding heads, a linear map of each end's flattened features to `feat_dim`, then L2
  normalisation. Both learn with the target (the source's features are detached, its head is
  not): like a `hint` connector (`dclang.models.connector`) the module is a submodule of the
  target's model, so the target's optimizer trains it and its checkpoints hold it;
- a memory bank per end: one unit `feat_dim` vector per training sample, buffers of the
  module, so checkpoints keep them and a resumed run continues with them. After each step the
  batch's entries move toward the batch's embeddings: m <- normalise(momentum m + (1 -
  momentum) v), momentum 0.5 as in the authors' code;
- the two normalising constants Z of the NCE estimate, set from the first batch's mean score
  (Z = N mean exp(v . m / T)) and then fixed, as in the authors' code; -1 until set.

Each sample n is contrasted with its own bank entry (the positive) and `nce_k` entries drawn
uniformly from the training set (negatives; as in the authors' code a draw may hit the
positive), from a stream of the module's own seeded by the update number. Its loss, in both
directions (the target's embedding against the source's bank, and the source's embedding
against the target's bank), is NCE's:

    a_n = -log(P_n0 / (P_n0 + K/N + eps)) - sum_j log((K/N) / (P_nj + K/N + eps)),
    P_nj = exp(v_n . m_idx(n,j) / T) / Z, eps = 1e-7.

Given the bank, a_n depends on sample n alone, so the paper's gates weigh it per sample like
any per-sample loss. The bank is updated with every sample of the batch whatever its gate
weight: it records the data's embeddings; the gate decides what the target learns.

The module needs each batch's sample indices (positions in the training split) to find the
positives and update the bank: the caller passes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dclang.diagnostics import UserError
from dclang.gates import gate_weights
from dclang.ir import EdgeSpec, live_edges
from dclang.loss_catalogue import LOSSES
from dclang.models.connector import connector_of, own

#: the arguments of `crd(...)` with their defaults (`dclang.loss_catalogue`)
DEFAULTS = {key: arg.default for key, arg in LOSSES["crd"].args.items()}
#: the bank's momentum and NCE's eps, the authors' values
MOMENTUM, EPS = 0.5, 1e-7


class Embed(nn.Module):
    """Linear map of flattened features to `feat_dim`, then L2 normalisation (the authors' `Embed`)."""

    def __init__(self, in_features: int, feat_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.linear(features.flatten(1)), dim=1)


class CRD(nn.Module):
    """The heads, memory banks and NCE loss of one `crd` edge over a training set of
    `n_data` samples; `source_features` and `target_features` are the flattened sizes of
    the edge's two ends (a layer's, or the number of classes for logits)."""

    def __init__(self, source_features: int, target_features: int, n_data: int, *,
                 feat_dim: int = DEFAULTS["feat_dim"], nce_k: int = DEFAULTS["nce_k"], T: float = DEFAULTS["T"]):
        super().__init__()
        if nce_k >= n_data:
            raise ValueError(f"crd draws nce_k={nce_k} negatives from a training set of {n_data} samples: "
                             f"nce_k must be smaller")
        feat_dim = int(feat_dim)
        self.n_data, self.nce_k, self.T = n_data, int(nce_k), T
        self.embed_source = Embed(source_features, feat_dim)
        self.embed_target = Embed(target_features, feat_dim)
        bound = 1 / math.sqrt(feat_dim / 3)  # the authors' initialisation: uniform in +-sqrt(3 / feat_dim)
        self.register_buffer("memory_source", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_target", torch.rand(n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of (target vs source bank, source vs target bank)
        # the negatives' stream: drawn from the seeded construction, so a rebuilt module has it too
        self.seed = int(torch.randint(0, 2 ** 31, (), device="cpu"))

    def negatives(self, indices: Tensor, k: int) -> Tensor:
        """`nce_k` bank entries per sample, uniform over the training set, for update `k`: a
        function of the module's seed and k alone, so every engine, in any order of edges, and
        a resumed run draw the same ones."""
        generator = torch.Generator(device=indices.device).manual_seed(self.seed * 1_000_003 + k)
        return torch.randint(0, self.n_data, (len(indices), self.nce_k), device=indices.device, generator=generator)

    def forward(self, source: Tensor, target: Tensor, indices: Tensor, negatives: Tensor) -> Tensor:
        """a_n of the batch, shape (B,), then the banks updated with the batch.

        `indices` (B,) are the samples' positions in the training set; `negatives` (B, nce_k)
        the bank entries to contrast with (`negatives`). The source is detached here,
        whatever the caller passed."""
        # a frozen source's features come from inference mode: its head must save a normal copy
        source = source.clone() if source.is_inference() else source.detach()
        v_source, v_target = self.embed_source(source), self.embed_target(target)
        contrast = torch.cat([indices[:, None], negatives], dim=1)  # (B, 1 + K): the positive first
        scores = torch.stack([self._scores(self.memory_source, contrast, v_target),
                              self._scores(self.memory_target, contrast, v_source)])  # (2, B, 1 + K)
        with torch.no_grad():
            first = scores.mean(dim=(1, 2)) * self.n_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
        loss = self._nce(scores / self.z[:, None, None]).sum(dim=0)
        with torch.no_grad():
            self._update(self.memory_source, indices, v_source)
            self._update(self.memory_target, indices, v_target)
        return loss

    def _scores(self, memory: Tensor, contrast: Tensor, v: Tensor) -> Tensor:
        """exp(m_idx . v / T) for each sample's contrasted entries, (B, 1 + K)."""
        return torch.exp((memory[contrast] @ v[:, :, None])[:, :, 0] / self.T)

    def _nce(self, p: Tensor) -> Tensor:
        """NCE's loss per sample from the normalised scores (..., B, 1 + K), positive first."""
        noise = self.nce_k / self.n_data
        positive = torch.log(p[..., 0] / (p[..., 0] + noise + EPS))
        negative = torch.log(noise / (p[..., 1:] + noise + EPS)).sum(dim=-1)
        return -(positive + negative)

    @staticmethod
    def _update(memory: Tensor, indices: Tensor, v: Tensor) -> None:
        moved = MOMENTUM * memory.index_select(0, indices) + (1 - MOMENTUM) * v.detach()
        memory.index_copy_(0, indices, F.normalize(moved, dim=1))


def check_crd(graph, *, train_size: int, options) -> None:
    """Refuse, as a mistake the user can fix, a `crd` edge the run cannot train: more
    negatives than training samples, or a fast path that does not pass the batch's positions
    (`options`, a `StepOptions`: HFTA, torch.compile, bf16, CUDA graphs; channels-last does).
    `compile_graph` asks, once the training set's size is known."""
    fast = [flag for flag, on in (("--hfta", options.hfta), ("--compile", options.compile),
                                  ("--precision bf16", options.precision == "bf16"),
                                  ("--cuda-graph", options.cuda_graph)) if on]
    for edge in live_edges(graph):
        if edge.loss != "crd":
            continue
        where = f"line {edge.span.line}: " if edge.span is not None else ""
        nce_k = int(dict(edge.args)["nce_k"])
        if nce_k >= train_size:
            raise UserError(f"{where}`{edge.key}` draws nce_k={nce_k} negatives per sample from "
                            f"{train_size} training samples", f"write `crd(nce_k=N)` with N < {train_size}")
        if fast:
            raise UserError(f"{where}`{edge.key}` (crd) reads each batch's positions in the training split, which "
                            f"{', '.join(fast)} cannot pass", "train it without " + " and ".join(fast))


def written_in(module) -> bool:
    """Whether a parsed file or template (`ast.Module`) writes a `crd` loss anywhere, a
    `choice(...)` option included: what a search refuses before any trial where the
    positions cannot be passed (a pack, the cost plan's synthetic steps)."""
    from dclang.syntax import ast

    return any(call.name.text == "crd" for edge in module.of(ast.EdgeDecl) for call in edge.loss_calls())


def add_crd(graph, models: dict[str, nn.Module], input_shape: tuple[int, int, int], num_classes: int,
            n_data: int | None) -> None:
    """Give each target of a live `crd` edge its CRD module (`connector.own`): heads sized by
    the ends' flattened layers (`taps.layer_shapes`, meta device) or by the classes for
    logits, banks of the `n_data` training samples (None: the smallest banks, nce_k + 1, for
    counting parameters where the training set is not loaded). Like `add_connectors`, the
    caller seeds the random stream; modules are created in edge order, after the models."""
    from dclang.models.taps import layer_shapes

    def size(node: str, layer) -> int:
        if layer is None:
            return num_classes
        return math.prod(layer_shapes(models[node], input_shape, [layer])[layer])

    for edge in live_edges(graph):
        if edge.loss == "crd":
            args = dict(edge.args)
            own(models[edge.target], edge, CRD(size(edge.source, edge.source_layer),
                                               size(edge.target, edge.target_layer),
                                               n_data or int(args["nce_k"]) + 1, **args, T=edge.T))


def crd_edge_loss(edge: EdgeSpec, source: Tensor, target: Tensor, source_logits: Tensor, labels: Tensor,
                  indices: Tensor, target_model: nn.Module, *, k: int, k_end: int,
                  update: int | None = None) -> tuple[Tensor, Tensor]:
    """L_{s,t} of a `crd` edge and the gate weights it used, (B,): the batch mean of
    weight x g_n x a_n, g_n decided by the source's logits at update k, like
    `layer_edge_loss`. `source` and `target` are the ends' layers or logits; `indices` the
    batch's positions in the training split; the CRD module is the target model's own
    (`add_crd`), its negatives those of `update` (k when None: the fused engine evaluates
    a linear gate at k_end and scales it, but draws the update's own negatives)."""
    module = connector_of(target_model, edge)
    per_sample = module(source, target, indices, module.negatives(indices, k if update is None else update))
    weights = gate_weights(edge.gate, source_logits=source_logits.detach(), labels=labels, k=k, k_end=k_end,
                           batch=labels.shape[0], dtype=per_sample.dtype)
    return (edge.weight * weights * per_sample).mean(), weights


__all__ = ["CRD", "DEFAULTS", "EPS", "MOMENTUM", "Embed", "add_crd", "check_crd", "crd_edge_loss", "written_in"]
