"""A mean teacher: `node t : ema(s, decay=0.999)`, what it is made of (no torch here).

`t` is a network of `s`'s architecture whose weights are the exponential moving average of
`s`'s, updated after each optimizer update of `s`:

    p_t <- decay * p_t + (1 - decay) * p_s

for every parameter and every floating-point buffer (BatchNorm's running mean and variance:
averaged, as timm's `ModelEmaV2` does); integer buffers (`num_batches_tracked`) are copied.
`t` starts as an exact copy of `s`'s initial weights, has no optimizer, receives no gradient
and runs in eval mode without autograd inside the step, like a frozen teacher, but it is
evaluated every epoch and checkpointed like a trained node. The update itself is
`dclang.compile.ema` (fused engine) and `ReferenceStep._update_ema` (reference engine).
"""

from __future__ import annotations

from typing import Any

from dclang import ranges
from dclang.registry import Option

#: the decay when `ema(s)` names none: Tarvainen & Valpola's mean teacher and timm's default
DEFAULT_DECAY = 0.999

#: the arguments `ema(s, ...)` takes besides its source, with their defaults and ranges
ARGS: dict[str, Option] = {"decay": Option("float", DEFAULT_DECAY, range=ranges.DECAY)}


def decay_of(spec: Any) -> Any:
    """An EMA node's decay (a float, or an Open in a template), the default filled in."""
    return spec.derived.arg("decay", DEFAULT_DECAY)


def ema_text(spec: Any) -> str:
    """An EMA node's model as the language writes it, the decay written out: `ema(s, decay=0.999)`."""
    return f"ema({spec.derived.source}, decay={decay_of(spec)!r})"


def ema_sources(graph) -> dict[str, tuple[str, float]]:
    """{EMA node: (its source, its decay)} of a concrete graph, in declaration order."""
    return {name: (spec.derived.source, float(decay_of(spec)))
            for name, spec in graph.nodes(data="spec") if spec.derived is not None and spec.derived.kind == "ema"}
