"""A search as processes: workers run the parent's dclang whatever the working directory
holds, Ctrl-C stops a search cleanly, and a damaged journal is refused with what to do.

Real processes throughout: `dclang search` with real workers (the cheap deterministic trainer
`fake_trainer:train`), a terminal's Ctrl-C imitated by SIGINT to the whole process group, and
real journals damaged on disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from test_search import FAKE, TEMPLATE  # the cheap trainer, and a template of ~10^6 graphs

import dclang
from dclang.diagnostics import UserError
from dclang.processes import dclang_argv, python_argv
from dclang.search.study import INTERRUPTED, load_study, open_storage


def shadowing_folder(root: Path) -> Path:
    """A working directory holding a `dclang/` package that fails when imported."""
    (root / "dclang").mkdir(parents=True)
    (root / "dclang" / "__init__.py").write_text("raise SystemExit('the dclang/ folder of the working directory')\n")
    return root


def test_a_child_python_imports_the_parents_dclang_not_the_working_directorys(tmp_path):
    cwd = shadowing_folder(tmp_path)
    assert subprocess.run([sys.executable, "-c", "import dclang"], cwd=cwd, capture_output=True).returncode != 0
    child = subprocess.run(python_argv("import dclang; print(dclang.__file__)"), cwd=cwd, capture_output=True,
                           text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == dclang.__file__


def test_search_workers_run_the_parents_dclang_beside_a_dclang_folder(tmp_path, search_env, study_trials):
    cwd = shadowing_folder(tmp_path)
    (cwd / "t.kt").write_text(TEMPLATE)
    done = subprocess.run(dclang_argv("search", "--template", "t.kt", "--trials", "4", "--workers", "2",
                                      "--pruner", "none", "-o", "out", *FAKE),
                          cwd=cwd, env=search_env, capture_output=True, text=True, timeout=180)
    logs = "".join(p.read_text() for p in (cwd / "out" / "logs").glob("*.log"))
    assert done.returncode == 0, done.stderr + logs
    trials, _ = study_trials(cwd / "out" / "study.journal", "small")
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 4
    assert "the dclang/ folder" not in logs


# ---------------------------------------------------------------- Ctrl-C


def wait_for(read, predicate, what: str, timeout: float = 120):
    """Poll `read()` until `predicate` accepts what it returns (the state, not a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if predicate(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def trials_of(out: Path):
    if not (out / "search.json").exists():
        return []
    study, _ = load_study(open_storage(str(out / "study.journal")), "small")
    return study.get_trials(deepcopy=False)


def test_ctrl_c_stops_a_search_with_its_trials_handed_back_as_interrupted(tmp_path, search_env):
    (tmp_path / "t.kt").write_text(TEMPLATE)
    out = tmp_path / "out"
    env = {**search_env, "DCLANG_FAKE_SLEEP": "0.5"}
    search = subprocess.Popen(dclang_argv("search", "--template", str(tmp_path / "t.kt"), "--trials", "30",
                                          "--workers", "2", "-o", str(out), *FAKE),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        # both workers in a trial that has begun to train
        wait_for(lambda: trials_of(out), lambda ts: sum(t.state == TrialState.RUNNING and "kt" in t.user_attrs
                                                        and "duplicate_of" not in t.user_attrs for t in ts) == 2,
                 "two trials training")
        os.killpg(search.pid, signal.SIGINT)  # what Ctrl-C at a terminal does: the parent and its workers
        stdout, stderr = search.communicate(timeout=60)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert search.returncode == 130, stderr
    trials = trials_of(out)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    handed_back = [t for t in trials if t.user_attrs.get("failed") == INTERRUPTED]
    assert len(handed_back) >= 1
    assert not [t for t in trials if "died" in t.user_attrs.get("failed", "")], "a worker was killed, not stopped"
    for t in handed_back:
        assert t.state == TrialState.FAIL
        retries = [r for r in trials if r.user_attrs.get("retry_of") == t.number]  # queued: WAITING
        assert [r.system_attrs["fixed_params"] for r in retries] == [t.params]
    assert f"continue with `dclang search --resume -o {out}`" in stderr
    assert "handed back as interrupted" in stderr and "interrupted" in stdout  # the summary counts them
    for text in (stderr, logs):  # no lock left behind for others to wait out, no click "Aborted!", no traceback
        assert "lock" not in text.lower() and "Aborted!" not in text and "Traceback" not in text
    assert logs.count("stopped; its running trials are marked interrupted") == 2
    assert (out / "leaderboard.csv").is_file() and (out / "summary.json").is_file()


# ---------------------------------------------------------------- a damaged journal


@pytest.fixture
def journal(finished_search, tmp_path) -> Path:
    """A copy of a finished search's journal."""
    path = tmp_path / "study.journal"
    shutil.copy(finished_search / "study.journal", path)
    return path


def trial_count(path: Path) -> int:
    study, _ = load_study(open_storage(str(path)), "tiny")
    return len(study.get_trials(deepcopy=False))


def test_a_garbage_line_appended_to_the_journal_is_refused_with_its_line_and_the_fix(journal, finished_search,
                                                                                      run_search, tmp_path):
    lines = journal.read_bytes().count(b"\n")
    out = tmp_path / "out"
    shutil.copytree(finished_search, out)
    with open(out / "study.journal", "ab") as f:
        f.write(b"this is not a record\n")
    resumed = run_search("--resume", "-o", out, "--trials", 5, *FAKE)
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    assert f"{out / 'study.journal'} is damaged: line {lines + 1} of {lines + 1} is not a journal record" \
        in resumed.stderr
    assert f"sed -i '{lines + 1}d' {out / 'study.journal'}" in resumed.stderr
    # the fix the message gives restores the search
    kept = (out / "study.journal").read_bytes().splitlines(keepends=True)[:-1]
    (out / "study.journal").write_bytes(b"".join(kept))
    assert run_search("--resume", "-o", out, "--trials", 5, *FAKE).returncode == 0


def test_a_damaged_line_inside_the_journal_is_refused_and_says_what_would_be_lost(journal):
    records = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*records[:3], b'{"op_code": "x"}\n', *records[3:]]))
    with pytest.raises(UserError) as refused:
        open_storage(str(journal))
    assert f"line 4 of {len(records) + 1}" in refused.value.message
    assert f"{len(records) - 3} record(s) follow it" in refused.value.hint


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=80))
def test_whatever_is_appended_the_journal_opens_whole_or_is_refused_by_name(journal, garbage):
    whole = journal.read_bytes()
    count = trial_count(journal)
    damaged = journal.with_name("damaged.journal")
    damaged.write_bytes(whole + garbage)
    try:
        assert trial_count(damaged) == count  # a torn last record is dropped; the study is as it was
    except UserError as exc:
        assert str(damaged) in exc.message and "line" in exc.message


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(min_value=0.0, max_value=1.0))
def test_a_journal_cut_anywhere_opens_as_the_study_it_held_then(journal, keep):
    """What a kill or a full disk leaves: a prefix of the records, the last one maybe torn."""
    whole = journal.read_bytes()
    cut = journal.with_name("cut.journal")
    cut.write_bytes(whole[:int(keep * len(whole))])
    try:
        count = trial_count(cut)
    except UserError as exc:  # cut before the study was complete: no dclang study in it yet
        assert "no study named" in exc.message or "was not created by `dclang search`" in exc.message
        return
    assert count <= trial_count(journal)
    assert cut.read_bytes() == whole[:len(cut.read_bytes())] and cut.read_bytes().endswith(b"\n")


