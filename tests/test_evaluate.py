"""Evaluation (dclang/compile/evaluate.py, dclang/train/evaluate.py): its counts against each
model's own forward, what it forwards, what a run evaluates when, and resuming exactly.

Counts are compared with an independent computation (a copy of each model, a plain forward,
argmax; the ensembles' formulas written out here) in float64, where a fused forward and a
separate one agree to rounding: counts must be equal, cross-entropy sums to 1e-10.
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dclang.api import check
from dclang.checkpoints import atomic_save, load_safely, node_checkpoint
from dclang.compile import StepOptions, compile_graph
from dclang.compile.evaluate import evaluate_nodes, tensor_batches
from dclang.data import Split, load_dataset, normalize
from dclang.train import RunDir, train_graph
from dclang.train.evaluate import EpochEvaluation, constant_nodes
from dclang.train.metrics import TIMING_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CLASSES = 3

# a, b: one HFTA group; c alone; t frozen (never grouped); e, f ensembles over both kinds
GRAPH = """
graph evaluated
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node a : cnn_tiny [target]
node b : cnn_tiny
node c : mlp
node t : cnn_tiny [frozen]
node e : ensemble(a, c)
node f : ensemble(b, t) [combine=mean_probs]
label -> a : through
label -> b : through
label -> c : through
t -> a : linear kl(T=2)
e -> b : through kl(T=2)
"""

OPTIONS = {"fused": StepOptions(channels_last=False), "hfta": StepOptions(hfta=True, channels_last=False),
           "hfta+channels_last": StepOptions(hfta=True, channels_last=True)}


def graph_of(text: str):
    checked = check(textwrap.dedent(text))
    assert checked.ok, checked.diagnostics
    return checked.graph


def trained_step(options: StepOptions):
    """The graph's step after two updates (weights and BatchNorm statistics off their start)."""
    step = compile_graph(graph_of(GRAPH), num_classes=CLASSES, in_channels=1, image_size=8,
                         device=torch.device("cpu"), seed=0, steps_per_epoch=2, epochs=2, options=options)
    gen = torch.Generator().manual_seed(3)
    for k in (1, 2):
        step.step(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, CLASSES, (16,), generator=gen), k)
    return step


def forwards(modules: dict[str, torch.nn.Module]) -> dict[str, list[int]]:
    """Per module, the batch size of every forward it runs from now on (forward hooks)."""
    calls: dict[str, list[int]] = {name: [] for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(len(args[0])))
    return calls


@pytest.mark.parametrize("variant", list(OPTIONS))
def test_counts_and_losses_equal_each_models_own_forward(variant, float64):
    step = trained_step(OPTIONS[variant])
    gen = torch.Generator().manual_seed(4)
    images, labels = torch.randn(37, 1, 8, 8, generator=gen), torch.randint(0, CLASSES, (37,), generator=gen)
    with torch.no_grad():
        z = {n: copy.deepcopy(step.models[n]).eval()(images) for n in "abct"}
    z["e"] = (z["a"] + z["c"]) / 2
    z["f"] = torch.log((torch.softmax(z["b"], dim=1) + torch.softmax(z["t"], dim=1)) / 2)

    names = ["a", "b", "c", "t", "e", "f"]
    calls = forwards({**step.models, **({"fused": step.groups[0].fused} if variant != "fused" else {})})
    sums = evaluate_nodes(step, tensor_batches(images, labels, 10, step.device), names, with_loss=True)
    assert sums.samples == 37
    assert sums.correct.tolist() == [int((z[n].argmax(dim=1) == labels).sum()) for n in names]
    assert sums.loss.tolist() == pytest.approx([F.cross_entropy(z[n], labels, reduction="sum").item()
                                                for n in names], rel=1e-10)
    accuracy, loss = sums.read()
    assert accuracy == {n: int((z[n].argmax(dim=1) == labels).sum()) / 37 for n in names}
    if variant == "fused":
        assert {n: len(calls[n]) for n in "abct"} == dict.fromkeys("abct", 4)  # 4 batches: 10, 10, 10, 7
    else:  # the group runs fused, once per batch, as the step trains it; its members never alone
        assert (calls["fused"], calls["a"], calls["b"]) == ([10, 10, 10, 7], [], [])
    assert step.training and [m.training for m in step.models.values()] == [True, True, True, False]


def test_only_the_networks_the_asked_nodes_need_are_forwarded(float64):
    step = trained_step(OPTIONS["fused"])
    images, labels = torch.randn(12, 1, 8, 8), torch.randint(0, CLASSES, (12,))
    calls = forwards(step.models)
    sums = evaluate_nodes(step, tensor_batches(images, labels, 12, step.device), ["e"])
    assert {n: len(c) for n, c in calls.items()} == {"a": 1, "b": 0, "c": 1, "t": 0}  # e = ensemble(a, c)
    assert sums.loss is None and sums.read()[1] is None


