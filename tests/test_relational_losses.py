"""The losses over a batch's embeddings (`rkd`, `pkt`) and neuron selectivity transfer (`nst`).

Values are held against numpy written here from the papers' formulas with explicit loops, in
float64, to rtol 1e-10; gradients against central finite differences of those numpy
functions (`test_loss_catalogue.numeric_grad`, h = 1e-6, rtol 1e-6 / atol 1e-8) and by
`torch.autograd.gradcheck`. The gates' meaning for a loss over pairs (each pair weighted by
min(g_i, g_j), each triplet by the min of its three) is held against the same loops; then
the front end (check, fmt, draw, search) and the engines (fused equals reference in float64,
HFTA equals fused, a digits run end to end).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_loss_catalogue import numeric_grad

from dclang.api import check, parse
from dclang.cli import main
from dclang.compile import StepOptions, compile_graph
from dclang.draw import to_graphviz
from dclang.feature_losses import layer_edge_loss, nst_per_sample
from dclang.ir import EdgeSpec
from dclang.losses import edge_losses
from dclang.relational_losses import pkt_loss, rkd_loss
from dclang.search.space import realize, search_space
from dclang.syntax.format import format_module

ROOT = Path(__file__).resolve().parent.parent
VALUES = dict(rtol=1e-10, atol=1e-12)
GRADS = dict(rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- numpy references


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def np_rkd(es, et, g, distance, angle):
    """Park et al.'s distance and angle potentials with explicit loops; pair (i, j) weighted
    by min(g_i, g_j), triplet (i, j, k) by min(g_i, g_j, g_k); means over all B^2 / B^3."""
    b = len(es)

    def dist(e):
        d = np.array([[np.sqrt(((e[i] - e[j]) ** 2).sum()) for j in range(b)] for i in range(b)])
        return d / (d.sum() / (b * (b - 1)))

    def cos(e, i, j, k):
        u, v = e[j] - e[i], e[k] - e[i]
        nu, nv = np.sqrt((u ** 2).sum()), np.sqrt((v ** 2).sum())
        return 0.0 if nu == 0 or nv == 0 else (u @ v) / (nu * nv)

    ds, dt = dist(es), dist(et)
    loss_d = sum(min(g[i], g[j]) * huber(dt[i, j] - ds[i, j]) for i in range(b) for j in range(b)) / b ** 2
    loss_a = sum(min(g[i], g[j], g[k]) * huber(cos(et, i, j, k) - cos(es, i, j, k))
                 for i, j, k in itertools.product(range(b), repeat=3)) / b ** 3
    return distance * loss_d + angle * loss_a


def np_pkt(es, et, g):
    """Passalis & Tefas' conditional probabilities from cosine kernels; KL(source || target)
    per row with the authors' eps = 1e-7, pair (i, j) weighted by min(g_i, g_j)."""
    b = len(es)

    def probs(e):
        unit = [e[i] / (np.sqrt((e[i] ** 2).sum()) + 1e-7) for i in range(b)]
        k = np.array([[(1 + unit[i] @ unit[j]) / 2 for j in range(b)] for i in range(b)])
        return np.array([[k[i, j] / k[i].sum() for j in range(b)] for i in range(b)])

    ps, pt = probs(es), probs(et)
    return sum(min(g[i], g[j]) * ps[i, j] * np.log((ps[i, j] + 1e-7) / (pt[i, j] + 1e-7))
               for i in range(b) for j in range(b)) / b ** 2


def np_nst(fs, ft):
    """Huang & Wang's MMD^2 with k(x, y) = (x . y)^2 between the channel maps of each sample."""
    def maps(f, n):
        return [row / np.sqrt((row ** 2).sum()) for row in f[n].reshape(f.shape[1], -1)]

    out = []
    for n in range(len(fs)):
        s, t = maps(fs, n), maps(ft, n)
        k = lambda a, b: np.mean([(x @ y) ** 2 for x in a for y in b])  # noqa: E731
        out.append(k(t, t) + k(s, s) - 2 * k(s, t))
    return np.array(out)


