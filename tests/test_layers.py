"""Edges between layers: syntax, taps, checks, gates, detaching, connectors, search, drawing.

Numbers are compared in float64 against explicit computations written here; the engines'
agreement on a graph mixing every kind of edge is in tests/test_engines.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_fuzz import _assert_span_inside, mutations

from dclang.api import check, parse
from dclang.compile import StepOptions, compile_graph
from dclang.draw import to_graphviz
from dclang.feature_losses import at_per_sample, layer_edge_loss
from dclang.ir import live_edges
from dclang.models import build_model, parameter_counts
from dclang.models.connector import CONNECTORS, connector_of
from dclang.models.taps import UnknownLayer, layer_names, layer_shapes, resolve_layer
from dclang.search.space import realize, search_space
from dclang.syntax.format import format_module

ROOT = Path(__file__).resolve().parent.parent
NEW_EXAMPLES = [ROOT / "examples" / "attention.kt", ROOT / "examples" / "digits_attention.kt"]

HEAD = """
graph layers
data digits { val_split = 300 }
train { epochs = 2  batch = 16 }
"""
GRAPH = HEAD + """\
node s : cnn_tiny [target]
node p : cnn_tiny
node t : cnn_small [frozen]
label -> s : through
label -> p : through
t.conv1 -> s.conv1 : {gate} hint()
p.conv2 -> s.conv2 : through at(p=2)
t -> s : through dkd(alpha=1, beta=2, T=3)
"""


def layered(gate: str) -> str:
    """GRAPH with the gate of its `hint` edge."""
    return GRAPH.replace("{gate}", gate)


def squeeze(text: str) -> str:
    """The text with each run of spaces as one (the formatter aligns columns)."""
    return re.sub(" +", " ", text)


def graph_of(text):
    checked = check(text)
    assert checked.ok, checked.errors
    return checked.graph


def step_of(text, engine="fused", k_end_steps=3):
    options = StepOptions(channels_last=False) if engine == "fused" else None
    return compile_graph(graph_of(text), num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                         engine=engine, seed=0, steps_per_epoch=k_end_steps, epochs=2, options=options)


def batch(size=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 1, 8, 8, generator=gen).to(torch.get_default_dtype()),
            torch.randint(0, 3, (size,), generator=gen))


# ---------------------------------------------------------------- syntax


def test_layer_edges_parse_and_round_trip():
    text = layered("correct") + (
        "t.choice(conv2, conv3) -> s.pool : linear choice(sp(), sp(weight=2))\n"
        "p.layer3.0.conv1 -> s.1 : through at(p=choice(1, 2))\n")
    module = parse(text)
    edge = module.items[-1]
    assert edge.source_layer.text == "layer3.0.conv1" and edge.target_layer.text == "1"
    once = format_module(module)
    assert "p.layer3.0.conv1 -> s.1 :" in squeeze(once) and "t.choice(conv2, conv3) -> s.pool :" in squeeze(once)
    assert format_module(parse(once)) == once


def test_ir_keys_layer_edges_apart_from_output_edges():
    g = graph_of(layered("through"))
    keys = sorted(k for *_, k in g.edges(keys=True))
    assert keys == ["label->p", "label->s", "p.conv2->s.conv2", "t->s", "t.conv1->s.conv1"]
    spec = g.edges["t", "s", "t.conv1->s.conv1"]["spec"]
    assert (spec.source_layer, spec.target_layer, spec.loss) == ("conv1", "conv1", "hint")
    dkd = g.edges["t", "s", "t->s"]["spec"]
    assert dkd.loss_args() == {"T": 3.0, "alpha": 1.0, "beta": 2.0}
    assert not g.nodes["s"]["spec"].frozen and g.nodes["t"]["spec"].frozen


def test_a_layer_edge_never_overrides_a_bulk_output_edge():
    g = graph_of("graph b\ndata digits { }\nnode a : cnn_tiny [target]\nnode b : cnn_tiny\n"
                 "edges * -> * : through\nb.conv1 -> a.conv1 : through at()\n")
    assert {k for *_, k in g.edges(keys=True)} >= {"b->a", "b.conv1->a.conv1", "label->a"}


# ---------------------------------------------------------------- taps


def test_taps_of_the_builtin_models():
    with torch.device("meta"):
        resnet, wrn = build_model("resnet32", 100, 3, 32), build_model("wrn28_2", 100, 3, 32)
    for model, widths in ((resnet, (16, 32, 64)), (wrn, (32, 64, 128))):
        assert layer_names(model)[:4] == ["layer1", "layer2", "layer3", "pool"]
        shapes = layer_shapes(model, (3, 32, 32))
        assert [shapes[f"layer{i}"] for i in (1, 2, 3)] == [(widths[0], 32, 32), (widths[1], 16, 16), (widths[2], 8, 8)]
        assert shapes["pool"] == (widths[2], 1, 1)
        assert shapes["layer3.0.conv1"][0] == widths[2]  # any module path works too
    tiny = build_model("cnn_tiny", 10, 1, 8)
    assert layer_names(tiny)[:3] == ["conv1", "conv2", "pool"]
    assert resolve_layer(tiny, "conv2") is tiny[5] and resolve_layer(tiny, "5") is tiny[5]
    assert next(tiny.parameters()).device.type == "cpu"  # layer_shapes left the model alone
    with pytest.raises(UnknownLayer, match="did you mean `conv2`"):
        resolve_layer(tiny, "conv22")


def test_a_library_model_has_layers_by_module_name():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
    assert layer_names(model) == ["0", "1", "2"]
    assert layer_shapes(model, (1, 5, 5), ["1"]) == {"1": (4, 5, 5)}


# ---------------------------------------------------------------- gates and detaching


@pytest.mark.parametrize("gate", ["through", "linear", "correct"])
def test_every_gate_on_a_layer_edge(gate, float64):
    """L = mean_n(weight * g_n * a_n), g_n decided by the source's logits, written out here."""
    g = graph_of(layered(gate).replace("hint()", "at(p=2, weight=3)"))
    edge = g.edges["t", "s", "t.conv1->s.conv1"]["spec"]
    gen = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(6, 4, 3, 3, generator=gen), torch.randn(6, 2, 3, 3, generator=gen)
    logits, labels = torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, weights = layer_edge_loss(edge, fs, ft, logits, labels, k=2, k_end=8)
    a = at_per_sample(fs, ft, 2.0)
    g_n = {"through": [1.0] * 6, "linear": [2 / 8] * 6,
           "correct": [float(logits[n].argmax() == labels[n]) for n in range(6)]}[gate]
    assert 0 < sum(g_n) < 6 or gate != "correct"
    expected = sum(3 * g_n[n] * a[n] for n in range(6)) / 6
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert weights.tolist() == g_n


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_cutoff_layer_edges_are_never_computed(engine):
    step = step_of(layered("cutoff"), engine)
    stats = step.step(*batch(), k=1)
    assert "t.conv1->s.conv1" not in stats.edge_loss and "p.conv2->s.conv2" in stats.edge_loss
    assert not hasattr(step.models["s"], CONNECTORS)  # a cutoff hint edge needs no connector


