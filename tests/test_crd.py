"""Contrastive representation distillation (`dclang.crd`): values, gradients, banks, state.

The NCE loss, the normalising constants and the banks' momentum update are held against
numpy written here from Tian et al.'s formulas with explicit loops, in float64, to rtol
1e-10; gradients (the target's features and both heads) against central finite differences
of that numpy (`test_loss_catalogue.numeric_grad`, h = 1e-6, rtol 1e-6 / atol 1e-8) and
`torch.autograd.gradcheck`. The module's state (heads, banks, Z) goes through a real
checkpoint file and continues identically.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_loss_catalogue import numeric_grad

from dclang.api import check, parse
from dclang.cli import main
from dclang.compile import Engine, StepMember, StepOptions, compile_graph
from dclang.compile.autotune import autotune
from dclang.crd import CRD, add_crd, crd_edge_loss
from dclang.data.batches import BatchIterator
from dclang.data.dataset import Split
from dclang.diagnostics import UserError
from dclang.draw import to_graphviz
from dclang.ir import EdgeSpec
from dclang.models import build_model, parameter_counts
from dclang.models.connector import CONNECTORS, connector_of, own, without_connectors
from dclang.syntax.format import format_module

ROOT = Path(__file__).resolve().parent.parent
VALUES = dict(rtol=1e-10, atol=1e-12)
GRADS = dict(rtol=1e-6, atol=1e-8)
B, N, K, D = 5, 20, 6, 4


def unit(x):
    return x / np.sqrt((x ** 2).sum(axis=1, keepdims=True))


def np_crd(fs, ft, params, memory_s, memory_t, z, indices, negatives, T):
    """a_n of both directions, the Z used and the updated banks, from explicit loops."""
    ws, bs, wt, bt = params
    vs, vt = unit(fs.reshape(B, -1) @ ws.T + bs), unit(ft.reshape(B, -1) @ wt.T + bt)
    contrast = [[indices[n]] + list(negatives[n]) for n in range(B)]
    scores = [np.array([[np.exp(memory[c] @ v[n] / T) for c in contrast[n]] for n in range(B)])
              for memory, v in ((memory_s, vt), (memory_t, vs))]
    z = [z[i] if z[i] >= 0 else scores[i].mean() * N for i in range(2)]
    noise = K / N
    a = np.zeros(B)
    for i in range(2):
        p = scores[i] / z[i]
        for n in range(B):
            a[n] -= np.log(p[n, 0] / (p[n, 0] + noise + 1e-7))
            a[n] -= sum(np.log(noise / (p[n, j] + noise + 1e-7)) for j in range(1, K + 1))
    banks = []
    for memory, v in ((memory_s, vs), (memory_t, vt)):
        memory = memory.copy()
        for n in range(B):
            moved = 0.5 * memory[indices[n]] + 0.5 * v[n]
            memory[indices[n]] = moved / np.sqrt((moved ** 2).sum())
        banks.append(memory)
    return a, z, banks


@pytest.fixture
def setup(float64):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = CRD(12, 8, N, feat_dim=D, nce_k=K, T=0.5)
    fs, ft = rng.normal(size=(B, 3, 2, 2)), rng.normal(size=(B, 2, 2, 2))
    indices = torch.tensor([3, 17, 0, 9, 11])
    negatives = torch.tensor(rng.integers(0, N, size=(B, K)))
    return module, fs, ft, indices, negatives


def state(module):
    return ([p.detach().numpy().copy() for p in (module.embed_source.linear.weight, module.embed_source.linear.bias,
                                                 module.embed_target.linear.weight, module.embed_target.linear.bias)],
            module.memory_source.numpy().copy(), module.memory_target.numpy().copy(), module.z.numpy().copy())


def test_values_first_z_and_bank_update(setup):
    module, fs, ft, indices, negatives = setup
    params, mem_s, mem_t, z = state(module)
    assert (z < 0).all()
    a = module(torch.tensor(fs), torch.tensor(ft), indices, negatives)
    want, want_z, (bank_s, bank_t) = np_crd(fs, ft, params, mem_s, mem_t, z, indices.numpy(), negatives.numpy(), 0.5)
    np.testing.assert_allclose(a.detach().numpy(), want, **VALUES)
    np.testing.assert_allclose(module.z.numpy(), want_z, **VALUES)
    np.testing.assert_allclose(module.memory_source.numpy(), bank_s, **VALUES)
    np.testing.assert_allclose(module.memory_target.numpy(), bank_t, **VALUES)
    # a second batch keeps Z and reads the updated banks
    a2 = module(torch.tensor(2 * fs), torch.tensor(-ft), indices, negatives)
    want2, z2, _ = np_crd(2 * fs, -ft, params, bank_s, bank_t, np.array(want_z), indices.numpy(), negatives.numpy(),
                          0.5)
    np.testing.assert_allclose(a2.detach().numpy(), want2, **VALUES)
    assert module.z.tolist() == list(want_z) == list(z2)


def test_gradients_of_the_target_and_both_heads(setup):
    """With Z set (after a first batch), the loss of the target's features and of both
    heads' weights against central differences of the numpy loss."""
    module, fs, ft, indices, negatives = setup
    module(torch.tensor(fs), torch.tensor(ft), torch.tensor([1, 2, 4, 5, 6]), negatives)  # sets Z, moves banks
    params, mem_s, mem_t, z = state(module)
    fresh = copy.deepcopy(module)
    w = np.linspace(0.5, 1.5, B)  # the weights numeric_grad gives the samples
    source, target = torch.tensor(fs, requires_grad=True), torch.tensor(ft, requires_grad=True)
    (torch.tensor(w) * fresh(source, target, indices, negatives)).sum().backward()
    assert source.grad is None

    loss = lambda fs_, ft_, p: np_crd(fs_, ft_, p, mem_s, mem_t, z, indices.numpy(), negatives.numpy(), 0.5)[0]  # noqa: E731
    np.testing.assert_allclose(target.grad.numpy(), numeric_grad(lambda x: loss(fs, x, params), ft)[0], **GRADS)
    for i, linear in ((0, fresh.embed_source.linear), (2, fresh.embed_target.linear)):
        with_weight = lambda x, i=i: loss(fs, ft, params[:i] + [x] + params[i + 1:])  # noqa: E731
        np.testing.assert_allclose(linear.weight.grad.numpy(), numeric_grad(with_weight, params[i])[0], **GRADS)

    def pure(x):
        return copy.deepcopy(module)(torch.tensor(fs), x, indices, negatives)

    assert torch.autograd.gradcheck(pure, (torch.tensor(ft, requires_grad=True),))


