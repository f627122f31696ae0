"""Choosing the fast paths on a GPU (`dclang.compile.autotune`), the TF32 policy
(`dclang.compile.tf32`), and what went wrong on an H200 held on the CPU: inference tensors in
a step, layer captures outliving their step, a compile failure followed by an eager one.

The measurement runs on CUDA only; here it runs on the CPU (`AUTOTUNE_DEVICES` widened), with
the real steps and, where the choice itself is tested, a timer that reports given times
(speed is measured in benchmarks, never in tests)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import dclang.compile.accelerate as accelerate
from dclang.api import check
from dclang.cli import main
from dclang.compile import StepOptions, compile_graph
from dclang.compile import autotune as tuning
from dclang.compile.tf32 import set_tf32, tf32, tf32_enabled
from dclang.data import load_dataset
from dclang.diagnostics import UserError
from dclang.train.loop import train_graph

# two cnn_tiny nodes (HFTA groups them), a frozen one, an edge between layers
GRAPH = """
graph tune
data digits { val_split = 300 }
train {
  epochs = 1
  batch = 32
  optimizer = sgd(lr=0.05, momentum=0.9)
}
node a : cnn_tiny [target]
node b : cnn_tiny
node t : cnn_tiny [frozen]
label -> a : through
label -> b : through
b -> a : linear
a -> b : correct kl(T=2)
t.conv2 -> a.conv2 : through at(p=2)
"""


def graph(text: str = GRAPH):
    checked = check(text, "<test>")
    assert checked.ok, checked.errors
    return checked.graph


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=300, split_seed=0)


@pytest.fixture(autouse=True)
def fresh_choices():
    tuning._CHOSEN.clear()
    yield
    tuning._CHOSEN.clear()


def build(options: StepOptions, text: str = GRAPH):
    return compile_graph(graph(text), num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                         seed=0, steps_per_epoch=4, epochs=1, options=options)


def batches(n: int = 2):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(n)]


# ---------------------------------------------------------------- TF32


def test_tf32_switches_convolutions_and_matrix_products_together_and_the_block_restores_them():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32(True):
        assert tf32_enabled() and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with tf32(False):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert tf32_enabled()
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("flag, want", [([], True), (["--no-tf32"], False)])
def test_dclang_run_sets_tf32(tmp_path, flag, want):
    kt = tmp_path / "one.kt"
    kt.write_text("graph one\ndata digits { val_split = 300 }\ntrain { epochs = 1\n batch = 256 }\n"
                  "node a : mlp [target]\nlabel -> a : through\n")
    with tf32(not want):  # the flag, not what the process had, decides
        done = CliRunner().invoke(main, ["run", str(kt), "-o", str(tmp_path / "run"), "--device", "cpu",
                                         "--no-progress", *flag])
        assert done.exit_code == 0, done.output
        assert tf32_enabled() is want
        set_tf32(not want)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tf32"] is None  # recorded on CUDA only


# ---------------------------------------------------------------- candidates and the choice


def test_candidates_are_the_options_valid_for_the_graph():
    labels = [o.label for o in tuning.candidates(graph(), torch.device("cuda"), convolutional=True)]
    assert labels[0] == "fused" and len(labels) == len(set(labels)) == 16
    assert "fused+hfta+bf16+channels_last+cudagraph" in labels and "fused+cudagraph" in labels
    assert not any("compile" in label for label in labels)
    on_cpu = tuning.candidates(graph(), torch.device("cpu"), convolutional=True)
    assert [o.label for o in on_cpu] == ["fused", "fused+channels_last", "fused+hfta", "fused+hfta+channels_last"]
    lone_mlp = graph("graph m\ndata digits { }\nnode a : mlp [target]\nlabel -> a : through\n")
    assert [o.label for o in tuning.candidates(lone_mlp, torch.device("cuda"), convolutional=False)] == [
        "fused", "fused+bf16", "fused+cudagraph", "fused+bf16+cudagraph"]
    fp32_only = tuning.candidates(graph(), torch.device("cuda"), convolutional=True, precision="fp32")
    assert len(fp32_only) == 8 and all(o.precision == "fp32" for o in fp32_only)  # --precision fp32 narrows
    assert tuning.applies(torch.device("cuda")) and not tuning.applies(torch.device("cpu"))


def test_autotune_takes_the_fastest_that_works_and_says_so():
    """The timer reports given times; a candidate that fails to build is named, not chosen."""
    given = {"fused": 0.040, "fused+channels_last": 0.036, "fused+hfta": 0.010, "fused+hfta+channels_last": 0.020}
    built: list[str] = []

    def build_noting(options):
        built.append(options.label)
        if options.label == "fused+hfta":
            raise RuntimeError("no fused kernel here")
        return build(options)

    def timer(run, device):
        run()
        return given[built[-1]]

    before = torch.get_rng_state()
    tuned = tuning.autotune(graph(), build_noting, batches(), device=torch.device("cpu"), timer=timer, warmup=1,
                            steps=2)
    assert tuned.options.label == "fused+hfta+channels_last"
    assert tuned.seconds == {k: v for k, v in given.items() if k != "fused+hfta"}
    assert tuned.failed == {"fused+hfta": "RuntimeError: no fused kernel here"}
    line = tuned.line()
    assert line.startswith("autotune: fused+hfta+channels_last") and "fused 40.0" in line and "--no-autotune" in line
    assert torch.equal(torch.get_rng_state(), before)
    again = tuning.autotune(graph(), build_noting, batches(), device=torch.device("cpu"), timer=timer)
    assert again.options == tuned.options and not again.measured  # once per architecture mix in a process
    other_gate = graph(GRAPH.replace("b -> a : linear", "b -> a : correct"))
    assert not tuning.autotune(other_gate, build_noting, batches(), device=torch.device("cpu"), timer=timer).measured
    mlp_b = GRAPH.replace("node b : cnn_tiny", "node b : mlp")
    assert tuning.autotune(graph(mlp_b), lambda options: build(options, text=mlp_b), batches(),
                           device=torch.device("cpu"), timer=lambda run, device: 1.0, warmup=1, steps=1).measured


def test_training_after_the_measurement_is_the_training_with_the_chosen_options(digits, monkeypatch):
    """Every record and every final weight equal, bit for bit, to a run given the chosen options."""
    monkeypatch.setattr(tuning, "AUTOTUNE_DEVICES", ("cuda", "cpu"))

    def run(**kwargs):
        result = train_graph(graph(), run_dir=None, device="cpu", dataset=digits, progress=False, **kwargs)
        return [r["nodes"] for r in result.records], result.summary["step"]

    tuned_records, tuned_label = run(autotune=True)
    (chosen,) = tuning._CHOSEN.values()
    given_records, given_label = run(options=chosen.options)
    assert tuned_label == given_label == chosen.options.label
    assert tuned_records == given_records


def test_dclang_run_measures_without_fast_path_flags_and_not_with_one(tmp_path, monkeypatch):
    from dclang.train.command import fast_paths_given

    assert fast_paths_given(StepOptions()) == fast_paths_given(StepOptions(precision="bf16")) == []
    assert fast_paths_given(StepOptions(channels_last=False, cuda_graph=True)) == [
        "--channels-last/--no-channels-last", "--cuda-graph"]
    monkeypatch.setattr(tuning, "AUTOTUNE_DEVICES", ("cuda", "cpu"))
    kt = tmp_path / "tune.kt"
    kt.write_text(GRAPH.replace("batch = 32", "batch = 256"))
    runner = CliRunner()
    for i, (flags, measured) in enumerate([([], True), (["--hfta"], False), (["--no-autotune"], False)]):
        out = tmp_path / f"run{i}"
        done = runner.invoke(main, ["run", str(kt), "-o", str(out), "--device", "cpu", *flags])
        assert done.exit_code == 0, done.output
        lines = [line for line in done.stderr.splitlines() if line.startswith("autotune: ")]
        step = json.loads((out / "summary.json").read_text())["step"]
        assert bool(lines) is measured, (flags, done.stderr)
        if measured:
            assert lines[0].startswith(f"autotune: {step}, the fastest")


# ---------------------------------------------------------------- what went wrong on the GPU, held on the CPU


@pytest.mark.parametrize("options", [StepOptions(precision="bf16", channels_last=False),
                                     StepOptions(precision="bf16", hfta=True, channels_last=True)],
                         ids=lambda o: o.label)
def test_bf16_weights_cast_at_once_compute_what_autocast_computes_in_fewer_operations(options):
    """The same training bit for bit as autocast casting each weight on its own (both round to
    nearest), with about fp32's operation count instead of two more per weight tensor: why
    bf16 was slower than fp32 on a launch-bound GPU."""
    from dclang.bench import count_ops

    at_once, per_op = build(options), build(options)
    per_op.bf16_weights = None  # autocast alone
    assert at_once.bf16_weights is not None and len(at_once.bf16_weights.fp32) > 0
    data = batches(3)
    for k, (x, y) in enumerate(data[:2], start=1):
        got, want = at_once.step(x, y, k), per_op.step(x, y, k)
        assert torch.equal(torch.stack(list(got.node_loss.values())), torch.stack(list(want.node_loss.values())))
    for name, model in per_op.models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(at_once.models[name].state_dict()[key], value), (name, key)
    assert all(p.dtype == torch.float32 for p in at_once.optimizer.param_groups[0]["params"])
    x, y = data[2]
    fp32 = build(StepOptions(channels_last=options.channels_last, hfta=options.hfta))
    fp32.step(x, y, 1)
    ops = {name: count_ops(lambda k, s=step: s.step(x, y, k), 3)
           for name, step in (("at_once", at_once), ("per_op", per_op), ("fp32", fp32))}
    weights = len(at_once.bf16_weights.fp32)
    assert ops["at_once"] <= ops["per_op"] - weights, ops  # at least one operation less per weight tensor
    assert ops["at_once"] <= ops["fp32"] + 30, ops


def test_a_frozen_node_computes_ordinary_tensors_in_a_step():
    """Not inference tensors: autograd may not save those, and torch.compile's tracing breaks on
    inference mode inside the step (the kd_dml --compile failure on an H200)."""
    for options in (StepOptions(channels_last=False), StepOptions(hfta=True, channels_last=False)):
        step = build(options)
        logits = step.forward(batches(1)[0][0])
        assert not logits["t"].is_inference() and not logits["t"].requires_grad
        assert logits["a"].requires_grad


def test_no_layer_capture_outlives_its_step():
    """A captured layer holds its forward's autograd graph, and each parameter's AccumulateGrad
    node with it; kept into the next step, a CUDA graph's warm-up crosses streams (torch's
    "AccumulateGrad node's stream does not match" warning on `attention.kt --cuda-graph`)."""
    step = build(StepOptions(precision="bf16", channels_last=False))  # an accelerated step on the CPU
    images, labels = batches(1)[0]
    step.step(images, labels, 1)
    assert step.layers.features == {}


def leaky_compile(fn, **_):
    """A compiler whose failed trace leaves torch's thread state behind, as torch 2.11's did on an
    H200: the Python dispatcher's key included (every later operation then fails with
    "PythonDispatcherTLS was not set"), and autograd switched off."""
    def run(*args):
        torch._C._dispatch_tls_set_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher, True)
        torch._C._set_grad_enabled(False)
        raise RuntimeError("Inference tensors cannot be saved for backward")
    return run


def test_a_compile_failure_that_leaves_torch_state_behind_still_falls_back_to_the_eager_step(monkeypatch):
    monkeypatch.setattr(accelerate.torch, "compile", leaky_compile)
    step, plain = build(StepOptions(compile=True, channels_last=False)), build(StepOptions(channels_last=False))
    data = batches(2)
    with pytest.warns(UserWarning, match="torch.compile failed, running the step eagerly: RuntimeError: Inference"):
        got = [step.step(x, y, k) for k, (x, y) in enumerate(data, start=1)]
    want = [plain.step(x, y, k) for k, (x, y) in enumerate(data, start=1)]
    assert torch.is_grad_enabled()
    assert not torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher)
    for g, w in zip(got, want):
        assert torch.equal(torch.stack(list(g.node_loss.values())), torch.stack(list(w.node_loss.values())))
    for name, model in plain.models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(step.models[name].state_dict()[key], value), (name, key)


def test_a_step_failing_compiled_and_eager_is_a_user_error(monkeypatch):
    """A step that fails for a reason of its own (images of the wrong shape) fails the compiled
    attempt and the eager one: the user is told both, not shown a traceback."""
    monkeypatch.setattr(accelerate.torch, "compile", lambda fn, **_: fn)
    step = build(StepOptions(compile=True, channels_last=False))
    images, labels = batches(1)[0]
    with pytest.warns(UserWarning, match="torch.compile failed"), pytest.raises(UserError) as caught:
        step.step(images.expand(-1, 3, -1, -1), labels, 1)
    assert caught.value.message.startswith("torch.compile failed (RuntimeError: ")
    assert "and the eager step after it failed too" in caught.value.message and "--compile" in caught.value.hint


# ---------------------------------------------------------------- on a GPU (benchmarks/gpu.sh runs these)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build_cuda(options: StepOptions):
    return compile_graph(graph(), num_classes=10, in_channels=1, image_size=8, device=torch.device("cuda"),
                         seed=0, steps_per_epoch=100, epochs=1, options=options)


@cuda
def test_cuda_autotune_times_every_candidate_and_leaves_the_random_streams():
    """Every combination (HFTA, channels-last, CUDA graphs, bf16) builds, captures
    and steps on this graph with a frozen node and an edge between layers."""
    data = [(x.cuda(), y.cuda()) for x, y in batches(2)]
    before = torch.cuda.get_rng_state(), torch.get_rng_state()
    tuned = tuning.autotune(graph(), build_cuda, data, device=torch.device("cuda"), warmup=tuning.WARMUP, steps=2)
    assert tuned.failed == {}
    assert len(tuned.seconds) == 16 and tuned.options.label in tuned.seconds
    assert torch.equal(torch.cuda.get_rng_state(), before[0]) and torch.equal(torch.get_rng_state(), before[1])


@cuda
def test_cuda_graph_steps_with_layer_edges_warn_nothing():
    """The warm-up and the capture on one side stream, no captured layer kept past its step:
    no "AccumulateGrad node's stream does not match" warning (`attention.kt --cuda-graph`)."""
    import warnings

    step = build_cuda(StepOptions(cuda_graph=True, channels_last=False))
    data = [(x.cuda(), y.cuda()) for x, y in batches(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(1, 8):
            step.step(*data[k % 2], k)
    assert step.graph is not None
