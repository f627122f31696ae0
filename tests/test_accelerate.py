"""The fast paths of the fused engine (dclang.compile.accelerate) against the plain fused engine.

Exact options run in float64 and must agree with the fused engine (itself tested against the
reference engine) to rtol 1e-10 / atol 1e-12 after 4 steps across an epoch boundary: they
differ only in summation order. That covers HFTA (parameters, optimizer state and
checkpoints in the fused engine's layout) and channels-last; every step takes the path compile
and CUDA graphs take (the linear gate's weight as a device tensor). bf16 autocast rounds by design
and is held to 5e-2 of fp32 in float32. `test_compile_*_SLOW` runs the real inductor
backend (it needs gcc) on a one-`mlp` graph: tens of seconds to compile on two cores.
CUDA graphs, and bf16 and channels-last on a GPU, run only where CUDA is available.
"""

import copy
import dataclasses
import shutil
import warnings

import pytest
import torch
from fresh_python import run_in_fresh_python
from tensor_trees import assert_tree_close

import dclang.compile.accelerate as accelerate
from dclang.api import check
from dclang.compile import Engine, StepOptions, compile_graph
from dclang.compile.common import build_models

TIGHT = dict(rtol=1e-10, atol=1e-12)
CLASSES, STEPS, EPOCHS = 3, 2, 2
FIELDS = ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass")

# two groups for HFTA (a, b: cnn_tiny; c, d: mlp), a frozen cnn_tiny that is not grouped,
# every gate, T and weights, Nesterov and weight decay, a schedule step between the epochs
GRAPH = """
graph groups
data digits { }
train {
  epochs = 2
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[1], gamma=0.1)
}
node a : cnn_tiny [target]
node b : cnn_tiny
node c : mlp
node d : mlp
node t : cnn_tiny [frozen]
label -> a : through
label -> b : linear
label -> c : through ce(weight=0.5)
label -> d : correct
a -> b : correct kl(T=2)
b -> a : through
t -> a : linear kl(T=3, weight=0.7)
c -> d : through
d -> c : linear kl(T=4)
a -> c : correct
"""

ADAM_GRAPH = GRAPH.replace("sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)", "adam(lr=0.01)")


def build(options=None, text=GRAPH, device="cpu", seed=0, steps=STEPS):
    """The step with `options`; the models' own layout where they leave channels-last unset
    (on the CPU it would be on), so each option is compared with the plain fused engine."""
    checked = check(text)
    assert checked.ok, checked.errors
    options = options or StepOptions()
    if options.channels_last is None:
        options = dataclasses.replace(options, channels_last=False)
    return compile_graph(checked.graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device(device),
                         seed=seed, steps_per_epoch=steps, epochs=EPOCHS, options=options)


def batches(n=STEPS * EPOCHS, size=16, device="cpu"):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 1, 8, 8, generator=gen).to(device, torch.get_default_dtype()),
             torch.randint(0, CLASSES, (size,), generator=gen).to(device)) for _ in range(n)]


def train(step, data, first_k=1, steps=STEPS):
    stats = []
    for k, (x, y) in enumerate(data, start=first_k):
        stats.append(step.step(x, y, k))
        if k % steps == 0:
            step.end_epoch()
    return stats


def assert_same_training(got_step, got_stats, want_step, want_stats, **tol):
    """Models, optimizer state (in the fused engine's layout), schedules and every step's stats."""
    assert_tree_close(got_step.state_dict(), want_step.state_dict(), **tol)
    for got, want in zip(got_stats, want_stats):
        for field in FIELDS:
            assert_tree_close(getattr(got, field), getattr(want, field), field, **tol)
    assert got_step.lr() == want_step.lr()


@pytest.mark.parametrize("text", [GRAPH, ADAM_GRAPH], ids=["sgd", "adam"])
def test_hfta_equals_fused(text, float64):
    data = batches()
    fused, hfta = build(text=text), build(StepOptions(hfta=True), text=text)
    assert isinstance(hfta, Engine) and [[n for _, n in g.slices] for g in hfta.groups] == [["a", "b"], ["c", "d"]]
    assert_tree_close(hfta.state_dict(), fused.state_dict(), rtol=0, atol=0)
    want, got = train(fused, data), train(hfta, data)
    assert_same_training(hfta, got, fused, want, **TIGHT)


def test_hfta_nodes_are_views_of_the_fused_tensors(float64):
    hfta = build(StepOptions(hfta=True))
    group = hfta.groups[0]
    train(hfta, batches(2))
    for k, (_, name) in enumerate(group.slices):
        for key, value in group.fused.node_state_dict(k).items():
            assert torch.equal(hfta.models[name].state_dict()[key], value), f"{name}.{key}"
    weight = hfta.models["b"].state_dict()["0.weight"]
    assert weight.untyped_storage().data_ptr() == group.fused.net.state_dict()["0.weight"].untyped_storage().data_ptr()


