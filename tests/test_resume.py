"""A run killed with SIGKILL and resumed ends exactly as the uninterrupted run (CPU).

The killed run is a real process (training through `train_graph`, held after epoch 2's files
are written, so the kill lands at a known point whatever the machine's load), its resumption a
real `dclang run --resume`; the uninterrupted run is trained in the test's process. On the CPU every operation is
deterministic and the batches of an epoch depend only on (seed, epoch), so apart from the
timing fields the metrics, the summary and the final weights must be identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dclang.api import load
from dclang.checkpoints import load_safely
from dclang.processes import python_argv
from dclang.train import RunDir, train_graph
from dclang.train.metrics import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[1]

GRAPH = textwrap.dedent("""\
    graph resumable
    data digits { val_split = 600  pad = 1 }
    train { epochs = 4  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }
    node s : cnn_tiny [target]
    node p : mlp
    node t : mlp [frozen]
    label -> s : through
    label -> p : through
    t -> s : linear
    p -> s : correct
    s -> p : through kl(T=2)
    """)


#: a run held after epoch 2's files are written, until the test kills it
HELD_RUN = """\
import sys
from pathlib import Path
from dclang.api import load
from dclang.train import train_graph

def hold(epoch, record):
    if epoch == 2:
        print("epoch 2 written", flush=True)
        sys.stdin.readline()

train_graph(load(Path(sys.argv[1])), run_dir=Path(sys.argv[2]), device="cpu", progress=False, on_epoch=hold)
"""


def dclang_run(kt: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dclang", "run", str(kt), "-o", str(out), "--device", "cpu",
                             "--no-progress", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    kt = tmp_path / "resumable.kt"
    kt.write_text(GRAPH)
    # The uninterrupted run trains here (a process start is most of this test's time), with
    # the processes' thread count: bits depend on it. It also pre-trains the shared teacher.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_graph(load(kt), run_dir=tmp_path / "full", device="cpu", progress=False,
                    teacher_cache=tmp_path / "cache" / "teachers")
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCLANG_CACHE": str(tmp_path / "cache")}

    killed_dir = RunDir(tmp_path / "killed")
    killed = subprocess.Popen(python_argv(HELD_RUN, str(kt), str(killed_dir.root)), cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline() == "epoch 2 written\n", killed.communicate()
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
        killed.communicate()
    assert len(killed_dir.read_metrics()) == 2 and killed_dir.load_last()["epoch"] == 2

    finish(dclang_run(kt, killed_dir.root, env, "--resume"))

    full_dir = RunDir(tmp_path / "full")
    assert untimed(killed_dir.read_metrics()) == untimed(full_dir.read_metrics())
    assert len(full_dir.read_metrics()) == 4
    timing = {"wall_seconds", "train_seconds", "steps_per_second"}
    resumed_summary, full_summary = killed_dir.read_summary(), full_dir.read_summary()
    assert {k: v for k, v in resumed_summary.items() if k not in timing} == \
        {k: v for k, v in full_summary.items() if k not in timing}
    for which in ("last", "best"):
        a, b = load_safely(getattr(killed_dir, which)), load_safely(getattr(full_dir, which))
        assert a["epoch"] == b["epoch"]
        models_a = a["train_step"]["models"] if which == "last" else {n: c["state_dict"] for n, c in a["nodes"].items()}
        models_b = b["train_step"]["models"] if which == "last" else {n: c["state_dict"] for n, c in b["nodes"].items()}
        for node, state in models_a.items():
            for name, tensor in state.items():
                assert torch.equal(tensor, models_b[node][name]), (which, node, name)


class _Stop(Exception):
    """Raised after an epoch's files are written: the run stops as a killed one would."""


def stop_after_the_epoch(epoch, record):
    raise _Stop


def test_a_compiled_run_resumes_to_the_uninterrupted_result_SLOW(tmp_path):
    """`--compile` (with channels-last, the CPU default for cnn_tiny): a run stopped after
    epoch 1 and resumed in a fresh step (compiled again) ends as the uninterrupted compiled
    run, and within float32 rounding of the eager run."""
    from dclang.compile import StepOptions
    from dclang.data import load_dataset

    text = GRAPH.replace("epochs = 4", "epochs = 2").replace("node t : mlp [frozen]\n", "").replace(
        "t -> s : linear\n", "")
    graph = load_text(tmp_path, text)
    dataset = load_dataset("digits", data_dir=None, val_split=600, split_seed=0)
    compiled = StepOptions(compile=True)

    def run(name, options, **kwargs):
        return train_graph(graph, run_dir=tmp_path / name, device="cpu", progress=False, dataset=dataset,
                           options=options, **kwargs)

    full = run("full", compiled)
    try:
        run("stopped", compiled, on_epoch=stop_after_the_epoch)
    except _Stop:
        pass
    assert len(RunDir(tmp_path / "stopped").read_metrics()) == 1
    resumed = run("stopped", compiled, resume=True)
    eager = run("eager", StepOptions())
    assert full.summary["step"] == "fused+compile+channels_last" and eager.summary["step"] == "fused+channels_last"
    assert untimed(resumed.records) == untimed(full.records)
    for got, want in zip(full.records, eager.records):
        for node in ("s", "p"):
            assert abs(got["nodes"][node]["train_loss"] - want["nodes"][node]["train_loss"]) < 1e-4, (node, got)


def load_text(tmp_path: Path, text: str):
    kt = tmp_path / "graph.kt"
    kt.write_text(text)
    return load(kt)


def test_a_run_with_shared_trunks_resumes_to_the_uninterrupted_result(tmp_path):
    """Branches (`branch(...)`): the trunk stored once in `last.pt`, restored in place; a run
    stopped after epoch 1 and resumed ends bit for bit as the uninterrupted one. `best.pt`
    holds each branch whole (trunk and head), loadable into a plain network."""
    from dclang.data import load_dataset
    from dclang.models import build_model

    text = textwrap.dedent("""\
        graph trunks
        data digits { val_split = 600 }
        train { epochs = 2  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }
        node a : cnn_tiny [target]
        node b : branch(a, from="3")
        node c : branch(b, from=pool)
        label -> a : through
        label -> b : through
        label -> c : through
        b -> a : through kl(T=2)
        c -> b : correct
        """)
    graph = load_text(tmp_path, text)
    dataset = load_dataset("digits", data_dir=None, val_split=600, split_seed=0)

    def run(name, **kwargs):
        return train_graph(graph, run_dir=tmp_path / name, device="cpu", progress=False, dataset=dataset, **kwargs)

    full = run("full")
    try:
        run("stopped", on_epoch=stop_after_the_epoch)
    except _Stop:
        pass
    resumed = run("stopped", resume=True)
    assert untimed(resumed.records) == untimed(full.records)
    last = [load_safely(RunDir(tmp_path / n).last)["train_step"]["models"] for n in ("stopped", "full")]
    assert not any(k.startswith(("0.", "1.")) for k in last[0]["b"])  # a's trunk, stored once, in a
    for node, state in last[0].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, last[1][node][key]), (node, key)
    whole = load_safely(RunDir(tmp_path / "full").best)["nodes"]["c"]["state_dict"]
    build_model("cnn_tiny", 10, 1, 8).load_state_dict(whole)  # strict: every tensor of a whole network
