"""`dclang search` on a real PostgreSQL server: the many-machines setup, on one machine.

The parent's workers and a worker that joins by itself (`dclang search --worker`, as on
another machine) share one study; one worker is killed mid-trial and its trial is retried.
The server is $DCLANG_TEST_POSTGRES, or one `.ci/start-postgres` starts (see conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

from test_search import (
    FAKE,
    TEMPLATE,
    assert_killed_and_retried,
    assert_outputs,
    assert_search_invariants,
    in_first_epoch,
    wait_for_trial,
    write,
)


def test_postgres_study_with_a_joining_worker_and_a_killed_one(tmp_path, postgres_url, search_env, study_trials):
    template, out = write(tmp_path, TEMPLATE), tmp_path / "out"
    name = f"pg-{uuid.uuid4().hex[:8]}"  # a server given by $DCLANG_TEST_POSTGRES may hold other studies
    env = {**search_env, "DCLANG_FAKE_SLEEP": "0.3"}
    command = [sys.executable, "-m", "dclang", "search"]
    parent = subprocess.Popen([*command, "--template", str(template), "--trials", "12", "--workers", "2", "-o",
                               str(out), "--storage", postgres_url, "--study", name, *FAKE],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    joiner = None

    def trials_once_joined():
        """The study's trials, once the study exists and the joiner is started."""
        nonlocal joiner
        if not (out / "search.json").exists():
            return None
        if joiner is None:
            joiner = subprocess.Popen([*command, "--worker", "--storage", postgres_url, "--study", name, *FAKE],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return study_trials(postgres_url, name)[0]

    try:
        victim = wait_for_trial(trials_once_joined, lambda t: in_first_epoch(t)
                                and t.user_attrs["owner"]["worker"].startswith("local-"))
        pid = victim.user_attrs["owner"]["pid"]
        os.kill(pid, signal.SIGKILL)
        _, stderr = parent.communicate(timeout=120)
        _, joined = joiner.communicate(timeout=120)
    finally:
        for proc in (parent, joiner):
            if proc is not None:
                proc.kill()
    assert parent.returncode == 0, stderr
    assert joiner.returncode == 0, joined
    assert "random sampler, asha pruner" in joined  # the joiner took the study's configuration

    trials, config = study_trials(postgres_url, name)
    assert_search_invariants(trials, config, workers=3)
    joined_trials = [t for t in trials
                     if not t.user_attrs.get("owner", {}).get("worker", "local-").startswith("local-")]
    assert_outputs(out, trials, top_k=5, still_training=joined_trials)  # the parent does not wait for the joiner
    workers = {t.user_attrs["owner"]["worker"] for t in trials if "owner" in t.user_attrs}
    assert {"local-0", "local-1"} <= workers and any(not w.startswith("local-") for w in workers)
    assert_killed_and_retried(trials, pid)