@pytest.mark.parametrize("engine", ["fused", "reference"])
def test_no_gradient_reaches_a_source_through_a_layer_edge(engine, float64):
    """`p` is trainable and the source of `p.conv2 -> s.conv2`: that edge's loss alone must
    leave every parameter of `p` without a gradient, while `s` gets one."""
    step = step_of(layered("through"), engine)
    x, y = batch()
    logits = step.forward(x)
    edge = next(e for e in step.edges if e.key == "p.conv2->s.conv2")
    loss, _ = step.layer_edge_result(edge, logits, y, k=1)
    loss.backward()
    assert all(p.grad is None for p in step.models["p"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in step.models["s"].parameters())


def test_layers_are_captured_in_the_one_forward():
    step = step_of(layered("through"))
    calls = {name: 0 for name in step.models}
    for name, model in step.models.items():
        model.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    step.step(*batch(), k=1)
    assert calls == {"s": 1, "p": 1, "t": 1}


# ---------------------------------------------------------------- connectors


def test_connector_only_where_channels_differ_owned_trained_saved_counted(tmp_path):
    step = step_of(layered("through"))
    s = step.models["s"]
    edge = next(e for e in step.edges if e.loss == "hint")
    conn = connector_of(s, edge)  # cnn_small.conv1 has 32 channels, cnn_tiny.conv1 8
    assert isinstance(conn[0], torch.nn.Conv2d) and (conn[0].in_channels, conn[0].out_channels) == (8, 32)
    assert connector_of(step.models["p"], edge) is None and not hasattr(step.models["t"], CONNECTORS)
    keys = [k for k in s.state_dict() if k.startswith(CONNECTORS)]
    assert keys and all(k.startswith(f"{CONNECTORS}.t__conv1__conv1.") for k in keys)
    counted = dict((n, c) for n, _, c in parameter_counts(graph_of(layered("through"))))
    plain = sum(p.numel() for p in build_model("cnn_tiny", 10, 1, 8).parameters())
    assert counted["s"] == plain + 8 * 32 + 2 * 32 and counted["p"] == plain
    before = conn[0].weight.detach().clone()
    step.step(*batch(), k=1)
    assert not torch.equal(before, conn[0].weight)  # trained with its target
    # the node's checkpoint holds it; loading it as `init` elsewhere drops it
    from dclang.checkpoints import atomic_save, node_checkpoint, read_node_checkpoint

    atomic_save(node_checkpoint("cnn_tiny", 3, s.state_dict()), tmp_path / "s.pt")
    state = read_node_checkpoint(tmp_path / "s.pt", model="cnn_tiny", num_classes=3, in_channels=1, image_size=8)
    build_model("cnn_tiny", 3, 1, 8).load_state_dict(state)


def test_hfta_with_layer_edges_equals_the_fused_engine(float64):
    """Three cnn_tiny fused into one network, edges between their layers (one under a linear
    gate, one from a frozen teacher's, one between pooled features), against the fused
    engine's separate models: the layers are captured from the fused network, cut to each
    node's part."""
    text = HEAD + """\
node s : cnn_tiny [target]
node p : cnn_tiny
node q : cnn_tiny
node t : cnn_small [frozen]
label -> s : through
label -> p : through
label -> q : through
p.conv2 -> s.conv2 : through at(p=2)
s.conv1 -> p.conv1 : linear at()
t.conv1 -> q.conv1 : through at()
s -> q : through kl(T=2)
q.pool -> p.pool : through sp()
"""
    graph = graph_of(text)
    steps = {hfta: compile_graph(graph, num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                                 seed=0, steps_per_epoch=3, epochs=2,
                                 options=StepOptions(hfta=hfta, channels_last=False)) for hfta in (False, True)}
    assert [[n for _, n in g.slices] for g in steps[True].groups] == [["s", "p", "q"]]
    generator = torch.Generator().manual_seed(0)
    for k in range(1, 5):
        x = torch.randn(16, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        stats = {hfta: step.step(x, y, k) for hfta, step in steps.items()}
        for edge, loss in stats[False].edge_loss.items():
            assert stats[True].edge_loss[edge].item() == pytest.approx(loss.item(), rel=1e-9, abs=1e-12), edge
    for node, model in steps[False].models.items():
        want = model.state_dict()
        for key, value in steps[True].models[node].state_dict().items():
            torch.testing.assert_close(value, want[key], rtol=1e-9, atol=1e-12, msg=f"{node}.{key}")


# ---------------------------------------------------------------- checking


def test_plain_check_imports_no_torch():
    """Only a file with an edge between layers pays for torch (check_layers imports it lazily)."""
    code = ("import sys; from dclang.api import check; c = check(open(sys.argv[1]).read()); "
            "assert c.ok, c.errors; print('torch' in sys.modules)")
    plain = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "kd_dml.kt")],
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "False"


