"""Optimizers and per-epoch learning-rate schedules from the graph's `train` block."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, MultiStepLR

from dclang.ir import OptimizerSpec, ScheduleSpec

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter], *,
                    foreach: bool | None = None) -> Optimizer:
    """`spec.name` over `params`; the spec's arguments are torch's own keyword names
    (sgd: lr, momentum, nesterov, weight_decay; adam/adamw: lr, weight_decay).

    `foreach=None` is torch's default (the per-tensor loop on CPU); True asks for the
    multi-tensor kernels.
    """
    if spec.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec.name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[spec.name](list(params), **spec.args, foreach=foreach)


def build_scheduler(spec: ScheduleSpec, optimizer: Optimizer, epochs: int) -> LRScheduler:
    """A scheduler stepped once per epoch: `step` = MultiStepLR, `cosine` = CosineAnnealingLR
    over `epochs`, `constant` = the optimizer's lr throughout."""
    if spec.name == "step":
        return MultiStepLR(optimizer, milestones=list(spec.args["milestones"]), gamma=spec.args["gamma"])
    if spec.name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs, eta_min=spec.args["eta_min"])
    if spec.name == "constant":
        return LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown schedule {spec.name!r}; known: step, cosine, constant")
