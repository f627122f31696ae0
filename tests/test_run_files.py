"""The files of a run: dclang never overwrites what it did not write, checks every output
path before any work, validates every file it reads back, and keys the teacher cache by
what a teacher depends on.

Real runs on digits (1 to 3 epochs of an mlp), real damaged files (flipped bits, random
bytes, truncation), a real write error (a file size limit: the kernel's EFBIG, as a full
disk's ENOSPC, in a real `dclang run` process).
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dclang.api import check
from dclang.checkpoints import atomic_write_text, load_safely
from dclang.cli import main
from dclang.data import load_dataset
from dclang.diagnostics import UserError
from dclang.train import RunDir, train_graph
from dclang.train.metrics import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[1]

ALONE = "node s : mlp [target]\nlabel -> s : through\n"
KD = "node s : mlp [target]\nnode t : mlp [frozen]\nlabel -> s : through\nt -> s : linear\n"


def kt(body: str, *, epochs: int = 1, batch: int = 64, data: str = "digits { val_split = 100  pad = 1 }") -> str:
    return textwrap.dedent(f"""\
        graph tiny
        data {data}
        train {{ epochs = {epochs}  batch = {batch}  optimizer = sgd(lr=0.1)  schedule = cosine }}
        """) + body


def graph_of(text: str, path: str = "<test>"):
    checked = check(text, path)
    assert checked.ok, checked.diagnostics
    return checked.graph


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=100, split_seed=0)


class _Stop(Exception):
    """Raised after an epoch's files are written: the run stops as a killed one would."""


def stop_after(last_epoch: int):
    def on_epoch(epoch, record):
        if epoch == last_epoch:
            raise _Stop

    return on_epoch


def stopped_run(folder: Path, digits, *, epochs: int, after: int):
    graph = graph_of(kt(ALONE, epochs=epochs))
    with pytest.raises(_Stop):
        train_graph(graph, run_dir=folder, device="cpu", progress=False, dataset=digits, on_epoch=stop_after(after))
    return graph


def resume(graph, folder: Path, digits):
    return train_graph(graph, run_dir=folder, device="cpu", progress=False, dataset=digits, resume=True)


# ---------------------------------------------------------------- never overwrite


