"""Library models (torchvision, timm) as nodes: trained with built-in ones by both engines,
fused by HFTA where their architecture allows, fitted to the data, pre-trained weights
loaded from the library's cache (never downloaded), and the teacher fine-tuned when its head
had to be replaced.

Pre-trained weights are made here: a real torchvision file name in a temporary
`$TORCH_HOME`, holding a state_dict with values unlike a fresh model's, so that every loaded
tensor can be told from an initialised one.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_accelerate import assert_same_training
from test_accelerate import batches as hfta_batches
from test_accelerate import build as build_step
from test_accelerate import train as hfta_train
from test_engines import EPOCHS, STEPS, TIGHT, assert_models_close, batches, snapshot, train

from dclang.api import check
from dclang.cli import main
from dclang.compile import StepOptions, compile_graph
from dclang.models import build_model, count_parameters
from dclang.models.library import WeightsMissing, adaptations, pretrained_fits, weights_file

SHUFFLE = "torchvision.shufflenet_v2_x0_5"
SHUFFLE_WEIGHTS = f'{SHUFFLE}(weights="IMAGENET1K_V1")'


def graph_text(a: str, b: str = "cnn_tiny", extra: str = "") -> str:
    return f"""
graph library
data digits {{ val_split = 100 }}
train {{ epochs = 1  batch = 64  optimizer = sgd(lr=0.05, momentum=0.9) }}
node a : {a} [target]
node b : {b}
{extra}
label -> a : through
label -> b : through
a -> b : correct kl(T=2)
b -> a : through
"""


def graph_of(text: str):
    checked = check(text)
    assert checked.ok, checked.errors
    return checked.graph


def engine_step(text: str, engine: str, classes: int = 3):
    options = StepOptions(channels_last=False) if engine == "fused" else None
    return compile_graph(graph_of(text), num_classes=classes, in_channels=1, image_size=8,
                         device=torch.device("cpu"), engine=engine, seed=0, steps_per_epoch=STEPS, epochs=EPOCHS,
                         options=options)


def test_a_torchvision_model_and_a_builtin_train_together_fused_equals_reference(float64):
    text = graph_text(SHUFFLE)
    reference, fused = engine_step(text, "reference"), engine_step(text, "fused")
    start = snapshot(fused)
    assert_models_close(snapshot(reference), start, rtol=0, atol=0)
    data = batches()
    train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    moved = (snapshot(fused)["a"]["fc.weight"] - start["a"]["fc.weight"]).abs().max()
    assert moved > 1e-4, "the library model was trained"


def test_an_edge_between_layers_reaches_into_a_torchvision_model_by_module_name(float64):
    """`t.layer1` is the output of the ResNet's `layer1` module (64x8x8 with the small stem)."""
    text = """
graph layers
data digits { }
train { epochs = 1  optimizer = sgd(lr=0.05, momentum=0.9) }
node a : cnn_tiny             [target]
node t : torchvision.resnet18 [frozen]
label    -> a       : through
t        -> a       : through kl(T=2)
t.layer1 -> a.conv2 : through at(p=2)
"""
    reference, fused = engine_step(text, "reference"), engine_step(text, "fused")
    data = batches(2, size=8)
    train(reference, data)
    fused_stats = train(fused, data)
    assert float(fused_stats[0].edge_loss["t.layer1->a.conv2"]) > 0
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)


