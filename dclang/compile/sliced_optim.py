"""An optimizer whose tensors are shared by several trainings, each owning slices of them.

Packed trials (`dclang.compile.engine`) fuse nodes of one architecture from different trials into
one network: slice s of a fused parameter is one node of one trial. Each trial has its own
learning rate (its schedule's position) and its own update count (Adam's bias correction), but
a torch optimizer holds one learning rate and one step count per tensor, so it cannot update
such a tensor. `SlicedOptimizer` applies torch's own update rule (SGD with momentum, Nesterov
and weight decay; Adam; AdamW, written as `torch.optim`'s multi-tensor implementation writes
them) with per-slice numbers: the per-element state (momentum, moments) is kept per tensor as
torch keeps it, and each number that differs between trials (the learning rate, the bias
corrections) becomes one coefficient per element, expanded from the per-trial values by two
operations per step however many tensors and trials there are (`_Coefficients`).

Equal to torch's optimizer up to rounding: a trial's slices follow exactly the arithmetic one
torch optimizer over that trial alone does (SGD's first momentum buffer is the gradient itself:
0 * momentum + gradient). `tests/test_union.py` holds them equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dclang.registry import OPTIMIZER_KINDS


def rule_of(name: str, args: dict) -> tuple:
    """What must agree for two trainings' tensors to be updated by one `SlicedOptimizer`: the
    optimizer and every hyperparameter but the learning rate: `args` (a spec's arguments, or a
    torch optimizer's parameter group) over the table's fixed ones
    (`dclang.registry.OPTIMIZER_KINDS`)."""
    if name not in OPTIMIZER_KINDS:
        raise ValueError(f"no sliced form of the optimizer {name!r}; known: {', '.join(OPTIMIZER_KINDS)}")
    kind = OPTIMIZER_KINDS[name]
    given = {**kind.fixed, **{key: args[key] for key in kind.args if key in args}}
    return (name, *((key, given[key]) for key in sorted(given) if key != "lr"))


def _initial(param: Tensor, given: Tensor | None) -> Tensor:
    """A state tensor for `param`, in its memory format: `given` (any layout of its elements
    in logical order), or zeros."""
    out = torch.zeros_like(param)
    if given is not None:
        out.copy_(given.reshape(param.shape))
    return out


class _Coefficients:
    """Per-owner numbers expanded to one value per element of every tensor: owner values (O,)
    -> per-slice values -> repeated over each slice's elements -> one flat vector, viewed as
    each tensor's shape."""

    def __init__(self, params: Sequence[Tensor], owners: Sequence[Sequence[int]]):
        device = params[0].device
        self.slice_owner = torch.tensor([o for own in owners for o in own], dtype=torch.long, device=device)
        sizes = [p.numel() // len(own) for p, own in zip(params, owners)]
        self.repeats = torch.tensor([n for n, own in zip(sizes, owners) for _ in own], dtype=torch.long, device=device)
        self.total = sum(p.numel() for p in params)
        self.layouts = [(p.shape, p.stride()) for p in params]
        self.numels = [p.numel() for p in params]
        self.dtype, self.device = params[0].dtype, device
        self._last: dict[str, tuple[tuple[float, ...], Tensor, list[Tensor]]] = {}

    def __call__(self, name: str, values: Sequence[float]) -> list[Tensor]:
        """One tensor per parameter holding its owner's value at each element, laid out as the
        parameter is (channels-last included: a slice is a block of the outermost dimension,
        contiguous in either layout). Each `name` keeps its tensors, refilled in place when its
        values change (a learning rate changes once an epoch, so most steps reuse them), so a
        captured CUDA graph that reads them reads the current values."""
        values = tuple(values)
        last = self._last.get(name)
        if last is not None and last[0] == values:
            return last[2]
        per_owner = torch.tensor(values, dtype=self.dtype).to(self.device, non_blocking=True)
        flat = per_owner.index_select(0, self.slice_owner).repeat_interleave(self.repeats, output_size=self.total)
        if last is not None:
            last[1].copy_(flat)
            flat, out = last[1], last[2]
        else:
            out = [part.as_strided(shape, stride) for part, (shape, stride) in zip(flat.split(self.numels),
                                                                                    self.layouts)]
        self._last[name] = (values, flat, out)
        return out

    def current(self, name: str) -> list[Tensor]:
        """The tensors of `name` as last set."""
        return self._last[name][2]


class SlicedOptimizer:
    """Updates `params` by `rule` (`rule_of`), slice s of tensor i belonging to owner
    `owners[i][s]` (each tensor viewed as (slices, -1): a fused tensor's node-major layout).

    `state` gives each tensor's per-element state by torch's names (missing: zeros, a fresh
    start). `prepare(lrs, counts)` takes each owner's learning rate and its update number (the
    1-based count of updates including this one, Adam's step) onto the device; `step()` then
    updates with them, reading no Python number that changes between steps (what a CUDA graph
    that captured `step` needs).
    """

    def __init__(self, rule: tuple, params: Sequence[nn.Parameter], owners: Sequence[Sequence[int]],
                 state: Sequence[dict[str, Tensor] | None] | None = None):
        self.name, self.hyper = rule[0], dict(rule[1:])
        if self.hyper.get("maximize") or self.hyper.get("amsgrad") or self.hyper.get("dampening", 0):
            raise ValueError(f"no sliced form of {self.name} with maximize, amsgrad or dampening")
        self.params = list(params)
        self.owners = [list(own) for own in owners]
        for p, own in zip(self.params, self.owners):
            if p.numel() % len(own):
                raise ValueError(f"a tensor of {p.numel()} elements cannot be cut into {len(own)} slices")
        state = list(state) if state is not None else [None] * len(self.params)
        self.state = [{key: _initial(p, (given or {}).get(key)) for key in OPTIMIZER_KINDS[self.name].state}
                      for p, given in zip(self.params, state)]
        self.coefficients = _Coefficients(self.params, self.owners)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def prepare(self, lrs: Sequence[float], counts: Sequence[int]) -> None:
        """Each owner's numbers of the coming update as per-element device tensors."""
        h = self.hyper
        if self.name == "sgd":
            self.coefficients("-lr", [-lr for lr in lrs])
            return
        beta1, beta2 = h["betas"]
        if self.name == "adamw":
            self.coefficients("decay", [1 - lr * h["weight_decay"] for lr in lrs])
        self.coefficients("step_size", [-(lr / (1 - beta1 ** n)) for lr, n in zip(lrs, counts)])
        self.coefficients("bias2", [(1 - beta2 ** n) ** 0.5 for n in counts])

    @torch.no_grad()
    def step(self) -> None:
        """One update of every tensor with a gradient, with the numbers `prepare` set; one
        without is left as it is, state and all, as torch leaves it (a layer no loss reached)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        states = [self.state[i] for i in live]

        def per_element(name: str) -> list[Tensor]:
            every = self.coefficients.current(name)
            return [every[i] for i in live]

        if self.name == "sgd":
            self._sgd(params, grads, states, per_element)
        else:
            self._adam(params, grads, states, per_element)

    def _sgd(self, params, grads, states, per_element) -> None:
        h = self.hyper
        if h["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=h["weight_decay"])
        if h["momentum"]:
            bufs = [s["momentum_buffer"] for s in states]
            torch._foreach_mul_(bufs, h["momentum"])
            torch._foreach_add_(bufs, grads)
            grads = torch._foreach_add(grads, bufs, alpha=h["momentum"]) if h["nesterov"] else bufs
        torch._foreach_addcmul_(params, grads, per_element("-lr"))

    def _adam(self, params, grads, states, per_element) -> None:
        h = self.hyper
        beta1, beta2 = h["betas"]
        if self.name == "adamw":
            torch._foreach_mul_(params, per_element("decay"))
        elif h["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=h["weight_decay"])
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_size = per_element("step_size")
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, per_element("bias2"))
        torch._foreach_add_(denom, h["eps"])
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, step_size), denom)


__all__ = ["SlicedOptimizer", "rule_of"]