def check_against(torch_fn, np_fn, source, target):
    """Values equal; the target's gradient equals the numeric one; the source gets none;
    and gradcheck agrees on the torch function's own derivative."""
    s, t = torch.tensor(source, requires_grad=True), torch.tensor(target, requires_grad=True)
    got = torch_fn(s, t)
    np.testing.assert_allclose(got.detach().numpy(), np_fn(source, target), **VALUES)
    want, w = numeric_grad(lambda x: np.atleast_1d(np_fn(source, x)), target)
    (torch.tensor(w) * got).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), want, **GRADS)
    assert s.grad is None, "a gradient reached the source"
    assert torch.autograd.gradcheck(lambda x: torch_fn(s.detach(), x), (torch.tensor(target, requires_grad=True),))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("distance,angle", [(1.0, 2.0), (1.0, 0.0), (0.0, 1.0), (25.0, 50.0)])
def test_rkd_on_embeddings(rng, distance, angle):
    es, et = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4))
    ones = np.ones(5)
    check_against(lambda s, t: rkd_loss(s, t, torch.ones(5), distance=distance, angle=angle),
                  lambda s, t: np_rkd(s, t, ones, distance, angle), es, et)


def test_rkd_on_flattened_layers(rng):
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 2, 1, 3))  # any two shapes compare
    ones = np.ones(4)
    check_against(lambda s, t: rkd_loss(s.flatten(1), t.flatten(1), torch.ones(4), distance=1.0, angle=2.0),
                  lambda s, t: np_rkd(s.reshape(4, -1), t.reshape(4, -1), ones, 1.0, 2.0), fs, ft)


def test_rkd_is_invariant_to_the_scale_and_rotation_of_embeddings(rng):
    """What Park et al. designed it for: relations, not coordinates, are transferred."""
    es, et = torch.tensor(rng.normal(size=(6, 3))), torch.tensor(rng.normal(size=(6, 3)))
    rotation, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(3, 3))))
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(rkd_loss(es, et, ones, distance=1.0, angle=2.0),
                               rkd_loss(7 * es @ rotation + 3, et, ones, distance=1.0, angle=2.0),
                               rtol=1e-9, atol=1e-12)
    assert rkd_loss(es, es.clone(), ones, distance=1.0, angle=2.0).item() == pytest.approx(0, abs=1e-12)


def test_pkt(rng):
    es, et = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) * 3
    check_against(lambda s, t: pkt_loss(s, t, torch.ones(5)), lambda s, t: np_pkt(s, t, np.ones(5)), es, et)


def test_pkt_summed_over_j_is_the_kl_between_rows(rng):
    es, et = torch.tensor(rng.normal(size=(5, 4))), torch.tensor(rng.normal(size=(5, 4)))
    unit = lambda e: e / e.norm(dim=1, keepdim=True)  # noqa: E731
    p = lambda e: torch.softmax(((unit(e) @ unit(e).T + 1) / 2).log(), dim=1)  # noqa: E731
    kl = (p(es) * (p(es).log() - p(et).log())).sum(dim=1).mean() / 5
    torch.testing.assert_close(pkt_loss(es, et, torch.ones(5, dtype=torch.float64)), kl, rtol=1e-5, atol=0)


def test_nst(rng):
    fs, ft = rng.normal(size=(3, 4, 2, 3)), rng.normal(size=(3, 2, 2, 3))  # channel counts may differ
    check_against(nst_per_sample, np_nst, fs, ft)


def test_nst_is_zero_for_the_same_maps_in_any_channel_order(rng):
    f = torch.tensor(rng.normal(size=(2, 5, 3, 3)))
    torch.testing.assert_close(nst_per_sample(f, f[:, [3, 1, 4, 0, 2]] * 4), torch.zeros(2, dtype=f.dtype),
                               rtol=0, atol=1e-12)


