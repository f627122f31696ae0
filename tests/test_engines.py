"""The fused engine against the reference engine (the oracle), and the TrainStep contract.

The graphs mix every gate, frozen and trainable sources, every loss between outputs and
every loss between layers (with FitNets connectors), so fused == reference covers them all.

Models run in float64 (the default dtype is switched for each test), so the engines must
agree to rtol 1e-10 / atol 1e-12 after several steps: they differ only in the order of the
same operations (one backward vs one per node, foreach vs per-tensor optimizer kernels).
One float32 case checks the production dtype at rtol 1e-5 / atol 1e-6.
"""

import copy
import math

import pytest
import torch
from torch import nn

import dclang.compile.loss_plan
import dclang.compile.reference
import dclang.losses
from dclang.api import check
from dclang.compile import ENGINES, StepOptions, compile_graph
from dclang.losses import edge_loss, edge_losses, node_loss
from dclang.models import build_model

TIGHT = dict(rtol=1e-10, atol=1e-12)
FLOAT32 = dict(rtol=1e-5, atol=1e-6)
CLASSES, STEPS, EPOCHS = 3, 3, 2  # 3 classes: the correct gate passes about a third of a batch

# every gate, T != 1, weights != 1, a frozen teacher (c) with an init state, a frozen node (e)
# and a trainable one (d) whose only out-edges are cutoff, sgd with nesterov, a step schedule
SGD_GRAPH = """
graph every_gate
data digits { }
train {
  epochs = 2
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[1], gamma=0.1)
}
node a : cnn_tiny [target]
node b : mlp
node d : cnn_tiny
node c : cnn_tiny [frozen]
node e : mlp [frozen]
label -> a : through ce(weight=0.7)
label -> b : linear
label -> d : correct
c -> a : correct kl(T=2, weight=0.5)
b -> a : through kl(T=3)
d -> a : cutoff
e -> a : cutoff
a -> b : correct kl(weight=1.5)
c -> b : linear kl(T=4)
a -> d : through
"""


def mutual_graph(optimizer: str) -> str:
    return f"""
graph mutual
data digits {{ }}
train {{ epochs = 2  optimizer = {optimizer}  schedule = cosine(eta_min=0.001) }}
node a : cnn_tiny [target]
node b : cnn_tiny
label -> a : through
label -> b : through
a -> b : linear kl(T=2)
b -> a : correct kl(T=2, weight=2)
"""


# edges between outputs and between layers in one graph: dkd and lskd, attention, similarity
# and FitNets hints (two with a connector: cnn_small's conv1 is 32 channels wide, cnn_tiny's 8),
# every gate on a layer edge, a trainable source (b) of layer edges, the frozen teacher c
LAYERS_GRAPH = """
graph layers
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4) }
node a : cnn_tiny [target]
node b : cnn_tiny
node c : cnn_tiny [frozen]
node f : cnn_small
label -> a : through
label -> b : through
label -> f : through
c -> a : correct dkd(alpha=1, beta=2, T=3)
b -> a : through lskd(T=2)
a -> b : linear kl(T=2)
c.conv2 -> a.conv2 : correct at(p=2, weight=50)
b.conv1 -> a.conv1 : linear sp(weight=5)
f.conv1 -> a.conv1 : through hint()
a.pool -> b.pool : through at(p=1)
f.conv2 -> b.conv2 : correct hint(weight=0.5)
c.conv1 -> f.conv1 : through hint()
"""

GRAPHS = {
    "sgd_every_gate": SGD_GRAPH,
    "layers_and_logit_losses": LAYERS_GRAPH,
    "adam_mutual": mutual_graph("adam(lr=0.01, weight_decay=1e-4)"),
    "adamw_mutual": mutual_graph("adamw(lr=0.01)"),
}


def graph_of(text):
    checked = check(text)
    assert checked.ok, checked.errors
    return checked.graph


def teacher_state():
    """A `cnn_tiny` unlike the seeded ones, with BatchNorm statistics that are not the defaults."""
    torch.manual_seed(123)
    model = build_model("cnn_tiny", CLASSES, 1, 8)
    for name, buffer in model.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return model.state_dict()


def batches(n=STEPS * EPOCHS, size=16):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(size, 1, 8, 8, generator=gen).to(torch.get_default_dtype()),
             torch.randint(0, CLASSES, (size,), generator=gen)) for _ in range(n)]


def assert_stats_close(want: list, got: list, **tol) -> None:
    """Every statistic of two engines' steps (node losses and correct counts, edge losses,
    gate weights and passes) equal to `tol`, step by step, key by key."""
    for ref, fus in zip(want, got, strict=True):
        for field in ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass"):
            have, expected = getattr(fus, field), getattr(ref, field)
            assert have.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(have[key], expected[key], **tol)


