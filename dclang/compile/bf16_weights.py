"""bf16 weights for a bf16 step, cast all at once: `Bf16Weights`.

Under bf16 autocast every convolution and linear layer casts its fp32 weight (and bias) to
bf16 on its own, and the backward casts each of their bf16 gradients back to fp32 on its own:
two kernels per tensor per step, on a step whose time on a GPU is kernel launches (a CIFAR
ResNet at batch 64). That is why `fused+bf16` was slower than fp32 on an H200 (0.047 s
against 0.040 s a kd_dml step): counted on the CPU, autocast took the fused kd_dml step from
1,554 operations to 1,893.

`Bf16Weights` keeps a bf16 copy of each such tensor, refreshed from the fp32 weights by one
multi-tensor copy (`torch._foreach_copy_`) before the forward; the layers compute with the
copies in their weights' places (autocast then has nothing to cast for them), and after the
backward one more multi-tensor copy turns the copies' bf16 gradients into the fp32 weights'
gradients. The optimizer, its state and checkpoints stay fp32, as with autocast alone; the
arithmetic is the same too, bit for bit (a cast rounds to nearest either way, and the bf16
gradient is what autocast's cast would have received: `tests/test_autotune.py`).

Only modules of exactly `nn.Conv1d/2d/3d` and `nn.Linear` are served (HFTA's grouped
convolutions are `nn.Conv2d`); anything else (a parametrized or custom layer) is cast by
autocast as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_SERVED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Bf16Weights:
    """bf16 copies of the weights of the served layers among `modules` (see the module doc)."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.slots: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]] = []
        copies: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for module in modules:
            for layer in module.modules():
                if type(layer) not in _SERVED:
                    continue
                for name, param in layer._parameters.items():
                    if param is None or param.dtype != torch.float32:
                        continue
                    if id(param) not in copies:  # a weight shared by two layers has one copy
                        copy = torch.empty_like(param, dtype=torch.bfloat16).requires_grad_(param.requires_grad)
                        copies[id(param)] = (param, copy)
                    self.slots.append((layer, name, param, copies[id(param)][1]))
        self.fp32 = [param for param, _ in copies.values()]
        self.bf16 = [copy for _, copy in copies.values()]
        self.trained = [(param, copy) for param, copy in copies.values() if param.requires_grad]
        self.grads: dict[int, torch.Tensor] = {}  # each weight's fp32 gradient, allocated once, refilled

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """The block (a forward) with the copies, refreshed, in the layers' weights' places."""
        with torch.no_grad():
            _copy_all(self.bf16, self.fp32)
        for layer, name, _, copy in self.slots:
            layer._parameters[name] = copy
        try:
            yield
        finally:
            for layer, name, param, _ in self.slots:
                layer._parameters[name] = param

    def gradients_back(self) -> None:
        """After the backward: the fp32 weights' gradients from the copies' (one multi-tensor
        copy where the weights had none, as after the step's `zero_grad`, into a buffer kept
        from step to step; added to one they had, as autograd would), the copies' let go."""
        pairs = [(param, copy) for param, copy in self.trained if copy.grad is not None]
        fresh = [(param, copy) for param, copy in pairs if param.grad is None]
        for param, copy in pairs:
            if param.grad is not None:
                param.grad.add_(copy.grad)
        for param, _ in fresh:
            if id(param) not in self.grads:
                self.grads[id(param)] = torch.empty_like(param)
            param.grad = self.grads[id(param)]
        if fresh:
            _copy_all([param.grad for param, _ in fresh], [copy.grad for _, copy in fresh])
        for _, copy in pairs:
            copy.grad = None


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`target.copy_(source)` for each pair: one multi-tensor copy where torch has it (its
    `_foreach_copy_`, which converts dtypes), one copy each before."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
        return
    for target, source in zip(targets, sources):
        target.copy_(source)


__all__ = ["Bf16Weights"]