def test_stacked_edges_equal_each_edge(rng):
    zs, zt = torch.tensor(rng.normal(size=(3, 6, 5))), torch.tensor(rng.normal(size=(3, 6, 5)))
    g = torch.tensor(rng.uniform(size=(3, 6)))
    for fn in (lambda s, t, w: rkd_loss(s, t, w, distance=1.0, angle=2.0), pkt_loss):
        stacked = fn(zs, zt, g)
        for e in range(3):
            torch.testing.assert_close(stacked[e], fn(zs[e], zt[e], g[e]), **VALUES)


def test_a_batch_of_one_sample_has_no_pairs():
    one = torch.ones(1, dtype=torch.float64)
    assert rkd_loss(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.float64, requires_grad=True), one,
                    distance=1.0, angle=2.0).item() == 0


# ---------------------------------------------------------------- gates on pairs


def edge(loss, gate, weight=3.0, args=()):
    return EdgeSpec("t", "s", gate, loss, 1.0, weight, args=args)


def gated(rng, b=6, c=3):
    zs, zt = rng.normal(size=(b, c)), rng.normal(size=(b, c))
    labels = np.array([0, 1, 2, 0, 1, 2][:b])
    return zs, zt, labels


@pytest.mark.parametrize("gate", ["through", "linear", "correct"])
@pytest.mark.parametrize("loss,args", [("rkd", (("distance", 1.0), ("angle", 2.0))), ("pkt", ())])
def test_gates_weigh_each_pair_by_its_smallest_gate(rng, gate, loss, args):
    """Between logits (stacked edges) and between layers, with the gate decided by the
    source's logits: the loss equals the loops' with g_n written out here."""
    zs, zt, y = gated(rng)
    g = {"through": np.ones(6), "linear": np.full(6, 2 / 8),
         "correct": np.array([float(zs[n].argmax() == y[n]) for n in range(6)])}[gate]
    assert gate != "correct" or 0 < g.sum() < 6
    np_fn = (lambda s, t: np_rkd(s, t, g, 1.0, 2.0)) if loss == "rkd" else (lambda s, t: np_pkt(s, t, g))
    spec = edge(loss, gate, args=args)
    s, t, labels = torch.tensor(zs), torch.tensor(zt, requires_grad=True), torch.tensor(y)
    got, weights = edge_losses([spec], s[None], t[None], labels, k=2, k_end=8)
    np.testing.assert_allclose(got.detach().numpy(), [3 * np_fn(zs, zt)], **VALUES)
    assert weights[0].tolist() == g.tolist()
    want, w = numeric_grad(lambda x: np.atleast_1d(3 * np_fn(zs, x)), zt)
    (torch.tensor(w) * got).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), want, **GRADS)
    # the same edge between layers: features flattened per sample, gate from the source's logits
    fs, ft = rng.normal(size=(6, 2, 1, 2)), rng.normal(size=(6, 1, 2, 2))
    layer_loss, _ = layer_edge_loss(spec, torch.tensor(fs), torch.tensor(ft), s, labels, k=2, k_end=8)
    np.testing.assert_allclose(layer_loss.item(), 3 * np_fn(fs.reshape(6, -1), ft.reshape(6, -1)), **VALUES)


def test_nst_is_gated_per_sample(rng):
    fs, ft = rng.normal(size=(6, 2, 2, 2)), rng.normal(size=(6, 3, 2, 2))
    logits, labels = torch.tensor(rng.normal(size=(6, 3))), torch.tensor([0, 1, 2, 0, 1, 2])
    g = (logits.argmax(dim=1) == labels).double().numpy()
    loss, _ = layer_edge_loss(edge("nst", "correct"), torch.tensor(fs), torch.tensor(ft), logits, labels, k=1, k_end=1)
    np.testing.assert_allclose(loss.item(), (3 * g * np_nst(fs, ft)).mean(), **VALUES)


# ---------------------------------------------------------------- the language


HEAD = """graph relational
data digits { val_split = 300 }
train { epochs = 1  batch = 16 }
node s : cnn_tiny [target]
node p : cnn_tiny
label -> s : through
label -> p : through
"""
EDGES = """\
p -> s : through rkd(distance=1, angle=2)
s -> p : correct pkt(weight=2)
p.pool -> s.pool : linear rkd(angle=0)
p.conv2 -> s.conv2 : through nst(weight=5)
s.conv1 -> p.conv1 : through pkt()
"""


