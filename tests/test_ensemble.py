"""Ensemble nodes end to end: what they compute (against numpy), both engines equal, no
gradient through them, evaluation, training with an ensemble target, search, fmt, draw.

Engines run in float64 and must agree to rtol 1e-10 / atol 1e-12 after six steps (as in
test_engines.py); the independent numpy computations agree to 1e-10.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from tensor_trees import assert_tree_close
from test_engines import CLASSES, EPOCHS, STEPS, TIGHT, assert_models_close, batches, snapshot, train

from dclang.api import check, parse
from dclang.compile import ENGINES, StepOptions, compile_graph
from dclang.draw import to_graphviz
from dclang.ensembles import combine, ensemble_order
from dclang.search.space import realize, search_space
from dclang.syntax.format import format_module

NUMPY = dict(rtol=1e-10, atol=1e-12)

# label edges, KL edges between networks, and ensembles teaching their members through every
# gate: `e` (mean_logits) over a, b and the frozen c; `f` (mean_probs) over b, d and the
# ensemble e (an ensemble of an ensemble); `e` is also a member-free teacher of d
GRAPH = """
graph ensembles
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
node e : ensemble(a, b, c)
node f : ensemble(b, d, e) [combine=mean_probs]
label -> a : through
label -> b : linear
label -> d : correct
b -> a : through kl(T=3)
a -> b : correct kl(weight=1.5)
e -> a : correct kl(T=2)
e -> b : linear kl(T=4, weight=0.5)
e -> d : through
f -> a : through kl(T=2, weight=0.7)
f -> b : correct
f -> d : cutoff
"""


def graph_of(text):
    checked = check(text)
    assert checked.ok, checked.diagnostics
    return checked.graph


def teacher_state():
    from test_engines import teacher_state as state

    return state()


def compiled(text=GRAPH, engine="fused", options=None):
    graph = graph_of(text)
    init = {"c": teacher_state()} if "c" in graph else None
    if engine == "fused" and options is None:
        options = StepOptions(channels_last=False)
    return compile_graph(graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                         engine=engine, init_states=init, seed=0, steps_per_epoch=STEPS, epochs=EPOCHS,
                         options=options)


# ---------------------------------------------------------------- what an ensemble computes


def _np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_combine_against_numpy(float64):
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 4, generator=gen) * 3 for _ in range(3)]
    arrays = [o.numpy() for o in outs]
    mean_logits = sum(arrays) / 3
    probs = sum(np.exp(_np_log_softmax(z)) for z in arrays) / 3
    np.testing.assert_allclose(combine(outs, "mean_logits").numpy(), mean_logits, **NUMPY)
    np.testing.assert_allclose(combine(outs, "mean_probs").numpy(), np.log(probs), **NUMPY)
    # as logits, mean_probs' output softmaxes back to the averaged probabilities
    np.testing.assert_allclose(torch.softmax(combine(outs, "mean_probs"), -1).numpy(), probs, **NUMPY)
    with pytest.raises(ValueError, match="unknown combine"):
        combine(outs, "median")


def test_ensembles_are_computed_after_the_ensembles_they_contain():
    graph = graph_of(GRAPH.replace("node e : ensemble(a, b, c)\nnode f : ensemble(b, d, e) [combine=mean_probs]",
                                   "node f : ensemble(b, d, e) [combine=mean_probs]\nnode e : ensemble(a, b, c)"))
    assert ensemble_order(graph) == [("e", ("a", "b", "c"), "mean_logits"), ("f", ("b", "d", "e"), "mean_probs")]


def _kl_np(src, tgt, T):
    log_s, log_t = _np_log_softmax(src / T), _np_log_softmax(tgt / T)
    return T * T * (np.exp(log_s) * (log_s - log_t)).sum(-1)


@pytest.mark.parametrize("engine", ENGINES)
def test_one_step_losses_against_numpy(engine, float64):
    """Every edge from an ensemble, its gate decided by the ensemble's own prediction, written
    out in numpy from the networks' logits on the batch."""
    step = compiled(engine=engine)
    x, y = batches(1)[0]
    with torch.no_grad():
        z = {n: m(x).numpy() for n, m in step.models.items()}
    yn = y.numpy()
    z["e"] = (z["a"] + z["b"] + z["c"]) / 3
    z["f"] = np.log((np.exp(_np_log_softmax(z["b"])) + np.exp(_np_log_softmax(z["d"]))
                     + np.exp(_np_log_softmax(z["e"]))) / 3)
    correct = {n: (z[n].argmax(-1) == yn).astype(float) for n in z}
    k, k_end = 1, STEPS * EPOCHS
    expected = {
        "e->a": (correct["e"] * _kl_np(z["e"], z["a"], 2)).mean(),
        "e->b": 0.5 * (k / k_end * _kl_np(z["e"], z["b"], 4)).mean(),
        "e->d": _kl_np(z["e"], z["d"], 1).mean(),
        "f->a": 0.7 * _kl_np(z["f"], z["a"], 2).mean(),
        "f->b": (correct["f"] * _kl_np(z["f"], z["b"], 1)).mean(),
    }
    stats = step.step(x, y, k)
    for key, value in expected.items():
        np.testing.assert_allclose(stats.edge_loss[key].item(), value, **NUMPY, err_msg=key)
    np.testing.assert_allclose(stats.edge_gate["f->b"].item(), correct["f"].mean(), **NUMPY)
    assert "f->d" not in stats.edge_loss  # cutoff: never computed
    assert {n: int(stats.node_correct[n]) for n in "abdcef"} == {n: int(correct[n].sum()) for n in "abdcef"}


