"""Tests for the model zoo in dclang.models.

Parameter counts are pinned exactly (so any architectural drift is caught)
and also compared with the figures published by He et al. (2016, Table 6) for
option-A CIFAR ResNets and by Zagoruyko & Komodakis (2016) for WRNs.
"""

import pytest
import torch
from torch import nn

from dclang.models import (
    BUILDERS,
    CifarResNet,
    WideResNet,
    build_model,
    count_parameters,
    parse_wrn_name,
)
from dclang.models.cifar_resnet import ShortcutA

CONFIGS = [(10, 3, 32), (10, 1, 8)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("config", CONFIGS, ids=["rgb32", "gray8"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_model_trains_one_step(name, config):
    num_classes, in_channels, image_size = config
    model = build_model(name, num_classes, in_channels, image_size).train()
    x = torch.randn(2, in_channels, image_size, image_size)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    logits.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_registry_names_are_lowercase():
    assert all(name == name.lower() for name in BUILDERS)


# Exact counts for 10 classes; published figures for option-A shortcuts.
RESNET_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
PUBLISHED_RESNET = {20: 0.27e6, 32: 0.46e6, 110: 1.7e6}


@pytest.mark.parametrize("depth", sorted(RESNET_PARAMS))
def test_resnet_parameter_counts(depth):
    n_params = count_parameters(build_model(f"resnet{depth}", 10))
    assert n_params == RESNET_PARAMS[depth]
    if depth in PUBLISHED_RESNET:
        assert abs(n_params / PUBLISHED_RESNET[depth] - 1) < 0.02


def test_resnet_parameter_counts_100_classes():
    # Only the 64 -> classes linear layer depends on the number of classes.
    assert count_parameters(build_model("resnet32", 100)) == 464_154 + 90 * 65 == 470_004
    assert count_parameters(build_model("resnet110", 100)) == 1_733_812


def test_wrn_parameter_counts():
    n_params = count_parameters(build_model("wrn28_2", 100))
    assert n_params == 1_479_220
    assert abs(n_params / 1.47e6 - 1) < 0.02
    # WRN-28-10 is quoted as 36.5M parameters in the paper.
    n_params = count_parameters(build_model("wrn28_10", 10))
    assert n_params == 36_479_194
    assert abs(n_params / 36.5e6 - 1) < 0.02


@pytest.mark.parametrize("depth", [20, 32, 110])
def test_option_a_shortcut_is_parameter_free(depth):
    model = build_model(f"resnet{depth}", 10)
    n = (depth - 2) // 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 * n + 1  # stem + 2 per block, no shortcut convs
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # entries of stages 2 and 3
    assert all(count_parameters(s) == 0 and not list(s.buffers()) for s in shortcuts)


def test_shortcut_a_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)  # odd size: must match a stride-2 3x3 conv
    out = ShortcutA(16, 32, 2)(x)
    conv_out = nn.Conv2d(16, 32, 3, 2, 1)(x)
    assert out.shape == conv_out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert torch.all(out[:, 16:] == 0)
    with pytest.raises(ValueError):
        ShortcutA(32, 16, 2)


def test_resnet_conv_init_is_kaiming_normal():
    model = build_model("resnet56", 10)
    weight = model.layer3[-1].conv2.weight  # 64 -> 64, 3x3
    expected_std = (2 / (64 * 9)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.1


def test_resnet110_eval_single_image():
    model = build_model("resnet110", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("alias, base", [
    ("resnet32_tiny", "resnet32"),
    ("resnet110_tiny", "resnet110"),
    ("wrn28_2_tiny", "wrn28_2"),
])
def test_tiny_imagenet_aliases(alias, base):
    model = build_model(alias, 200, 3, 64)
    reference = build_model(base, 200, 3, 64)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.stride == (1, 1)
    model.train()
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 200)
    logits.sum().backward()


def test_parse_wrn_name():
    assert parse_wrn_name("wrn28_10") == (28, 10)
    assert parse_wrn_name("WRN16_1") == (16, 1)
    assert parse_wrn_name("wrn10_3") == (10, 3)
    for bad in ["wrn27_2", "wrn4_2", "wrn28_0", "wrn28", "wrn28_2_tiny", "resnet32", "xwrn28_2"]:
        assert parse_wrn_name(bad) is None, bad


def test_generic_wrn_builds_unregistered_names():
    assert "wrn10_3" not in BUILDERS
    model = build_model("wrn10_3", 5, 1, 8)
    assert isinstance(model, WideResNet)
    assert (model.depth, model.widen_factor) == (10, 3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet33", "wrn27_2", "vgg16", ""])
def test_unknown_names_raise_key_error(name):
    with pytest.raises(KeyError):
        build_model(name, 10)


def test_names_are_case_insensitive():
    assert isinstance(build_model("ResNet20", 10), CifarResNet)


def test_invalid_depths_raise_value_error():
    with pytest.raises(ValueError):
        CifarResNet(33, 10)
    with pytest.raises(ValueError):
        WideResNet(27, 2, 10)
    with pytest.raises(ValueError):
        WideResNet(28, 0, 10)


def test_wrn_dropout_keeps_state_dict():
    plain = WideResNet(16, 1, 10)
    dropped = WideResNet(16, 1, 10, dropout_rate=0.3)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 6
    assert plain.state_dict().keys() == dropped.state_dict().keys()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_models_are_plain_for_fusion(name):
    model = build_model(name, 10, 1, 8)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            assert not m.inplace
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert type(m) is nn.BatchNorm2d


def test_small_network_sizes():
    assert count_parameters(build_model("cnn_tiny", 10, 1, 8)) == 1_442
    assert count_parameters(build_model("cnn_small", 10, 1, 8)) == 94_186
    assert count_parameters(build_model("mlp", 10, 1, 8)) == 64 * 128 + 128 + 128 * 10 + 10


def test_conv_nets_accept_other_sizes():
    for name in ["cnn_tiny", "cnn_small", "resnet20", "wrn16_1"]:
        model = build_model(name, 10, 3, 32).eval()
        with torch.no_grad():
            for size in (8, 13, 64):
                assert model(torch.randn(1, 3, size, size)).shape == (1, 10), (name, size)


def test_count_parameters_ignores_frozen():
    model = build_model("cnn_tiny", 10, 1, 8)
    total = count_parameters(model)
    model[-1].weight.requires_grad_(False)
    assert count_parameters(model) == total - 160
