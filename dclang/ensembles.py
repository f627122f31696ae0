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

A member may itself be an ensemble (the passes refuse cycles), so ensembles are computed in
dependency order. The output is detached: an ensemble is only ever a source, and no
gradient reaches its members through it (paper 3.1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:  # the front end (`dclang check`) reads COMBINES without loading torch
    from torch import Tensor

COMBINES = ("mean_logits", "mean_probs")
DEFAULT_COMBINE = "mean_logits"


def combine(outputs: list[Tensor], how: str) -> Tensor:
    """z_e from the members' outputs (each (B, C)), as the module docstring defines it."""
    import torch

    stacked = torch.stack([z.detach() for z in outputs])
    if how == "mean_logits":
        return stacked.mean(dim=0)
    if how == "mean_probs":
        # log mean_i softmax(z_i) = logsumexp_i log_softmax(z_i) - log M, without underflow
        # (log M a Python number: a step creates no tensor from host values)
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(outputs))
    raise ValueError(f"unknown combine {how!r}; known: {', '.join(COMBINES)}")


def ensemble_order(graph: nx.DiGraph) -> list[tuple[str, tuple[str, ...], str]]:
    """(name, members, combine) of every ensemble node, each after the ensembles it contains
    (declaration order otherwise)."""
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
    return [(n, specs[n].model, specs[n].combine) for n in done]


def ensemble_outputs(outputs: dict[str, Tensor], order: list[tuple[str, tuple[str, ...], str]]) -> dict[str, Tensor]:
    """`outputs` (every network node's logits) with every ensemble's output added, in `order`."""
    out = dict(outputs)
    for name, members, how in order:
        out[name] = combine([out[m] for m in members], how)
    return out