def test_constant_nodes_are_the_frozen_ones_and_ensembles_of_them():
    graph = graph_of(GRAPH + "node u : mlp [frozen]\nnode g : ensemble(t, u)\n"
                             "node h : ensemble(g, u) [combine=mean_probs]\nnode i : ensemble(h, a)\n"
                             "g -> a : through\nh -> a : through\ni -> b : through\n")
    assert constant_nodes(graph) == {"t", "u", "g", "h"}


# ---------------------------------------------------------------- what a run evaluates when


EPOCHS_GRAPH = """
graph lean
data digits { val_split = 100 }
train { epochs = 3  batch = 64  optimizer = sgd(lr=0.1) }
node s : cnn_tiny [target]
node t : mlp [frozen]
node u : cnn_tiny [frozen]
node c : ensemble(t, u)
label -> s : through
c -> s : through
"""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=100, split_seed=0)


def test_a_frozen_node_is_evaluated_once_and_test_only_for_selected_weights(digits):
    """Nothing is trained between the epochs here, so val never improves after the first:
    test is evaluated in the first epoch (the first selection) and the last; val every
    epoch; the frozen `t` (and its ensemble `c`) in the first epoch only, its figures carried."""
    graph = graph_of(EPOCHS_GRAPH)
    step = compile_graph(graph, num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                         seed=0, steps_per_epoch=1, epochs=3)
    evaluation = EpochEvaluation(step, graph, val=digits.val, test=digits.test, mean=digits.mean, std=digits.std,
                                 epochs=3, batch=64)
    calls = forwards(step.models)
    figures = [evaluation.after_epoch(epoch) for epoch in (1, 2, 3)]
    val, test = [64, 36], [64] * 5 + [40]  # 100 and 360 images, in batches of 64 on the CPU
    assert calls == {"s": val + test + val + val + test, "t": val + test, "u": val + test}
    assert [f["s"]["test_acc"] is None for f in figures] == [False, True, False]
    assert figures[0]["s"]["test_acc"] == figures[2]["s"]["test_acc"]  # the same weights
    for name in ("t", "u", "c"):
        assert figures[0][name] == figures[1][name] == figures[2][name]
        assert None not in figures[0][name].values()
    with torch.no_grad():
        t = step.models["t"].eval()
        expected = (t(normalize(digits.test.images, digits.mean, digits.std)).argmax(1) == digits.test.labels)
    assert figures[2]["t"]["test_acc"] == expected.double().mean().item()


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


class _Stop(Exception):
    """Raised from on_epoch after an epoch's files are written: the run stops there."""


RUN_GRAPH = """
graph selected
data digits {{ val_split = 100  pad = 1 }}
train {{ epochs = 5  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }}
node s : cnn_tiny [target]
node p : mlp
node t : mlp [frozen, init="{init}/t.pt"]
node u : mlp [frozen, init="{init}/u.pt"]
node e : ensemble(s, p)
node c : ensemble(t, u)
label -> s : through
label -> p : through
c -> s : linear
e -> p : through kl(T=2)
"""


@pytest.fixture(scope="module")
def run_graph(tmp_path_factory):
    from dclang.models import build_model

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    for name in ("t", "u"):
        atomic_save(node_checkpoint("mlp", 10, build_model("mlp", 10, 1, 8).state_dict()), folder / f"{name}.pt")
    return graph_of(RUN_GRAPH.format(init=folder))


def test_test_is_recorded_exactly_for_the_epochs_val_selects(run_graph, digits, tmp_path):
    result = train_graph(run_graph, run_dir=tmp_path, device="cpu", progress=False, dataset=digits)
    records = result.records
    for node in ("s", "p", "e"):
        val = [r["nodes"][node]["val_acc"] for r in records]
        measured = [r["nodes"][node]["test_acc"] is not None for r in records]
        improved = [i == 0 or v > max(val[:i]) for i, v in enumerate(val)]
        assert measured == [i or epoch == len(records) - 1 for epoch, i in enumerate(improved)], node
        assert result.summary["nodes"][node]["test_at_best_val"] is not None
    assert any(r["nodes"][n]["test_acc"] is None for r in records for n in "spe")  # the case has such epochs
    for node in ("t", "u", "c"):  # constant: measured once, carried
        assert len({tuple(r["nodes"][node][k] for k in ("val_acc", "val_loss", "test_acc")) for r in records}) == 1

    # the target's test @ best val is the test accuracy of best.pt's weights, computed here
    from dclang.models import build_model

    best = load_safely(RunDir(tmp_path).best)
    assert best["epoch"] == result.summary["best_epoch"]
    model = build_model("cnn_tiny", 10, 1, 8)
    model.load_state_dict(best["nodes"]["s"]["state_dict"])
    with torch.no_grad():
        correct = model.eval()(normalize(digits.test.images, digits.mean, digits.std)).argmax(1) == digits.test.labels
    assert result.summary["nodes"]["s"]["test_at_best_val"] == correct.double().mean().item()
    assert result.summary["nodes"]["s"]["final_test_acc"] == records[-1]["nodes"]["s"]["test_acc"] is not None


