"""`dclang search` end to end on the journal file, with real worker processes.

Most tests use the cheap deterministic trainer `fake_trainer:train` (hidden `--trainer`
option): a graph's accuracy is a fixed function of the graph and the epoch. One test trains
real tiny graphs on digits through `train_graph`. More workers than the machine has cores
(4 on 2) keep the asynchronous paths busy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from click.testing import CliRunner
from optuna.trial import TrialState

from dclang.api import check_file, parse
from dclang.search.output import epochs_reported, trained_epochs
from dclang.search.study import StudyConfig, create_study, open_storage, owner, reap

FAKE = ("--trainer", "fake_trainer:train")

#: 3 nodes, 11 search sites (two models, nine gates): ~10^6 graphs, so random samples rarely repeat
TEMPLATE = """\
# three nodes on digits; the fake trainer never loads the data
graph small
data digits { val_split = 300 }
train { epochs = 8 }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)

edges * -> * : choice(through, cutoff, linear, correct)
"""

#: 8 samples, only 5 distinct trained graphs (n2 is dead when n2 -> n1 is cut), 2 invalid
TINY = """\
graph tiny
data digits { val_split = 300 }
train { epochs = 4 }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)  # the peer

label -> n1 : choice(through, cutoff)
n2    -> n1 : choice(through, cutoff)
label -> n2 : through
"""

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def write(tmp_path: Path, text: str, name: str = "template.kt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_search_invariants(trials, config: StudyConfig, workers: int) -> None:
    """What every finished search must satisfy, whatever the storage."""
    finished = [t for t in trials if t.state in COUNTED]
    # the budget: T <= finished <= T + D - 1 (each other worker finishes the trial it is on)
    assert config.trials <= len(finished) <= config.trials + workers - 1
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    # no graph is trained twice, except a retry of a trial whose worker died
    trained = [t for t in trials if trained_epochs(t) > 0 and "retry_of" not in t.user_attrs]
    keys = [t.user_attrs["graph"] for t in trained]
    assert len(keys) == len(set(keys))
    for t in finished:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1))  # one validation accuracy per epoch, step = epoch
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == config.epochs and t.value == t.intermediate_values[config.epochs]
        else:  # pruned only at a rung, never after the last epoch
            assert steps[-1] in config.rungs()
    # the pruner stops fewer trials at each rung than at the one before
    rungs = config.rungs()
    stopped = [sum(t.state == TrialState.PRUNED and "duplicate_of" not in t.user_attrs
                   and epochs_reported(t) == r for t in trials) for r in rungs]
    assert stopped == sorted(stopped, reverse=True) and stopped[0] > 0, stopped


def assert_outputs(out: Path, trials, top_k: int, still_training=()) -> None:
    """trials/*.kt parse, best/*.kt check and are the leaderboard's top-k distinct graphs.
    `still_training`: trials of a worker the parent does not wait for (one that joined by
    itself), which may have trained more epochs after the outputs were written."""
    sampled = [t for t in trials if "kt" in t.user_attrs]
    assert sorted(p.name for p in (out / "trials").glob("*.kt")) == sorted(f"{t.number:04d}.kt" for t in sampled)
    for t in sampled:
        assert parse((out / "trials" / f"{t.number:04d}.kt").read_text())
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in trials)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert [float(r["val_acc"]) for r in complete] == sorted((float(r["val_acc"]) for r in complete), reverse=True)
    expected, seen = [], set()
    for r in complete:
        if r["graph"] not in seen and len(expected) < top_k:
            seen.add(r["graph"])
            expected.append(int(r["trial"]))
    best = sorted((out / "best").glob("*.kt"))
    assert [int(p.stem.split("_trial")[1]) for p in best] == expected
    for p in best:
        assert check_file(p).ok, p
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["trial"] == expected[0]
    total = sum(trained_epochs(t) for t in trials)
    late = sum(trained_epochs(t) for t in still_training)
    assert total - late <= summary["budget"]["epochs_trained"] <= total


def test_journal_search_with_more_workers_than_cores(tmp_path, run_search, study_trials):
    template, out = write(tmp_path, TEMPLATE), tmp_path / "out"
    # about one graph in ten diverges (the fake trainer raises): it fails alone, the search goes on
    done = run_search("--template", template, "--trials", 24, "--workers", 4, "-o", out, "--top-k", 3, *FAKE,
                      env={"DCLANG_FAKE_CRASH": "0.1"})
    assert done.returncode == 0, done.stderr
    trials, config = study_trials(out / "study.journal", "small")
    assert (config.sampler, config.pruner, config.eta, config.min_resource, config.epochs) == (
        "random", "asha", 2, 1, 8)
    assert_search_invariants(trials, config, workers=4)
    assert_outputs(out, trials, top_k=3)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("error" in t.user_attrs or "invalid" in t.user_attrs for t in failed)
    crashed = [t for t in failed if "error" in t.user_attrs]
    assert crashed and all("FloatingPointError" in t.user_attrs["error"] for t in crashed)
    assert len({t.user_attrs["owner"]["worker"] for t in trials}) == 4  # every worker ran trials
    assert "trials " in done.stderr and "budget:" in done.stdout and "rungs: epoch 1:" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"]["trials_x_epochs"] == 24 * 8
    assert summary["budget"]["epochs_trained"] < 24 * 8  # ASHA stopped most graphs early
    if shutil.which("dot"):
        assert (out / "best.svg").read_text().startswith("<?xml")
    else:
        assert not (out / "best.svg").exists() and "`dot` is not installed" in summary["notes"][0]
    # each best graph is one that `dclang check` accepts from the command line too
    best = sorted((out / "best").glob("*.kt"))
    checked = subprocess.run([sys.executable, "-m", "dclang", "check", "--no-params", *best], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stderr


def test_duplicates_reuse_numbers_and_invalid_samples_cost_nothing(tmp_path, run_search, study_trials):
    # 30 trials: which graphs are drawn depends on when each worker joined (its seed), and
    # the dead-peer graph below (1 draw in 4) is then missed with probability 0.75^30 < 1e-3
    trials_asked = 30
    template, out = write(tmp_path, TINY), tmp_path / "out"
    done = run_search("--template", template, "--trials", trials_asked, "--workers", 2, "-o", out, *FAKE)
    assert done.returncode == 0, done.stderr
    trials, config = study_trials(out / "study.journal", "tiny")
    assert_search_invariants(trials, config, workers=2)
    by_number = {t.number: t for t in trials}
    duplicates = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert len(duplicates) >= trials_asked - 5  # only five distinct graphs can be trained
    for dup in duplicates:
        original = by_number[dup.user_attrs["duplicate_of"]]
        assert original.user_attrs["graph"] == dup.user_attrs["graph"] and original.number < dup.number
        assert dup.intermediate_values == original.intermediate_values and dup.state == original.state
        assert trained_epochs(dup) == 0
    invalid = [t for t in trials if "invalid" in t.user_attrs]
    for t in invalid:
        assert t.state == TrialState.FAIL and not t.intermediate_values
        assert "E304" in t.user_attrs["invalid"]
        assert (out / "trials" / f"{t.number:04d}.kt").exists()
    dead = [t for t in trials if t.params.get("n2->n1.gate") == "cutoff" and t.params["label->n1.gate"] == "through"]
    assert dead and all(t.user_attrs["dropped"] == ["n2"] for t in dead)
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "E304" in logs and "Traceback" not in logs  # an invalid sample is logged as one line


def in_first_epoch(trial) -> bool:
    """A trial training its first epoch: with slow fake epochs, still running a moment later."""
    attrs = trial.user_attrs
    return (trial.state == TrialState.RUNNING and "kt" in attrs and not trial.intermediate_values
            and "invalid" not in attrs and "duplicate_of" not in attrs)


def wait_for_trial(read, predicate, timeout: float = 90):
    """Poll `read()` (None until the study exists) for a trial `predicate` accepts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        trials = read()
        found = next((t for t in trials or () if predicate(t)), None)
        if found is not None:
            return found
    raise AssertionError("no trial came to the expected point in time")


def assert_killed_and_retried(trials, pid: int) -> None:
    """The trial the killed worker was running is FAIL, noted, and retried with its parameters."""
    killed = [t for t in trials if t.user_attrs.get("owner", {}).get("pid") == pid and "failed" in t.user_attrs]
    assert len(killed) == 1 and killed[0].state == TrialState.FAIL and "died" in killed[0].user_attrs["failed"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retries) == 1 and retries[0].params == killed[0].params and retries[0].state in COUNTED


def test_a_killed_worker_loses_only_its_trial_which_is_retried(tmp_path, search_env, study_trials):
    template, out = write(tmp_path, TEMPLATE), tmp_path / "out"
    env = {**search_env, "DCLANG_FAKE_SLEEP": "0.3"}
    search = subprocess.Popen([sys.executable, "-m", "dclang", "search", "--template", str(template), "--trials", "8",
                               "--workers", "3", "-o", str(out), *FAKE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_trial(lambda: (out / "search.json").exists() and study_trials(out / "study.journal",
                                                                                        "small")[0], in_first_epoch)
        pid = victim.user_attrs["owner"]["pid"]
        os.kill(pid, signal.SIGKILL)
        _, stderr = search.communicate(timeout=120)
    finally:
        search.kill()
    assert search.returncode == 0, stderr
    trials, config = study_trials(out / "study.journal", "small")
    assert_search_invariants(trials, config, workers=3)
    assert_killed_and_retried(trials, pid)
    assert "was killed (SIGKILL)" in stderr


def test_an_interrupted_search_resumes(tmp_path, run_search, search_env, study_trials):
    template, out = write(tmp_path, TEMPLATE), tmp_path / "out"
    env = {**search_env, "DCLANG_FAKE_SLEEP": "0.5"}
    search = subprocess.Popen([sys.executable, "-m", "dclang", "search", "--template", str(template), "--trials", "30",
                               "--workers", "2", "-o", str(out), *FAKE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # stop it while a trial is half a second from its first report, after at least one has finished
        wait_for_trial(lambda: (out / "search.json").exists() and study_trials(out / "study.journal", "small")[0],
                       lambda t: t.state in COUNTED)
        wait_for_trial(lambda: study_trials(out / "study.journal", "small")[0], in_first_epoch)
        search.send_signal(signal.SIGTERM)
        _, stderr = search.communicate(timeout=60)
    finally:
        search.kill()
    assert search.returncode != 0
    assert "stopping the workers" in stderr
    trials, _ = study_trials(out / "study.journal", "small")
    stopped = [t for t in trials if t.user_attrs.get("failed", "").startswith("interrupted")]
    assert stopped and not [t for t in trials if t.state == TrialState.RUNNING]
    assert (out / "leaderboard.csv").exists()  # the output is written for what was done so far

    refused = run_search("--resume", "-o", out, "--sampler", "tpe")
    assert refused.returncode == 1 and "--sampler cannot change a study" in refused.stderr
    again = run_search("--template", template, "--trials", 4, "-o", out, *FAKE)
    assert again.returncode == 1 and "already holds a search" in again.stderr

    resumed = run_search("--resume", "-o", out, "--trials", 8, "--workers", 2, *FAKE)
    assert resumed.returncode == 0, resumed.stderr
    trials, config = study_trials(out / "study.journal", "small")
    assert config.trials == 8
    assert_search_invariants(trials, config, workers=2)
    for t in stopped:  # each interrupted trial ran again, with the parameters it had drawn
        retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retries) == 1 and retries[0].state in COUNTED
        assert retries[0].params == {**retries[0].params, **t.params}  # stopped while drawing: the rest is new


def test_real_tiny_graphs_train_end_to_end(tmp_path, run_search, study_trials):
    """No fake: two workers train digits graphs through train_graph, a frozen teacher is
    pre-trained into the shared cache, and the best graph file trains again as it is."""
    template = write(tmp_path, """\
graph real
data digits { val_split = 300 }
train { epochs = 2  batch = 64  optimizer = sgd(lr=0.1, momentum=0.9) }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)

label -> n1 : through
n2    -> n1 : choice(through, linear)
label -> n2 : choice(through, cutoff)
""")
    out = tmp_path / "out"
    done = run_search("--template", template, "--trials", 3, "--workers", 2, "-o", out, "--device", "cpu",
                      "--top-k", 2, timeout=240)
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    trials, config = study_trials(out / "study.journal", "real")
    finished = [t for t in trials if t.state in COUNTED]
    assert 3 <= len(finished) <= 4
    for t in finished:
        assert 0.0 < t.intermediate_values[1] <= 1.0
        assert t.user_attrs["metrics"][0]["val_acc"]["n1"] == t.intermediate_values[1]
    assert_outputs(out, trials, top_k=2)
    teachers = {t.params["n2.model"] for t in trials if t.params.get("label->n2.gate") == "cutoff"}
    assert len(list((out / "teachers").glob("*.pt"))) == len(teachers)  # each pre-trained once, shared

    from dclang.api import load
    from dclang.train.loop import train_graph

    best = sorted((out / "best").glob("*.kt"))[0]
    again = train_graph(load(best), run_dir=None, device="cpu", epochs=1, progress=False,
                        teacher_cache=out / "teachers")
    assert again.records[0]["nodes"]["n1"]["val_acc"] is not None


# ---------------------------------------------------------------- in-process pieces


def test_the_command_line(tmp_path):
    from dclang.cli import main

    runner = CliRunner()
    shown = runner.invoke(main, ["search", "--help"])
    assert shown.exit_code == 0
    for flag in ("--template", "--trials", "--workers", "--storage", "--resume", "--worker", "--top-k", "--eta"):
        assert flag in shown.output
    assert "--trainer" not in shown.output and "--slot" not in shown.output  # hidden
    fixed = write(tmp_path, TEMPLATE.replace("choice(mlp, cnn_tiny)", "mlp").replace(
        "choice(through, cutoff, linear, correct)", "through"))
    refused = runner.invoke(main, ["search", "--template", str(fixed), "--trials", "2", "-o", str(tmp_path / "o")])
    assert refused.exit_code == 1 and "nothing to search" in refused.output
    assert runner.invoke(main, ["search", "--template", str(fixed), "--trials", "2"]).exit_code == 2
    worker = runner.invoke(main, ["search", "--worker", "--storage", "x.journal", "--study", "s", "--pruner", "none"])
    assert worker.exit_code == 1 and "takes the study's configuration from the study" in worker.output


def test_workers_rebuild_sampler_and_pruner_from_the_study(tmp_path):
    config = StudyConfig(template=TEMPLATE, template_path="t.kt", sampler="tpe", seed=3, pruner="hyperband",
                         eta=3, min_resource=1, epochs=9, trials=5)
    storage = str(tmp_path / "s.journal")
    create_study(open_storage(storage, create=True), "s", config)
    from dclang.search.study import load_study

    study, loaded = load_study(open_storage(storage), "s", worker="local-1")
    assert loaded == config
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert config.rungs() == [1, 3]
    assert StudyConfig(**{**config.to_attr(), "pruner": "asha", "eta": 2, "epochs": 8}).rungs() == [1, 2, 4]
    # each worker draws its own graphs from the one study seed
    random = StudyConfig(**{**config.to_attr(), "sampler": "random"})
    draws = []
    for worker in ("local-0", "local-1"):
        s = optuna.create_study(sampler=random.sampler_for(worker))
        draws.append([s.ask().suggest_int("x", 0, 10**9) for _ in range(3)])
    assert draws[0] != draws[1]


def test_reap_fails_trials_of_dead_workers_and_retries_them(tmp_path):
    config = StudyConfig(template=TEMPLATE, template_path="t.kt", sampler="random", seed=0, pruner="asha",
                         eta=2, min_resource=1, epochs=8, trials=5)
    study = create_study(open_storage(str(tmp_path / "s.journal"), create=True), "s", config)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, alive = study.ask(), study.ask()
    dead.suggest_categorical("n2.model", ["mlp", "cnn_tiny"])
    dead.set_user_attr("owner", {**owner("w0"), "pid": gone.pid})
    alive.set_user_attr("owner", owner("w1"))  # this process: alive
    assert reap(study) == [dead.number]
    assert reap(study) == []  # failed once, retried once
    trials = study.get_trials()
    assert trials[dead.number].state == TrialState.FAIL and "died" in trials[dead.number].user_attrs["failed"]
    assert trials[alive.number].state == TrialState.RUNNING
    assert [t.state for t in trials[2:]] == [TrialState.WAITING]
    retry = study.ask()  # the retry is asked first, with the same parameters
    assert retry.user_attrs["retry_of"] == dead.number
    assert retry.suggest_categorical("n2.model", ["mlp", "cnn_tiny"]) == dead.params["n2.model"]


def test_the_heartbeat_retries_a_silent_trial_like_the_reaper(tmp_path):
    """On an RDB storage a trial whose worker stopped sending heartbeats is failed by the next
    worker and retried through `study.retry` (here on SQLite, with a 1-second grace period)."""
    from dclang.search.study import retry

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=1,
                                         heartbeat_stale_trial_callback=retry)
    study = optuna.create_study(storage=storage, direction="maximize")
    silent = study.ask()
    silent.suggest_categorical("n2.model", ["mlp", "cnn_tiny"])
    storage.set_trial_system_attr(silent._trial_id, "completed_rung_0", 0.5)  # what ASHA records at a rung
    storage.record_heartbeat(silent._trial_id)
    deadline = time.monotonic() + 60
    while study.get_trials()[0].state != TrialState.FAIL:  # once the grace period is over, however long it takes
        assert time.monotonic() < deadline, "the silent trial was never failed"
        time.sleep(0.2)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING and trials[1].user_attrs == {"retry_of": 0, "retry_count": 1}
    assert "completed_rung_0" not in trials[1].system_attrs  # the retry faces every rung afresh
