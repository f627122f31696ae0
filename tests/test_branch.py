"""Shared trunks (`branch(...)`, `dclang.models.branch`): one copy of the trunk, whose gradient
is the sum of its nodes' losses', computed once per step; the head initialised as a separate
network's; both engines equal in float64 (rtol 1e-10) on a graph mixing branches (one of a
branch) with gates, an ensemble and layer edges from and into a trunk and a head; HFTA never
fuses a trunk-sharing node; a packed trial equals itself alone; resume; counts; drawing."""

from __future__ import annotations

import copy

import pytest
import test_engines as te
import test_union as tu
import torch
import torch.nn.functional as F

from dclang.compile import StepOptions
from dclang.compile.engine import Engine
from dclang.models import build_model, parameter_counts
from dclang.models.branch import Shared

MIXED = """
graph branches
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4) }
node a : cnn_tiny [target]
node b : branch(a, from="3")
node g : branch(a, from=pool)
node h : branch(b, from="6")
node d : cnn_tiny
node d2 : cnn_tiny
node e : ensemble(a, b, g)
label -> a : through
label -> b : correct
label -> g : through
label -> d : through
label -> d2 : through
label -> h : through
e -> a : through kl(T=2)
e -> b : linear kl(T=2)
b -> g : through
a -> d : through
d -> d2 : through
h -> a : through kl(T=2)
b.conv2 -> d.conv2 : through at(p=2, weight=5)
d.conv1 -> b.conv1 : through sp(weight=3)
g.4 -> d.4 : through at(p=2)
d.1 -> b.1 : through sp()
"""

PLAIN = """
graph two_heads
data digits {{ }}
train {{ epochs = 2  optimizer = sgd(lr=0.1, momentum=0, nesterov=false, weight_decay=0) }}
node a : cnn_tiny [target]
node b : {b}
label -> a : through
label -> b : through
"""


def test_trunk_is_one_copy_and_its_gradient_is_the_sum_of_both_losses(float64):
    """One SGD step (no momentum) of a and b = branch(a, from="3") against an independent
    computation: two plain cnn_tiny, b's built with a's trunk weights copied in, each with its
    own cross-entropy; the trunk moves by the sum of both gradients, its BatchNorm statistics
    by one batch."""
    step = te.compiled(PLAIN.format(b='branch(a, from="3")'), "fused")
    a, b = step.models["a"], step.models["b"]
    assert isinstance(b[0], Shared) and isinstance(b[1], Shared)  # conv1, bn1: a's
    assert not {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}
    plain_a, plain_b = copy.deepcopy(a), build_model("cnn_tiny", te.CLASSES, 1, 8)
    plain_b.load_state_dict({**{k: v for k, v in a.state_dict().items() if k.split(".")[0] in ("0", "1")},
                             **b.state_dict()})
    x, y = te.batches(1)[0]
    trunk = [p for m in (plain_a[0], plain_a[1]) for p in m.parameters()]
    twin = [p for m in (plain_b[0], plain_b[1]) for p in m.parameters()]
    grads_a = torch.autograd.grad(F.cross_entropy(plain_a(x), y), trunk + list(plain_a.parameters())[len(trunk):])
    grads_b = torch.autograd.grad(F.cross_entropy(plain_b(x), y), twin + list(plain_b.parameters())[len(twin):])
    before = {n: copy.deepcopy(m.state_dict()) for n, m in step.models.items()}
    step.step(x, y, 1)
    for i, (key, _) in enumerate(list(a.named_parameters())[:len(trunk)]):
        want = before["a"][key] - 0.1 * (grads_a[i] + grads_b[i])
        torch.testing.assert_close(a.state_dict()[key], want, **te.TIGHT)
    head_b = [k for k, _ in b.named_parameters()]
    for i, key in enumerate(head_b):
        torch.testing.assert_close(b.state_dict()[key], before["b"][key] - 0.1 * grads_b[len(twin) + i], **te.TIGHT)
    # the shared BatchNorm saw the batch once: as the plain network's forward left its own
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(a.state_dict()[key], plain_a.state_dict()[key], **te.TIGHT)


