"""The fused engine over packed trials: each trial in it computes what it computes alone.

Every comparison is against the trial trained alone: its own engine of one graph
(`compile_graph`: torch's optimizer, held equal to the reference engine by test_engines.py),
stepped alone on the same batches with the same update numbers, and torch's own optimizers.
Models run in float64, so that only the summation order differs (a grouped
convolution, one product for the node losses): tolerance 1e-9 relative.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dclang.api import check
from dclang.bench import count_ops
from dclang.compile import Engine, StepOptions, compile_graph
from dclang.compile.fused import FusedStep
from dclang.compile.sliced_optim import SlicedOptimizer, rule_of
from dclang.train.metrics import EpochStats

HEAD = """\
graph g
data digits {{ val_split = 300 }}
train {{ epochs = 2  batch = 16  optimizer = {optimizer} }}
"""
SGD = "sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)"

GRAPHS = {
    # three peers of one architecture: fused within the trial and with the other trials' cnn_tiny
    "mutual": HEAD.format(optimizer=SGD) + """\
node n1 : cnn_tiny [target]
node n2 : cnn_tiny
node n3 : cnn_tiny
edges * -> * : through
""",
    # a linear gate (its own k), a correct gate, other losses
    "gates": HEAD.format(optimizer=SGD) + """\
node n1 : cnn_tiny [target]
node n2 : mlp
label -> n1 : through
n2 -> n1 : linear
label -> n2 : through
n1 -> n2 : correct lskd(T=2)
""",
    # another optimizer: its nodes fuse with each other, not with the SGD trials'
    "adam": HEAD.format(optimizer="adam(lr=0.01, weight_decay=1e-4)") + """\
node n1 : mlp [target]
node n2 : mlp
label -> n1 : through
label -> n2 : through
n1 -> n2 : through dkd(alpha=1, beta=2, T=3)
n2 -> n1 : through
""",
    # an ensemble node teaching its members
    "ensemble": HEAD.format(optimizer="adamw(lr=0.01)") + """\
node p1 : cnn_tiny
node p2 : cnn_tiny
node e : ensemble(p1, p2) [target]
label -> p1 : through
label -> p2 : through
e -> p1 : through
e -> p2 : linear
""",
    # edges between layers and a frozen teacher: computed by the trial's own step
    "layers": HEAD.format(optimizer=SGD) + """\
