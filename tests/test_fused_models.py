"""Tests for horizontal fusion (dclang.models.fused): K fused models must compute, train and
keep statistics exactly as the K separate models do.

Tolerances: the fused network does the same arithmetic per output element, but grouped and
batched kernels may sum in another order, so agreement is to rounding: forwards within
atol 1e-10 in float64 and 1e-5 in float32; parameters and BatchNorm buffers after SGD/Adam
steps within atol 1e-10 in float64. Copies between fused and separate form (fusing,
``unfuse_into``, ``node_state_dict``) move tensors unchanged, so they are checked bitwise.
Inputs are 8x8, batch 4, to keep the whole file within seconds on a CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dclang.models import BUILDERS, WideResNet, build_model
from dclang.models.fused import FusedModel, fuse_models, stack_inputs

ARCHS = ["resnet20", "wrn16_2", "cnn_tiny", "cnn_small", "mlp"]
CLASSES, CHANNELS, SIZE, BATCH = 10, 3, 8, 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_models(name: str, k: int, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    """K models initialised from different seeds, with BatchNorm affine parameters, running
    statistics and counters and the classifier bias randomised too (the builders set them to
    constants, which would hide a mix-up between nodes)."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model(name, CLASSES, CHANNELS, SIZE).to(dtype)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.num_batches_tracked.fill_(seed)
                elif isinstance(m, nn.Linear):
                    m.bias.normal_(0, 0.1)
        models.append(model)
    return models


def batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen, dtype=dtype)
    return x, torch.randint(0, CLASSES, (BATCH,), generator=gen)


def assert_same_state(fused: FusedModel, models: list[nn.Module], atol: float) -> None:
    for k, model in enumerate(models):
        node = fused.node_state_dict(k)
        state = model.state_dict()
        assert node.keys() == state.keys()
        for name, t in state.items():
            torch.testing.assert_close(node[name], t, rtol=0, atol=atol, msg=f"node {k} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_equals_separate_models(name, k, train, dtype):
    models = make_models(name, k, dtype)
    fused = fuse_models(models).train(train)
    for m in models:
        m.train(train)
    x, _ = batch(dtype)
    with torch.no_grad():
        out = fused(x)
        expected = torch.stack([m(x) for m in models])
    assert out.shape == (k, BATCH, CLASSES)
    torch.testing.assert_close(out, expected, rtol=0, atol=TOL[dtype])
    # In train mode the forward also moved the running statistics and counters.
    assert_same_state(fused, models, atol=TOL[dtype])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ARCHS)
def test_each_node_reading_its_own_input_equals_separate_models(name, k):
    """Without a shared input (packed trials: each node reads its own trial's batch), node k's
    logits, gradients and running statistics are model k's on batch k."""
    models = make_models(name, k)
    fused = fuse_models(models, shared_input=False)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) for _ in range(k)]
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    out = fused(stack_inputs(xs))
    expected = torch.stack([m(x) for m, x in zip(models, xs)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    sum_of_node_losses(out, y).backward()
    F.cross_entropy(expected.flatten(0, 1), y.repeat(k), reduction="sum").div(BATCH).backward()
    grads = dict(fused.net.named_parameters())
    for i, model in enumerate(models):
        for pname, p in model.named_parameters():
            got = grads[pname].grad.view(k, *fused.node_shapes[pname])[i]
            torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-10, msg=f"node {i} {pname}")
    assert_same_state(fused, models, atol=1e-10)  # running statistics: one forward each


@pytest.mark.parametrize("shared_input", [True, False], ids=["shared", "own_inputs"])
@pytest.mark.parametrize("name", ARCHS)
def test_every_layer_of_a_fused_node_is_its_own_models_layer(name, shared_input):
    """What edges between layers read under HFTA: each layer of the fused network, cut to node
    k's part (`FusedModel.node_output`), equals that layer of model k, for every layer name
    the model has (the classifier, element-wise layers before the first convolution included)."""
    from dclang.models.taps import LayerCapture, layer_names

    k = 3
    models = make_models(name, k)
    fused = fuse_models(models, shared_input=shared_input)
    names = layer_names(models[0])
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64) for _ in range(k)]
    if shared_input:
        xs = [xs[0]] * k
    nodes = {f"n{i}": m for i, m in enumerate(models)}
    wanted = [(node, layer) for node in nodes for layer in names]
    with LayerCapture(nodes, wanted) as alone, torch.no_grad():
        for model, x in zip(nodes.values(), xs):
            model(x)
    with LayerCapture(nodes, wanted, fused={f"n{i}": (fused, i) for i in range(k)}) as inside, torch.no_grad():
        fused(xs[0] if shared_input else stack_inputs(xs))
    assert set(inside.features) == set(alone.features) == set(wanted)
    for key, want in alone.features.items():
        torch.testing.assert_close(inside.features[key], want, rtol=0, atol=1e-10, msg=str(key))


@pytest.mark.parametrize("name", sorted(n for n in set(BUILDERS) - set(ARCHS) - {"wrn28_4", "wrn28_10"}
                                         if not n.endswith("_tiny")))