def test_run_beside_the_users_own_file_is_refused_before_any_work(tmp_path, monkeypatch):
    """`dclang run graph.kt -o .` used to replace the user's commented graph.kt with the
    canonical text; now the folder is refused (it is not dclang's) before the teacher is
    pre-trained, and nothing in it changes."""
    work = tmp_path / "work"
    work.mkdir()
    users = "# my experiment: keep these notes\n" + kt(KD) + "# end\n"
    (work / "graph.kt").write_text(users)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DCLANG_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["run", "graph.kt", "-o", ".", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "holds files dclang did not write (graph.kt)" in result.output and "Traceback" not in result.output
    assert "-o runs/NAME" in result.output
    assert (work / "graph.kt").read_text() == users and [p.name for p in work.iterdir()] == ["graph.kt"]
    assert not (tmp_path / "cache").exists()  # refused before the teacher was pre-trained


def test_metrics_and_summary_of_a_folder_that_is_not_dclangs_are_never_clobbered(tmp_path, digits):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "summary.json").write_text('{"mine": 2}\n')
    with pytest.raises(UserError, match="holds files dclang did not write"):
        train_graph(graph_of(kt(ALONE)), run_dir=folder, device="cpu", progress=False, dataset=digits)
    assert (folder / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert (folder / "summary.json").read_text() == '{"mine": 2}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "summary.json"]

    (folder / "checkpoints").mkdir()  # as a run of a dclang without manifests left it
    with pytest.raises(UserError, match=r"holds a run of an earlier dclang \(it has no dclang-run\.json\)"):
        train_graph(graph_of(kt(ALONE)), run_dir=folder, device="cpu", progress=False, dataset=digits)

    # a new folder, or an empty one, becomes dclang's: its manifest is written first
    (tmp_path / "empty").mkdir()
    train_graph(graph_of(kt(ALONE)), run_dir=tmp_path / "empty", device="cpu", progress=False, dataset=digits)
    manifest = json.loads((tmp_path / "empty" / "dclang-run.json").read_text())
    assert manifest["format"] == "dclang-run/1" and manifest["graph"] == "tiny"


# ---------------------------------------------------------------- output paths, before any work


def test_output_paths_are_checked_before_any_work(tmp_path, digits):
    cache = tmp_path / "cache"
    graph = graph_of(kt(KD))

    def run(folder):
        return train_graph(graph, run_dir=folder, device="cpu", progress=False, dataset=digits, teacher_cache=cache)

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"cannot write the run folder .*notes\.txt/run: it is under .*notes\.txt, "
                                        r"which is a file"):
        run(tmp_path / "notes.txt" / "run")
    with pytest.raises(UserError, match=r"notes\.txt: it is a file"):
        run(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(UserError, match=r"cannot write .*locked/run.*: Permission denied"):
                run(locked / "run")
        finally:
            locked.chmod(0o755)
    assert not cache.exists()  # no teacher was pre-trained for a run that could not be written


def test_a_write_error_mid_run_is_clear_and_loses_nothing(tmp_path, digits):
    """A real `dclang run --resume` whose files may not grow past 20 kB (RLIMIT_FSIZE: the
    kernel refuses the write, EFBIG, as a full disk refuses it with ENOSPC): the checkpoint
    of epoch 2 cannot be written. The error names the file and the cause, no traceback, no
    temporary file is left, last.pt is still epoch 1's, and a resume then finishes."""
    kt_path = tmp_path / "g.kt"
    kt_path.write_text(kt(ALONE, epochs=2))
    stopped_run(tmp_path / "run", digits, epochs=2, after=1)
    last = RunDir(tmp_path / "run").last.read_bytes()

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dclang", "run", str(kt_path), "-o", str(tmp_path / "run"),
                           "--resume", "--device", "cpu", "--no-progress"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limited)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"cannot write .*checkpoints/(best|last)\.pt: File too large", proc.stderr), proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    run = RunDir(tmp_path / "run")
    assert run.last.read_bytes() == last and load_safely(run.last)["epoch"] == 1
    assert not [p.name for p in run.root.rglob(".*")]  # no temporary file left behind
    assert resume(graph_of(kt(ALONE, epochs=2)), run.root, digits).summary["epochs_done"] == 2


# ---------------------------------------------------------------- reading back


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensors' bytes: the archive still reads
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_refuses_to_resume_and_names_the_intact_one(tmp_path, digits, capsys):
    graph = stopped_run(tmp_path / "run", digits, epochs=3, after=2)
    run = RunDir(tmp_path / "run")
    assert load_safely(run.previous)["epoch"] == 1  # the epoch before last.pt's, kept
    _flip_a_bit(run.last)
    with pytest.raises(UserError, match=r"last\.pt: it does not match the content hash it was written with") as caught:
        resume(graph, run.root, digits)
    assert f"{run.previous} (epoch 1) is intact: copy it over {run.last}" in caught.value.hint

    good = run.last.with_name("kept.pt")
    shutil.copy(run.previous, good)
    for damage, why in ((b"", r"is empty \(0 bytes\)"),
                        (bytes(range(7, 256)) * 8, r"is not a PyTorch checkpoint \(it starts with b'\\x07\\x08"),
                        (good.read_bytes()[:5000], r"is truncated or damaged")):
        run.last.write_bytes(damage)
        with pytest.raises(UserError, match=r"cannot resume from .*last\.pt: it " + why) as caught:
            resume(graph, run.root, digits)
        assert "Python objects" not in str(caught.value) and "(epoch 1) is intact" in caught.value.hint

    shutil.copy(good, run.last)  # what the hint says: resume from epoch 1's checkpoint
    capsys.readouterr()
    resumed = resume(graph, run.root, digits)
    assert f"resuming the run in {run.root} from epoch 2 of 3" in capsys.readouterr().err
    full = train_graph(graph, run_dir=tmp_path / "full", device="cpu", progress=False, dataset=digits)
    assert untimed(resumed.records) == untimed(full.records)  # epoch 2 trained again, to the same bits
    resume(graph, run.root, digits)
    assert f"the run in {run.root} is already complete (3 of 3 epochs): nothing to train" in capsys.readouterr().err


