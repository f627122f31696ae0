"""A learned ensemble (`combine=learned`): its output and w's gradient against an independent
computation, fused == reference in float64, its members untouched by it, resume bit for bit,
a packed trial equal to the trial alone, the template's choice, draw and fmt.

z_e = sum_i softmax(w)_i z_i over the members' detached outputs, w initialised to zeros
(`dclang.learned_ensembles`), trained by `label -> e` (cross-entropy, eq. 1).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_engines import CLASSES, TIGHT, assert_models_close, assert_stats_close, batches, compiled, snapshot, train
from test_union import EPOCHS as UNION_EPOCHS
from test_union import HEAD, SGD, STEPS_PER_EPOCH, Trial, assert_same_trials, step_both

from dclang.api import check
from dclang.compile import Engine, StepOptions, compile_graph
from dclang.draw import to_graphviz
from dclang.ensembles import combine, ensemble_order
from dclang.learned_ensembles import LearnedWeights
from dclang.syntax.format import format_module
from dclang.syntax.parser import parse_module

# a learned ensemble of a trained network, a linear-gated one and a frozen teacher, taught by
# `label` through a linear gate, teaching one member back (correct gate, T=2); a mean ensemble
# of it and a network (an ensemble of a learned ensemble); a second learned ensemble whose
# label edge is cutoff (frozen at w = 0); an edge between layers; sgd with nesterov and
# weight decay (on w too)
GRAPH = """
graph learned
data digits { }
train {
  epochs = 2
  optimizer = sgd(lr=0.5, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[1], gamma=0.1)
}
node a : cnn_tiny [target]
node b : mlp
node c : cnn_tiny [frozen]
node e : ensemble(a, b, c) [combine=learned]
node m : ensemble(e, b)
node f : ensemble(a, b) [combine=learned]
label -> a : through
label -> b : linear
label -> e : linear
label -> f : cutoff
e -> a : correct kl(T=2)
m -> b : through kl(T=3)
f -> b : through
c.conv2 -> a.conv2 : through at(p=2, weight=50)
"""

ADAM = """
graph learned_adam
data digits { }
train { epochs = 2  optimizer = adam(lr=0.05, weight_decay=1e-4) }
node a : cnn_tiny [target]
node b : cnn_tiny
node e : ensemble(a, b) [combine=learned]
label -> a : through
label -> b : through
label -> e : through ce(weight=2)
e -> a : through kl(T=2)
a -> b : correct
"""


def parse(text: str):
    module, errors = parse_module(text)
    assert not errors, errors
    return module


def weights_of(step) -> dict[str, torch.Tensor]:
    return {name: w.w.detach().clone() for name, w in step.ensemble_weights.items()}


# ---------------------------------------------------------------- the combine itself

def test_learned_combine_against_an_independent_computation(float64):
    """Value: z_e[b, c] = sum_i exp(w_i) / sum_j exp(w_j) * z_i[b, c], written out with math.
    Gradient of the cross-entropy of z_e in w: central finite differences to 1e-8; the members
    get none (they are detached)."""
    gen = torch.Generator().manual_seed(0)
    members = [torch.randn(5, 4, generator=gen, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([0, 3, 1, 2, 3])
    module = LearnedWeights(3)
    with torch.no_grad():
        module.w.copy_(torch.tensor([0.3, -1.2, 0.7]))
    w = module.w.tolist()
    p = [math.exp(x) / sum(math.exp(y) for y in w) for x in w]
    expected = [[sum(p[i] * members[i][b, c].item() for i in range(3)) for c in range(4)] for b in range(5)]
    z = combine(members, module)
    torch.testing.assert_close(z, torch.tensor(expected), rtol=1e-14, atol=1e-14)

    def loss_at(values: list[float]) -> float:
        q = [math.exp(x) / sum(math.exp(y) for y in values) for x in values]
        total = 0.0
        for b in range(5):
            row = [sum(q[i] * members[i][b, c].item() for i in range(3)) for c in range(4)]
            total += math.log(sum(math.exp(v) for v in row)) - row[labels[b]]
        return total / 5

    F.cross_entropy(z, labels).backward()
    eps = 1e-6
    numeric = [(loss_at([*w[:i], w[i] + eps, *w[i + 1:]]) - loss_at([*w[:i], w[i] - eps, *w[i + 1:]])) / (2 * eps)
               for i in range(3)]
    torch.testing.assert_close(module.w.grad, torch.tensor(numeric), rtol=1e-7, atol=1e-8)
    assert all(m.grad is None for m in members)


def test_a_learned_ensemble_starts_as_the_mean_of_logits(float64):
    members = [torch.randn(6, 5) for _ in range(4)]
    torch.testing.assert_close(combine(members, LearnedWeights(4)), combine(members, "mean_logits"),
                               rtol=1e-15, atol=1e-15)


def test_learned_without_weights_is_refused():
    with pytest.raises(ValueError, match="needs its weights"):
        combine([torch.zeros(1, 2), torch.zeros(1, 2)], "learned")


# ---------------------------------------------------------------- the engines

@pytest.mark.parametrize("text", [GRAPH, ADAM], ids=["sgd_gates_layers", "adam"])
def test_fused_equals_reference(text, float64):
    """Every weight, buffer and w after six steps across an epoch boundary, and every
    statistic of every step (a learned ensemble's node loss among them), to 1e-10."""
    data = batches()
    reference, fused = compiled(text, "reference"), compiled(text, "fused")
    assert reference.learned == fused.learned == ["e"] and reference.loss_nodes[-1] == "e"
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    for name, w in weights_of(reference).items():
        torch.testing.assert_close(weights_of(fused)[name], w, **TIGHT)
    assert not torch.equal(weights_of(fused)["e"], torch.zeros(len(weights_of(fused)["e"])))  # it learned
    assert_stats_close(ref_stats, fused_stats, **TIGHT)
    assert "e" in fused_stats[0].node_loss and "e" in fused_stats[0].node_correct


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_a_cutoff_label_edge_keeps_w_at_zero(engine, float64):
    step = compiled(GRAPH, engine)
    assert step.learned == ["e"] and set(step.ensemble_weights) == {"e", "f"}
    train(step, batches())
    assert torch.equal(weights_of(step)["f"], torch.zeros(2))


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_the_members_get_no_gradient_through_it(engine, float64):
    """The graph with the learned ensemble and its label edge trains its networks bit for bit as
    the graph without them: nothing flows from the ensemble's loss into a member, and nothing
    else in the step changes."""
    without = ADAM.replace("node e : ensemble(a, b) [combine=learned]\n", "").replace(
        "label -> e : through ce(weight=2)\n", "").replace("e -> a : through kl(T=2)\n", "")
    with_ = ADAM.replace("e -> a : through kl(T=2)\n", "")
    data = batches()
    steps = [compiled(text, engine) for text in (with_, without)]
    for step in steps:
        train(step, data)
    assert_models_close(snapshot(steps[0]), snapshot(steps[1]), rtol=0, atol=0)
    assert not torch.equal(weights_of(steps[0])["e"], torch.zeros(2))


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_state_dict_round_trip_continues_identically(engine, float64):
    data = batches()
    step = compiled(GRAPH, engine)
    train(step, data[:2])
    state = copy.deepcopy(step.state_dict())
    assert set(state["ensembles"]) == {"e", "f"}
    train(step, data[2:], first_k=3)
    resumed = compiled(GRAPH, engine, seed=99)
    resumed.load_state_dict(state)
    train(resumed, data[2:], first_k=3)
    assert_models_close(snapshot(step), snapshot(resumed), rtol=0, atol=0)
    for name, w in weights_of(step).items():
        assert torch.equal(weights_of(resumed)[name], w), name


def test_evaluate_counts_the_learned_ensembles_output(float64):
    step = compiled(GRAPH, "fused")
    train(step, batches()[:2])
    images, labels = torch.randn(23, 1, 8, 8), torch.randint(0, CLASSES, (23,))
    counts = step.evaluate(images, labels, batch_size=10)
    step.eval()
    with torch.no_grad():
        logits = {n: m(images) for n, m in step.models.items()}
        z_e = sum(p * logits[n] for p, n in zip(torch.softmax(step.ensemble_weights["e"].w, 0), "abc"))
    step.train()
    assert int(counts["e"]) == int((z_e.argmax(1) == labels).sum())


# ---------------------------------------------------------------- a run: resume bit for bit

def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A run with a learned target ensemble stopped after epoch 1 and resumed ends as the
    uninterrupted one: metrics, the last and best checkpoints (w included)."""
    from dclang.api import load
    from dclang.checkpoints import load_safely
    from dclang.data import load_dataset
    from dclang.train import RunDir, train_graph

    text = """
graph resumable
data digits { val_split = 300  pad = 1 }
train { epochs = 2  batch = 128  optimizer = sgd(lr=0.1, momentum=0.9)  schedule = cosine }
node s : mlp
node p : mlp
node e : ensemble(s, p) [target, combine=learned]
label -> s : through
label -> p : through
label -> e : through
e -> s : through kl(T=2)
"""
    kt = tmp_path / "graph.kt"
    kt.write_text(text)
    graph = load(kt)
    dataset = load_dataset("digits", data_dir=None, val_split=300, split_seed=0)

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    def run(name, **kwargs):
        return train_graph(graph, run_dir=tmp_path / name, device="cpu", progress=False, dataset=dataset, **kwargs)

    full = run("full")
    with pytest.raises(Stop):
        run("stopped", on_epoch=stop)
    resumed = run("stopped", resume=True)
    untimed = [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in resumed.records]
    assert untimed == [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in full.records]
    assert full.summary["nodes"]["e"]["test_at_best_val"] is not None and full.summary["nodes"]["e"]["params"] == 2
    for which in ("last", "best"):
        a, b = (load_safely(getattr(RunDir(tmp_path / n), which)) for n in ("stopped", "full"))
        ens_a = a["train_step"]["ensembles"] if which == "last" else a["ensembles"]
        ens_b = b["train_step"]["ensembles"] if which == "last" else b["ensembles"]
        assert torch.equal(ens_a["e"]["w"], ens_b["e"]["w"]) and not torch.equal(ens_a["e"]["w"], torch.zeros(2))


# ---------------------------------------------------------------- packed search trials

def test_a_packed_trial_computes_what_it_computes_alone(float64):
    """A learned-ensemble trial packed beside another graph (HFTA across them) equals its twin
    trained alone: weights, w, statistics."""
    graph = check(HEAD.format(optimizer=SGD) + """\
node n1 : cnn_tiny [target]
node n2 : cnn_tiny
node e : ensemble(n1, n2) [combine=learned]
label -> n1 : through
label -> n2 : through
label -> e : linear
e -> n1 : through kl(T=2)
""").graph
    args = dict(num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"), seed=0,
                steps_per_epoch=STEPS_PER_EPOCH, epochs=UNION_EPOCHS)
    learned = Trial("learned", compile_graph(graph, member=True, **args),
                    compile_graph(graph, options=StepOptions(channels_last=False), **args), 16)
    generator = torch.Generator().manual_seed(0)
    trials = [learned, Trial.of("gates")]
    union, stats = Engine(trials, StepOptions(hfta=True, channels_last=False), packed=True), {}
    for _ in range(STEPS_PER_EPOCH * UNION_EPOCHS - 1):
        step_both(union, trials, generator, stats)
    assert_same_trials(union, trials, stats)
    torch.testing.assert_close(learned.step.ensemble_weights["e"].w, learned.alone.ensemble_weights["e"].w,
                               rtol=1e-9, atol=1e-10)
    assert not torch.equal(learned.alone.ensemble_weights["e"].w, torch.zeros(2))


def test_a_pack_of_one_learned_trial_equals_the_trial_alone(float64):
    """`Engine(packed=True)` of one member: the sliced optimizer updates w as torch's does."""
    graph = check(GRAPH).graph
    args = dict(num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"), seed=0,
                steps_per_epoch=3, epochs=2, init_states=None)
    alone = compile_graph(graph, options=StepOptions(channels_last=False), **args)
    member = compile_graph(graph, member=True, **args)

    class One:
        step, batch = member, 16

    packed = Engine([One], StepOptions(channels_last=False), packed=True)
    for k, (x, y) in enumerate(batches(), start=1):
        alone.step(x, y, k)
        packed.step_all([(x, y, k)])
        if k % 3 == 0:
            alone.end_epoch()
            member.end_epoch()
    assert_models_close(snapshot(alone), snapshot(member), rtol=1e-9, atol=1e-10)
    for name, w in weights_of(alone).items():
        torch.testing.assert_close(weights_of(member)[name], w, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- front end

def test_fmt_round_trips_and_draw_sets_a_learned_ensemble_apart():
    text = format_module(parse(GRAPH))
    assert "[combine=learned]" in text and format_module(parse(text)) == text
    dot = to_graphviz(check(GRAPH).graph).source
    e_node, m_node = (dot.split(f"\n\t{name} [")[1].split("]\n")[0] for name in "em")
    assert "\nlearned" in e_node and "peripheries=2" in e_node
    assert "\nmean_logits" in m_node and "peripheries" not in m_node
    assert "double outline: a learned ensemble" in dot


def test_ensemble_order_puts_the_weights_in_place_of_the_name():
    graph = check(GRAPH).graph
    assert [(n, c) for n, _, c in ensemble_order(graph)] == [("e", "learned"), ("m", "mean_logits"),
                                                             ("f", "learned")]
    weights = {"e": LearnedWeights(3), "f": LearnedWeights(2)}
    assert [c for _, _, c in ensemble_order(graph, weights)] == [weights["e"], "mean_logits", weights["f"]]


# a template choosing the combine, with the `label -> e` edge a learned pick needs
COMBINE_TEMPLATE = """
graph t
data digits { }
train { epochs = 1 }
node a : mlp [target]
node b : mlp
node e : ensemble(a, b) [combine=choice(mean_logits, learned)]
label -> a : through
label -> b : through
label -> e : through
e -> a : through
"""


def test_a_template_may_choose_a_learned_ensemble():
    """`combine=choice(mean_logits, learned)` with a `label -> e` edge: a trial that picks the
    mean leaves the edge out (a mean has nothing to learn), one that picks `learned` keeps it."""
    from dclang.search.space import realize, search_space

    template = parse(COMBINE_TEMPLATE)
    assert check(format_module(template)).ok
    space = search_space(template)
    for pick, has_edge in (("mean_logits", False), ("learned", True)):
        trial = realize(template, {"e.combine": pick}, space=space)
        assert trial.problem is None, trial.problem
        assert ("label -> e" in trial.text) == has_edge, trial.text


def test_frozen_on_a_learned_ensemble_says_how_to_freeze_its_weights():
    checked = check("""
graph g
data digits { }
node a : mlp [target]
node b : mlp
node e : ensemble(a, b) [frozen, combine=learned]
label -> a : through
label -> b : through
label -> e : through
e -> a : through
""")
    (diag,) = [d for d in checked.errors if d.code == "E333"]
    assert diag.message == "the learned ensemble `e` is marked `frozen`" and diag.span.line == 6
    assert "`label -> e : cutoff`" in diag.help


def test_a_templates_concrete_graph_leaves_the_label_edge_out_as_the_trial_does():
    from dclang.search.equivalence import concrete

    template = check(COMBINE_TEMPLATE).graph
    for pick, edges in (("mean_logits", []), ("learned", ["label->e"])):
        graph = concrete(template, {"e.combine": pick})
        assert [k for _, t, k in graph.edges(keys=True) if t == "e"] == edges


def test_a_learned_trial_in_a_search_pack_equals_the_trial_trained_alone():
    """Through search's `Pack` and `TrialRun` (HFTA across trials), beside a mate: every
    node's figures per epoch, the learned target ensemble's included, as `train_graph` alone,
    to float32 rounding (losses 1e-5 relative, accuracies one image of the 300)."""
    from test_search_pack import HEAD as PACK_HEAD
    from test_search_pack import SHORT

    from dclang.data import load_dataset
    from dclang.search.pack import Pack, TrialRun
    from dclang.train.loop import train_graph

    trial = check(PACK_HEAD.format(seed=3) + """\
node n1 : cnn_tiny
node n2 : mlp
node e : ensemble(n1, n2) [target, combine=learned]
label -> n1 : through
label -> n2 : through
label -> e : through
e -> n2 : through kl(T=2)
""").graph
    digits = load_dataset("digits", data_dir=None, val_split=300, split_seed=0)
    options = StepOptions(hfta=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        alone = train_graph(trial, run_dir=None, device="cpu", dataset=digits, progress=False, options=options).records
        seen: list[dict] = []
        pack = Pack(2, options)
        pack.add("short", TrialRun(check(SHORT).graph, dataset=digits, device=torch.device("cpu"),
                                   on_epoch=lambda epoch, record: None))
        pack.add("trial", TrialRun(trial, dataset=digits, device=torch.device("cpu"),
                                   on_epoch=lambda epoch, record: seen.append(record)))
        while pack.runs:
            pack.step(on_error=lambda key, exc: pytest.fail(f"{key}: {exc}"), on_done=lambda key, r: None)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(seen) == len(alone) == 2
    for packed, single in zip(seen, alone):
        for node, figures in single["nodes"].items():
            if figures["train_loss"] is not None:
                assert math.isclose(packed["nodes"][node]["train_loss"], figures["train_loss"], rel_tol=1e-5), node
            for key in ("val_acc", "test_acc"):
                assert abs(packed["nodes"][node][key] - figures[key]) <= 1 / 300 + 1e-12, (node, key)
    assert alone[-1]["nodes"]["e"]["train_loss"] is not None
