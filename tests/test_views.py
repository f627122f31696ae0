"""Own views (`[view=own]`): each such network reads its own augmentation of the batch's images.

Checked here: the fused engine equals the reference engine in float64 on a graph mixing own
and shared views, layer edges, a frozen teacher on its own view and an ensemble, with HFTA
and without; each network reads its view (forward hooks); the views a run draws are crops of
the same images (checked against `torch.nn.functional.pad`, not against `BatchAugment`),
different per own-view node, the same for shared ones, a function of (seed, epoch, node)
alone; a stopped and resumed run ends bit for bit as the uninterrupted one; a packed trial
with own views equals the trial alone; evaluation does not depend on views; the messages.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from fresh_python import run_in_fresh_python
from test_engines import (
    CLASSES,
    EPOCHS,
    STEPS,
    TIGHT,
    assert_models_close,
    assert_stats_close,
    graph_of,
    snapshot,
    teacher_state,
    train,
)

from dclang.api import check
from dclang.compile import StepOptions, compile_graph
from dclang.data import load_dataset
from dclang.train import RunDir, train_graph
from dclang.train.run import Run
from dclang.views import own_seed, view_index, view_keys

# a, b and c (a frozen teacher) on their own views, d and f on the shared one; an ensemble of
# an own-view and a shared-view member teaching a; edges between layers across views
VIEWS_GRAPH = """
graph views
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4) }
node a : cnn_tiny [target, view=own]
node b : cnn_tiny [view=own]
node c : cnn_tiny [frozen, view=own]
node d : cnn_tiny
node f : mlp [view=shared]
node e : ensemble(b, d)
label -> a : through
label -> b : through
label -> d : correct
label -> f : through
e -> a : through kl(T=2)
c -> a : correct kl(T=3)
a -> b : linear kl(T=2)
d -> b : through
b -> d : through
c.conv2 -> a.conv2 : correct at(p=2, weight=50)
d.conv1 -> b.conv1 : linear sp(weight=5)
a.pool -> d.pool : through at(p=1)
"""


def view_batches(n=STEPS * EPOCHS, size=16, views=4):
    """Random batches of `views` different images each: what a step of VIEWS_GRAPH reads."""
    gen = torch.Generator().manual_seed(7)
    return [(tuple(torch.randn(size, 1, 8, 8, generator=gen).to(torch.get_default_dtype()) for _ in range(views)),
             torch.randint(0, CLASSES, (size,), generator=gen)) for _ in range(n)]


def compiled(engine, options=None, seed=0):
    graph = graph_of(VIEWS_GRAPH)
    return compile_graph(graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                         engine=engine, init_states={"c": teacher_state()}, seed=seed, steps_per_epoch=STEPS,
                         epochs=EPOCHS, options=options if engine == "fused" else None)


def test_the_views_a_step_reads():
    graph = graph_of(VIEWS_GRAPH)
    assert view_keys(graph) == ("shared", "a", "b", "c")
    assert view_index(graph) == {"a": 1, "b": 2, "c": 3, "d": 0, "f": 0}
    assert graph.nodes["e"]["spec"].view == "shared" and graph.nodes["f"]["spec"].view == "shared"
    only_own = graph_of(VIEWS_GRAPH.replace("node d : cnn_tiny", "node d : cnn_tiny [view=own]").replace(
        "node f : mlp [view=shared]", "node f : mlp [view=own]"))
    assert view_keys(only_own) == ("a", "b", "c", "d", "f")  # nobody reads the shared view: not drawn


FAST_PATHS = {"plain": StepOptions(channels_last=False), "hfta": StepOptions(channels_last=False, hfta=True),
              "channels_last": StepOptions(channels_last=True),
              "hfta_channels_last": StepOptions(channels_last=True, hfta=True),
              "cuda_graph_logic": StepOptions(channels_last=False, hfta=True)}


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fused_equals_reference_with_own_views(float64, path, monkeypatch):
    """Every weight, buffer and statistic after 6 steps over an epoch's end. `cuda_graph_logic`:
    the CUDA-graph path on the CPU, with test_accelerate.py's recording capture (captured after
    the warm-up from the flat list of every view, replayed eagerly)."""
    from test_accelerate import FakeCapture

    from dclang.compile import accelerate

    data = view_batches()
    reference = compiled("reference")
    fused = compiled("fused", FAST_PATHS[path])
    hfta = fused.options.hfta
    if path == "cuda_graph_logic":
        monkeypatch.setattr(accelerate, "CapturedStep", FakeCapture)
        FakeCapture.made = []
        fused.options = dataclasses.replace(fused.options, cuda_graph=True)  # CUDA only otherwise
    if hfta:  # a, b and d are fused in one network reading three views side by side
        assert [sorted(n for _, n in g.slices) for g in fused.groups] == [["a", "b", "d"]]
        assert not fused.groups[0].shared
    assert_models_close(snapshot(reference), snapshot(fused), rtol=0, atol=0)
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)  # weights and BatchNorm statistics
    assert_stats_close(ref_stats, fused_stats, **TIGHT)
    if path == "cuda_graph_logic":
        assert FakeCapture.made == [[(16, 1, 8, 8)] * 4]  # once, after 3 eager steps: the 4 views
    # the views matter: the same graph reading one batch for every view trains otherwise
    shared = compiled("reference")
    train(shared, [(views[0], labels) for views, labels in data])
    assert any(not torch.equal(v, snapshot(reference)["a"][k]) for k, v in snapshot(shared)["a"].items())


def test_bf16_with_own_views_stays_close_to_fp32():
    data = [(tuple(v.float() for v in views), labels) for views, labels in view_batches(2)]
    fp32 = compiled("fused", StepOptions(channels_last=False))
    bf16 = compiled("fused", StepOptions(channels_last=False, hfta=True, precision="bf16"))
    for got, want in zip(train(bf16, data), train(fp32, data)):
        for node, loss in want.node_loss.items():
            torch.testing.assert_close(got.node_loss[node], loss, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C compiler")
def test_compile_with_own_views_equals_fused_SLOW():
    # in its own Python, as test_accelerate.py's compile test: a crashing compiler fails this test only
    run_in_fresh_python(compile_with_own_views_equals_fused)


def compile_with_own_views_equals_fused() -> None:
    """torch.compile of a step reading two own views and the shared one (mlps: quick to
    compile), compiled once (the last, partial batch runs eagerly), equal to the eager step."""
    torch.set_default_dtype(torch.float64)
    text = """
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node a : mlp [target, view=own]
node b : mlp [view=own]
node d : mlp
edges * -> * : through
"""
    graph = graph_of(text)

    def build(options):
        return compile_graph(graph, num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                             seed=0, steps_per_epoch=STEPS, epochs=EPOCHS, options=options)

    data = view_batches(views=3)
    data[-1] = (tuple(v[:5] for v in data[-1][0]), data[-1][1][:5])
    fused, fast = build(StepOptions(hfta=True)), build(StepOptions(hfta=True, compile=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile fallback would warn
        got = [fast.step(*data[0], 1)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got += train(fast, data[1:], first_k=2)
    want = train(fused, data)
    assert_models_close(snapshot(fused), snapshot(fast), **TIGHT)
    for g, w in zip(got, want):
        for node, loss in w.node_loss.items():
            torch.testing.assert_close(g.node_loss[node], loss, **TIGHT)


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_each_network_reads_its_own_view(float64, engine):
    step = compiled(engine, StepOptions(channels_last=False))
    seen = {}
    for name, model in step.models.items():
        model.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0]))
    (views, labels), = view_batches(1)
    step.step(views, labels, 1)
    want = {"a": views[1], "b": views[2], "c": views[3], "d": views[0], "f": views[0]}
    assert seen.keys() == want.keys()
    for name, x in want.items():
        assert torch.equal(seen[name], x), name


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=300, split_seed=0)


RUN_GRAPH = """
graph run_views
data digits {{ val_split = 300  augment = pad_crop  pad = 2 }}
train {{ epochs = 2  batch = 128  optimizer = sgd(lr=0.1, momentum=0.9)  seed = {seed} }}
node a : cnn_tiny [target, view=own]
node b : cnn_tiny [view=own]
node d : mlp
{extra}
edges * -> * : through
"""


def run_of(digits, seed=3, extra=""):
    run = Run.prepare(graph_of(RUN_GRAPH.format(seed=seed, extra=extra)), device="cpu", dataset=digits,
                      progress=False)
    run.train = digits.train  # what `compile` puts on the device (the CPU here)
    from dclang.train.run import batch_augment

    run.augment = batch_augment(run.graph.graph["data"], digits)
    return run


def crops(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Every (2 pad + 1)^2 crop of each reflect-padded image: (N, shifts, C, H, W), normalised
    as the digits data is."""
    n, c, h, w = images.shape
    padded = F.pad(images.to(torch.float32), (pad,) * 4, mode="reflect")
    out = torch.stack([padded[:, :, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)],
                      dim=1)
    return out