def errors_of(text):
    return [(d.code, d.message, d.span.line, d.help) for d in check(text).errors]


def test_check_accepts_the_new_losses_at_either_kind_of_ends():
    assert check(HEAD + EDGES).ok, check(HEAD + EDGES).errors


@pytest.mark.parametrize("edge_text,code,words", [
    ("p -> s : through nst()", "E320", "compares two layers"),
    ("label -> p : through rkd()", "E312", "cross-entropy"),
    ("p -> s : through rkd(distnce=1)", "E206", "did you mean `distance`"),
    ("p -> s : through rkd(angle=-1)", "E404", "`angle` must be from 0 to 100000"),
    ("p -> s : through pktt()", "E203", "did you mean `pkt`"),
    ("p.conv2 -> s.pool : through nst()", "E321", "spatial"),
    ("p.7 -> s.7 : through nst()", "E321", "over its positions"),
    ("p.pool -> s.pool : through nst()", "E321", "over its positions"),
])
def test_check_locates_wrong_ends_and_arguments(edge_text, code, words):
    """Each mistake is reported on its own line (the last), with its code and words."""
    text = HEAD.replace("label -> p : through\n", "") + edge_text + "\n"
    found = errors_of(text)
    assert found, edge_text
    assert found[0][0] == code and found[0][2] == text.count("\n"), found
    assert words in found[0][1] + " " + (found[0][3] or ""), found


def test_fmt_round_trips_and_draw_labels_them():
    text = HEAD + EDGES
    once = format_module(parse(text))
    assert format_module(parse(once)) == once
    specs = lambda t: {spec.key: spec for _, _, spec in check(t).graph.edges(data="spec")}  # noqa: E731
    assert specs(once) == specs(text) and len(specs(text)) == 7
    dot = to_graphviz(check(text).graph).source
    for label in ("rkd", "pkt ×2", "nst ×5", "rkd angle=0"):
        assert re.search(re.escape(label), dot), (label, dot)


# ---------------------------------------------------------------- the engines


def compiled(engine):
    graph = check(HEAD + EDGES).graph
    options = StepOptions(channels_last=False) if engine == "fused" else None
    return compile_graph(graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                         engine=engine, seed=0, steps_per_epoch=2, epochs=2, options=options)


def test_fused_equals_reference_with_the_new_losses(float64):
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(3)]
    reference, fused = compiled("reference"), compiled("fused")
    for k, (x, y) in enumerate(data, start=1):
        ref, fus = reference.step(x, y, k), fused.step(x, y, k)
        for field in ("node_loss", "edge_loss", "edge_gate", "edge_pass"):
            for key, want in getattr(ref, field).items():
                torch.testing.assert_close(getattr(fus, field)[key], want, rtol=1e-10, atol=1e-12)
    assert {e.key for e in fused.edges} >= {"p->s", "p.conv2->s.conv2", "s.conv1->p.conv1"}
    for name in reference.models:
        for key, value in reference.models[name].state_dict().items():
            torch.testing.assert_close(fused.models[name].state_dict()[key], value, rtol=1e-10, atol=1e-12,
                                       msg=f"{name}.{key}")