def test_negatives_are_a_function_of_the_module_and_the_update(setup):
    module, _, _, indices, _ = setup
    torch.manual_seed(0)
    rebuilt = CRD(12, 8, N, feat_dim=D, nce_k=K, T=0.5)  # built from the same seeded stream
    first = module.negatives(indices, 3)
    assert first.shape == (B, K) and 0 <= first.min() and first.max() < N
    assert torch.equal(first, rebuilt.negatives(indices, 3)) and not torch.equal(first, module.negatives(indices, 4))


def test_nce_k_must_be_smaller_than_the_training_set():
    with pytest.raises(ValueError, match="nce_k must be smaller"):
        CRD(4, 4, 10, nce_k=10)


def test_the_gate_weighs_each_samples_nce_loss(setup):
    module, fs, ft, indices, negatives = setup
    edge = EdgeSpec("t", "s", "correct", "crd", 0.5, 0.8)
    logits, labels = torch.tensor(np.random.default_rng(1).normal(size=(B, 3))), torch.tensor([0, 1, 2, 0, 1])
    g = (logits.argmax(dim=1) == labels).double()
    assert 0 < g.sum() < B
    a = copy.deepcopy(module)(torch.tensor(fs), torch.tensor(ft), indices, module.negatives(indices, 1)).detach()
    owner = torch.nn.Sequential(torch.nn.Identity())
    own(owner, edge, module)
    loss, weights = crd_edge_loss(edge, torch.tensor(fs), torch.tensor(ft), logits, labels, indices, owner,
                                  k=1, k_end=1)
    torch.testing.assert_close(loss, (0.8 * g * a).mean(), **VALUES)
    assert weights.tolist() == g.tolist()


GRAPH = """graph crd
data digits { val_split = 300 }
train { epochs = 1  batch = 32 }
node s : cnn_tiny [target]
node t : cnn_tiny
node f : cnn_tiny [frozen]
label -> s : through
label -> t : through
f.conv1 -> s.conv1 : through crd(feat_dim=4, nce_k=8)
t.conv2 -> s.pool : through crd(feat_dim=8, nce_k=16)
t -> s : correct crd(feat_dim=8, nce_k=16, T=0.1)
s.pool -> t.pool : linear crd(feat_dim=4, nce_k=8, weight=0.8)
"""