def test_the_trunk_runs_once_per_step_and_per_evaluated_batch(float64):
    step = te.compiled(MIXED, "fused")
    calls = []
    step.models["a"][0].register_forward_hook(lambda *_: calls.append(1))
    x, y = te.batches(1)[0]
    step.step(x, y, 1)
    assert len(calls) == 1  # a's conv1, shared by b, g and (through b) h
    step.evaluate(x, y, batch_size=8)
    assert len(calls) == 3  # two batches of 8


def test_a_branch_head_starts_as_a_separate_network(float64):
    branch = te.compiled(PLAIN.format(b='branch(a, from="3")'), "reference").models["b"].state_dict()
    separate = te.compiled(PLAIN.format(b="cnn_tiny"), "reference").models["b"].state_dict()
    assert branch.keys() < separate.keys() and not any(k.split(".")[0] in ("0", "1") for k in branch)
    for key in branch:
        assert torch.equal(branch[key], separate[key]), key


@pytest.mark.parametrize("hfta", [False, True], ids=["separate", "hfta"])
def test_fused_equals_reference_on_a_mixed_graph(hfta, float64):
    data = te.batches()
    reference = te.compiled(MIXED, "reference")
    fused = te.compile_graph(te.graph_of(MIXED), num_classes=te.CLASSES, in_channels=1, image_size=8,
                             device=torch.device("cpu"), seed=0, steps_per_epoch=te.STEPS, epochs=te.EPOCHS,
                             options=StepOptions(hfta=hfta, channels_last=False))
    if hfta:  # d and d2 fused; no node sharing a trunk ever is
        assert [sorted(n for _, n in g.slices) for g in fused.groups] == [["d", "d2"]]
    te.assert_models_close(te.snapshot(reference), te.snapshot(fused), rtol=0, atol=0)
    ref_stats, fused_stats = te.train(reference, data), te.train(fused, data)
    te.assert_models_close(te.snapshot(reference), te.snapshot(fused), **te.TIGHT)
    for ref, fus in zip(ref_stats, fused_stats):
        for field in ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass"):
            want, got = getattr(ref, field), getattr(fus, field)
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], **te.TIGHT)


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_resume_continues_bit_for_bit_with_the_trunk_stored_once(engine, float64):
    data = te.batches()
    step = te.compiled(MIXED, engine)
    te.train(step, data[:2])
    state = copy.deepcopy(step.state_dict())
    assert not any(k.split(".")[0] in ("0", "1") for k in state["models"]["b"])  # a's, stored in a
    te.train(step, data[2:], first_k=3)
    resumed = te.compiled(MIXED, engine, seed=99)
    resumed.load_state_dict(state)
    te.train(resumed, data[2:], first_k=3)
    te.assert_models_close(te.snapshot(step), te.snapshot(resumed), rtol=0, atol=0)


def test_a_packed_trial_with_branches_equals_itself_alone(float64, monkeypatch):
    monkeypatch.setitem(tu.GRAPHS, "branches", tu.HEAD.format(optimizer=tu.SGD) + """\
node n1 : cnn_tiny [target]
node n2 : branch(n1, from="3")
node n3 : branch(n1, from=pool)
label -> n1 : through
label -> n2 : through
n1 -> n3 : through
n2 -> n1 : through
n1.conv1 -> n3.conv1 : through sp()
""")
    generator = torch.Generator().manual_seed(3)
    trials = [tu.Trial.of("branches"), tu.Trial.of("mutual")]
    union, stats = Engine(trials, StepOptions(hfta=True, channels_last=False), packed=True), {}
    assert all(n not in ("n1", "n2", "n3") or m == 1 for g in union.groups for m, n in g.slices)
    for _ in range(3):
        tu.step_both(union, trials, generator, stats)
    tu.assert_same_trials(union, trials, stats)


