"""Data augmentation and normalisation.

`BatchAugment` augments a whole uint8 batch on the device it already lives on, with a few
tensor ops and no Python loop over samples: several networks train on the same batch, so
augmenting once per batch on the GPU keeps the input pipeline far from being the bottleneck.
`per_sample_transforms` and `TransformedSplit` build the same augmentation the standard way
(torchvision transforms in a DataLoader) as the baseline it is compared against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from torch.utils.data import Dataset as TorchDataset

from dclang.data.dataset import Split


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 `(images / 255 - mean) / std`, per channel, on the same device.

    Computed as one multiply-add with constants cached per device, so that normalising each
    evaluation batch does not copy the constants to the GPU again.
    """
    if images.dtype != torch.uint8:  # also keeps the in-place ops below off the caller's tensor
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"{images.shape[1]} channels but mean has {len(mean)} and std {len(std)} values")
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return images.to(torch.float32).mul_(scale).add_(shift)


@lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, C, 1, 1) with x * scale + shift == (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).to(device, torch.float32), (-m / s).to(device, torch.float32)


class BatchAugment:
    """Reflect pad + random crop + random horizontal flip + normalisation of a uint8 batch.

    Each sample gets its own crop offset (uniform in [0, 2 * pad] along each axis of the
    padded image) and its own flip (p = 0.5). Padding is never materialised: every output
    pixel's source index is computed directly (reflection included) and the batch is read
    with one gather. `crop=False` disables the random crop (and so makes `pad` irrelevant);
    with neither crop nor flip this is `normalize`, which is what evaluation uses.
    """

    def __init__(self, pad: int, crop: bool, flip: bool, mean: Sequence[float], std: Sequence[float]):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad, self.crop, self.flip = pad, crop, flip
        self.mean, self.std = tuple(mean), tuple(std)

    def sample(self, n: int, device: torch.device | str,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random parameters of `n` samples: (dy, dx) crop offsets into the padded image,
        int64 (n,) each (`pad`, i.e. no shift, without crop), and `flipped`, bool (n,).

        Drawn in this order from `generator` (which must be on `device`; None: torch's default
        generator): the offsets as one randint of shape (2, n), then the flips as rand(n) < 0.5.
        """
        if self.crop and self.pad:
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator, device=device)
        else:
            dy = dx = torch.full((n,), self.pad, dtype=torch.int64, device=device)
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=device) < 0.5
        else:
            flipped = torch.zeros(n, dtype=torch.bool, device=device)
        return dy, dx, flipped

    def apply(self, images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """Crop at offsets (dy, dx) of the reflect-padded images, flip where `flipped`, normalise."""
        n, channels, height, width = images.shape
        if not (self.crop and self.pad) and not self.flip:
            return normalize(images, self.mean, self.std)
        if self.crop and self.pad >= min(height, width):
            raise ValueError(f"reflect padding of {self.pad} needs images larger than that, got {height}x{width}")
        device = images.device
        rows = _reflect(torch.arange(height, device=device) + (dy[:, None] - self.pad), height)
        cols = _reflect(torch.arange(width, device=device) + (dx[:, None] - self.pad), width)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
        out = images[torch.arange(n, device=device)[:, None, None, None],
                     torch.arange(channels, device=device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        return normalize(out, self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented, normalised float32 copy of the uint8 batch `images` (N, C, H, W)."""
        return self.apply(images, *self.sample(images.shape[0], images.device, generator))


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-(size - 1), 2 * (size - 1)] into [0, size) as reflect padding does
    (the edge pixel is not repeated: -1 -> 1, size -> size - 2)."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def per_sample_transforms(pad: int, flip: bool, mean: Sequence[float], std: Sequence[float], *,
                          image_size: int, crop: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same augmentation as `BatchAugment(pad, crop, flip, mean, std)`, one uint8 (C, H, W)
    image at a time, as torchvision transforms: the baseline input pipeline.

    `image_size` is the crop size torchvision's RandomCrop needs; without crop or with pad 0
    there is no RandomCrop.
    """
    from dclang.models.library import import_library

    transforms = import_library("torchvision.transforms")

    steps: list[Callable] = []
    if crop and pad:
        steps.append(transforms.RandomCrop(image_size, padding=pad, padding_mode="reflect"))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


class TransformedSplit(TorchDataset):
    """A Split as a map-style dataset of (transform(image), label), for a DataLoader.

    The split must be on the CPU when DataLoader workers are used.
    """

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.split.images[index]), self.split.labels[index]