def test_the_target_owns_heads_and_banks_through_a_checkpoint(tmp_path, float64):
    """`add_crd` gives the target a CRD module sized by the ends: its parameters are the
    target's, its banks and Z are in the target's state and come back from a real file,
    after which the two copies compute the same; the target's forward never runs it."""
    graph = check(GRAPH).graph
    torch.manual_seed(0)
    models = {n: build_model("cnn_tiny", 10, 1, 8) for n in ("s", "t", "f")}
    add_crd(graph, models, (1, 8, 8), 10, 100)
    edges = {spec.key: spec for _, _, spec in graph.edges(data="spec")}
    layer, logits = connector_of(models["s"], edges["t.conv2->s.pool"]), connector_of(models["s"], edges["t->s"])
    assert layer.embed_source.linear.in_features == 16 * 8 * 8 and layer.embed_target.linear.in_features == 16
    assert logits.embed_source.linear.in_features == 10 and layer.memory_source.shape == (100, 8)
    assert {id(p) for p in layer.parameters()} <= {id(p) for p in models["s"].parameters()}
    counted = {node: n for node, _, n in parameter_counts(graph)}  # what `dclang check --params` shows
    assert counted["s"] == sum(p.numel() for p in models["s"].parameters()) > counted["f"]
    assert models["s"](torch.randn(2, 1, 8, 8)).shape == (2, 10)
    x, indices = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 7, 99])
    logits(models["t"](x), models["s"](x), indices, logits.negatives(indices, 1))  # moves the banks and sets Z
    path = tmp_path / "s.pt"
    torch.save(models["s"].state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert f"{CONNECTORS}.t__None__None.memory_source" in state and f"{CONNECTORS}.t__None__None.z" in state
    assert not any(k.startswith(CONNECTORS) for k in without_connectors(state))
    torch.manual_seed(1)
    again = {"s": build_model("cnn_tiny", 10, 1, 8), "t": models["t"], "f": models["f"]}
    add_crd(graph, again, (1, 8, 8), 10, 100)
    again["s"].load_state_dict(state)
    negatives = torch.randint(0, 100, (4, 16))
    first = logits(models["t"](x), models["s"](x), indices, negatives)
    second = connector_of(again["s"], edges["t->s"])(models["t"](x), again["s"](x), indices, negatives)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# ---------------------------------------------------------------- in graphs


def compiled(engine, graph=None):
    options = StepOptions(channels_last=False) if engine == "fused" else None
    return compile_graph(graph or check(GRAPH).graph, num_classes=3, in_channels=1, image_size=8,
                         device=torch.device("cpu"), engine=engine, seed=0, steps_per_epoch=2, epochs=2,
                         options=options, train_size=40)


def batches(n=4):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(10, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen),
             torch.randperm(40, generator=gen)[:10]) for _ in range(n)]


def train(step, data, first_k=1):
    return [step.step(x, y, k, index) for k, (x, y, index) in enumerate(data, start=first_k)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_equals_reference_with_crd_edges(float64, channels_last):
    """Every weight, bank and Z, and every statistic, after four steps, to 1e-10; the fused
    engine in the models' own layout and in channels-last (the one fast path crd takes)."""
    data = batches()
    reference = compiled("reference")
    fused = compile_graph(check(GRAPH).graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"),
                          seed=0, steps_per_epoch=2, epochs=2, options=StepOptions(channels_last=channels_last),
                          train_size=40)
    assert fused.options.channels_last == channels_last
    assert reference.needs_indices and fused.needs_indices
    for ref, fus in zip(train(reference, data), train(fused, data)):
        for field in ("node_loss", "edge_loss", "edge_gate", "edge_pass"):
            for key, want in getattr(ref, field).items():
                torch.testing.assert_close(getattr(fus, field)[key], want, rtol=1e-10, atol=1e-12, msg=key)
    for name, model in reference.models.items():
        state = model.state_dict()
        assert any("memory_source" in key for key in state) == (name != "f")  # a frozen source owns none
        for key, value in fused.models[name].state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=1e-10, atol=1e-12, msg=f"{name}.{key}")


def test_a_resumed_step_continues_with_its_banks(float64):
    data = batches(4)
    whole = compiled("fused")
    train(whole, data)
    first = compiled("fused")
    train(first, data[:2])
    saved = copy.deepcopy(first.state_dict())
    resumed = compiled("fused", check(GRAPH).graph)
    resumed.load_state_dict(saved)
    train(resumed, data[2:], first_k=3)
    for name, model in whole.models.items():
        for key, value in model.state_dict().items():
            torch.testing.assert_close(resumed.models[name].state_dict()[key], value, rtol=0, atol=0,
                                       msg=f"{name}.{key}")


