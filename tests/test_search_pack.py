"""Packed trials: a trial trained in a pack computes what it computes alone; a packed search
runs end to end with real worker processes."""

from __future__ import annotations

import csv
import math
import os

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
train {{ epochs = 2 batch = 256 optimizer = sgd(lr=0.1, momentum=0.9) schedule = cosine(eta_min=0.0) seed = {seed} }}
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
            return TrialRun(graph(text), dataset=digits, device=torch.device("cpu"),
                            on_epoch=lambda epoch, record: seen[name].append(record))

        pack = Pack(2, options)
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
            # float32 rounding only: the union sums in another order (a grouped convolution, one
            # product for the node losses, a linear gate scaled after the mean); losses to 1e-5
            # relative, accuracies to one image of the 300 (a borderline prediction may flip)
            assert math.isclose(packed["nodes"][node]["train_loss"], figures["train_loss"], rel_tol=1e-5), \
                (node, packed["nodes"][node]["train_loss"], figures["train_loss"])
            for key in ("val_acc", "test_acc"):
                assert abs(packed["nodes"][node][key] - figures[key]) <= 1 / 300 + 1e-12, \
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
    done = run_search("--template", template, "--trials", 4, "--workers", 1, "--pack", 2, "--device", "cpu",
                      "-o", out, timeout=300)
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    trials, config = study_trials(out / "study.journal", "packed")
    finished = [t for t in trials if t.state in COUNTED]
    assert len(finished) == 4  # one worker: exactly T
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


def test_a_killed_packed_worker_loses_only_its_packs_trials_which_are_retried(tmp_path, search_env, study_trials):
    import signal
    import subprocess
    import sys

    from test_search import wait_for_trial

    template = tmp_path / "packed.kt"
    template.write_text(SEARCH.replace("epochs = 2  batch = 128", "epochs = 8  batch = 32"))  # long enough to be seen
    out = tmp_path / "out"
    search = subprocess.Popen([sys.executable, "-m", "dclang", "search", "--template", str(template), "--trials", "2",
                               "--workers", "1", "--pack", "2", "--device", "cpu", "-o", str(out)], env=search_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running_pair():
        """The trials training in the pack, as one candidate (None until the study exists)."""
        if not ((out / "study.journal").exists() and (out / "search.json").exists()):
            return None
        trials, _ = study_trials(out / "study.journal", "packed")
        return [[t for t in trials if t.state == TrialState.RUNNING and "kt" in t.user_attrs
                 and "duplicate_of" not in t.user_attrs and t.user_attrs.get("graph")]]

    try:
        running = wait_for_trial(running_pair, lambda pair: len(pair) == 2, timeout=180)  # two in the pack
        pid = running[0].user_attrs["owner"]["pid"]
        assert running[1].user_attrs["owner"]["pid"] == pid
        os.kill(pid, signal.SIGKILL)
        _, stderr = search.communicate(timeout=300)
    finally:
        search.kill()
    assert search.returncode == 0, stderr
    trials, _ = study_trials(out / "study.journal", "packed")
    killed = [t for t in trials if t.user_attrs.get("owner", {}).get("pid") == pid and "failed" in t.user_attrs]
    # every trial the worker held when it died, and only those, failed and was retried
    assert {t.number for t in killed} >= {t.number for t in running}
    assert all(t.state == TrialState.FAIL and "died" in t.user_attrs["failed"] for t in killed)
    for t in killed:
        retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retries) == 1 and retries[0].params == t.params
    assert "was killed (SIGKILL)" in stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_a_packed_trial_matches_the_trial_alone(digits, no_tf32):
    """On CUDA the kernels are not deterministic (atomics in convolution backward): the packed
    trial is held to the lone one within what two lone runs differ by, not bitwise (TF32 off:
    `no_tf32`)."""
    alone = train_graph(graph(TRIAL), run_dir=None, device="cuda", dataset=digits, progress=False).records
    seen: list[dict] = []
    pack = Pack(2)
    pack.add("mate", TrialRun(graph(MATE), dataset=digits, device=torch.device("cuda"), on_epoch=lambda e, r: None))
    pack.add("trial", TrialRun(graph(TRIAL), dataset=digits, device=torch.device("cuda"),
                               on_epoch=lambda e, r: seen.append(r)))
    while pack.runs:
        pack.step(on_error=lambda key, exc: pytest.fail(f"{key}: {exc}"), on_done=lambda key, r: None)
    for packed, single in zip(seen, alone, strict=True):
        for node, figures in single["nodes"].items():
            assert packed["nodes"][node]["train_loss"] == pytest.approx(figures["train_loss"], rel=1e-3)
            assert packed["nodes"][node]["val_acc"] == pytest.approx(figures["val_acc"], abs=0.02)


