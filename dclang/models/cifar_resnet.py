"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning", section 4.2.

Depth is 6n+2: a 3x3 stride-1 stem convolution, three stages of n BasicBlocks
with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the
resolution), global average pooling and a linear classifier.

Shortcuts use **option A** of the paper: when a block changes shape, the
identity is subsampled with stride 2 and its missing channels are zero-padded.
The shortcut is therefore parameter free, which is what the published
parameter counts (0.27M for ResNet20, 0.46M for ResNet32, 1.7M for ResNet110)
assume; projection shortcuts (option B) would add parameters and change the
model the paper's numbers refer to.

The classifier head uses ``AdaptiveAvgPool2d(1)`` instead of a fixed 8x8
pool, so the same network runs on 32x32 CIFAR, on 8x8 digits and on 64x64
Tiny-ImageNet. For Tiny-ImageNet the paper keeps the CIFAR architecture "with
the stride of the initial convolution set to 1"; our stem is already stride 1,
so the CIFAR builders are the Tiny-ImageNet models as well.

Every layer is an ordinary module (plain ``nn.BatchNorm2d``, non-inplace
``nn.ReLU``) so that models of one architecture can later be fused
(e.g. by stacking their parameters) without surprises from shared buffers or
in-place writes.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """Option-A shortcut: strided subsampling plus zero channels, no parameters.

    Slicing with ``::stride`` yields ceil(H/stride) rows, the same size as a
    3x3 convolution with padding 1 and that stride, so the two branches of a
    block always agree in shape, even for odd spatial sizes.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("option-A shortcut can only add channels")
        self.extra_channels = out_planes - in_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dimension backwards: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; ``depth`` must satisfy (depth-2) % 6 == 0.

    Taps (``dclang.models.taps``): ``layer1``, ``layer2``, ``layer3``, the three stages'
    outputs (16, 32, 64 channels at full, half and quarter resolution), and ``pool``, the
    pooled features the classifier reads.
    """

    taps = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "pool": "pool"}

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n>=1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=False),
        )
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. train these nets with the initialisation of
                # "Delving deep into rectifiers", i.e. Kaiming normal.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