def compiled(text, engine, seed=0):
    """The engine itself: the fused engine in the models' own layout (channels-last, its CPU
    default for convolutions, is held equal to it in test_accelerate.py)."""
    graph = graph_of(text)
    init = {"c": teacher_state()} if "c" in graph else None
    options = StepOptions(channels_last=False) if engine == "fused" else None
    return compile_graph(graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                         engine=engine, init_states=init, seed=seed, steps_per_epoch=STEPS, epochs=EPOCHS,
                         options=options)


def train(step, data, first_k=1):
    """Run `data` through `step` with k counting from `first_k`, ending epochs on schedule."""
    stats = []
    for k, (x, y) in enumerate(data, start=first_k):
        stats.append(step.step(x, y, k))
        if k % STEPS == 0:
            step.end_epoch()
    return stats


def snapshot(step):
    return {name: copy.deepcopy(model.state_dict()) for name, model in step.models.items()}


def assert_models_close(left, right, **tol):
    assert left.keys() == right.keys()
    for name in left:
        for key in left[name]:
            torch.testing.assert_close(left[name][key], right[name][key], **tol, msg=f"{name}.{key}")


@pytest.mark.parametrize("graph", GRAPHS)
def test_fused_equals_reference(graph, float64):
    data = batches()
    reference, fused = compiled(GRAPHS[graph], "reference"), compiled(GRAPHS[graph], "fused")
    assert_models_close(snapshot(reference), snapshot(fused), rtol=0, atol=0)
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    assert reference.lr() == fused.lr()
    assert_stats_close(ref_stats, fused_stats, **TIGHT)


def test_fused_equals_reference_in_float32():
    data = batches()
    reference, fused = compiled(SGD_GRAPH, "reference"), compiled(SGD_GRAPH, "fused")
    train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **FLOAT32)


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_nodes_never_change(engine, float64):
    step = compiled(SGD_GRAPH, engine)
    assert step.frozen == ["c", "e"] and step.trainable == ["a", "b", "d"]
    before = snapshot(step)
    assert_models_close({"c": before["c"]}, {"c": teacher_state()}, rtol=0, atol=0)
    train(step, batches())
    after = snapshot(step)
    for name in step.frozen:
        for key, value in before[name].items():
            assert torch.equal(value, after[name][key]), f"{name}.{key} changed"
    for name in step.trainable:
        assert any(not torch.equal(v, after[name][k]) for k, v in before[name].items()), f"{name} did not train"


@pytest.mark.parametrize("engine", ENGINES)
def test_cutoff_edges_are_never_computed_but_every_node_runs_once(engine, float64, monkeypatch):
    # every edge's loss goes through losses.edge_losses: the reference engine's through
    # edge_loss, the fused engine's directly, a group of edges at a time
    module = {"fused": dclang.compile.loss_plan, "reference": dclang.losses}[engine]
    computed = []

    def recording_edge_losses(edges, *args, **kwargs):
        computed.extend(edge.key for edge in edges)
        return edge_losses(edges, *args, **kwargs)

    monkeypatch.setattr(module, "edge_losses", recording_edge_losses)
    step = compiled(SGD_GRAPH, engine)
    forwards = {name: 0 for name in step.models}
    for name, model in step.models.items():
        model.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
    x, y = batches(1)[0]
    stats = step.step(x, y, 1)
    live = {"label->a", "label->b", "label->d", "c->a", "b->a", "a->b", "c->b", "a->d"}
    assert sorted(computed) == sorted(live)
    assert stats.edge_loss.keys() == live
    assert forwards == {name: 1 for name in "abdce"}
    assert stats.node_correct.keys() == set("abdce") and stats.node_loss.keys() == set("abd")