# ---------------------------------------------------------------- both engines, one meaning


def test_fused_equals_reference_with_ensembles(float64):
    data = batches()
    reference, fused = compiled(engine="reference"), compiled(engine="fused")
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    for ref, fus in zip(ref_stats, fused_stats):
        for field in ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass"):
            assert getattr(fus, field).keys() == getattr(ref, field).keys()
            assert_tree_close(getattr(fus, field), getattr(ref, field), field, **TIGHT)
    assert set(ref_stats[0].node_correct) == set("abdcef") and set(ref_stats[0].node_loss) == set("abd")


# ensembles beside edges between layers: a FitNets connector (b's 64 channels onto a's 16),
# attention transfer from the frozen c, similarity-preserving from a to b, each gated
MIXED = GRAPH.split("node a :")[0] + """
node a : cnn_tiny [target]
node b : cnn_small
node c : cnn_tiny [frozen]
node e : ensemble(a, b, c) [combine=mean_probs]
label -> a : through
label -> b : linear
b -> a : through kl(T=3)
a -> b : correct
e -> a : correct kl(T=2)
e -> b : through
b.conv2 -> a.conv2 : correct hint()
c.conv1 -> a.conv1 : through at(p=2, weight=30)
a.conv2 -> b.conv2 : linear sp()
"""


def test_fused_equals_reference_with_ensembles_and_layer_edges(float64):
    data = batches()
    reference, fused = compiled(MIXED, engine="reference"), compiled(MIXED, engine="fused")
    assert any(n.startswith("dclang_connectors") for n, _ in fused.models["a"].named_parameters())
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    for ref, fus in zip(ref_stats, fused_stats):
        for field in ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass"):
            assert_tree_close(getattr(fus, field), getattr(ref, field), field, **TIGHT)
    assert set(ref_stats[0].node_correct) == set("abce")


def test_hfta_with_ensembles_equals_fused(float64):
    text = GRAPH.replace("node b : mlp", "node b : cnn_tiny")  # a, b, d: one HFTA group
    data = batches()
    fused = compiled(text, options=StepOptions(channels_last=False))
    hfta = compiled(text, options=StepOptions(hfta=True, channels_last=False))
    train(fused, data), train(hfta, data)
    assert_models_close(snapshot(hfta), snapshot(fused), **TIGHT)


@pytest.mark.parametrize("engine", ENGINES)
def test_no_gradient_reaches_the_members_through_an_ensemble(engine, float64):
    """`b` is a member of `e`, which teaches `a`: `a`'s loss must leave `b` untouched."""
    text = """
graph g
data digits { }
node a : cnn_tiny [target]
node b : mlp
node e : ensemble(a, b) [combine=mean_probs]
label -> b : through
e -> a : through kl(T=2)
"""
    step = compiled(text, engine=engine)
    x, y = batches(1)[0]
    logits = step.outputs(x)
    assert not logits["e"].requires_grad
    if engine == "fused":
        loss_a = step.node_losses(x, y, k=1)["a"]
    else:
        from dclang.losses import edge_loss

        edge = next(e for e in step.edges if e.key == "e->a")
        loss_a = edge_loss(edge, logits["e"], logits["a"], y, k=1, k_end=step.k_end)[0]
    loss_a.backward()
    # (the fused engine's one stack hands b an all-zero gradient; the reference engine none)
    assert all(p.grad is None or not p.grad.any() for p in step.models["b"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.models["a"].parameters())


def test_evaluate_reports_the_ensemble_from_the_same_forward(float64):
    step = compiled()
    images, labels = torch.randn(37, 1, 8, 8), torch.randint(0, CLASSES, (37,))
    counts = step.evaluate(images, labels, batch_size=10)
    step.eval()
    with torch.no_grad():
        z = {n: m(images) for n, m in step.models.items()}
    step.train()
    z["e"] = (z["a"] + z["b"] + z["c"]) / 3
    z["f"] = torch.log(sum(torch.softmax(z[n], -1) for n in "bde") / 3)
    assert list(counts) == ["a", "b", "d", "c", "e", "f"]
    assert {n: int(c) for n, c in counts.items()} == {n: int((z[n].argmax(1) == labels).sum()) for n in z}


# ---------------------------------------------------------------- training with an ensemble target


def test_an_ensemble_target_is_trained_selected_and_reported(tmp_path):
    from dclang.data import load_dataset
    from dclang.train import train_graph

    text = textwrap.dedent("""\
        graph peers
        data digits { val_split = 100  pad = 1 }
        train { epochs = 2  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }
        node p1 : mlp
        node p2 : mlp
        node ens : ensemble(p1, p2) [target, combine=mean_probs]
        label -> p1 : through
        label -> p2 : through
        ens -> p1 : correct kl(T=2)
        ens -> p2 : through kl(T=2)
        """)
    dataset = load_dataset("digits", data_dir=None, val_split=100, split_seed=0)
    result = train_graph(graph_of(text), run_dir=tmp_path, device="cpu", progress=False, dataset=dataset)
    summary = result.summary
    assert summary["target"] == "ens" and list(summary["nodes"]) == ["p1", "p2", "ens"]
    ens = summary["nodes"]["ens"]
    assert ens["model"] == "ensemble(p1, p2)" and ens["params"] == 0
    assert summary["best_epoch"] == ens["best_val_epoch"]
    assert all(0 <= r["nodes"]["ens"]["test_acc"] <= 1 for r in result.records)
    assert "combine=mean_probs" in (tmp_path / "graph.kt").read_text()
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)
    assert set(best["nodes"]) == {"p1", "p2"} and best["target"] == "ens"