@pytest.mark.parametrize("stop_after", [1, 3])
def test_a_resumed_run_records_what_the_uninterrupted_run_records(run_graph, digits, tmp_path, stop_after):
    def stop(epoch, record):
        if epoch == stop_after:
            raise _Stop

    full = train_graph(run_graph, run_dir=tmp_path / "full", device="cpu", progress=False, dataset=digits)
    with pytest.raises(_Stop):
        train_graph(run_graph, run_dir=tmp_path / "stopped", device="cpu", progress=False, dataset=digits,
                    on_epoch=stop)
    stopped = RunDir(tmp_path / "stopped").read_summary()
    assert stopped["nodes"]["s"]["test_at_best_val"] is not None  # whenever a run stops
    resumed = train_graph(run_graph, run_dir=tmp_path / "stopped", device="cpu", progress=False, dataset=digits,
                          resume=True)
    assert untimed(resumed.records) == untimed(full.records)
    timing = {"wall_seconds", "train_seconds", "steps_per_second"}
    assert {k: v for k, v in resumed.summary.items() if k not in timing} == \
        {k: v for k, v in full.summary.items() if k not in timing}


def test_an_empty_test_split_is_evaluated_as_nothing(digits):
    graph = graph_of(EPOCHS_GRAPH)
    step = compile_graph(graph, num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                         seed=0, steps_per_epoch=1, epochs=3)
    empty = Split(digits.test.images[:0].contiguous(), digits.test.labels[:0])
    evaluation = EpochEvaluation(step, graph, val=empty, test=digits.test, mean=digits.mean, std=digits.std,
                                 epochs=3, batch=1024)
    figures = evaluation.after_epoch(1)
    assert figures["s"]["val_acc"] is None and figures["s"]["val_loss"] is None
    assert figures["s"]["test_acc"] is not None  # without val every epoch's weights are the selected ones
    assert evaluation.after_epoch(2)["s"]["test_acc"] is not None


def test_batches_are_made_outside_inference_mode(digits):
    """normalize caches its constants on first use: made inside inference mode they would be
    inference tensors, which training cannot save for backward."""
    from dclang.data import augment
    from dclang.train.evaluate import split_batches

    step = compile_graph(graph_of(EPOCHS_GRAPH), num_classes=10, in_channels=1, image_size=8,
                         device=torch.device("cpu"), seed=0, steps_per_epoch=1, epochs=1)
    augment._affine.cache_clear()
    evaluate_nodes(step, split_batches(digits.val, digits.mean, digits.std, 64), ["s"])
    scale, shift = augment._affine(tuple(digits.mean), tuple(digits.std), torch.device("cpu"))
    assert augment._affine.cache_info().misses == 1  # filled by the evaluation
    assert not scale.is_inference() and not shift.is_inference()


# ---------------------------------------------------------------- benchmarks/torchdistill_epoch.py


def test_the_torchdistill_benchmark_runs_what_it_says(tmp_path):
    """Its data is digits at 28x28 in the npz layout, its graphs check, and the modules its
    torchdistill side hooks for attention transfer are the layers dclang's edges name."""
    import importlib.util
    from pathlib import Path

    from dclang.checkpoints import atomic_save, node_checkpoint
    from dclang.models import build_model
    from dclang.models.taps import resolve_layer

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "torchdistill_epoch.py"
    spec = importlib.util.spec_from_file_location("torchdistill_epoch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    npz = bench.make_data(tmp_path, train=120, test=30)
    data = load_dataset("npz", data_dir=None, val_split=20, split_seed=0, path=str(npz))
    assert (len(data.train), len(data.val), len(data.test), data.image_size, data.channels) == (100, 20, 30, 28, 1)
    atomic_save(node_checkpoint("cnn_small", 10, build_model("cnn_small", 10, 1, 28).state_dict()), tmp_path / "t.pt")
    for extra in ("", bench.AT):
        text = bench.KT.format(name="kd", npz=npz, val=20, epochs=1, teacher=tmp_path / "t.pt") + extra
        assert check(text).ok, check(text).diagnostics
    for model in ("cnn_small", "cnn_tiny"):
        net = build_model(model, 10, 1, 28)
        for layer, module_path in bench.AT_PATHS.items():
            assert resolve_layer(net, layer) is net.get_submodule(module_path), (model, layer)