def test_own_views_are_other_crops_of_the_same_images(digits):
    run = run_of(digits)
    views, labels, k, index = next(run.batches(1, indices=True))
    assert isinstance(views, tuple) and len(views) == 3 and k == 1
    assert torch.equal(labels, digits.train.labels[index])
    mean, std = torch.tensor(digits.mean).view(1, -1, 1, 1), torch.tensor(digits.std).view(1, -1, 1, 1)
    candidates = crops(digits.train.images[index], 2)  # (N, 25, C, H, W)
    shifts = []
    for view in views:
        pixels = view * std + mean  # back to [0, 255]
        distance = (candidates - pixels.unsqueeze(1) * 255).abs().flatten(2).amax(-1)  # (N, 25)
        best = distance.min(-1)
        assert best.values.max() < 1e-2  # each sample is a crop of its own image
        shifts.append(best.indices)
    # three independent draws of 25 shifts: most samples differ between any two views
    for i in range(3):
        for j in range(i):
            assert (shifts[i] != shifts[j]).float().mean() > 0.8, (i, j)
    # the shared view is what a graph without own views reads: the same batches as before views
    plain = run_of(digits, extra="").graph
    assert view_keys(plain) == ("shared", "a", "b")
    no_views = Run.prepare(graph_of(RUN_GRAPH.format(seed=3, extra="").replace(", view=own", "").replace(
        " [view=own]", "")), device="cpu", dataset=digits, progress=False)
    no_views.train, no_views.augment = run.train, run.augment
    images, same_labels, _ = next(no_views.batches(1))
    assert torch.is_tensor(images) and torch.equal(images, views[0]) and torch.equal(same_labels, labels)


