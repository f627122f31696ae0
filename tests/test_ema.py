"""A mean teacher `node t : ema(s, decay)`: its weights are the exponential moving average of
its source's, after each optimizer update, in both engines.

The update is held against the EMA sequence computed here by hand from the source's weights
after each step (float64, to 1e-12); the fused engine (plain, HFTA, a pack of trials, the
CUDA-graph logic on the CPU) against the reference engine or the trial alone on a graph that
mixes mean teachers with the correct and linear gates, a layer edge from a mean teacher, an
ensemble with one as member and a frozen teacher; a stopped run resumed against the
uninterrupted one, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings

import pytest
import test_union
import torch
from test_engines import TIGHT, assert_models_close, assert_stats_close, batches, compiled, snapshot, train
from test_union import Trial, assert_same_trials, step_both

from dclang.api import check
from dclang.compile import ENGINES, Engine, StepOptions
from dclang.train.metrics import EpochStats

# one mean teacher of `s`: the update against a hand computation
SIMPLE = """
graph simple
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node s : cnn_tiny
node t : ema(s, decay=0.75) [target]
label -> s : through
t -> s : through kl(T=2)
"""

# mean teachers among the existing constructs: `m` the target, the source of a correct gate and
# of a layer edge, member of an ensemble with a linear gate; `mb` of another node with another
# decay; the frozen teacher `c` (with an init state, `compiled`)
MIXED = """
graph mixed
data digits { }
train {
  epochs = 2
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[1], gamma=0.1)
}
node a : cnn_tiny
node b : cnn_tiny
node c : cnn_tiny [frozen]
node m : ema(a, decay=0.8) [target]
node mb : ema(b, decay=0.5)
node e : ensemble(m, b)
label -> a : through
label -> b : linear
m -> a : correct kl(T=2)
mb -> b : through
e -> a : linear kl(T=3, weight=0.5)
m.conv2 -> b.conv2 : correct at(p=2, weight=50)
c -> b : correct
a -> b : through
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_the_teacher_is_the_hand_computed_average_of_its_source(engine, float64):
    """t_0 = s_0; t_k = 0.75 t_{k-1} + 0.25 s_k for every parameter and floating-point buffer
    (BatchNorm's running statistics), s_k the source after update k; `num_batches_tracked`
    copied. The teacher has no gradient, no optimizer, runs in eval mode, and is counted."""
    step = compiled(SIMPLE, engine)
    assert step.trainable == ["s"] and step.frozen == [] and step.ema == {"t": ("s", 0.75)}
    want = {key: value.clone() for key, value in step.models["s"].state_dict().items()}
    assert_models_close({"t": step.models["t"].state_dict()}, {"t": want}, rtol=0, atol=0)
    for k, (x, y) in enumerate(batches(), start=1):
        stats = step.step(x, y, k)
        for key, value in step.models["s"].state_dict().items():
            want[key] = 0.75 * want[key] + 0.25 * value if value.is_floating_point() else value.clone()
        assert_models_close({"t": step.models["t"].state_dict()}, {"t": want}, rtol=1e-12, atol=1e-12)
        assert stats.node_correct.keys() == {"s", "t"} and stats.node_loss.keys() == {"s"}
    teacher = step.models["t"]
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert int(teacher.get_buffer("1.num_batches_tracked")) == len(batches())


@pytest.mark.parametrize("hfta,channels_last", [(False, False), (True, False), (True, True)],
                         ids=["separate", "hfta", "hfta_channels_last"])
def test_fused_equals_reference_with_mean_teachers(hfta, channels_last, float64):
    """Every weight, buffer and statistic after several steps; with HFTA, `a` and `b` are one
    fused network and their teachers average their slices of it (in channels-last too)."""
    data = batches()
    reference = compiled(MIXED, "reference")
    fused = compiled(MIXED, "fused")
    if hfta:
        fused = Engine(fused.members, StepOptions(hfta=True, channels_last=channels_last))
        assert [sorted(n for _, n in g.slices) for g in fused.groups] == [["a", "b"]]
    assert_models_close(snapshot(reference), snapshot(fused), rtol=0, atol=0)
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    assert_stats_close(ref_stats, fused_stats, **TIGHT)
    # the teachers moved away from their sources, and from where they started
    after = snapshot(fused)
    assert not torch.equal(after["m"]["0.weight"], after["a"]["0.weight"])


