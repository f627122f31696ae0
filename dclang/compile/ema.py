"""The fused engine's mean-teacher update (`ema(s, decay)`, `dclang.ema`): after each
optimizer update, every EMA node's parameters and floating-point buffers move towards its
source's, p_t <- p_t + (1 - decay) (p_s - p_t) = decay p_t + (1 - decay) p_s, as ONE
`torch._foreach_lerp_` per decay over every EMA node of every member (the tensors of all
nodes with one decay in one list), and the integer buffers (BatchNorm's
`num_batches_tracked`) copied with one `torch._foreach_copy_`. The reference engine computes
the same with a plain loop of its own (`ReferenceStep._update_ema`).

The lists are made of the tensors themselves, so they must be taken after anything that
replaces a source's tensors (HFTA's `alias_to_slice`): an engine builds its `EmaUpdate` last.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _pairs(target: nn.Module, source: nn.Module) -> Iterable[tuple[Tensor, Tensor]]:
    """(EMA tensor, source tensor) of every parameter and buffer, by name. The source may own
    more modules than the EMA (a connector or CRD module an edge into it owns): those are not
    the network, and are not averaged."""
    for name, p in target.named_parameters():
        yield p, source.get_parameter(name)
    for name, b in target.named_buffers():
        yield b, source.get_buffer(name)


def start_ema(models: dict[str, nn.Module], ema: dict[str, tuple[str, float]]) -> None:
    """Each EMA node made an exact copy of its source's weights (after the source's `init`),
    without autograd and in eval mode for good."""
    with torch.no_grad():
        for name, (source, _) in ema.items():
            for t, s in _pairs(models[name], models[source]):
                t.copy_(s)
            models[name].requires_grad_(False).eval()


class EmaUpdate:
    """The EMA update of a list of (EMA model, source model, decay): called after each optimizer
    step (inside a captured CUDA graph too: it only reads and writes tensors in place)."""

    def __init__(self, nodes: Iterable[tuple[nn.Module, nn.Module, float]]):
        self.lerp: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        self.copy: tuple[list[Tensor], list[Tensor]] = ([], [])
        for target, source, decay in nodes:
            for t, s in _pairs(target, source):
                ts, ss = self.lerp.setdefault(decay, ([], [])) if t.is_floating_point() else self.copy
                ts.append(t)
                ss.append(s)

    def __bool__(self) -> bool:
        return bool(self.lerp or self.copy[0])

    def __call__(self) -> None:
        with torch.no_grad():
            for decay, (ts, ss) in self.lerp.items():
                torch._foreach_lerp_(ts, ss, 1.0 - decay)
            if self.copy[0]:
                torch._foreach_copy_(*self.copy)