def test_torchvision_models_are_fitted_to_the_data():
    """Classes and channels from the data; a ResNet's ImageNet stem replaced for small images."""
    net = build_model("torchvision.resnet18", 10, 1, 8)
    assert net.conv1.weight.shape == (64, 1, 3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity) and net.fc.out_features == 10
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    large = build_model("torchvision.resnet18", 200, 3, 64)
    assert large.conv1.weight.shape == (64, 3, 7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    gray = build_model(SHUFFLE, 10, 1, 8)
    assert gray.conv1[0].weight.shape == (24, 1, 3, 3) and gray(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # arguments as written reach the constructor
    assert build_model("torchvision.resnet18(zero_init_residual=true)", 10, 3, 32).layer1[0].bn2.weight.abs().sum() == 0


def test_two_torchvision_resnets_fuse_and_another_architecture_falls_back_with_the_reason(float64):
    text = """
graph hfta
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node a : torchvision.resnet18 [target]
node b : torchvision.resnet18
node c : torchvision.shufflenet_v2_x0_5
node d : torchvision.shufflenet_v2_x0_5
label -> a : through
label -> b : through
label -> c : through
label -> d : through
a -> b : through kl(T=2)
b -> a : correct
c -> a : through
d -> a : through
"""
    with pytest.warns(UserWarning, match=r"HFTA: cannot fuse ShuffleNetV2: .*; nodes c, d stay separate"):
        hfta = build_step(StepOptions(hfta=True), text=text)
    assert [[n for _, n in g.slices] for g in hfta.groups] == [["a", "b"]]
    fused = build_step(text=text)
    data = hfta_batches(2, size=8)
    want, got = hfta_train(fused, data), hfta_train(hfta, data)
    assert_same_training(hfta, got, fused, want, **TIGHT)


def test_bench_runs_on_a_torchvision_graph(tmp_path):
    path = tmp_path / "g.kt"
    path.write_text(graph_text("torchvision.resnet18", "torchvision.resnet18"))
    result = CliRunner().invoke(main, ["bench", str(path), "--steps", 1, "--warmup", 1, "--device", "cpu",
                                       "--variants", "fused,fused+hfta", "--batch", 8, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["engines"]) == {"reference", "fused", "fused+hfta"}
    ops = {name: entry["ops_per_step"] for name, entry in out["engines"].items()}
    assert 0 < ops["fused+hfta"] < ops["fused"], "the two ResNet-18s run as one fused network"


def test_search_can_choose_a_library_model():
    from dclang.api import parse
    from dclang.search.space import sample, search_space
    from dclang.syntax.format import format_module

    template = parse(graph_text("choice(cnn_tiny, torchvision.resnet18, timm.test_resnet)"))
    space = search_space(template)
    assert space[0].name == "a.model" and space[0].choices == ("cnn_tiny", "torchvision.resnet18", "timm.test_resnet")
    text = format_module(sample(template, {"a.model": "torchvision.resnet18"}, space))
    assert "node a : torchvision.resnet18 [target]" in text
    assert graph_of(text).nodes["a"]["spec"].model == "torchvision.resnet18"


# ---------------------------------------------------------------- pre-trained weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def fake_imagenet_weights(torch_home) -> dict:
    """shufflenet_v2_x0_5's IMAGENET1K_V1 file, where torchvision looks for it, with made-up values."""
    from torchvision import models

    gen = torch.Generator().manual_seed(3)
    state = {k: (torch.rand(v.shape, generator=gen) + 0.5).to(v.dtype) if v.is_floating_point() else v
             for k, v in models.shufflenet_v2_x0_5().state_dict().items()}
    path = weights_file(models.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1)
    assert path.parent == torch_home / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_pretrained_weights_are_loaded_and_the_head_and_stem_replaced(torch_home):
    state = fake_imagenet_weights(torch_home)
    net = build_model(SHUFFLE_WEIGHTS, 10, 1, 8)
    got = net.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        want = value.sum(dim=1, keepdim=True) if key == "conv1.0.weight" else value  # the gray stem sums RGB
        assert torch.equal(got[key], want), key
    assert got["fc.weight"].shape == (10, 1024) and got["fc.bias"].abs().max() < 0.5  # a fresh head
    assert adaptations(SHUFFLE_WEIGHTS, 10, 1, 8) == ["the head (1000 -> 10 classes)", "the stem (1-channel input)"]
    assert not pretrained_fits(SHUFFLE_WEIGHTS, 10, 1, 8)
    assert pretrained_fits(SHUFFLE_WEIGHTS, 1000, 3, 224) and not pretrained_fits(SHUFFLE, 1000, 3, 224)
    full = build_model(SHUFFLE_WEIGHTS, 1000, 3, 224).state_dict()
    assert all(torch.equal(full[k], v) for k, v in state.items())
    assert count_parameters(net) == count_parameters(build_model(SHUFFLE, 10, 1, 8))


def test_a_missing_weights_file_says_which_and_where(torch_home):
    with pytest.raises(WeightsMissing) as err:
        build_model(SHUFFLE_WEIGHTS, 10, 1, 8)
    assert "shufflenetv2_x0.5-f707e7126e.pth" in err.value.message and "never downloads" in err.value.message
    assert str(torch_home / "hub" / "checkpoints") in err.value.hint
    assert "https://download.pytorch.org/models/shufflenetv2_x0.5-f707e7126e.pth" in err.value.hint


def tiny_digits(path) -> None:
    """The first 96 of scikit-learn's digits as an .npz: 64 to train on, 32 to test."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images[:96] * 15).astype(np.uint8), digits.target[:96]
    np.savez(path, x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])


def test_the_teacher_cache_key_holds_the_weights_name_and_file(torch_home):
    from torchvision import models

    from dclang.train.run import resolved_graph
    from dclang.train.teachers import teacher_graph, teacher_key

    graph = resolved_graph(graph_of(graph_text(SHUFFLE_WEIGHTS)), epochs=1, seed=0)
    state = fake_imagenet_weights(torch_home)
    key = teacher_key(teacher_graph(graph, SHUFFLE_WEIGHTS))
    assert key != teacher_key(teacher_graph(graph, SHUFFLE))
    state["fc.bias"] = state["fc.bias"] + 1  # another file under the same name: another teacher
    torch.save(state, weights_file(models.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1))
    assert teacher_key(teacher_graph(graph, SHUFFLE_WEIGHTS)) != key


def test_a_frozen_teacher_with_replaced_head_is_fine_tuned_through_the_cache(torch_home, tmp_path, monkeypatch):
    tiny_digits(tmp_path / "tiny.npz")
    teacher = f"node t : {SHUFFLE_WEIGHTS} [frozen]\nt -> a : through"
    path = tmp_path / "g.kt"
    text = graph_text("cnn_tiny", "mlp", teacher).replace("data digits { val_split = 100 }",
                                                          'data npz { path = "tiny.npz"  val_split = 16 }')
    path.write_text(text.replace("batch = 64", "batch = 16"))
    monkeypatch.setenv("DCLANG_CACHE", str(tmp_path / "cache"))
    run = ["run", str(path), "-o", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    missing = CliRunner().invoke(main, run)
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "shufflenetv2_x0.5-f707e7126e.pth" in missing.output and str(torch_home) in missing.output
    fake_imagenet_weights(torch_home)
    result = CliRunner().invoke(main, [*run[:3], str(tmp_path / "out2"), *run[4:]])
    assert result.exit_code == 0, result.output
    fresh = "the head (1000 -> 10 classes), the stem (1-channel input) of its pre-trained weights start fresh"
    assert fresh in result.output
    cached = list((tmp_path / "cache" / "teachers").glob("*.pt"))
    assert len(cached) == 1 and torch.load(cached[0], weights_only=True)["model"] == SHUFFLE_WEIGHTS


# ---------------------------------------------------------------- timm


def test_a_timm_model_and_a_builtin_train_together_fused_equals_reference(float64):
    pytest.importorskip("timm", reason='timm is an optional extra: pip install "dclang[timm]"')
    text = graph_text("timm.test_resnet")
    assert build_model("timm.test_resnet", 3, 1, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    reference, fused = engine_step(text, "reference"), engine_step(text, "fused")
    data = batches()
    train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)


def test_timm_arguments_are_checked():
    pytest.importorskip("timm", reason='timm is an optional extra: pip install "dclang[timm]"')
    checked = check(graph_text("timm.test_resnt", "timm.test_resnet(in_chans=3, drop_rat=0.1)"))
    assert [(d.code, d.message, d.help) for d in checked.errors] == [
        ("E200", "unknown timm model `test_resnt`", "did you mean `test_resnet`?"),
        ("E221", "`in_chans` is set by dclang", "`in_chans` comes from the data; leave it out"),
        ("E221", "`timm.test_resnet` takes no argument `drop_rat`", "did you mean `drop_rate`?")]


# ---------------------------------------------------------------- dclang models


def test_models_lists_every_kind():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    from torchvision import models

    assert "    resnet32        CIFAR ResNet-32 (He et al. 2016, option A shortcuts)" in result.output
    assert f"torchvision ({len(models.list_models(module=models))}, written `torchvision.NAME`)" in result.output
    assert "mobilenet_v3_small" in result.output and "plugins (" in result.output


def test_models_describes_one_model_for_a_dataset():
    result = CliRunner().invoke(main, ["models", "torchvision.resnet18", "--data", "digits"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    expected = count_parameters(build_model("torchvision.resnet18", 10, 1, 8))
    assert lines[0] == f"torchvision.resnet18 for digits (10 classes, 1x8x8 images): {expected:,} parameters"
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    # the small-image stem keeps 8x8 through layer1; each later stage halves it (8 -> 4 -> 2 -> 1)
    assert rows["conv1"] == ["Conv2d", "64x8x8"] and rows["maxpool"] == ["Identity", "64x8x8"]
    assert rows["layer2"][-1] == "128x4x4" and rows["layer4"][-1] == "512x1x1" and rows["fc"] == ["Linear", "10"]
    wrong = CliRunner().invoke(main, ["models", "torchvision.resnt18"])
    assert wrong.exit_code == 1 and "did you mean `resnet18`?" in wrong.output and "Traceback" not in wrong.output
