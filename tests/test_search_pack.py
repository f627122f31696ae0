"""Packed trials: a trial trained in a pack computes what it computes alone; a packed search
runs end to end with real worker processes."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from optuna.trial import TrialState

from dclang.api import check
from dclang.data import load_dataset
from dclang.search.pack import Pack, TrialRun
from dclang.train.loop import train_graph

HEAD = """\
graph g
data digits {{ val_split = 300 augment = pad_crop pad = 1 }}
train {{ epochs = 2 batch = 128 optimizer = sgd(lr=0.1, momentum=0.9) schedule = cosine(eta_min=0.0) seed = {seed} }}
"""

#: the trial compared; and two pack mates of other architectures, seeds and lengths
TRIAL = HEAD.format(seed=3) + """\
node n1 : cnn_tiny [target]
node n2 : mlp
label -> n1 : through
n2 -> n1 : linear
label -> n2 : correct
"""
MATE = HEAD.format(seed=7).replace("epochs = 2", "epochs = 3") + """\
node n1 : mlp [target]
node n2 : cnn_tiny
node n3 : cnn_tiny
edges * -> * : through
"""
SHORT = HEAD.format(seed=1).replace("epochs = 2", "epochs = 1") + """\
node n1 : cnn_tiny [target]
label -> n1 : through
"""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=300, split_seed=0)


def graph(text: str):
    checked = check(text, "<test>")
    assert checked.ok, checked.errors
    return checked.graph


@pytest.mark.parametrize("hfta", [False, True])
def test_a_trial_trained_in_a_pack_equals_the_trial_trained_alone(digits, hfta):
    from dclang.compile import StepOptions

    options = StepOptions(hfta=hfta)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        alone = train_graph(graph(TRIAL), run_dir=None, device="cpu", dataset=digits, progress=False,
                            options=options).records
        seen: dict[str, list[dict]] = {"trial": [], "mate": [], "short": []}

        def run(name: str, text: str) -> TrialRun:
            return TrialRun(graph(text), dataset=digits, device=torch.device("cpu"), options=options,
                            on_epoch=lambda epoch, record: seen[name].append(record))

        pack = Pack(2)
        pack.add("mate", run("mate", MATE))
        pack.add("short", run("short", SHORT))
        left = []
        while pack.runs:
            pack.step(on_error=lambda key, exc: pytest.fail(f"{key}: {exc}"),
                      on_done=lambda key, r: left.append(key))
            if pack.free and "trial" not in left and "trial" not in pack.runs:
                pack.add("trial", run("trial", TRIAL))  # joins mid-epoch of its mate, in the short one's slot
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert left == ["short", "trial", "mate"] or left == ["short", "mate", "trial"]
    assert len(seen["trial"]) == len(alone) == 2 and len(seen["mate"]) == 3
    for packed, single in zip(seen["trial"], alone):
        for node, figures in single["nodes"].items():
            for key in ("val_acc", "test_acc", "train_loss"):
                # the same arithmetic in the same order: equal to float rounding of the summaries
                assert math.isclose(packed["nodes"][node][key], figures[key], rel_tol=1e-9, abs_tol=1e-12), \
                    (node, key, packed["nodes"][node][key], figures[key])
        assert packed["lr"] == single["lr"]


def test_a_pack_holds_at_least_one_trial():
    with pytest.raises(ValueError):
        Pack(0)


# ---------------------------------------------------------------- packed search, real processes

SEARCH = """\
graph packed
data digits { val_split = 300 }
train { epochs = 2  batch = 128  optimizer = sgd(lr=0.1, momentum=0.9) }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)

label -> n1 : through
n2 -> n1 : choice(through, linear)
n3 -> n1 : choice(through, linear)
label -> n2 : choice(through, cutoff)
label -> n3 : choice(through, cutoff)
"""
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def test_a_packed_worker_trains_its_trials_at_once_and_says_which_are_the_same(tmp_path, run_search, study_trials):
    from dclang.search.output import trained_epochs

    template = tmp_path / "packed.kt"
    template.write_text(SEARCH)
    out = tmp_path / "out"
    done = run_search("--template", template, "--trials", 6, "--workers", 1, "--pack", 3, "--device", "cpu",
                      "-o", out, timeout=300)
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    trials, config = study_trials(out / "study.journal", "packed")
    finished = [t for t in trials if t.state in COUNTED]
    assert len(finished) == 6  # one worker: exactly T
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 1
    trained = sorted((t for t in finished if trained_epochs(t) > 0), key=lambda t: t.number)
    # the pack held several trials at once: a later trial started before an earlier one ended
    assert any(b.datetime_start < a.datetime_complete for a, b in zip(trained, trained[1:]))
    for t in finished:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1))
        assert t.state == TrialState.PRUNED or steps[-1] == config.epochs
    rows = {int(r["trial"]): r for r in csv.DictReader((out / "leaderboard.csv").open())}
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            assert rows[t.number]["same_as"] == str(t.user_attrs["duplicate_of"])
            assert trained_epochs(t) == 0