def test_a_crd_step_without_indices_says_so():
    step = compiled("reference")
    x, y, _ = batches(1)[0]
    with pytest.raises(ValueError, match="needs the batch's positions"):
        step.step(x.float(), y, 1)


def test_an_engine_that_cannot_pass_positions_refuses_crd():
    """A pack (several members, or one packed member) and the fast paths that cannot pass
    positions are refused with the edges named; an engine of one plain member takes them."""
    graph = check(GRAPH).graph

    def member():
        step = compile_graph(graph, num_classes=3, in_channels=1, image_size=8, device=torch.device("cpu"), seed=0,
                             steps_per_epoch=2, epochs=2, train_size=40, member=True)
        return StepMember.of(step, graph)

    for members, options, packed, why in [(2, None, False, "a pack of trials"), (1, None, True, "a pack of trials"),
                                          (1, StepOptions(hfta=True), False, "--hfta"),
                                          (1, StepOptions(compile=True), False, "--compile"),
                                          (1, StepOptions(precision="bf16"), False, "--precision bf16")]:
        with pytest.raises(UserError, match=f"`crd` edges .*t->s.* which {why} cannot pass"):
            Engine([member() for _ in range(members)], options, packed=packed)
    assert Engine([member()]).needs_indices


def test_autotune_trains_a_crd_graph_on_the_plain_fused_engine_and_says_so():
    """Nothing is built or timed (the timing steps pass no positions): plain fused, one line why."""
    def build(options):
        raise AssertionError("a crd graph is not timed")

    tuned = autotune(check(GRAPH).graph, build, [], device=torch.device("cpu"))
    assert tuned.options == StepOptions(channels_last=False) and not tuned.measured
    assert tuned.line().startswith("autotune: fused, nothing timed: `crd` edges (") and "plain fused" in tuned.line()


def test_check_takes_crd_and_checks_its_arguments():
    assert check(GRAPH).ok, check(GRAPH).errors
    bad = GRAPH.replace("crd(feat_dim=8, nce_k=16)", "crd(feat_dim=0.5, nce_k=16)")
    errors = check(bad).errors
    assert [(e.code, e.span.line) for e in errors] == [("E400", 10)] and "whole number" in errors[0].message
    huge = GRAPH.replace("crd(feat_dim=8, nce_k=16)", "crd(feat_dim=100000, nce_k=16)")
    assert [(e.code, e.message) for e in check(huge).errors] == [
        ("E404", "`feat_dim` must be from 1 to 65536, but got 100000")]
    wrong = GRAPH.replace("label -> t : through", "label -> t : through crd()")
    assert [e.code for e in check(wrong).errors] == ["E312"]