def test_reference_losses_come_from_outputs_before_any_update(float64):
    """Paper 3.4: all nodes see the same batch and the losses use the pre-update outputs."""
    graph_text = GRAPHS["adam_mutual"]
    x, y = batches(1)[0]
    models = compiled(graph_text, "reference").models  # untouched twin of the engine's models
    logits = {name: model(x) for name, model in models.items()}
    edges = {e.key: e for e in (spec for *_, spec in graph_of(graph_text).edges(data="spec"))}
    expected = {
        "a": node_loss([edge_loss(edges["label->a"], None, logits["a"], y, k=1, k_end=6)[0],
                        edge_loss(edges["b->a"], logits["b"], logits["a"], y, k=1, k_end=6)[0]]),
        "b": node_loss([edge_loss(edges["label->b"], None, logits["b"], y, k=1, k_end=6)[0],
                        edge_loss(edges["a->b"], logits["a"], logits["b"], y, k=1, k_end=6)[0]]),
    }
    stats = compiled(graph_text, "reference").step(x, y, 1)
    for name in expected:
        torch.testing.assert_close(stats.node_loss[name], expected[name].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_state_dict_round_trip_continues_identically(engine, float64):
    data = batches()
    step = compiled(SGD_GRAPH, engine)
    train(step, data[:2])
    state = copy.deepcopy(step.state_dict())
    train(step, data[2:], first_k=3)  # crosses the epoch boundary: the lr drops
    resumed = compiled(SGD_GRAPH, engine, seed=99)  # different start: everything must come from `state`
    resumed.load_state_dict(state)
    train(resumed, data[2:], first_k=3)
    assert_models_close(snapshot(step), snapshot(resumed), rtol=0, atol=0)
    assert step.lr() == resumed.lr() == pytest.approx(0.01)


def test_state_dict_of_another_engine_is_refused():
    state = compiled(SGD_GRAPH, "reference").state_dict()
    with pytest.raises(ValueError, match="`reference` engine state cannot resume the `fused` engine"):
        compiled(SGD_GRAPH, "fused").load_state_dict(state)


@pytest.mark.parametrize("engine", ENGINES)
def test_linear_gate_grows_to_exactly_one(engine):
    step = compiled(SGD_GRAPH, engine)
    assert step.k_end == STEPS * EPOCHS == 6
    x, y = batches(1)[0]
    assert step.step(x, y, 1).edge_gate["label->b"].item() == pytest.approx(1 / 6)
    assert step.step(x, y, 6).edge_gate["label->b"].item() == 1.0
    with pytest.raises(ValueError, match="1 <= k <= k_end"):
        step.step(x, y, 7)


@pytest.mark.parametrize("engine", ENGINES)
def test_cosine_schedule_and_lr(engine):
    step = compiled(GRAPHS["adam_mutual"], engine)
    assert step.lr() == pytest.approx(0.01)
    train(step, batches(STEPS))  # ends the first epoch
    assert step.lr() == pytest.approx(0.001 + (0.01 - 0.001) * (1 + math.cos(math.pi / 2)) / 2)


@pytest.mark.parametrize("schedule,kind,args", [
    ("step", "MultiStepLR", dict(milestones=[1, 3, 3], gamma=0.1)),
    ("cosine", "CosineAnnealingLR", dict(eta_min=0.001)),
    ("constant", "LambdaLR", dict(lr_lambda=lambda epoch: 1.0)),
])
def test_a_schedule_is_torchs_scheduler(schedule, kind, args):
    """`Schedule` (the learning rate after `done` epochs) against torch's scheduler stepped
    epoch by epoch (its recursive form: equal to rounding)."""
    from dclang.compile.optim import Schedule
    from dclang.ir import ScheduleSpec

    spec_args = {k: tuple(v) if k == "milestones" else v for k, v in args.items() if k != "lr_lambda"}
    lr_after = Schedule(ScheduleSpec(schedule, spec_args), 0.05, 5)
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.05)
    scheduler = getattr(torch.optim.lr_scheduler, kind)(optimizer, **({"T_max": 5} if schedule == "cosine" else {}),
                                                       **args)
    for done in range(6):
        assert lr_after(done) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), done
        optimizer.step()
        scheduler.step()


def test_evaluate_counts_and_restores_training_mode(float64):
    step = compiled(SGD_GRAPH, "fused")
    images = torch.randn(37, 1, 8, 8)
    labels = torch.randint(0, CLASSES, (37,))
    counts = step.evaluate(images, labels, batch_size=10)
    step.eval()
    with torch.no_grad():
        expected = {n: int((m(images).argmax(1) == labels).sum()) for n, m in step.models.items()}
    step.train()
    assert {n: int(c) for n, c in counts.items()} == expected
    assert [m.training for m in step.models.values()] == [True, True, True, False, False]


def test_compile_refuses_templates_and_unknown_engines():
    template = graph_of(SGD_GRAPH.replace("node b : mlp", "node b : choice(mlp, cnn_tiny)"))
    args = dict(num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                steps_per_epoch=STEPS, epochs=EPOCHS)
    with pytest.raises(ValueError, match=r"open choices \(b.model\)"):
        compile_graph(template, **args)
    with pytest.raises(ValueError, match="unknown engine 'jit'"):
        compile_graph(graph_of(SGD_GRAPH), engine="jit", **args)


def test_a_checkpoint_that_kept_torchs_schedulers_resumes_at_its_epoch():
    """Checkpoints written before schedules were a function of the epochs done hold torch's
    scheduler states: their `last_epoch` is the count."""
    step = compiled(GRAPHS["adam_mutual"], "fused")
    train(step, batches(STEPS))  # one epoch
    state = step.state_dict()
    del state["epochs_done"]
    state["schedulers"] = {"all": {"last_epoch": 1, "base_lrs": [0.01]}}
    resumed = compiled(GRAPHS["adam_mutual"], "fused")
    resumed.load_state_dict(state)
    assert resumed.epochs_done == 1 and resumed.lr() == step.lr() != 0.01