def test_parameter_counts_hold_the_trunk_once():
    counts = {n: c for n, _, c in parameter_counts(te.graph_of(PLAIN.format(b='branch(a, from="3")')))}
    net = build_model("cnn_tiny", 10, 1, 8)  # digits: 10 classes, 1x8x8
    trunk = sum(p.numel() for m in (net[0], net[1]) for p in m.parameters())
    assert counts["a"] == sum(p.numel() for p in net.parameters()) and counts["b"] == counts["a"] - trunk


def test_draw_boxes_a_trunk_with_its_branches():
    from dclang.draw import to_graphviz

    source = to_graphviz(te.graph_of(MIXED)).source
    assert 'subgraph cluster_trunk_0' in source and 'label="shared trunk of a"' in source
    assert 'a -> b [label="from=3"' in source and 'b -> h [label="from=6"' in source
    assert "networks sharing one trunk" in source


def test_search_picks_a_branch_or_a_network_and_its_layer():
    from pathlib import Path

    from dclang.api import check
    from dclang.search.space import sample, search_space
    from dclang.syntax.format import format_module
    from dclang.syntax.parser import parse_module

    module, _ = parse_module((Path(__file__).parent / "golden" / "branches.kt").read_text(encoding="utf-8"))
    space = search_space(module)
    assert [(p.name, p.choices) for p in space] == [("b5.model", ("branch(b1, from=layer3)", "resnet20")),
                                                    ("b6.from", ("layer2", "layer3"))]
    text = format_module(sample(module, {"b5.model": "resnet20", "b6.from": "layer2"}, space))
    assert "node b5  : resnet20" in text and "node b6  : branch(b1, from=layer2)" in text
    assert check(text).ok


def test_a_branch_and_its_source_keep_each_other_alive():
    """Each one's loss trains the trunk the other computes: dead-node elimination keeps both."""
    from dclang.passes.check_reachability import influencing_nodes

    graph = te.graph_of("""
graph alive
data digits { }
node a : cnn_tiny
node b : branch(a, from="3")
node c : cnn_tiny [target]
node d : branch(c, from=pool)
node x : cnn_tiny
label -> a : through
label -> b : through
label -> c : through
label -> d : through
label -> x : through
b -> c : through
""")
    assert influencing_nodes(graph) - {"label"} == {"a", "b", "c", "d"}  # not x


def test_bench_floor_and_fused_step_compute_a_shared_trunk_once(tmp_path):
    """`dclang bench` on peers sharing a trunk: the fused step dispatches fewer operations than
    the same graph of separate networks, and so does the floor (the trunk counted once)."""
    import json

    from click.testing import CliRunner

    from dclang.cli import main

    ops = {}
    for kind, model in (("branch", 'branch(a, from="3")'), ("separate", "cnn_tiny")):
        path = tmp_path / f"{kind}.kt"
        path.write_text(PLAIN.format(b=model))
        result = CliRunner().invoke(main, ["bench", str(path), "--steps", "1", "--warmup", "1", "--device", "cpu",
                                           "--variants", "fused", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        ops[kind] = (out["engines"]["fused"]["ops_per_step"], out["floor_ops_per_step"])
    assert ops["branch"][0] < ops["separate"][0] and ops["branch"][1] < ops["separate"][1]


def test_equivalent_graphs_share_a_key_whatever_the_source_is_named():
    """Search's dedup: renaming a branch's source (a non-target node) keeps the key; sharing
    another node's trunk changes it."""
    from dclang.search.equivalence import canonical_key

    text = """
graph k
data digits { }
node t : cnn_tiny [target]
node {p} : cnn_tiny
node {q} : mlp
node b : branch({src}, from=pool)
label -> t : through
label -> {p} : through
label -> {q} : through
label -> b : through
b -> t : through
{p} -> t : through
{q} -> t : through
"""
    def key(p, src):
        return canonical_key(te.graph_of(text.replace("{p}", p).replace("{q}", "q").replace("{src}", src)))

    assert key("x", "x") == key("p", "p") != key("p", "t")
