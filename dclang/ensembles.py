"""What an ensemble node computes: the one place that says it (both engines and evaluation
call `ensemble_outputs`).

An ensemble node `node e : ensemble(a, b, c) [combine=...]` has no parameters. Its output
z_e takes the place of a network's logits everywhere a node's output is read (edges from it,
the `correct` gate, accuracy), computed from its members' outputs z_i on the same batch:

- `mean_logits` (the default): z_e = (1/M) sum_i z_i. At temperature T an edge from e
  compares softmax(z_e / T), the averaged logits softened like any network's (ONE, KDCL's
  naive teacher).
- `mean_probs`: z_e = log((1/M) sum_i softmax(z_i)), the log of the averaged class
  probabilities (the classic ensemble prediction). These log-probabilities are what the
  losses take as the source's logits: softmax(z_e) is the averaged probability itself, and at
  temperature T an edge compares softmax(z_e / T), the averaged probabilities sharpened or
  flattened by T (not the average of the members' softened probabilities).

- `learned`: z_e = sum_i softmax(w)_i z_i, one weight vector w (M numbers, initialised to
  zeros: the ensemble starts as `mean_logits`) learned from an edge `label -> e` (see
  `dclang.learned_ensembles`, which holds w).

A member may itself be an ensemble (the passes refuse cycles), so ensembles are computed in
dependency order. The members' outputs are detached: an ensemble is only ever a source for
its members, and no gradient reaches them through it (paper 3.1); a learned ensemble's w is
the only tensor its output is differentiable in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import networkx as nx

if TYPE_CHECKING:  # the front end (`dclang check`) reads COMBINES without loading torch
    from torch import Tensor

COMBINES = ("mean_logits", "mean_probs", "learned")
DEFAULT_COMBINE = "mean_logits"
LEARNED = "learned"


def combine(outputs: list[Tensor], how: Any) -> Tensor:
    """z_e from the members' outputs (each (B, C)), as the module docstring defines it; `how`
    is a combine's name, or for a learned ensemble the module holding its w
    (`dclang.learned_ensembles.LearnedWeights`), called on the stacked detached outputs."""
    import torch

    stacked = torch.stack([z.detach() for z in outputs])
    if callable(how):
        return how(stacked)
    if how == "mean_logits":
        return stacked.mean(dim=0)
    if how == "mean_probs":
        # log mean_i softmax(z_i) = logsumexp_i log_softmax(z_i) - log M, without underflow
        # (log M a Python number: a step creates no tensor from host values)
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(outputs))
    if how == LEARNED:
        raise ValueError("a learned ensemble's output needs its weights: `ensemble_order(graph, weights)`")
    raise ValueError(f"unknown combine {how!r}; known: {', '.join(COMBINES)}")


def ensemble_order(graph: nx.DiGraph, weights: dict[str, Any] | None = None) -> list[tuple[str, tuple[str, ...], Any]]:
    """(name, members, combine) of every ensemble node, each after the ensembles it contains
    (declaration order otherwise); a learned ensemble's combine is its module in `weights`
    (`dclang.learned_ensembles.learned_weights`) where given."""
    specs = {n: s for n, s in graph.nodes(data="spec") if s.is_ensemble}
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for member in specs[name].model:
            if member in specs:
                visit(member)
        done.append(name)

    for name in specs:
        visit(name)
    weights = weights or {}
    return [(n, specs[n].model, weights.get(n, specs[n].combine)) for n in done]


def trained_ensembles(graph: nx.DiGraph) -> list[str]:
    """The learned ensembles whose weights train: `combine=learned` and a live (not `cutoff`)
    edge into them, which the passes allow only from `label`. One whose edges are all `cutoff`
    keeps w = 0, the mean of its members' logits (as a node whose edges are all cutoff is a
    frozen one); declaration order."""
    return [n for n, s in graph.nodes(data="spec") if s.is_ensemble and s.combine == LEARNED
            and any(e.gate != "cutoff" for _, _, e in graph.in_edges(n, data="spec"))]


def ensemble_outputs(outputs: dict[str, Tensor], order: list[tuple[str, tuple[str, ...], Any]]) -> dict[str, Tensor]:
    """`outputs` (every network node's logits) with every ensemble's output added, in `order`."""
    out = dict(outputs)
    for name, members, how in order:
        out[name] = combine([out[m] for m in members], how)
    return out