def test_own_views_are_a_function_of_seed_epoch_and_node(digits):
    first = [b[0] for b, _ in zip(run_of(digits).batches(2), range(2))]
    again = [b[0] for b, _ in zip(run_of(digits).batches(2), range(2))]
    for x, y in zip(first, again):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    # another own-view node, declared before them, changes no other node's view
    more = run_of(digits, extra="node z : mlp [view=own]")
    assert view_keys(more.graph) == ("shared", "a", "b", "z")
    for x, (y, *_) in zip(first, more.batches(2)):
        assert all(torch.equal(u, v) for u, v in zip(x, y[:3]))
    other_seed = next(run_of(digits, seed=4).batches(2))[0]
    assert not torch.equal(other_seed[1], first[0][1])
    assert len({own_seed(3, 2, "a"), own_seed(3, 2, "b"), own_seed(3, 1, "a"), own_seed(4, 2, "a")}) == 4


def test_a_run_with_own_views_resumes_bit_for_bit(tmp_path, digits):
    graph = graph_of(RUN_GRAPH.format(seed=5, extra=""))

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    def run(name, **kwargs):
        return train_graph(graph, run_dir=tmp_path / name, device="cpu", progress=False, dataset=digits, **kwargs)

    full = run("full")
    written = (tmp_path / "full" / "graph.kt").read_text()  # the run's graph keeps its views
    assert "node a : cnn_tiny [target, view=own]" in written and "node d : mlp\n" in written
    assert graph_of(written).nodes["b"]["spec"].view == "own"
    with pytest.raises(Stop):
        run("stopped", on_epoch=stop)
    assert len(RunDir(tmp_path / "stopped").read_metrics()) == 1
    resumed = run("stopped", resume=True)
    timing = {"wall_seconds", "train_seconds", "steps_per_second", "seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.records] == \
        [{k: v for k, v in r.items() if k not in timing} for r in full.records]
    from dclang.checkpoints import load_safely

    a, b = load_safely(RunDir(tmp_path / "stopped").last), load_safely(RunDir(tmp_path / "full").last)
    for node, state in a["train_step"]["models"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["train_step"]["models"][node][name]), (node, name)


@pytest.mark.parametrize("hfta", [False, True])
def test_a_packed_trial_with_own_views_equals_the_trial_alone(digits, hfta):
    from dclang.search.pack import Pack, TrialRun

    text = RUN_GRAPH.format(seed=3, extra="")
    mate = RUN_GRAPH.format(seed=8, extra="node z : cnn_tiny [view=own]").replace("epochs = 2", "epochs = 1")
    options = StepOptions(hfta=hfta)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        alone = train_graph(graph_of(text), run_dir=None, device="cpu", dataset=digits, progress=False,
                            options=options).records
        seen: dict[str, list[dict]] = {"trial": [], "mate": []}
        pack = Pack(2, options)
        for name, t in (("mate", mate), ("trial", text)):
            pack.add(name, TrialRun(graph_of(t), dataset=digits, device=torch.device("cpu"),
                                    on_epoch=lambda epoch, record, name=name: seen[name].append(record)))
        while pack.runs:
            pack.step(on_error=lambda key, exc: pytest.fail(f"{key}: {exc}"), on_done=lambda key, r: None)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(seen["trial"]) == len(alone) == 2 and len(seen["mate"]) == 1
    for packed, single in zip(seen["trial"], alone):
        for node, figures in single["nodes"].items():
            # float32 rounding only (the union sums in another order): see test_search_pack.py
            assert math.isclose(packed["nodes"][node]["train_loss"], figures["train_loss"], rel_tol=1e-5), node
            for key in ("val_acc", "test_acc"):
                assert abs(packed["nodes"][node][key] - figures[key]) <= 1 / 300 + 1e-12, (node, key)


def test_evaluation_reads_no_view(float64):
    """Evaluation augments nothing: a step with own views counts what the same weights count
    in a graph without them."""
    with_views = compiled("fused", StepOptions(channels_last=False, hfta=True))
    plain = compile_graph(graph_of(VIEWS_GRAPH.replace(", view=own", "").replace(" [view=own]", "")),
                          num_classes=CLASSES, in_channels=1, image_size=8, device=torch.device("cpu"),
                          engine="reference", init_states={"c": teacher_state()}, seed=0, steps_per_epoch=STEPS,
                          epochs=EPOCHS)
    train(with_views, view_batches(2))
    for name, model in plain.models.items():
        model.load_state_dict(with_views.models[name].state_dict())
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, CLASSES, (40,), generator=gen)
    got, want = with_views.evaluate(images, labels, 16), plain.evaluate(images, labels, 16)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


