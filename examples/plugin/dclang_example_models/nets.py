"""`tiny_mixer`: a small all-MLP image model (patches mixed across space, then channels).

A dclang model factory takes the three numbers dclang knows from the data, `num_classes`,
`in_channels` and `image_size`, plus whatever arguments the `.kt` file gives it
(`node s : tiny_mixer(width=32)`), and returns a `torch.nn.Module` mapping images
(B, in_channels, image_size, image_size) to logits (B, num_classes).
"""

from __future__ import annotations

from torch import Tensor, nn


class TinyMixer(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int, patch: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.norm1 = nn.LayerNorm(width)
        self.token_mix = nn.Sequential(nn.Linear(tokens, tokens), nn.GELU())
        self.norm2 = nn.LayerNorm(width)
        self.channel_mix = nn.Sequential(nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, tokens, width)
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mix(self.norm2(x))
        return self.head(x.mean(dim=1))


def tiny_mixer(num_classes: int, in_channels: int, image_size: int, width: int = 16, patch: int = 2) -> nn.Module:
    """The factory dclang calls: sizes from the data, `width` and `patch` from the .kt file."""
    return TinyMixer(num_classes, in_channels, image_size, width, patch)
