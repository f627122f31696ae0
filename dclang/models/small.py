"""Small networks for unit tests and the scikit-learn digits quickstart.

Digits are 8x8 grayscale images with 10 classes; these models train in
seconds on a CPU, which is what tests and a first run need. The convolutional
ones pool globally, so they accept any ``in_channels`` and any image size of
at least 8x8 (``cnn_small`` halves the resolution once). The MLP flattens its
input and therefore needs the exact ``image_size`` it was built for.

``nn.Sequential`` only numbers its layers, so each builder names its taps
(``dclang.models.taps``): the ReLU output of each conv block (``conv1``, ...), the
pooled features (``pool``), the MLP's hidden layer (``hidden``).
"""

from torch import nn


def mlp(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    """Flatten -> 128 -> ReLU -> num_classes. Tap: ``hidden``."""
    return _with_taps(nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 128),
        nn.ReLU(inplace=False),
        nn.Linear(128, num_classes),
    ), hidden="2")


def _with_taps(model: nn.Sequential, **taps: str) -> nn.Sequential:
    model.taps = taps
    return model


def _conv_bn_relu(in_planes: int, planes: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False),
        nn.BatchNorm2d(planes),
        nn.ReLU(inplace=False),
    ]


def _head(planes: int, num_classes: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes, num_classes)]


def cnn_tiny(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers (8, 16 channels), global pool, linear.

    ``image_size`` is accepted for the uniform builder signature only: the
    network is size agnostic. Taps: ``conv1``, ``conv2``, ``pool``.
    """
    return _with_taps(nn.Sequential(
        *_conv_bn_relu(in_channels, 8),
        *_conv_bn_relu(8, 16),
        *_head(16, num_classes),
    ), conv1="2", conv2="5", pool="6")


def cnn_small(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    """Conv-BN-ReLU 32 -> 64, 2x2 max-pool, conv-BN-ReLU 128, global pool, linear.

    One max-pool keeps a 4x4 map for 8x8 digits while still giving the last
    layer a wider receptive field. ``image_size`` is accepted for the uniform
    builder signature only. Taps: ``conv1``, ``conv2`` (full resolution), ``conv3`` (half),
    ``pool``.
    """
    return _with_taps(nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        *_head(128, num_classes),
    ), conv1="2", conv2="5", conv3="9", pool="10")