def test_fused_and_hfta_checkpoints_are_interchangeable(float64):
    data = batches()
    fused = build()
    train(fused, data[:2])
    state = copy.deepcopy(fused.state_dict())
    want = train(fused, data[2:], first_k=3)

    resumed = build(StepOptions(hfta=True), seed=9)  # other weights: everything must come from `state`
    resumed.load_state_dict(state)
    got = train(resumed, data[2:], first_k=3)
    assert_same_training(resumed, got, fused, want, **TIGHT)

    hfta = build(StepOptions(hfta=True))
    train(hfta, data[:2])
    back = build(seed=9)
    back.load_state_dict(copy.deepcopy(hfta.state_dict()))
    assert_same_training(back, train(back, data[2:], first_k=3), fused, want, **TIGHT)


@pytest.mark.parametrize("options", [StepOptions(channels_last=True), StepOptions(hfta=True, channels_last=True)],
                         ids=lambda o: o.label)
def test_channels_last_and_the_tensor_linear_weight_equal_fused(options, float64):
    """NHWC tensors, with and without HFTA."""
    data = batches()
    fused, fast = build(), build(options)
    assert fast.options.channels_last and fast.models["a"][0].weight.is_contiguous(
        memory_format=torch.channels_last)
    want, got = train(fused, data), train(fast, data)
    assert_same_training(fast, got, fused, want, **TIGHT)


def test_bf16_autocast_stays_close_to_fp32():
    data = batches(2)
    fp32, bf16 = build(), build(StepOptions(precision="bf16"))
    want, got = train(fp32, data), train(bf16, data)
    for g, w in zip(got, want):
        assert_tree_close(g.node_loss, w.node_loss, rtol=5e-2, atol=5e-2)
    assert_tree_close(bf16.state_dict()["models"], fp32.state_dict()["models"], rtol=5e-2, atol=5e-2)
    assert next(bf16.models["a"].parameters()).dtype == torch.float32  # weights stay fp32


def test_a_failing_compile_falls_back_to_eager_and_restores_batchnorm(float64, monkeypatch):
    def broken_compile(fn, **_):
        def run(*args):
            fn(*args)  # the forward runs (BatchNorm statistics move) before the "compiler" fails
            raise RuntimeError("inductor: no C compiler")
        return run

    monkeypatch.setattr(accelerate.torch, "compile", broken_compile)
    data = batches()
    fused, fast = build(), build(StepOptions(compile=True))
    with pytest.warns(UserWarning, match="torch.compile failed, running the step eagerly: RuntimeError"):
        got = train(fast, data)
    assert_same_training(fast, got, fused, train(fused, data), **TIGHT)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C compiler")
def test_compile_equals_fused_and_compiles_once_SLOW():
    # in its own Python: a compiler that crashes (SIGABRT on torch 2.13.0+cpu) fails this test, not the suite
    run_in_fresh_python(compile_equals_fused_and_compiles_once)