def test_a_stopped_worker_hands_back_what_it_still_runs_and_nothing_else(tmp_path):
    """What a worker does last when stopped: its own RUNNING trials (a packed worker's trial
    stopped while it was set up) are failed as interrupted and queued again; others' stay."""
    from dclang.search.study import StudyConfig, create_study, hand_back, owner

    config = StudyConfig(template=TEMPLATE, template_path="t.kt", sampler="random", seed=0, pruner="asha",
                         eta=2, min_resource=1, epochs=8, trials=5)
    study = create_study(open_storage(str(tmp_path / "s.journal"), create=True), "s", config)
    mine, theirs = study.ask(), study.ask()
    mine.suggest_categorical("n2.model", ["mlp", "cnn_tiny"])
    mine.set_user_attr("owner", owner("local-0"))
    theirs.set_user_attr("owner", {**owner("local-1"), "pid": os.getppid()})
    assert hand_back(study) == [mine.number]
    trials = study.get_trials()
    assert trials[mine.number].state == TrialState.FAIL and trials[mine.number].user_attrs["failed"] == INTERRUPTED
    assert trials[theirs.number].state == TrialState.RUNNING
    assert trials[2].user_attrs["retry_of"] == mine.number and trials[2].system_attrs["fixed_params"] == \
        trials[mine.number].params