def test_other_depths_and_widths_fuse(name):
    """The remaining registered ResNet depths and WRN shapes, K=2 (the ``_tiny`` aliases build
    the same networks; WRN-28-4 and WRN-28-10 are left out for their 5.8M and 36M parameters)."""
    torch.manual_seed(0)
    models = [build_model(name, CLASSES, CHANNELS, SIZE) for _ in range(2)]
    fused = fuse_models(models)
    x, _ = batch(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.stack([m(x) for m in models]), rtol=0, atol=1e-5)


def test_wrn_with_dropout_fuses():
    """Dropout masks are drawn per element, as K models would draw them: equal in distribution,
    so only eval mode (dropout off) can be compared exactly; train mode must still run."""
    torch.manual_seed(0)
    models = [WideResNet(10, 1, CLASSES, CHANNELS, dropout_rate=0.3).double().eval() for _ in range(2)]
    fused = fuse_models(models)
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.stack([m(x) for m in models]), rtol=0, atol=1e-10)
        assert fused.train()(x).shape == (2, BATCH, CLASSES)


def sum_of_node_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over nodes of each node's mean cross-entropy: node k's gradient is its own loss's."""
    return sum(F.cross_entropy(node_logits, labels) for node_logits in logits)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", ARCHS)
def test_sgd_steps_equal_separate_training(name, k):
    """Two Nesterov SGD steps with weight decay: one foreach optimizer over the fused
    parameters against one optimizer per separate model."""
    models = make_models(name, k)
    fused = fuse_models(models)
    x, y = batch()
    args = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused_opt = torch.optim.SGD(fused.parameters(), **args, foreach=True)
    opts = [torch.optim.SGD(m.parameters(), **args, foreach=False) for m in models]
    for step in range(2):
        xs = x + 0.1 * step
        fused_opt.zero_grad()
        sum_of_node_losses(fused(xs), y).backward()
        fused_opt.step()
        for model, opt in zip(models, opts):
            opt.zero_grad()
            F.cross_entropy(model(xs), y).backward()
            opt.step()
    assert_same_state(fused, models, atol=1e-10)


def test_adam_steps_equal_separate_training():
    models = make_models("cnn_tiny", 3)
    fused = fuse_models(models)
    x, y = batch()
    fused_opt = torch.optim.Adam(fused.parameters(), lr=1e-2, weight_decay=1e-4, foreach=True)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4) for m in models]
    for _ in range(3):
        fused_opt.zero_grad()
        sum_of_node_losses(fused(x), y).backward()
        fused_opt.step()
        for model, opt in zip(models, opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert_same_state(fused, models, atol=1e-10)


@pytest.mark.parametrize("name", ARCHS)
def test_unfuse_round_trip_is_exact(name):
    models = make_models(name, 3)
    originals = [{n: t.clone() for n, t in m.state_dict().items()} for m in models]
    fused = fuse_models(models)
    # Fusing copies: the fused tensors do not alias the models'.
    assert all(not any(p.data_ptr() == q.data_ptr() for q in models[0].parameters())
               for p in fused.parameters())
    targets = make_models(name, 6)[3:]  # other values, same architecture
    fused.unfuse_into(targets)
    for target, original in zip(targets, originals):
        state = target.state_dict()
        assert all(torch.equal(state[n], t) for n, t in original.items())
    refused = fuse_models(targets)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), refused.state_dict().values()))


def test_node_state_dict_views_write_through():
    models = make_models("resnet20", 2)
    fused = fuse_models(models)
    node = fused.node_state_dict(1)
    assert node["fc.weight"].shape == models[1].fc.weight.shape
    assert node["stem.1.num_batches_tracked"].shape == ()
    node["fc.bias"].fill_(7.0)
    assert torch.all(fused.net.fc.bias[1] == 7.0) and not torch.any(fused.net.fc.bias[0] == 7.0)
    with pytest.raises(IndexError):
        fused.node_state_dict(2)


def test_fused_parameters_are_leaves_and_copy_requires_grad():
    models = make_models("cnn_tiny", 2)
    fused = fuse_models(models)
    assert all(isinstance(p, nn.Parameter) and p.is_leaf and p.requires_grad for p in fused.parameters())
    for m in models:
        m.requires_grad_(False)
    assert not any(p.requires_grad for p in fuse_models(models).parameters())


def test_train_eval_mode_propagates():
    models = make_models("wrn16_2", 2)
    for m in models:
        m.eval()
    fused = fuse_models(models)
    assert not fused.training and not any(m.training for m in fused.modules())
    fused.train()
    assert all(m.training for m in fused.modules())
    fused.eval()
    assert not any(m.training for m in fused.modules())


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("model, arch", [
    (TwoBranch(), "TwoBranch"),
    (nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2)), "Conv1d"),
    (nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), "final Linear"),
    (nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Linear(8, 8), nn.Linear(8, 2)), "Linear layer inside"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)), "stateful"),
])
def test_unsupported_architectures_raise(model, arch):
    with pytest.raises(NotImplementedError, match=arch):
        fuse_models([model, model])


def test_models_that_differ_do_not_fuse():
    with pytest.raises(ValueError):
        fuse_models([build_model("resnet20", 10), build_model("resnet32", 10)])
    with pytest.raises(ValueError):
        fuse_models([build_model("cnn_tiny", 10), build_model("cnn_tiny", 10).eval()])
    with pytest.raises(ValueError):
        fuse_models([])
