"""Wide Residual Networks of Zagoruyko & Komodakis (2016).

WRN-d-k has a 3x3 stem convolution with 16 channels followed by three stages
of (d-4)/6 pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with
16k, 32k and 64k channels, then BN-ReLU, global average pooling and a linear
layer. When a block changes the number of channels or the resolution, its
shortcut is a 1x1 convolution applied to the pre-activated input, as in the
authors' reference code; this is what makes WRN-28-10 have 36.5M parameters.

Dropout between the two convolutions is off by default because the paper
reports its main results both with and without it and the experiments in
this project use the plain variant; ``dropout_rate`` turns it on.

Like the CIFAR ResNets, the head uses ``AdaptiveAvgPool2d(1)`` and the stem
has stride 1, so the same network serves 32x32 CIFAR, 8x8 digits and 64x64
Tiny-ImageNet (the paper's Tiny-ImageNet setting keeps the initial
convolution at stride 1). All layers are plain modules with non-inplace ReLUs
so same-architecture models can be fused later.
"""

import re

import torch
from torch import nn

_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """Return (depth, widen_factor) for names like ``wrn28_2``, else None.

    None is also returned for well-formed names whose depth is not 6m+4 with
    m >= 1 or whose width is 0, so callers can treat them as unknown models.
    """
    match = _WRN_NAME.fullmatch(name.lower())
    if match is None:
        return None
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
        return None
    return depth, width


class PreActBlock(nn.Module):
    """Pre-activation residual block with an optional 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        # Identity keeps the state_dict independent of the dropout setting.
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; ``depth`` must satisfy (depth-4) % 6 == 0.

    Taps (``dclang.models.taps``): ``layer1``, ``layer2``, ``layer3``, the three groups'
    outputs (16k, 32k, 64k channels; pre-activation, as attention transfer takes them),
    and ``pool``, the pooled features after the final BN-ReLU.
    """

    taps = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "pool": "pool"}

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n>=1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor = depth, widen_factor
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, 1, dropout_rate)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, dropout_rate)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, dropout_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(
        in_planes: int, planes: int, blocks: int, stride: int, dropout_rate: float
    ) -> nn.Sequential:
        layers = [PreActBlock(in_planes, planes, stride, dropout_rate)]
        layers += [PreActBlock(planes, planes, 1, dropout_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))