# ---------------------------------------------------------------- benchmarks/gpu.sh, its CPU-safe parts

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_throughput_template_checks_and_its_figures_add_up(tmp_path):
    bench = load_script("pack_throughput")
    for data in ("digits", "npz"):
        text = bench.template("resnet32", data=data, npz=tmp_path / "x.npz", epochs=2, batch=64)
        checked = check(text, str(tmp_path / "t.kt"))
        assert checked.ok, checked.errors
        assert len(checked.graph.graph["sites"]) == 9  # every ordered pair's gate, label included
    assert bench.parse_runs("2:1,1:2") == [(2, 1), (1, 2)]
    summary = {"trials": {"finished": 6}, "budget": {"epochs_trained": 15}}
    rows = bench.with_ratios([{**bench.figures(summary, 60.0)}, {**bench.figures(summary, 30.0)}, {"error": "x"}])
    assert rows[0]["trials_per_hour"] == 360 and rows[0]["epochs_per_hour"] == 900
    assert rows[1]["trials_per_hour_ratio"] == 2 and "trials_per_hour_ratio" not in rows[2]


def test_the_gpu_report_gathers_every_part_and_judges_each_goal(tmp_path):
    report = load_script("gpu_report")
    (tmp_path / "tests.rc").write_text("0 41\n")
    (tmp_path / "tests.out").write_text("12 passed, 3 deselected\n")
    (tmp_path / "bench_kd.rc").write_text("0 50\n")
    engines = {"reference": 0.040, "fused": 0.040, "fused+cudagraph": 0.020, "fused+bf16+cudagraph": 0.012,
               "fused+bf16": 0.047}
    (tmp_path / "bench_kd.out").write_text(json.dumps({"engines": {n: {"s_per_step": s} for n, s in engines.items()},
                                                       "run_default": "fused+bf16+cudagraph"}))
    (tmp_path / "run_kd.rc").write_text("0 40\n")
    (tmp_path / "run_kd.err").write_text("autotune: fused+bf16+cudagraph, the fastest on ...\n")
    (tmp_path / "pack_ops.rc").write_text("124 50\n")
    (tmp_path / "plan.rc").write_text("0 30\n")
    (tmp_path / "plan.out").write_text("search plan for examples/search3.kt: T = 1500\nestimated wall time: 4.5 h "
                                       "(mean epoch 1 s)\n")
    (tmp_path / "compile.rc").write_text("skipped 9\n")
    out = report.report(tmp_path, 300)
    assert out["tests"] == {"ran": True, "exit_code": 0, "seconds": 41, "timed_out": False,
                            "output_tail": "12 passed, 3 deselected\n"}
    assert out["pack_ops"]["timed_out"] and out["bench_dml4"] == {"ran": False}
    assert out["compile"] == {"ran": False, "why": "not run: 9 s of the budget left"} and out["ok"] is False
    goals = {g["goal"].split(",")[0].split(":")[0]: g for g in out["goals"]}
    assert [goals[f"union of K={k} three-ResNet32 trials"]["met"] for k in (16, 8)] == [None, None]
    assert "timed out after 50 s" in goals["union of K=16 three-ResNet32 trials"]["detail"]
    kd = goals["kd_dml single run"]
    assert kd["figure"] == pytest.approx(0.040 / 0.012) and kd["met"] is True and "dclang run chose" in kd["detail"]
    assert goals["dclang search --plan"]["figure"] == 4.5 and goals["dclang search --plan"]["met"] is True
    bf16 = goals["bf16 not slower than fp32 (each bf16 variant against the same options in fp32; the worst)"]
    assert bf16["figure"] == pytest.approx(0.047 / 0.040) and bf16["met"] is False
    assert "fused+bf16 1.18x" in bf16["detail"] and "fused+bf16+cudagraph 0.60x" in bf16["detail"]
    assert goals["the CUDA tests pass"]["met"] is True and goals["benchmarks/gpu.sh's own time"]["met"] is True
    text = report.table(out)
    assert "NOT MET" in text and "no figure" in text and "- compile: not run" in text


def test_the_pack_ops_benchmark_runs_and_its_ratios_are_to_the_lone_trial(tmp_path):
    bench = load_script("pack_ops")
    report = bench.main(["--packs", "1,2", "--steps", "1", "--hfta", "--json", str(tmp_path / "ops.json")])
    assert json.loads((tmp_path / "ops.json").read_text()) == report
    alone, rows = report["alone"], report["rows"]
    assert [r["pack"] for r in rows] == [1, 2] and alone["label"].startswith("fused+hfta")
    for row in rows:
        assert row["ops_ratio_to_one"] == row["ops_per_step"] / alone["ops_per_step"]
    # a run is a pack of one, the same engine; K trials cost about one step of it, whatever K
    assert all(row["ops_per_step"] <= 1.2 * alone["ops_per_step"] for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what gpu.sh does without a GPU")
def test_gpu_sh_says_so_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "gpu.json")], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, cwd=BENCHMARKS.parent, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "gpu.json").exists()