def compile_equals_fused_and_compiles_once() -> None:
    """The body of the test above, run in a fresh process (so in float64 without the fixture)."""
    torch.set_default_dtype(torch.float64)
    text = """
graph one
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node a : mlp [target]
label -> a : linear
"""
    data = batches()
    for last in (1, 3):  # each epoch ends with a partial batch, run eagerly rather than recompiled
        data[last] = (data[last][0][:5], data[last][1][:5])
    fused, fast = build(text=text), build(StepOptions(compile=True), text=text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile fallback would warn
        got = [fast.step(*data[0], 1)]
        with torch._dynamo.config.patch(error_on_recompile=True):  # k and the last batch change, the graph must not
            got += train(fast, data[1:], first_k=2)
    assert_same_training(fast, got, fused, train(fused, data), rtol=1e-9, atol=1e-12)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        StepOptions(precision="fp8")
    with pytest.raises(ValueError, match="step options apply to the fused engine, not 'reference'"):
        checked = check(GRAPH)
        compile_graph(checked.graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                      engine="reference", steps_per_epoch=1, epochs=1, options=StepOptions(channels_last=True))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            build(StepOptions(cuda_graph=True))
    assert StepOptions(hfta=True, compile=True, precision="bf16").label == "fused+hfta+compile+bf16"
    assert build(StepOptions()).label == "fused"


def test_channels_last_is_on_by_default_for_convolutions_on_the_cpu():
    mlp_only = check(GRAPH.replace("cnn_tiny", "mlp")).graph
    for text, device, want in [(GRAPH, "cpu", True), (GRAPH.replace("cnn_tiny", "mlp"), "cpu", False),
                               (GRAPH, "cuda", False)]:
        models = build_models(check(text).graph, num_classes=3, in_channels=1, image_size=8,
                              device=torch.device("cpu"), init_states=None, seed=0)
        assert StepOptions().resolve(torch.device(device), models).channels_last is want, (text[:20], device)
        assert StepOptions(channels_last=not want).resolve(torch.device(device), models).channels_last is not want
    default = compile_graph(check(GRAPH).graph, num_classes=3, in_channels=1, image_size=8,
                            device=torch.device("cpu"), steps_per_epoch=1, epochs=1)
    assert default.label == "fused+channels_last"
    plain = compile_graph(mlp_only, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                          steps_per_epoch=1, epochs=1)
    assert plain.label == "fused"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("options", [StepOptions(cuda_graph=True), StepOptions(cuda_graph=True, hfta=True),
                                     StepOptions(channels_last=True)], ids=lambda o: o.label)
def test_cuda_paths_equal_fused(options, no_tf32):
    """float32 on the GPU, TF32 off (`no_tf32`: TF32 rounds products to ~1e-3, and differently
    per layout): 1e-4 (cuDNN picks other algorithms for other layouts). 8 steps:
    3 eager warm-up, capture at the 4th, recapture at the 5th (the lr dropped after the 4th),
    replays, and a smaller last batch run eagerly beside the graph."""
    data = batches(8, device="cuda")
    data[-1] = (data[-1][0][:9], data[-1][1][:9])
    fused, fast = build(device="cuda", steps=4), build(options, device="cuda", steps=4)
    want, got = train(fused, data, steps=4), train(fast, data, steps=4)
    assert_same_training(fast, got, fused, want, rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_bf16_stays_close_to_fp32():
    data = batches(8, device="cuda")
    fp32 = build(device="cuda", steps=4)
    bf16 = build(StepOptions(precision="bf16", cuda_graph=True), device="cuda", steps=4)
    want, got = train(fp32, data, steps=4), train(bf16, data, steps=4)
    for g, w in zip(got, want):
        assert_tree_close(g.node_loss, w.node_loss, rtol=5e-2, atol=5e-2)


def test_an_hfta_step_dispatches_as_many_operations_for_eight_nodes_as_for_two():
    """The GPU goal's kernel launches, counted on the CPU: with same-architecture nodes fused
    (HFTA) and each group of edges computed as one tensor, a step of K mutually learning
    nodes (K(K-1) + K edges) dispatches a constant number of computing operations, plus two
    per node (its loss is the sum of its edges', eq. 3)."""
    from dclang.bench import count_ops

    def ops(k, options):
        nodes = "\n".join(f"node m{i} : cnn_tiny" + (" [target]" if i == 1 else "") for i in range(1, k + 1))
        graph = check(f"graph g\ndata digits {{ }}\n{nodes}\nedges * -> * : through\n").graph
        step = compile_graph(graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                             steps_per_epoch=4, epochs=1, options=options)
        (x, y), = batches(1)
        step.step(x, y, 1)
        return count_ops(lambda k: step.step(x, y, k), 2)

    hfta = StepOptions(hfta=True, channels_last=False)
    assert ops(8, hfta) - ops(2, hfta) <= 2 * 6
    plain = StepOptions(channels_last=False)
    assert ops(8, plain) - ops(2, plain) > 6 * 20  # separate models: each node's layers dispatch again


class FakeCapture:
    """`accelerate.CapturedStep` on the CPU: records each capture and replays by running the
    engine's step eagerly, so the engine's capture logic runs around a real step."""

    made: list[list[tuple]] = []

    def __init__(self, engine, images, labels, ks):
        FakeCapture.made.append([tuple(x.shape) for x in images])
        self.engine, self.images, self.labels = engine, images, labels

    def fits(self, images, labels):
        return all(x.shape == s.shape and x.stride() == s.stride() for x, s in zip(images, self.images)) and all(
            y.shape == s.shape for y, s in zip(labels, self.labels))

    def replay(self, images, labels, ks):
        return self.engine._eager_step(images, labels, ks)


def test_a_step_is_captured_after_the_warm_up_and_again_when_the_learning_rate_changes(float64, monkeypatch):
    """The CUDA-graph logic on the CPU, with a capture that records: three eager warm-up
    steps, a capture at the fourth, replays, an epoch's short last batch run eagerly (no
    capture for it), a capture again after the schedule moved the learning rate (an engine of
    one graph holds it as a number); and the numbers are the plain engine's."""
    monkeypatch.setattr(accelerate, "CapturedStep", FakeCapture)
    FakeCapture.made = []
    data = batches(8)
    data[3] = (data[3][0][:9], data[3][1][:9])  # the first epoch's last batch is short
    fused, fast = build(steps=4), build(steps=4)
    fast.options = dataclasses.replace(fast.options, cuda_graph=True)  # CUDA only otherwise
    want, got = train(fused, data, steps=4), []
    for k, (x, y) in enumerate(data, start=1):
        got.append(fast.step(x, y, k))
        assert len(FakeCapture.made) == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1, 8: 1}[k], k
        if k % 4 == 0:
            fast.end_epoch()  # the step schedule: lr * 0.1 after epoch 1
    assert FakeCapture.made == [[(16, 1, 8, 8)]]  # made at the 5th step, after the rate moved
    assert_same_training(fast, got, fused, want, **TIGHT)