MESSAGES = {
    "node a : cnn_tiny [view=owm]": ("E360", "unknown view `owm`", "did you mean `own`?"),
    "node a : cnn_tiny [view=3]": ("E400", "`view` must be a name", "write `shared` or `own`"),
    "node a : cnn_tiny [view]": ("E400", "`view` needs a value", "write `[view=own]` or `[view=shared]`"),
    "node a : cnn_tiny [view=choice()]": ("E403", "empty `choice()` for `view`", "choice(shared, own)"),
    "node a : cnn_tiny [viev=own]": ("E208", "unknown node attribute `viev`", "did you mean `view`?"),
    "node e : ensemble(x, y) [view=own]": ("E361", "`view` on the ensemble `e`", "give `view` to the members"),
}


@pytest.mark.parametrize("line", MESSAGES)
def test_messages(line):
    text = "data digits { }\nnode x : cnn_tiny [target]\nnode y : cnn_tiny\nedges * -> * : through\n" + line + "\n"
    code, message, help_text = MESSAGES[line]
    found = [d for d in check(text).diagnostics if d.code == code]
    assert found, check(text).diagnostics
    assert found[0].message == message and help_text in found[0].help
    assert found[0].span.line == 5


def test_own_view_with_no_augmentation_is_a_warning():
    text = ("data digits { augment = none }\nnode a : cnn_tiny [target, view=own]\nlabel -> a : through\n")
    checked = check(text)
    assert checked.ok
    (w,) = [d for d in checked.diagnostics if d.code == "W360"]
    assert w.message == "`view=own` with `augment = none`: every view is the same images"
    assert (w.span.line, w.span.column) == (2, 33)


