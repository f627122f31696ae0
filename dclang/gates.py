"""The paper's gates (section 3.3, eq. 4-7): per-sample weights on an edge's loss.

A gate G_{s,t}(a) multiplies each sample's loss `a` by a weight, so every gate is written here
as the weight vector it applies; `losses.edge_loss` does the multiplication. This module is
the only place that says what a gate means (the engines and the docs defer to it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_weights(gate: str, *, source_logits: Tensor | None, labels: Tensor, k: int, k_end: int,
                 batch: int, dtype: torch.dtype | None = None) -> Tensor:
    """The weight each of the `batch` samples' losses gets on an edge with `gate`, shape (B,),
    or (E, B) for the `correct` gate given the stacked source logits (E, B, C) of E edges.

    - `through` (eq. 4, G(a) = a): ones.
    - `cutoff` (eq. 5, G(a) = 0): zeros. The engines never compute a cutoff edge at all; the
      weights exist so the gate is defined like the others.
    - `linear` (eq. 6, G(a) = k / k_end * a): k / k_end for every sample, where k is the
      1-based number of the parameter update being made, so the first update has weight
      1 / k_end and the last exactly 1.
    - `correct` (eq. 7, G(a) = delta(y, y_s) * a): 1 where the source's top-1 class equals
      the label, else 0. `source_logits` is None when the source is `label`, whose top-1 is
      the label itself: all ones.

    The weights live on `labels`' device, in `dtype` (default: torch's default float dtype);
    `losses.edge_loss` asks for the loss's own dtype so a float64 loss is not weighted by a
    float32-rounded k / k_end. Nothing here reads a tensor value back to the host, so a
    training step stays free of syncs.
    """
    kw = dict(device=labels.device, dtype=dtype or torch.get_default_dtype())
    if gate == "through":
        return torch.ones(batch, **kw)
    if gate == "cutoff":
        return torch.zeros(batch, **kw)
    if gate == "linear":
        if not 1 <= k <= k_end:
            raise ValueError(f"the linear gate needs 1 <= k <= k_end, but got (k={k}, k_end={k_end})")
        return torch.full((batch,), k / k_end, **kw)
    if gate == "correct":
        if source_logits is None:
            return torch.ones(batch, **kw)
        return (source_logits.argmax(dim=-1) == labels).to(kw["dtype"])
    raise ValueError(f"unknown gate {gate!r}; known: through, cutoff, linear, correct")