def test_garbage_in_metrics_or_summary_is_named_never_a_traceback(tmp_path, digits):
    graph = stopped_run(tmp_path / "run", digits, epochs=2, after=1)
    run = RunDir(tmp_path / "run")
    good = run.metrics.read_text()
    run.metrics.write_text(good + "{'epoch': 2, oops\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl: line 2 is not a JSON record") as caught:
        resume(graph, run.root, digits)
    assert f"delete the run folder {run.root}" in caught.value.hint
    run.metrics.write_text("")
    with pytest.raises(UserError, match=r"metrics\.jsonl holds 0 epoch record\(s\), but .*last\.pt is at epoch 1"):
        resume(graph, run.root, digits)
    run.metrics.write_text(good)

    run.summary.write_text('{"graph": "tiny", "nodes": {')
    result = CliRunner().invoke(main, ["report", str(run.root), "--out", str(tmp_path / "report")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{run.summary}: is not valid JSON" in result.output


def test_the_teacher_cache_is_keyed_by_the_data_and_checked_when_read(tmp_path, capsys):
    """An .npz regenerated at the same path is new data: its teacher is pre-trained again,
    never the one trained on the old file. A damaged cache entry is named, not used."""
    rng = np.random.default_rng(0)

    def write_npz(labels_shift: int) -> None:
        x = rng.integers(0, 256, (240, 8, 8), dtype=np.uint8)
        y = (x.reshape(240, -1)[:, :4].sum(1) // 256 + labels_shift) % 4
        np.savez(tmp_path / "data.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])

    kt_path = tmp_path / "g.kt"
    kt_path.write_text(kt(KD, data='npz { path = "data.npz"  val_split = 40 }'))
    cache = tmp_path / "cache"

    def run(name: str):
        return train_graph(graph_of(kt_path.read_text(), str(kt_path)), run_dir=tmp_path / name, device="cpu",
                           progress=False, teacher_cache=cache)

    write_npz(0)
    run("a")
    assert "pre-training mlp on npz" in capsys.readouterr().err
    run("b")
    assert "cached mlp on npz" in capsys.readouterr().err
    write_npz(1)  # same path, other content
    run("c")
    assert "pre-training mlp on npz" in capsys.readouterr().err
    entries = sorted(cache.glob("*.pt"))
    assert len(entries) == 2

    newest = max(entries, key=lambda p: p.stat().st_mtime_ns)
    _flip_a_bit(newest)
    with pytest.raises(UserError, match=rf"teacher `t`: the cached checkpoint {re.escape(str(newest))} does not match "
                                        r"the content hash") as caught:
        run("d")
    assert f"delete {newest}" in caught.value.hint
    newest.unlink()
    (cache / newest.stem / "summary.json").write_text("[1, 2")
    run("e")  # the entry's weights were deleted: pre-trained again from its own run folder
    assert "pre-training mlp on npz" in capsys.readouterr().err


# ---------------------------------------------------------------- values, modes, messages


def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(tmp_path, digits):
    with pytest.raises(UserError, match=rf"batch = 5000 is larger than the training split \({len(digits.train)} "
                                        r"images of digits\)") as caught:
        train_graph(graph_of(kt(KD, batch=5000)), run_dir=tmp_path / "run", device="cpu", progress=False,
                    dataset=digits, teacher_cache=tmp_path / "cache")
    assert "--set train.batch=N" in caught.value.hint
    assert not (tmp_path / "cache").exists()


def test_files_are_created_with_the_users_umask(tmp_path, digits):
    before = os.umask(0o027)
    try:
        train_graph(graph_of(kt(ALONE)), run_dir=tmp_path / "run", device="cpu", progress=False, dataset=digits)
    finally:
        os.umask(before)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*")}
    assert modes["run/checkpoints"] == oct(0o750)
    assert {m for p, m in modes.items() if p != "run/checkpoints"} == {oct(0o640)}, modes
    script = tmp_path / "script.kt"  # a file rewritten in place keeps its own mode
    script.write_text("old")
    script.chmod(0o755)
    atomic_write_text("new", script)
    assert script.stat().st_mode & 0o777 == 0o755 and script.read_text() == "new"


def test_an_init_checkpoint_of_random_bytes_is_called_what_it_is(tmp_path):
    (tmp_path / "t.pt").write_bytes(bytes(range(7, 256)))
    path = tmp_path / "g.kt"
    path.write_text(kt(KD.replace("[frozen]", '[frozen, init="t.pt"]')))
    checked = check(path.read_text(), str(path))
    [error] = checked.errors
    assert "is not a PyTorch checkpoint" in error.message and "Python objects" not in error.message


def test_the_teacher_cache_does_not_import_the_training_loop():
    """The loop pre-trains teachers through the cache (`init_states(..., pretrain=)`): the
    dependency runs one way."""
    tree = ast.parse((REPO / "dclang" / "train" / "teachers.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "dclang.train.loop" not in imported


def _strings(tree: ast.AST):
    """Every string of a module, an f-string whole (its fields as `{}`), so a flag is read in
    the phrase that names its command."""
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            yield node.value


def test_no_message_names_a_flag_that_does_not_exist():
    """Every `--flag` in the strings of the code behind `dclang run` is an option of the
    command the string names (`dclang search --template`), else of `dclang run`; torchrun's
    own flag aside."""
    import click

    commands = {name: {opt for p in command.params for opt in p.opts + p.secondary_opts} | {"--help"}
                for name, command in main.commands.items()}
    sources = [*(REPO / "dclang" / "train").glob("*.py"), *(REPO / "dclang" / "data").glob("*.py"),
               REPO / "dclang" / "checkpoints.py"]
    unknown = []
    for source in sources:
        for text in _strings(ast.parse(source.read_text())):
            for found in re.finditer(r"(?<![\w-])--[a-z][a-z0-9_-]*", text):
                named = re.search(r"dclang (\w+)[^.;:`\n]*$", text[:found.start()])  # in the same phrase
                command = named.group(1) if named and named.group(1) in commands else "run"
                if found.group() not in commands[command] and found.group() != "--nproc_per_node":
                    unknown.append((source.name, command, found.group()))
    assert isinstance(main, click.Group) and not unknown, unknown


def test_a_run_refused_before_any_work_leaves_no_folder(tmp_path):
    """Data that cannot be loaded is found after the folder is claimed: the folder the run made
    goes again, and a folder the user made stays, as empty as it was."""
    kt = tmp_path / "bad.kt"
    kt.write_text('graph bad\ndata npz { path = "missing.npz" }\ntrain { epochs = 1  batch = 8 }\n'
                  "node s : cnn_tiny [target]\nlabel -> s : through\n")
    made, kept = tmp_path / "made", tmp_path / "kept"
    kept.mkdir()
    for out in (made, kept):
        result = CliRunner().invoke(main, ["run", str(kt), "-o", str(out), "--device", "cpu", "--no-progress"])
        assert result.exit_code == 1 and "missing.npz does not exist" in result.output, result.output
    assert not made.exists() and kept.is_dir() and list(kept.iterdir()) == []