def test_the_update_is_one_lerp_per_decay(float64):
    """The fused engine's EMA update: one `_foreach_lerp_` per decay for all teachers, one
    `_foreach_copy_` for the integer buffers (`dclang bench` counts them as the step's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    fused = compiled(MIXED, "fused")
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fused.ema_update()
    assert sorted(seen) == ["_foreach_copy_.default", "_foreach_lerp_.Scalar", "_foreach_lerp_.Scalar"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_state_dict_round_trip_continues_identically(engine, float64):
    data = batches()
    step = compiled(MIXED, engine)
    train(step, data[:2])
    state = copy.deepcopy(step.state_dict())
    train(step, data[2:], first_k=3)
    resumed = compiled(MIXED, engine, seed=99)
    resumed.load_state_dict(state)
    train(resumed, data[2:], first_k=3)
    assert_models_close(snapshot(step), snapshot(resumed), rtol=0, atol=0)


PACKED = test_union.HEAD.format(optimizer=test_union.SGD) + """\
node n1 : cnn_tiny
node n2 : cnn_tiny
node t : ema(n1, decay=0.9) [target]
node e : ensemble(t, n2)
label -> n1 : through
label -> n2 : through
t -> n1 : correct kl(T=2)
e -> n2 : linear
t.conv1 -> n2.conv1 : through at(p=2)
"""


@pytest.mark.parametrize("hfta", [False, True], ids=["separate", "hfta"])
def test_a_packed_trial_with_a_mean_teacher_computes_what_it_computes_alone(hfta, float64, monkeypatch):
    """Two trials with mean teachers (other decays) beside a trial without, one leaving:
    every model and summed statistic equals each trial's twin trained alone."""
    monkeypatch.setitem(test_union.GRAPHS, "ema", PACKED)
    monkeypatch.setitem(test_union.GRAPHS, "ema2", PACKED.replace("decay=0.9", "decay=0.5"))
    generator = torch.Generator().manual_seed(0)
    first = [Trial.of("ema"), Trial.of("gates"), Trial.of("ema2")]
    stats: dict[str, EpochStats] = {}
    union = Engine(first, StepOptions(hfta=hfta, channels_last=False), packed=True)
    for _ in range(2):
        step_both(union, first, generator, stats)
    second = first[:2]
    union = Engine(second, union.options, carried=union.carry(second), packed=True)
    step_both(union, second, generator, stats)
    assert_same_trials(union, second, stats)
    test_union.assert_same_models(first[2])


def test_the_captured_step_logic_keeps_the_teachers(float64, monkeypatch):
    """The CUDA-graph logic on the CPU (test_accelerate's recording capture): the EMA update is
    part of the update the capture holds (`Engine.apply_update`), so a replayed run equals the
    plain one."""
    from test_accelerate import FakeCapture

    from dclang.compile import accelerate

    monkeypatch.setattr(accelerate, "CapturedStep", FakeCapture)
    FakeCapture.made = []
    data = batches()
    plain, graphed = compiled(MIXED, "fused"), compiled(MIXED, "fused")
    graphed.options = dataclasses.replace(graphed.options, cuda_graph=True)
    train(plain, data), train(graphed, data)
    assert len(FakeCapture.made) >= 1
    assert_models_close(snapshot(plain), snapshot(graphed), rtol=0, atol=0)


def test_a_mean_teacher_is_neither_trained_nor_frozen_nor_pretrained():
    checked = check(SIMPLE)
    assert checked.ok and not checked.diagnostics, checked.diagnostics
    spec = checked.graph.nodes["t"]["spec"]
    assert spec.is_ema and not spec.frozen and spec.model == "cnn_tiny"
    from dclang.ir import ema_nodes, frozen_nodes, model_nodes, trainable_nodes
    from dclang.train.evaluate import constant_nodes

    g = checked.graph
    assert trainable_nodes(g) == ["s"] and frozen_nodes(g) == [] and ema_nodes(g) == ["t"]
    assert model_nodes(g) == ["s", "t"] and constant_nodes(g) == set()