# ---------------------------------------------------------------- the front end


def test_fmt_round_trips_every_ensemble_form():
    text = textwrap.dedent("""\
        graph g

        data digits {
        }

        node a : cnn_tiny                                        [target]
        node b : mlp
        node e : ensemble(a, b)                                  [combine=mean_probs]
        node f : ensemble(a, b, e)
        node g : choice(none, ensemble(a, b), ensemble(a, b, e)) [combine=choice(mean_logits, mean_probs)]

        label -> a : through
        label -> b : through
        e     -> a : correct kl(T=2)
        f     -> b : through
        g     -> a : through
        """)
    assert format_module(parse(text)) == text
    messy = text.replace("ensemble(a, b, e)", "ensemble( a,b ,\n  e )").replace("node g ", "node   g")
    assert format_module(parse(messy)) == text
    assert check(text).ok


def test_an_unknown_member_gets_a_suggestion():
    checked = check(GRAPH.replace("ensemble(a, b, c)", "ensemble(a, bb, c)"))
    (diag,) = checked.errors
    assert diag.code == "E201" and diag.help == "did you mean `b`?" and diag.span.line == 13


def test_a_target_ensemble_of_frozen_nodes_is_a_frozen_target():
    text = textwrap.dedent("""\
        graph g
        data digits { }
        node a : cnn_tiny [frozen]
        node b : mlp
        node e : ensemble(a, b) [target]
        node f : ensemble(a, e)
        """)
    (diag,) = check(text).errors
    assert (diag.code, diag.span.line, diag.span.column) == ("E304", 5, 10)
    assert "frozen nodes" in diag.message
    assert check(text + "label -> b : through\n").ok


def test_search_picks_members_or_leaves_the_ensemble_out():
    template = parse(textwrap.dedent("""\
        graph t
        data digits { }
        node a : cnn_tiny [target]
        node b : cnn_tiny
        node c : mlp
        node e : choice(none, ensemble(a, b), ensemble(a, b, c)) [combine=choice(mean_logits, mean_probs)]
        label -> a : through
        label -> b : through
        label -> c : through
        e -> a : choice(cutoff, through) kl(T=2)
        e -> b : through
        """))
    space = {p.name: p.choices for p in search_space(template)}
    assert space == {"e.model": ("none", "ensemble(a, b)", "ensemble(a, b, c)"),
                     "e.combine": ("mean_logits", "mean_probs"), "e->a.gate": ("cutoff", "through")}

    def trial(model, gate="through", how="mean_probs"):
        return realize(template, {"e.model": model, "e.combine": how, "e->a.gate": gate})

    absent = trial("none")
    assert absent.ok and "node e" not in absent.text and "e ->" not in absent.text
    assert absent.dropped == ("b", "c")  # nothing ties them to the target any more
    two = trial("ensemble(a, b)")
    assert "node e : ensemble(a, b) [combine=mean_probs]" in two.trained_text
    assert two.dropped == ("c",)  # c is no member: dead; a and b are live through e
    three = trial("ensemble(a, b, c)")
    assert three.dropped == () and three.checked.graph.nodes["e"]["spec"].combine == "mean_probs"
    # an ensemble that teaches nobody live is dead, and so are the members only it made live
    dead = trial("ensemble(a, b, c)", gate="cutoff")
    assert dead.dropped == ("b", "c", "e") and dead.key == absent.key


def test_draw_shows_ensembles_with_a_legend():
    source = to_graphviz(graph_of(GRAPH)).source
    assert "shape=hexagon" in source and "legend" in source and "member of an ensemble" in source
    assert source.count("style=dotted") == 6  # one membership arrow per member of e and f
    plain = to_graphviz(graph_of(GRAPH.split("node e")[0] + "label -> a : through\n"
                                 "label -> b : through\nlabel -> d : through\n")).source
    assert "member of an ensemble" not in plain and "hexagon" not in plain