def test_a_tiny_digits_run_trains_end_to_end(tmp_path):
    """`dclang run` of a graph with every new loss: one epoch of digits, finite losses."""
    kt = tmp_path / "relational.kt"
    kt.write_text(HEAD.replace("batch = 16", "batch = 32") + EDGES)
    result = CliRunner().invoke(main, ["run", str(kt), "-o", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    edges = metrics[-1]["edges"]
    assert {"p->s", "s->p", "p.pool->s.pool", "p.conv2->s.conv2", "s.conv1->p.conv1"} <= set(edges)
    assert all(math.isfinite(e["loss"]) for e in edges.values()), edges


@pytest.mark.parametrize("example", ["rkd.kt", "digits_rkd.kt"])
def test_the_examples_check(example):
    checked = check((ROOT / "examples" / example).read_text())
    assert checked.ok, checked.errors
    assert any(spec.loss == "rkd" for _, _, spec in checked.graph.edges(data="spec"))


def test_hfta_with_the_new_losses_equals_the_fused_engine(float64):
    """`s` and `p` fused into one network (HFTA): the new losses between their logits and
    layers, read from the fused network, equal the separate models' over four steps."""
    graph = check(HEAD + EDGES).graph
    steps = {hfta: compile_graph(graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                                 seed=0, steps_per_epoch=2, epochs=2,
                                 options=StepOptions(hfta=hfta, channels_last=False)) for hfta in (False, True)}
    assert [[n for _, n in g.slices] for g in steps[True].groups] == [["s", "p"]]
    gen = torch.Generator().manual_seed(4)
    for k in range(1, 5):
        x, y = torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
        stats = {hfta: step.step(x, y, k) for hfta, step in steps.items()}
        for key, loss in stats[False].edge_loss.items():
            torch.testing.assert_close(stats[True].edge_loss[key], loss, rtol=1e-9, atol=1e-12, msg=key)
    for node, model in steps[False].models.items():
        for key, value in steps[True].models[node].state_dict().items():
            torch.testing.assert_close(value, model.state_dict()[key], rtol=1e-9, atol=1e-12, msg=f"{node}.{key}")


def test_the_channels_last_step_equals_the_models_own_layout(float64):
    """The engine evaluates every gate at k_end and scales the linear edges by a tensor (exact
    for a pair loss because min(c, c) = c); in channels-last the pair losses read NHWC layers
    and equal the models' own layout's."""
    graph = check(HEAD + EDGES).graph
    steps = {cl: compile_graph(graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                               seed=0, steps_per_epoch=2, epochs=2, options=StepOptions(channels_last=cl))
             for cl in (False, True)}
    assert steps[True].options.channels_last and not steps[False].options.channels_last
    gen = torch.Generator().manual_seed(5)
    for k in range(1, 4):
        x, y = torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
        stats = {cl: step.step(x, y, k) for cl, step in steps.items()}
        for key, loss in stats[False].edge_loss.items():
            torch.testing.assert_close(stats[True].edge_loss[key], loss, rtol=1e-9, atol=1e-12, msg=key)
    assert stats[True].edge_loss["p.pool->s.pool"] > 0  # the linear edge did count


def test_a_bulk_edge_with_a_loss_over_pairs_keeps_cross_entropy_from_the_label():
    text = HEAD.replace("label -> s : through\nlabel -> p : through\n", "edges * -> * : correct pkt(weight=2)\n")
    checked = check(text)
    assert checked.ok, checked.errors
    losses = {spec.key: (spec.loss, spec.gate, spec.weight) for _, _, spec in checked.graph.edges(data="spec")}
    assert losses == {"label->s": ("ce", "correct", 2.0), "label->p": ("ce", "correct", 2.0),
                      "p->s": ("pkt", "correct", 2.0), "s->p": ("pkt", "correct", 2.0)}


def test_search_picks_among_the_new_losses():
    template = parse(HEAD + "p.pool -> s.pool : through choice(rkd(), pkt(), sp())\n"
                            "p.conv2 -> s.conv2 : through nst(weight=choice(1, 50))\n"
                            "p -> s : through rkd(angle=choice(0, 2))\n")
    space = {p.name: p.choices for p in search_space(template)}
    assert space == {"p.pool->s.pool.loss": ("rkd()", "pkt()", "sp()"), "p.conv2->s.conv2.weight": (1, 50),
                     "p->s.angle": (0, 2)}
    trial = realize(template, {name: choices[1] for name, choices in space.items()})
    assert trial.ok, trial.problem
    assert {"p.pool -> s.pool : through pkt()", "p.conv2 -> s.conv2 : through nst(weight=50)",
            "p -> s : through rkd(angle=2)"} <= {re.sub(" +", " ", line) for line in trial.text.splitlines()}
