"""In-memory splits and the seeded train/validation split.

Every supported dataset fits in memory as uint8 (CIFAR: 180 MB, Tiny ImageNet: 1.4 GB), so a
split is one tensor of images and one of labels. The training loop moves it to the GPU once
and cuts batches by indexing, with no DataLoader workers and no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dclang.data.catalog import DataError


@dataclass(frozen=True)
class Split:
    """One split kept whole: `images` uint8 (N, C, H, W) contiguous, `labels` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # The training loop indexes these directly; catch a wrong layout here, not mid-epoch.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or not self.images.is_contiguous():
            raise ValueError(f"Split.images must be contiguous uint8 (N, C, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"Split.labels must be int64 of shape ({self.images.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        """The same split on `device` (the uint8 images are copied once, not per batch)."""
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, indices: torch.Tensor) -> Split:
        """The samples at `indices`, in that order, as a new contiguous split."""
        return Split(self.images.index_select(0, indices).contiguous(), self.labels.index_select(0, indices))


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: three disjoint splits and what a model needs to know about them.

    `train` and `val` partition the official training set (val is seeded by `split_seed`);
    `test` is the official test set, evaluated and reported but never used for selection.
    `mean` and `std` are per channel, in [0, 1] units, for normalisation.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split


def split_indices(n: int, val_split: int | float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into an official training set of `n` samples, each sorted.

    `val_split` is a count (int) or a fraction in [0, 1) (float) of `n`; 0 gives an empty val.
    The val indices are the first ones of `torch.randperm(n)` drawn from a CPU generator
    seeded with `split_seed`, so a seed always gives the same split on any machine.
    """
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
        raise DataError(f"val_split must be a count (int) or a fraction (float), got {val_split!r}")
    if isinstance(val_split, float):
        if not 0.0 <= val_split < 1.0:
            raise DataError(f"val_split={val_split} is not a fraction in [0, 1); "
                            f"write an integer to hold out a number of images")
        n_val = round(val_split * n)
        if val_split > 0 and n_val == 0:
            raise DataError(f"val_split={val_split} of {n} training images holds out none; write val_split = 0 "
                            f"for no validation split, or a count (an integer) of images to hold out")
    else:
        n_val = val_split
    if not 0 <= n_val < n:
        raise DataError(f"val_split={val_split} asks for {n_val} validation images, but the official "
                        f"training set has {n}: at least one image must be left to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def carve_validation(official_train: Split, val_split: int | float, split_seed: int,
                     num_classes: int) -> tuple[Split, Split]:
    """Split the official training set into (train, val) with `split_indices`; refused when
    the val split takes every training image of a class (a class the models never train on,
    yet are scored on)."""
    train_idx, val_idx = split_indices(len(official_train), val_split, split_seed)
    train, val = official_train.subset(train_idx), official_train.subset(val_idx)
    counts = torch.bincount(train.labels, minlength=num_classes)
    lost = sorted(set(val.labels.unique().tolist()) - set(counts.nonzero().flatten().tolist()))
    if lost:
        shown = ", ".join(map(str, lost[:8])) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
        raise DataError(f"val_split={val_split} holds out every training image of class(es) {shown}, so the models "
                        f"would never train on them: give a smaller val_split, another split_seed, or more images "
                        f"of those classes")
    return train, val


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Summed in float64 over chunks of samples, so a large set is neither copied whole to
    float nor summed with float32 round-off. A constant channel gets std 1 so that
    normalising never divides by zero.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(mean.tolist()), tuple(s if s > 0 else 1.0 for s in std.tolist())