RUN = """\
graph mean_teacher
data digits { val_split = 300  pad = 1 }
train { epochs = 2  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }
node s : cnn_tiny
node t : ema(s, decay=0.9) [target]
label -> s : through
t -> s : correct kl(T=2)
"""


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A run stopped after epoch 1 and resumed from its checkpoint ends as the uninterrupted
    run, bit for bit (CPU); the teacher is evaluated every epoch, as a trained node is, and
    its figures are the ones it is reported and selected by."""
    from test_resume import _Stop, load_text, stop_after_the_epoch, untimed

    from dclang.checkpoints import load_safely
    from dclang.data import load_dataset
    from dclang.train import RunDir, train_graph

    graph = load_text(tmp_path, RUN)
    dataset = load_dataset("digits", data_dir=None, val_split=300, split_seed=0)

    def run(name, **kwargs):
        return train_graph(graph, run_dir=tmp_path / name, device="cpu", progress=False, dataset=dataset, **kwargs)

    full = run("full")
    with pytest.raises(_Stop):
        run("stopped", on_epoch=stop_after_the_epoch)
    resumed = run("stopped", resume=True)
    assert untimed(resumed.records) == untimed(full.records)
    val = [r["nodes"]["t"]["val_acc"] for r in full.records]
    assert len(set(val)) > 1, val  # evaluated every epoch: it changes
    assert full.summary["target"] == "t" and full.summary["nodes"]["t"]["model"] == "ema(s, decay=0.9)"
    assert full.summary["nodes"]["t"]["best_val_epoch"] is not None
    written = (tmp_path / "full" / "graph.kt").read_text()
    assert "node t : ema(s, decay=0.9) [target]" in written, written
    assert check(written).ok  # the graph as trained, every default written out, checks again
    a, b = load_safely(RunDir(tmp_path / "stopped").last), load_safely(RunDir(tmp_path / "full").last)
    for node in ("s", "t"):
        for key, tensor in a["train_step"]["models"][node].items():
            assert torch.equal(tensor, b["train_step"]["models"][node][key]), (node, key)


TEMPLATE = """\
graph online
data digits { val_split = 300 }
train { epochs = 1  batch = 64 }
node s : cnn_tiny [target]
node p : choice(cnn_tiny, mlp)
node t : choice(ema(s, decay=0.99), none)
node u : ema(p, decay=choice(0.9, 0.99))
edges label -> * : through
t -> s : choice(through, correct)
u -> s : choice(through, cutoff)
"""


def test_a_template_chooses_a_mean_teacher_or_none_and_its_decay():
    """Every sample of a template with `choice(ema(s), none)` and `decay=choice(...)`: the
    sampled text checks (or not) as the IR the search counts on says (`concrete`, its key with
    and without dead nodes), `none` leaves the node and its edges out, and an unreachable mean
    teacher is dropped as a dead node with its source when nothing else needs it."""
    import itertools

    from dclang.search.equivalence import canonical_key, concrete, count_distinct, trainable_sample, without_dead_nodes
    from dclang.search.space import realize, search_space

    checked = check(TEMPLATE)
    assert checked.ok and not checked.diagnostics, checked.diagnostics
    space, sites = search_space(checked.module), checked.graph.graph["sites"]
    assert [(p.name, p.choices) for p in space] == [
        ("p.model", ("cnn_tiny", "mlp")), ("t.model", ("ema(s, decay=0.99)", "none")), ("u.decay", (0.9, 0.99)),
        ("t->s.gate", ("through", "correct")), ("u->s.gate", ("through", "cutoff"))]
    keys, texts = set(), {}
    for index in itertools.product(*(range(len(s.options)) for s in sites)):
        picks = {s.name: s.options[i] for s, i in zip(sites, index)}
        params = {p.name: p.choices[i] for p, i in zip(space, index)}
        realized = realize(checked.module, params)
        graph = concrete(checked.graph, picks)
        assert realized.ok and trainable_sample(graph), realized.problem
        assert canonical_key(graph) == canonical_key(check(realized.text).graph)
        assert canonical_key(without_dead_nodes(graph)) == canonical_key(check(realized.trained_text).graph)
        keys.add(realized.key)
        texts[tuple(params.values())] = realized
    count = count_distinct(checked.graph)
    assert count.trainable == 32 and count.dead_dropped == len(keys)
    absent = texts[("mlp", "none", 0.9, "through", "cutoff")]
    assert "node t" not in absent.text and "t ->" not in absent.text and "node u : ema(p, decay=0.9)" in absent.text
    assert absent.dropped == ("p", "u")  # u reaches nothing live, so neither does its source
    kept = texts[("mlp", "ema(s, decay=0.99)", 0.99, "correct", "through")]
    assert "node t : ema(s, decay=0.99)" in kept.trained_text and kept.dropped == ()


def test_messages_of_attributes_and_bulk_edges():
    """`init` on a mean teacher is refused (it starts as its source's copy); `edges * -> *`
    never points into one; the default decay is 0.999."""
    from dclang.ema import DEFAULT_DECAY, ema_sources

    text = SIMPLE.replace("[target]", '[target, init="teacher.pt"]')
    assert [d.code for d in check(text).errors if d.code == "E346"] == ["E346"]
    bulk = check(SIMPLE.replace("ema(s, decay=0.75)", "ema(s)").replace("t -> s : through kl(T=2)",
                                                                          "edges * -> * : through"))
    assert bulk.ok, bulk.errors
    assert {(s, t) for s, t in bulk.graph.edges()} == {("label", "s"), ("t", "s")}
    assert ema_sources(bulk.graph) == {"t": ("s", DEFAULT_DECAY)} and DEFAULT_DECAY == 0.999


def test_drawn_with_a_dashed_arrow_from_its_source():
    from dclang.draw import to_graphviz

    source = to_graphviz(check(SIMPLE).graph).source
    arrow = next(line for line in source.splitlines() if line.strip().startswith("s -> t"))
    assert 'style=dashed' in arrow and 'label="ema 0.75"' in arrow
    assert "exponential moving average of" in source and "ema of s" in source


def test_check_params_says_the_teacher_is_not_trained(tmp_path):
    from click.testing import CliRunner

    from dclang.cli import main

    kt = tmp_path / "simple.kt"
    kt.write_text(SIMPLE)
    result = CliRunner().invoke(main, ["check", "--params", str(kt)])
    assert result.exit_code == 0, result.output
    assert "mean teachers: `t`" in result.output
    line = next(line for line in result.output.splitlines() if line.strip().startswith("t "))
    assert "ema(s, decay=0.75)" in line and "not trained" in line


def test_the_golden_file_formats_to_a_fixed_point():
    from pathlib import Path

    from dclang.api import parse
    from dclang.syntax.format import format_module

    text = (Path(__file__).parent / "golden" / "mean_teacher.fmt").read_text()
    assert format_module(parse(text)) == text
    assert check(text).ok


def test_a_choice_of_decays_is_held_to_the_range():
    text = SIMPLE.replace("decay=0.75", "decay=choice(0.9, 1.5, 0)")
    assert [(d.code, d.span.column) for d in check(text).errors] == [("E343", 35), ("E343", 40)]


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C compiler")
def test_a_compiled_step_reads_the_teachers_new_weights_SLOW(float64):
    """torch.compile of the forward and losses: the teacher's weights, changed in place by each
    EMA update outside the compiled region, are read anew by every step (no constant folded)."""
    data = batches()
    plain = compiled(SIMPLE, "fused")
    fast = Engine(compiled(SIMPLE, "fused").members, StepOptions(compile=True, channels_last=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile fallback would warn
        train(plain, data), train(fast, data)
    assert fast.compiled_shapes is not None
    assert_models_close(snapshot(plain), snapshot(fast), rtol=1e-9, atol=1e-10)


def test_bench_counts_the_average_as_two_operations(tmp_path):
    """`dclang bench` on a graph with a mean teacher: the same graph with a frozen teacher in its
    place runs the same forward (eval mode, no autograd), so the step's extra operations are
    the update's: one `_foreach_lerp_` and one `_foreach_copy_`."""
    import json

    from click.testing import CliRunner

    from dclang.cli import main

    ops = {}
    for name, text in (("ema", SIMPLE), ("frozen", SIMPLE.replace("ema(s, decay=0.75) [target]", "cnn_tiny [frozen]")
                                          .replace("node s : cnn_tiny", "node s : cnn_tiny [target]"))):
        path = tmp_path / f"{name}.kt"
        path.write_text(text)
        result = CliRunner().invoke(main, ["bench", str(path), "--steps", "1", "--warmup", "1", "--device", "cpu",
                                           "--variants", "fused", "--json"])
        assert result.exit_code == 0, result.output
        ops[name] = json.loads(result.stdout)["engines"]["fused"]["ops_per_step"]
    assert ops["ema"] - ops["frozen"] == 2, ops


def test_set_changes_or_adds_the_decay():
    from dclang.api import parse
    from dclang.train.command import apply_override

    written = apply_override(SIMPLE, parse(SIMPLE), "t.decay", "0.5")
    assert "node t : ema(s, decay=0.5) [target]" in written
    bare = SIMPLE.replace("ema(s, decay=0.75)", "ema(s)")
    assert "node t : ema(s, decay=0.9) [target]" in apply_override(bare, parse(bare), "t.decay", "0.9")


def test_a_graphs_key_renames_the_teachers_source_with_the_nodes():
    """Search's key of a graph up to renaming: the mirror of a graph (n2 and n3 swapped, the
    teacher's source with them) is the same experiment, and the teacher of the other peer is
    another one, although the two peers' names appear in the same places."""
    from dclang.search.equivalence import canonical_key

    head = "graph g\ndata digits { }\nnode s : cnn_tiny [target]\nnode n2 : cnn_tiny\nnode n3 : cnn_tiny\n"
    edges = "edges label -> * : through\n{a} -> s : through\n{b} -> s : correct\nt -> s : linear\n"

    def key(source: str, a: str, b: str) -> str:
        checked = check(head + f"node t : ema({source})\n" + edges.format(a=a, b=b))
        assert checked.ok, checked.errors
        return canonical_key(checked.graph)

    assert key("n2", "n2", "n3") == key("n3", "n3", "n2")  # the mirror
    assert key("n2", "n2", "n3") != key("n2", "n3", "n2")  # the teacher of the `correct` peer
