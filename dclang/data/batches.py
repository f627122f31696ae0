"""Shuffled mini-batches cut from a Split that is already on the training device.

Batches are index_select slices of the resident uint8 tensors: no DataLoader, no worker
processes, no host-to-device copy per batch. The order of an epoch is a function of the
caller's seed and the epoch number only, so a run resumed at (epoch, position) sees exactly
the batches the uninterrupted run would have seen; the caller keeps those two numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dclang.data.dataset import Split


def epoch_generator(seed: int, epoch: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` for the order of `epoch` of a run seeded with `seed`.

    (seed, epoch) are mixed by NumPy's SeedSequence into one 64-bit seed, so neighbouring
    epochs and runs get unrelated streams. The same (seed, epoch, device type) always gives
    the same permutation; CPU and CUDA generators differ, so resume on the same device type.
    """
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(mixed)


class BatchIterator:
    """One epoch over `split` in a random order, as (images_uint8, labels) batches.

    The permutation is drawn once, on the split's device, from `generator` (see
    `epoch_generator`). `start` is the number of batches of this epoch already done, for
    resuming; iterating yields the remaining batches, and `len()` counts exactly those. The
    last, smaller batch is dropped when `drop_last` is set. Iterating twice gives the same batches.
    """

    def __init__(self, split: Split, batch_size: int, generator: torch.Generator, *,
                 drop_last: bool = False, start: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.drop_last = split, batch_size, drop_last
        n = len(split)
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start={start} is outside the {self.num_batches} batches of an epoch")
        self.start = start
        self.order = torch.randperm(n, generator=generator, device=split.images.device)

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((images, labels) for images, labels, _ in self.indexed())

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches with each sample's position in the split, (images, labels, positions):
        what a loss with a memory bank over the training set (`crd`) reads."""
        for b in range(self.start, self.num_batches):
            index = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.split.images.index_select(0, index), self.split.labels.index_select(0, index), index