node s : cnn_tiny [target]
node p : cnn_tiny
node t : cnn_small [frozen]
label -> s : through
label -> p : through
t.conv1 -> s.conv1 : through hint()
p.conv2 -> s.conv2 : through at(p=2)
t -> s : through kl(T=3)
""",
}
GRAPHS["tiny"] = HEAD.format(optimizer=SGD) + """\
node n1 : mlp [target]
label -> n1 : linear
"""  # compiled (slow to compile: a one-node graph)
STEPS_PER_EPOCH, EPOCHS = 3, 2
TIGHT = dict(rtol=1e-9, atol=1e-10)


@dataclass(eq=False)
class Trial:
    """An engine member (`dclang.compile.engine.Member`) with its twin trained alone."""

    name: str
    step: FusedStep
    alone: Engine
    batch: int
    k: int = 0

    classes: int = 10

    @classmethod
    def of(cls, name: str, classes: int = 10, device: str = "cpu") -> Trial:
        checked = check(GRAPHS[name], f"<{name}>")
        assert checked.ok, checked.errors
        graph = checked.graph
        steps = [compile_graph(graph, num_classes=classes, in_channels=1, image_size=8, device=torch.device(device),
                               seed=0, steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, **how)
                 for how in (dict(member=True), dict(options=StepOptions(channels_last=False)))]
        assert type(steps[0]) is FusedStep and not steps[0].optimizers and len(steps[1].members) == 1
        return cls(name, steps[0], steps[1], graph.graph["train"].batch, classes=classes)


def batch_of(size: int, generator: torch.Generator, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(size, 1, 8, 8, generator=generator).to(torch.get_default_dtype()),
            torch.randint(0, classes, (size,), generator=generator))


def step_both(union: Engine, trials: list[Trial], generator: torch.Generator, stats: dict,
              sizes: dict[str, int] | None = None) -> None:
    """One union step, and each trial's twin stepped alone on the trial's batch."""
    batches = []
    for trial in trials:
        trial.k += 1
        images, labels = (t.to(trial.step.device) for t in
                          batch_of((sizes or {}).get(trial.name, trial.batch), generator, trial.classes))
        batches.append((images, labels, trial.k))
        stats.setdefault(trial.name, EpochStats()).add(trial.alone.step(images, labels, trial.k), len(labels), trial.k)
    union.step_all(batches)


def assert_same_models(trial: Trial) -> None:
    for node, model in trial.alone.models.items():
        got, want = trial.step.models[node].state_dict(), model.state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TIGHT, msg=f"{trial.name}.{node}.{key}")


def assert_same_trials(union: Engine, trials: list[Trial], stats: dict[str, EpochStats]) -> None:
    """Every trial's models, and its statistics summed since the start, equal its twin's."""
    for m, trial in enumerate(trials):
        assert_same_models(trial)
        got, got_bad = union.read(m)
        want, want_bad = stats[trial.name].read()
        assert got.keys() == want.keys() and got_bad == want_bad == {}
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (trial.name, key)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("hfta", [False, True], ids=["separate", "hfta"])
def test_each_trial_of_a_union_computes_what_it_computes_alone(hfta, channels_last, float64):
    """Trials of several graphs, optimizers and batch sizes; one leaves, two join mid-way (their
    first update beside another trial's fourth), a learning rate moves mid-way: every model,
    and every statistic summed over the steps, equals the twin trained alone."""
    generator = torch.Generator().manual_seed(0)
    mutual, gates, layers, adam, ensemble = (Trial.of(n) for n in ("mutual", "gates", "layers", "adam", "ensemble"))
    stats: dict[str, EpochStats] = {}
    first = [mutual, gates, layers]
    union = Engine(first, StepOptions(hfta=hfta, channels_last=channels_last))
    if hfta:  # five cnn_tiny of three trials in one network, `layers`' p (whose layers an edge reads)
        # among them; its s carries a `hint` connector, another architecture: it stays alone
        assert [sorted(g.slices) for g in union.groups] == [[(0, "n1"), (0, "n2"), (0, "n3"), (1, "n1"), (2, "p")]]
    step_both(union, first, generator, stats)
    step_both(union, first, generator, stats, sizes={"gates": 11})  # a short last batch: the group splits
    for trial in (mutual, gates):  # a schedule moves on: its own learning rate from now on
        trial.step.end_epoch()
        trial.alone.end_epoch()
    assert_same_models(mutual)
    second = [gates, layers, adam, ensemble]  # `mutual` left; two trials join
    union = Engine(second, StepOptions(hfta=hfta, channels_last=channels_last), carried=union.carry(second))
    for _ in range(3):
        step_both(union, second, generator, stats)
    assert_same_trials(union, second, stats)


def test_trials_of_different_classes_share_a_union(float64):
    """Logits of another shape (a dataset with 7 classes beside one with 10) are stacked apart."""
    generator = torch.Generator().manual_seed(3)
    trials = [Trial.of("gates"), Trial.of("gates", classes=7)]
    trials[1].name = "gates7"
    union, stats = Engine(trials, StepOptions(hfta=True, channels_last=False)), {}
    for _ in range(3):
        step_both(union, trials, generator, stats)
    assert_same_trials(union, trials, stats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_a_union_computes_what_its_trials_compute_alone(no_tf32):
    """On CUDA, in float32 with TF32 off (`no_tf32`: TF32 rounds products to ~1e-3), with HFTA:
    kernels differ between a fused network and separate ones (and are not deterministic), so to
    1e-4 after three steps."""
    generator = torch.Generator().manual_seed(0)
    trials = [Trial.of(name, device="cuda") for name in ("mutual", "gates", "layers", "ensemble")]
    union, stats = Engine(trials, StepOptions(hfta=True)), {}
    for _ in range(3):
        step_both(union, trials, generator, stats)
    for trial in trials:
        for node, model in trial.alone.models.items():
            got, want = trial.step.models[node].state_dict(), model.state_dict()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{trial.name}.{node}.{key}")


def test_a_union_of_k_trials_dispatches_about_the_operations_of_one(float64):
    """One forward and one backward for all: with HFTA, four trials of one graph cost at most
    1.2x the operations of one (counted, not timed: ATen operations, each a kernel launch on a GPU)."""
    generator = torch.Generator().manual_seed(0)

    def ops(k: int) -> int:
        trials = [Trial.of("mutual") for _ in range(k)]
        union = Engine(trials, StepOptions(hfta=True, channels_last=False))
        data = [batch_of(16, generator) for _ in trials]
        union.step_all([(x, y, 1) for x, y in data])
        return count_ops(lambda update: union.step_all([(x, y, update) for x, y in data]), 2)

    one, four = ops(1), ops(4)
    assert four <= 1.2 * one, (one, four)


@pytest.mark.parametrize("name,kind,args", [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)),
    ("adam", torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-4)),
    ("adamw", torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
])
def test_a_sliced_optimizer_is_torchs_optimizer_per_owner(name, kind, args, float64):
    """Owner 0 holds slice 0 of a shared tensor; owner 1 holds slice 1 and a tensor of its own,
    has three times the learning rate and has made two updates before (its state carried in,
    its bias correction two steps on): each owner's tensors follow its own torch optimizer."""
    gen = torch.Generator().manual_seed(1)
    a = [nn.Parameter(torch.randn(3, 4, generator=gen)) for _ in range(2)]
    b = nn.Parameter(torch.randn(5, generator=gen))
    torch_opts = [kind([a[0]], foreach=True, **args), kind([a[1], b], foreach=True, **{**args, "lr": 3 * args["lr"]})]
    for _ in range(2):  # owner 1's first two updates, alone
        a[1].grad, b.grad = torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)
        torch_opts[1].step()
    rule = rule_of(name, torch_opts[0].param_groups[0])
    shared = nn.Parameter(torch.stack([p.detach() for p in a]).reshape(6, 4).clone())
    own = nn.Parameter(b.detach().clone())
    carried = torch_opts[1].state
    state = [{key: torch.cat([torch.zeros(3, 4), carried[a[1]][key]]) for key in carried[a[1]] if key != "step"},
             {key: v for key, v in carried[b].items() if key != "step"}]
    sliced = SlicedOptimizer(rule, [shared, own], [[0, 1], [1]], state if args.get("momentum", 1) else None)
    for update in range(1, 5):
        grads = [torch.randn(3, 4, generator=gen) for _ in range(2)] + [torch.randn(5, generator=gen)]
        a[0].grad, a[1].grad, b.grad = grads
        for opt in torch_opts:
            opt.step()
        shared.grad, own.grad = torch.stack(grads[:2]).reshape(6, 4), grads[2]
        sliced.prepare([args["lr"], 3 * args["lr"]], [update, update + 2])
        sliced.step()
    torch.testing.assert_close(shared.detach().view(2, 3, 4), torch.stack([p.detach() for p in a]), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(own.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_a_sliced_optimizer_refuses_what_it_cannot_slice(float64):
    with pytest.raises(ValueError, match="no sliced form"):
        rule_of("lamb", {})
    with pytest.raises(ValueError, match="cannot be cut"):
        SlicedOptimizer(rule_of("adam", torch.optim.Adam([nn.Parameter(torch.ones(1))]).param_groups[0]),
                        [nn.Parameter(torch.ones(5))], [[0, 1]])


def test_a_tensor_no_loss_reached_is_left_as_it_is(float64):
    """As torch skips a parameter without a gradient (no weight decay, no momentum decay)."""
    used, unused = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    rule = rule_of("sgd", torch.optim.SGD([used], lr=0.1, momentum=0.9, weight_decay=0.1).param_groups[0])
    state = [None, {"momentum_buffer": torch.full((4,), 2.0)}]
    sliced = SlicedOptimizer(rule, [used, unused], [[0], [0]], state)
    used.grad = torch.ones(4)
    sliced.prepare([0.1], [1])
    sliced.step()
    assert torch.equal(unused.detach(), torch.ones(4)) and torch.equal(sliced.state[1]["momentum_buffer"],
                                                                        torch.full((4,), 2.0))
    assert not torch.equal(used.detach(), torch.ones(4))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_optimizer_table_is_torchs_optimizer(name, float64):
    """One table (`registry.OPTIMIZER_KINDS`) builds torch's optimizer, and what it pins as fixed
    and names as state is what that optimizer holds: a spec's rule is its torch group's."""
    from dclang.compile.optim import build_optimizer
    from dclang.ir import OptimizerSpec
    from dclang.registry import OPTIMIZER_KINDS

    kind = OPTIMIZER_KINDS[name]
    spec = OptimizerSpec(name, {key: option.default for key, option in kind.args.items()})
    param = nn.Parameter(torch.ones(3))
    opt = build_optimizer(spec, [param])
    assert type(opt).__name__ == kind.torch_class
    assert rule_of(name, spec.args) == rule_of(name, opt.param_groups[0])
    assert all(opt.param_groups[0][key] == value for key, value in kind.fixed.items())
    param.grad = torch.ones(3)
    opt.step()
    assert set(opt.state[param]) - {"step"} == set(kind.state)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor's CPU backend needs a C compiler")
def test_a_compiled_union_computes_what_its_trials_compute_alone_SLOW(float64):
    """torch.compile of a union of two one-`mlp` trials (tens of seconds to compile): compiled
    once for the first batch shapes (a trial's short batch then runs eagerly, without a
    recompilation), and each trial equals its twin trained alone, plain."""
    generator = torch.Generator().manual_seed(2)
    trials = [Trial.of("tiny"), Trial.of("tiny")]
    trials[1].name = "tiny2"
    union, stats = Engine(trials, StepOptions(compile=True, channels_last=False)), {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile fallback would warn
        step_both(union, trials, generator, stats)
        with torch._dynamo.config.patch(error_on_recompile=True):  # k changes, the graph must not
            step_both(union, trials, generator, stats)
            step_both(union, trials, generator, stats, sizes={"tiny2": 5})
    assert union.compiled_shapes is not None
    assert_same_trials(union, trials, stats)


def test_a_union_captures_after_its_warm_up_and_anew_when_its_members_change(float64, monkeypatch):
    """The CUDA-graph logic of a union on the CPU, with the recording capture of
    test_accelerate.py (its replay runs the step eagerly): captured once after three eager
    steps, a trial's short batch run eagerly, no capture again at an epoch's end (the
    learning rates are the optimizer's device tensors, refilled in place), and a union of
    other members captures anew after its own warm-up; every trial equals its twin."""
    from test_accelerate import FakeCapture

    from dclang.compile import accelerate

    monkeypatch.setattr(accelerate, "CapturedStep", FakeCapture)
    FakeCapture.made = []
    generator = torch.Generator().manual_seed(4)
    mutual, adam, gates, ensemble = (Trial.of(n) for n in ("mutual", "adam", "gates", "ensemble"))
    stats: dict[str, EpochStats] = {}

    def graphed(members, carried=None):
        union = Engine(members, StepOptions(hfta=True, channels_last=False), carried=carried)
        union.options = dataclasses.replace(union.options, cuda_graph=True)  # CUDA only otherwise
        return union

    first, second = [mutual, adam], [gates, ensemble]
    union = graphed(first)
    for _ in range(4):
        step_both(union, first, generator, stats)
    assert len(FakeCapture.made) == 1
    for trial in first:
        trial.step.end_epoch()
        trial.alone.end_epoch()
    step_both(union, first, generator, stats, sizes={"adam": 11})  # eager
    step_both(union, first, generator, stats)
    assert len(FakeCapture.made) == 1
    assert_same_trials(union, first, stats)
    union = graphed(second, carried=union.carry(second))
    for _ in range(4):
        step_both(union, second, generator, stats)
    assert len(FakeCapture.made) == 2
    assert_same_trials(union, second, stats)


def test_a_sliced_optimizers_numbers_are_refilled_in_place(float64):
    """What a captured update reads: the same device tensors, holding each step's numbers."""
    params = [nn.Parameter(torch.ones(2, 3))]
    rule = rule_of("adam", {"lr": 0.1, "weight_decay": 0.0})
    sliced = SlicedOptimizer(rule, params, [[0, 1]])
    sliced.prepare([0.1, 0.2], [1, 5])
    kept = {name: sliced.coefficients.current(name)[0] for name in ("step_size", "bias2")}
    before = {name: t.clone() for name, t in kept.items()}
    sliced.prepare([0.05, 0.2], [2, 6])
    for name, tensor in kept.items():
        assert sliced.coefficients.current(name)[0] is tensor and not torch.equal(tensor, before[name])
    torch.testing.assert_close(kept["step_size"][0], torch.full((3,), -0.05 / (1 - 0.9 ** 2)))


def test_a_pack_down_to_one_trial_keeps_its_optimizer_state(float64):
    """A pack's engine of one member (its mates left, none joined yet) is still sliced: its
    momentum carries over to the engine its next mates join."""
    generator = torch.Generator().manual_seed(5)
    mutual, gates, adam = (Trial.of(n) for n in ("mutual", "gates", "adam"))
    stats: dict[str, EpochStats] = {}
    union = Engine([mutual, gates], StepOptions(hfta=True, channels_last=False), packed=True)
    for _ in range(2):
        step_both(union, [mutual, gates], generator, stats)
    union = Engine([gates], union.options, carried=union.carry([gates]), packed=True)
    assert not union.solo
    step_both(union, [gates], generator, stats)
    union = Engine([gates, adam], union.options, carried=union.carry([gates, adam]), packed=True)
    for _ in range(2):
        step_both(union, [gates, adam], generator, stats)
    assert_same_trials(union, [gates, adam], stats)
