"""Optimizers and per-epoch learning-rate schedules from the graph's `train` block.

The optimizers are `dclang.registry.OPTIMIZER_KINDS`' (one table: names, settings, torch
classes, state). A schedule is a function of the epochs done (`Schedule`), not a torch
scheduler bound to one optimizer: an engine whose members share fused tensors updates them
with a sliced optimizer (`dclang.compile.sliced_optim`), each member at its own learning rate,
and a resumed run needs only the count.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from dclang.ir import OptimizerSpec, ScheduleSpec
from dclang.registry import OPTIMIZER_KINDS


def build_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter], *,
                    foreach: bool | None = None) -> Optimizer:
    """`spec.name` over `params`: the torch class of `OPTIMIZER_KINDS`, with the spec's
    arguments (torch's own keyword names) and the table's fixed hyperparameters.

    `foreach=None` is torch's default (the per-tensor loop on CPU); True asks for the
    multi-tensor kernels.
    """
    if spec.name not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown optimizer {spec.name!r}; known: {', '.join(OPTIMIZER_KINDS)}")
    kind = OPTIMIZER_KINDS[spec.name]
    return getattr(torch.optim, kind.torch_class)(list(params), **kind.fixed, **spec.args, foreach=foreach)


class Schedule:
    """The learning rate after `done` epochs: `step` = MultiStepLR's (the base rate times gamma
    per milestone passed), `cosine` = CosineAnnealingLR's closed form over `epochs`,
    `constant` = the optimizer's lr throughout."""

    def __init__(self, spec: ScheduleSpec, lr: float, epochs: int):
        if spec.name not in ("step", "cosine", "constant"):
            raise ValueError(f"unknown schedule {spec.name!r}; known: step, cosine, constant")
        self.spec, self.base, self.epochs = spec, lr, epochs
        self.milestones = sorted(spec.args.get("milestones", ()))

    def __call__(self, done: int) -> float:
        args = self.spec.args
        if done == 0:  # torch's schedulers start at the base rate exactly, not at a rounding of it
            return self.base
        if self.spec.name == "step":
            return self.base * args["gamma"] ** bisect_right(self.milestones, done)
        if self.spec.name == "cosine":
            eta_min = args["eta_min"]
            return eta_min + (self.base - eta_min) * (1 + math.cos(math.pi * done / self.epochs)) / 2
        return self.base