def test_a_tiny_digits_run_trains_crd_end_to_end(tmp_path):
    """`dclang run` of GRAPH on digits: one epoch, finite losses, the banks in the checkpoint;
    too many negatives and a fast path are refused before training, without a traceback."""
    kt = tmp_path / "crd.kt"
    kt.write_text(GRAPH)
    result = CliRunner().invoke(main, ["run", str(kt), "-o", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"t.conv2->s.pool", "t->s", "s.pool->t.pool"} <= set(record["edges"])
    assert all(math.isfinite(e["loss"]) for e in record["edges"].values()), record["edges"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert any(k.endswith("memory_source") for k in last["train_step"]["models"]["s"])
    kt.write_text(GRAPH.replace("nce_k=16)", "nce_k=5000)"))
    refused = CliRunner().invoke(main, ["run", str(kt), "-o", str(tmp_path / "big"), "--no-progress",
                                        "--device", "cpu"])
    assert refused.exit_code != 0 and "line 10: `t.conv2->s.pool` draws nce_k=5000" in refused.output
    assert "Traceback" not in refused.output
    kt.write_text(GRAPH)
    refused = CliRunner().invoke(main, ["run", str(kt), "-o", str(tmp_path / "hfta"), "--no-progress", "--hfta",
                                        "--device", "cpu"])
    assert refused.exit_code != 0 and "line 12: `s.pool->t.pool` (crd) reads each batch's positions" in refused.output
    assert "which --hfta cannot pass" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "hfta").exists()  # refused before any work


@pytest.mark.parametrize("example", ["crd.kt", "digits_crd.kt"])
def test_the_examples_check(example):
    checked = check((ROOT / "examples" / example).read_text())
    assert checked.ok, checked.errors
    assert any(spec.loss == "crd" for _, _, spec in checked.graph.edges(data="spec"))


def test_fmt_round_trips_and_draw_labels_crd():
    once = format_module(parse(GRAPH))
    assert format_module(parse(once)) == once
    specs = lambda t: {spec.key: spec for _, _, spec in check(t).graph.edges(data="spec")}  # noqa: E731
    assert specs(once) == specs(GRAPH)
    dot = to_graphviz(check(GRAPH).graph).source
    for label in ("crd feat_dim=8 nce_k=16", "correct crd T=0.1 feat_dim=8 nce_k=16",
                  "linear crd feat_dim=4 nce_k=8 ×0.8"):
        assert label in dot, (label, dot)


def test_batches_carry_their_positions_in_the_split():
    """`BatchIterator.indexed`: each batch with the positions it was cut from, the same
    batches plain iteration gives, every position once per epoch."""
    images = torch.arange(23 * 4, dtype=torch.uint8).reshape(23, 1, 2, 2).contiguous()
    split = Split(images, torch.arange(23))
    batches = BatchIterator(split, 5, torch.Generator().manual_seed(0))
    seen = []
    for (x, y, index), (x2, y2) in zip(batches.indexed(), batches, strict=True):
        assert torch.equal(x, images[index]) and torch.equal(y, index) and torch.equal(x, x2) and torch.equal(y, y2)
        seen += index.tolist()
    assert sorted(seen) == list(range(23))


class _Stop(Exception):
    """Raised after an epoch's files are written: the run stops as a killed one would."""


def _stop(epoch, record):
    raise _Stop


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Two epochs of GRAPH straight, and stopped after the first then resumed from its
    checkpoint in a fresh step: the same records and the same banks, bit for bit."""
    from dclang.api import load
    from dclang.checkpoints import load_safely
    from dclang.data import load_dataset
    from dclang.train import RunDir, train_graph
    from dclang.train.metrics import TIMING_FIELDS

    kt = tmp_path / "crd.kt"
    kt.write_text(GRAPH.replace("epochs = 1", "epochs = 2"))
    dataset = load_dataset("digits", data_dir=None, val_split=300, split_seed=0)

    def run(name, **kwargs):
        return train_graph(load(kt), run_dir=tmp_path / name, device="cpu", progress=False, dataset=dataset,
                           teacher_cache=tmp_path / "teachers", **kwargs)

    full = run("full")
    with pytest.raises(_Stop):
        run("stopped", on_epoch=_stop)
    resumed = run("stopped", resume=True)
    untimed = lambda records: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]  # noqa: E731
    assert untimed(resumed.records) == untimed(full.records) and len(full.records) == 2
    a, b = (load_safely(RunDir(tmp_path / name).last)["train_step"]["models"] for name in ("stopped", "full"))
    assert any(key.endswith("memory_target") for key in a["s"])
    for node, state in a.items():
        for key, value in state.items():
            assert torch.equal(value, b[node][key]), (node, key)


def test_a_search_refuses_to_pack_fuse_or_plan_crd_trials(tmp_path):
    template = tmp_path / "t.kt"
    template.write_text(GRAPH.replace("t -> s : correct crd(feat_dim=8, nce_k=16, T=0.1)",
                                      "t -> s : correct choice(crd(nce_k=16), kl(T=2))"))
    assert check(template.read_text()).ok
    for flags in (["--pack", "2"], ["--hfta"], ["--compile"]):
        result = CliRunner().invoke(main, ["search", "--template", str(template), "--trials", "2",
                                           "-o", str(tmp_path / "out"), *flags])
        assert result.exit_code != 0, result.output
        assert "cannot train in a pack of trials or with a fast path" in result.output, result.output
        assert not (tmp_path / "out").exists()
    planned = CliRunner().invoke(main, ["search", "--plan", "--template", str(template), "--trials", "2"])
    assert planned.exit_code != 0 and "has `crd` edges, which --plan does not measure" in planned.output
    assert "Traceback" not in planned.output


def test_bench_refuses_a_crd_graph_and_says_why(tmp_path):
    kt = tmp_path / "crd.kt"
    kt.write_text(GRAPH)
    result = CliRunner().invoke(main, ["bench", str(kt), "--device", "cpu"])
    assert result.exit_code != 0 and "which `dclang bench` does not time yet" in result.output, result.output
    assert "positions in the training split" in result.output and "Traceback" not in result.output
