"""TF32: whether fp32 convolutions and matrix products on CUDA may round their inputs to TF32.

On Ampere and later cards (A100, H100, H200) tensor cores multiply fp32 tensors several
times faster when their inputs are rounded to TF32 (a 10-bit mantissa), with fp32
accumulation. PyTorch's own defaults disagree with each other: cuDNN convolutions use TF32
unless told not to, matrix products do not. dclang decides both the same way, in this one
place:

- training (`dclang run`, `dclang search`, `dclang bench`) turns TF32 **on** by default, as
  most training code does: SGD's noise dwarfs the rounding, and a step of a CIFAR ResNet is
  bound by launches and bandwidth, not by fp32 arithmetic, so leaving speed on the table
  would buy nothing measurable in accuracy. `--no-tf32` turns it off; a CUDA run's
  `summary.json` records which (`tf32`).
- tests that hold two ways of computing a step equal (fused against reference, a union
  against its trials alone, each fast path against plain fused) turn it **off** with
  `tf32(False)`: TF32 rounds each product to ~1e-3 relative, far above their tolerances,
  and the rounding differs between layouts and kernels.

The CPU never uses TF32; the setting is process-wide, so it is set once per process, before
the first step is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in CUDA fp32 convolutions and matrix products, both at once.

    The `allow_tf32` flags are read by every torch from 1.7 to today's, so this works across
    the versions dclang supports (newer torch maps them onto its `fp32_precision` settings).
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether TF32 is on for both convolutions and matrix products (what `set_tf32` sets)."""
    return bool(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """`set_tf32(enabled)` for the block, the previous flags restored after it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


__all__ = ["set_tf32", "tf32", "tf32_enabled"]