def test_a_template_may_choose_the_view():
    from dclang.api import parse
    from dclang.search.equivalence import canonical_key
    from dclang.search.space import graph_key, sample, search_space

    text = ("data digits { }\nnode a : cnn_tiny [target, view=choice(shared, own)]\nnode b : cnn_tiny\n"
            "edges * -> * : through\n")
    checked = check(text)
    assert checked.ok, checked.errors
    assert [s.name for s in checked.graph.graph["sites"]] == ["a.view"]
    module = parse(text)
    (param,) = search_space(module)
    assert param.name == "a.view" and param.choices == ("shared", "own")
    picked = check_module(sample(module, {"a.view": "own"}))
    assert picked.nodes["a"]["spec"].view == "own"
    # two trials that differ only by a view are two trials, even up to renaming the nodes
    shared, own = (sample(module, {"a.view": v}) for v in ("shared", "own"))
    assert graph_key(shared) != graph_key(own)
    assert canonical_key(check_module(shared)) != canonical_key(check_module(own))
    swapped = graph_of(text.replace("view=choice(shared, own)", "view=shared").replace(
        "node b : cnn_tiny", "node b : cnn_tiny [view=own]"))
    assert canonical_key(swapped) != canonical_key(picked)  # the target's view is not another node's


def check_module(module):
    from dclang.syntax.format import format_module

    return graph_of(format_module(module))


def test_draw_marks_own_views_and_fmt_keeps_them():
    from dclang.api import parse
    from dclang.draw import to_graphviz
    from dclang.syntax.format import format_module

    text = ("data digits {\n}\n\nnode a : cnn_tiny [target, view=own]\nnode b : cnn_tiny [view=choice(shared, own)]\n"
            "node d : cnn_tiny [view=shared]\n\nedges * -> * : through\n")
    assert format_module(parse(text)) == text
    graph = check(text).graph
    lines = {line.split()[0]: line for line in to_graphviz(graph).source.split("\n\t")
             if line.strip() and "->" not in line}  # each node's statement
    assert "view=own" in lines["a"] and "peripheries=2" in lines["a"]
    assert "view=shared | own" in lines["b"] and "peripheries=2" in lines["b"]
    assert "view" not in lines["d"] and "peripheries" not in lines["d"]
    assert "double outline: view=own, its own augmentation of each batch" in lines["legend"]
    plain = check(text.replace("view=own", "view=shared").replace("view=choice(shared, own)", "frozen")).graph
    assert "double outline" not in to_graphviz(plain).source  # a legend lists only what is drawn


DDP_GRAPH = """
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9) }
node a : mlp [target, view=own]
node b : mlp [view=own]
node d : mlp
edges * -> * : through
"""


def ddp_step():
    return compile_graph(graph_of(DDP_GRAPH), num_classes=CLASSES, in_channels=1, image_size=8,
                         device=torch.device("cpu"), seed=0, steps_per_epoch=STEPS, epochs=EPOCHS,
                         options=StepOptions(hfta=True))


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from dclang.train.distributed import DistEnv

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        step = DistEnv(rank, 2, rank, "cpu").wrap(ddp_step(), train_size=16 * STEPS, batch=16)
        train(step, view_batches(views=3))
        torch.save(snapshot(step), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_split_every_view_and_equal_one(tmp_path, float64):
    """Data-parallel (torchrun's step, gloo on the CPU): each process takes its slice of every
    view; mlps (no BatchNorm), so two processes compute what one does."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    alone = ddp_step()
    train(alone, view_batches(views=3))
    assert_models_close(torch.load(tmp_path / "rank0.pt"), snapshot(alone), rtol=1e-9, atol=1e-12)
