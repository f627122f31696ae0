"""A run folder as processes see it: owned by one process at a time (a lock the operating
system releases when its owner dies, however it dies), and Ctrl-C during `dclang run`
keeps what was trained and says how to go on. Real `dclang run` processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from dclang.processes import dclang_argv
from dclang.train import RunDir

GRAPH = """\
graph locked
data digits { val_split = 300 }
train { epochs = EPOCHS  batch = 64 }
node s : mlp [target]
node p : mlp
label -> s : through
label -> p : through
p -> s : through
"""


def write_graph(tmp_path: Path, epochs: int) -> Path:
    kt = tmp_path / "g.kt"
    kt.write_text(GRAPH.replace("EPOCHS", str(epochs)))
    return kt


def dclang_run(kt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(dclang_argv("run", str(kt), "-o", str(out), "--device", "cpu", *extra), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll until `predicate()` holds (a state on disk, not a time), the process still running."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_holder(rundir: RunDir) -> int | None:
    try:
        return json.loads(rundir.lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_run_into_a_folder_is_refused_naming_the_first_and_a_killed_owner_frees_it(tmp_path):
    kt = write_graph(tmp_path, 100)
    rundir = RunDir(tmp_path / "out")
    first = dclang_run(kt, rundir.root, "--no-progress")
    try:
        wait_for(lambda: lock_holder(rundir) == first.pid, first, "the first run to hold the folder")
        os.kill(first.pid, signal.SIGSTOP)  # it holds the folder for as long as the test needs
        second = dclang_run(kt, rundir.root, "--no-progress", "--resume")
        _, refused = second.communicate(timeout=120)
        assert second.returncode == 1, refused
        assert f"{rundir.root} is in use: process {first.pid} on " in refused
        assert f"`dclang run {kt} -o {rundir.root} --device cpu --no-progress`, since " in refused
        assert "Traceback" not in refused
        first.kill()  # SIGKILL: no chance to let anything go
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    third = dclang_run(write_graph(tmp_path, 1), rundir.root, "--no-progress")
    out, err = third.communicate(timeout=180)
    assert third.returncode == 0, err
    assert lock_holder(rundir) == third.pid and len(rundir.read_metrics()) == 1


def test_ctrl_c_keeps_the_epochs_done_draws_their_curves_and_gives_the_resume_command(tmp_path):
    kt = write_graph(tmp_path, 300)
    rundir = RunDir(tmp_path / "out")
    run = dclang_run(kt, rundir.root)
    try:
        wait_for(rundir.last.is_file, run, "the first epoch's checkpoint")
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C at a terminal
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, stderr
    done = rundir.load_last()["epoch"]  # what is kept: metrics.jsonl is cut back to it
    assert 1 <= done < 300 and len(rundir.read_metrics()) == done
    assert f"stopped: {done} of 300 epochs are done and kept in {rundir.root}" in stderr
    assert f"last checkpoint: {rundir.last} (epoch {done})" in stderr
    assert f"continue with: dclang run {kt} -o {rundir.root} --device cpu --resume" in stderr
    assert "Aborted!" not in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in (rundir.root / "curves").glob("*.png")) == ["p.png", "s.png"]


def test_a_run_says_where_its_results_are_and_that_epochs_shortened_its_teachers_pre_training(tmp_path):
    kt = tmp_path / "kd.kt"
    kt.write_text(GRAPH.replace("EPOCHS", "3").replace("node p : mlp\n", "node p : mlp\nnode t : mlp [frozen]\n")
                  + "t -> s : through\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCLANG_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(dclang_argv("run", str(kt), "-o", str(out), "--device", "cpu", "--epochs", "1",
                                      "--no-progress"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("note: --epochs 1 also shortens the pre-training of the frozen node(s) `t` (the train block says 3 "
            "epochs)") in done.stderr
    assert "pre-training mlp on digits on labels for 1 epoch " in done.stderr  # as the note says
    assert done.stdout.startswith(f"results in {out}/:\n")
    for key_file in ("summary.json", "metrics.jsonl", "curves/", "checkpoints/", "graph.kt"):
        assert f"\n  {key_file} " in done.stdout
    assert "  curves/            s.png, p.png, t.png (accuracy and loss per epoch)" in done.stdout
    for name in ("summary.json", "metrics.jsonl", "graph.kt", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file()