def test_choice_over_layers_is_checked_per_option_and_per_trial():
    template = layered("through") + "t.choice(conv2, conv3) -> s.conv2 : through choice(at(), sp())\n"
    assert check(template).ok  # conv3 (4x4) with at fails, but sp and conv2 fit: decided per trial
    bad = layered("through") + "t.choice(conv3, pool) -> s.conv2 : through at()\n"
    assert [d.code for d in check(bad).errors] == ["E321"]  # no option fits
    typo = layered("through") + "t.choice(conv2, conv4) -> s.conv2 : through at()\n"
    assert [d.code for d in check(typo).errors] == ["E230"]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations([p.read_text(encoding="utf-8") for p in NEW_EXAMPLES]))
def test_check_never_raises_on_mutated_attention_examples(text):
    checked = check(text)
    for diag in checked.diagnostics:
        if diag.span is not None:
            _assert_span_inside(diag.span, text)
    assert checked.ok or checked.errors


# ---------------------------------------------------------------- search and drawing


def test_search_picks_losses_their_arguments_and_layers():
    template = parse(layered("through") +
                     "t.choice(conv1, conv2) -> s.conv1 : correct choice(at(p=2), sp())\n"
                     "p.conv1 -> s.conv1 : through at(p=choice(1, 2))\n"
                     "p -> s : through choice(kl(T=2), dkd(alpha=1, beta=8, T=4), lskd())\n")
    space = {p.name: p.choices for p in search_space(template)}
    assert space == {"t.{conv1|conv2}->s.conv1.source_layer": ("conv1", "conv2"),
                     "t.{conv1|conv2}->s.conv1.loss": ("at(p=2)", "sp()"),
                     "p.conv1->s.conv1.p": (1, 2),
                     "p->s.loss": ("kl(T=2)", "dkd(alpha=1, beta=8, T=4)", "lskd()")}
    trial = realize(template, {name: choices[-1] for name, choices in space.items()})
    assert trial.ok, trial.problem
    text = squeeze(trial.text)
    assert "t.conv2 -> s.conv1 : correct sp()" in text and "p.conv1 -> s.conv1 : through at(p=2)" in text
    assert "p -> s : through lskd()" in text
    other = realize(template, {name: choices[0] for name, choices in space.items()})
    assert other.key != trial.key


def test_dead_node_elimination_follows_layer_edges():
    template = parse(layered("through") + "node q : cnn_tiny\nlabel -> q : through\n")
    trial = realize(template, {})
    assert trial.dropped == ("q",)  # q reaches nothing; p reaches s only through its layer edge
    assert "p.conv2 -> s.conv2" in squeeze(trial.trained_text)


def test_draw_shows_layer_edges_distinctly_with_a_legend():
    source = to_graphviz(graph_of(layered("through"))).source
    assert "conv1 → conv1" in source and "hint" in source and "legend" in source
    layer_edge = re.search(r'p -> s \[label="conv2 → conv2[^\]]*\]', source).group(0)
    assert "dashed" in layer_edge and "#1b7f79" in layer_edge
    assert "between layers" not in to_graphviz(graph_of("graph a\ndata digits { }\nnode a : cnn_tiny [target]\n"
                                                        "label -> a : through\n")).source


def test_live_edges_include_layer_edges():
    assert {e.key for e in live_edges(graph_of(layered("through")))} == {
        "label->s", "label->p", "t.conv1->s.conv1", "p.conv2->s.conv2", "t->s"}
