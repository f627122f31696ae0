"""End-to-end tests of the training loop on scikit-learn's digits with tiny models.

Every run is a real one (2 epochs of cnn_tiny / mlp on ~1300 8x8 images), so these tests
check the run directory, the selection on val, divergence messages and the teacher cache
as a user meets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dclang.api import check
from dclang.checkpoints import atomic_save, load_safely, node_checkpoint
from dclang.data import Dataset, Split, load_dataset
from dclang.diagnostics import UserError
from dclang.train import RunDir, graph_text, resolve_device, train_graph
from dclang.train.command import load_with_overrides
from dclang.train.metrics import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[1]


def kt(body: str, *, epochs: int = 2, val_split: int = 100, lr: float = 0.1, name: str = "tiny") -> str:
    return textwrap.dedent(f"""\
        graph {name}
        data digits {{ val_split = {val_split}  pad = 1 }}
        train {{ epochs = {epochs}  batch = 64  optimizer = sgd(lr={lr})  schedule = cosine }}
        """) + textwrap.dedent(body)


DML = """\
node s : cnn_tiny [target]
node p : mlp
label -> s : through
label -> p : through
p -> s : correct
s -> p : through kl(T=2)
"""

KD = """\
node s : cnn_tiny [target]
node t : mlp [frozen]
label -> s : through
t -> s : linear
"""


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def graph_of(text: str, path: str = "<test>"):
    checked = check(text, path)
    assert checked.ok, checked.diagnostics
    return checked.graph


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", data_dir=None, val_split=100, split_seed=0)


def test_run_directory_files_and_summary(tmp_path, digits):
    seen = []
    result = train_graph(graph_of(kt(DML)), run_dir=tmp_path, device="cpu", progress=False, dataset=digits,
                         on_epoch=lambda epoch, record: seen.append((epoch, record)))
    run = RunDir(tmp_path)

    text = run.graph_kt.read_text()
    again = check(text)
    assert again.ok and graph_text(again.graph) == text  # graph.kt is canonical and resolved
    assert "augment = pad_crop" in text and "epochs = 2" in text and "seed = 0" in text

    records = run.read_metrics()
    assert records == result.records == [r for _, r in seen]
    assert [e for e, _ in seen] == [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert set(record["nodes"]) == {"s", "p"}
        assert set(record["edges"]) == {"label->s", "label->p", "p->s", "s->p"}
        for node in record["nodes"].values():
            assert 0 <= node["train_acc"] <= 1 and 0 <= node["val_acc"] <= 1 and 0 <= node["test_acc"] <= 1
            assert node["train_loss"] > 0 and node["val_loss"] > 0
        assert record["edges"]["label->s"]["gate"] == 1.0 and record["edges"]["label->s"]["pass_rate"] == 1.0
        assert 0 <= record["edges"]["p->s"]["pass_rate"] <= 1  # the correct gate drops some samples
        assert record["lr"] > 0 and record["seconds"] > 0

    summary = json.loads(run.summary.read_text())
    assert summary == result.summary
    assert summary["graph"] == "tiny" and summary["target"] == "s"
    assert summary["complete"] and summary["epochs_done"] == summary["epochs"] == 2
    assert (summary["seed"], summary["device"], summary["engine"]) == (0, "cpu", "fused")
    assert set(summary["versions"]) == {"dclang", "torch", "python"}
    assert summary["dataset"] == {"name": "digits", "train": len(digits.train), "val": 100, "test": 360,
                                  "num_classes": 10, "channels": 1, "image_size": 8}
    assert summary["steps"] == 2 * -(-len(digits.train) // 64) and summary["steps_per_second"] > 0
    s = summary["nodes"]["s"]
    assert s["model"] == "cnn_tiny" and not s["frozen"] and s["params"] == 1442
    assert s["final_val_acc"] == records[-1]["nodes"]["s"]["val_acc"]
    assert s["final_test_acc"] == records[-1]["nodes"]["s"]["test_acc"]
    best = records[s["best_val_epoch"] - 1]["nodes"]["s"]
    assert (s["best_val_acc"], s["test_at_best_val"]) == (best["val_acc"], best["test_acc"])

    last, best_pt = load_safely(run.last), load_safely(run.best)
    assert last["epoch"] == 2 and set(last["train_step"]["models"]) == {"s", "p"}
    assert best_pt["epoch"] == summary["best_epoch"]
    node = best_pt["nodes"]["s"]  # each node as a node checkpoint, usable as an `init`
    assert (node["format"], node["model"], node["num_classes"]) == ("dclang-node/1", "cnn_tiny", 10)
    if run.graph_svg.exists():
        assert run.graph_svg.read_text().lstrip().startswith("<?xml")


def test_best_checkpoint_is_selected_on_val_never_on_test(tmp_path, digits):
    """A validation split whose labels are all wrong by one: the better the model, the lower
    its val accuracy, while test accuracy rises. Selection must follow val."""
    val = Split(digits.train.images[:200].clone(), (digits.train.labels[:200] + 1) % 10)
    rigged = Dataset(digits.name, digits.num_classes, digits.channels, digits.image_size, digits.mean,
                     digits.std, digits.train, val, digits.test)
    result = train_graph(graph_of(kt("node s : mlp [target]\nlabel -> s : through\n", epochs=4)),
                         run_dir=tmp_path, device="cpu", progress=False, dataset=rigged)
    val_acc = [r["nodes"]["s"]["val_acc"] for r in result.records]
    test_acc = {r["epoch"]: r["nodes"]["s"]["test_acc"] for r in result.records
                if r["nodes"]["s"]["test_acc"] is not None}
    by_val = 1 + val_acc.index(max(val_acc))
    by_test = max(test_acc, key=test_acc.get)  # among the epochs whose test was measured (the last one is)
    assert by_val != by_test  # the case tells the two rules apart
    assert result.summary["best_epoch"] == by_val == load_safely(RunDir(tmp_path).best)["epoch"]
    assert result.summary["nodes"]["s"]["test_at_best_val"] == test_acc[by_val]


def test_empty_validation_split_selects_the_last_epoch_with_a_warning(tmp_path, capsys):
    result = train_graph(graph_of(kt("node s : mlp [target]\nlabel -> s : through\n", val_split=0)),
                         run_dir=tmp_path, device="cpu", progress=False)
    assert "validation split is empty" in capsys.readouterr().err
    assert result.summary["best_epoch"] == 2 == load_safely(RunDir(tmp_path).best)["epoch"]
    assert result.records[-1]["nodes"]["s"]["val_acc"] is None


def test_divergence_names_epoch_node_and_edge(tmp_path, digits):
    with pytest.raises(UserError) as caught:
        train_graph(graph_of(kt(DML, lr=10)), run_dir=tmp_path, device="cpu", progress=False, dataset=digits)
    message = caught.value.message
    assert "epoch 1" in message and "NaN or infinite" in message
    assert "node `s`" in message or "node `p`" in message
    assert "`label->s`" in message or "`label->p`" in message
    assert "learning rate" in caught.value.hint
    assert not RunDir(tmp_path).last.exists()  # nothing diverged was saved


def test_teacher_is_pretrained_once_then_cached(tmp_path, digits, capsys):
    cache = tmp_path / "cache"
    first = train_graph(graph_of(kt(KD)), run_dir=tmp_path / "a", device="cpu", progress=False, dataset=digits,
                        teacher_cache=cache)
    err = capsys.readouterr().err
    assert "teacher `t`: pre-training mlp on digits" in err
    [weights] = cache.glob("*.pt")
    teacher_acc = json.loads((cache / weights.stem / "summary.json").read_text())["nodes"]["teacher"]["final_test_acc"]
    assert first.summary["nodes"]["t"]["final_test_acc"] == teacher_acc  # the frozen node is that teacher

    second = train_graph(graph_of(kt(KD)), run_dir=tmp_path / "b", device="cpu", progress=False, dataset=digits,
                         teacher_cache=cache)
    err = capsys.readouterr().err
    assert "teacher `t`: cached mlp on digits" in err and f"test acc {100 * teacher_acc:.1f}%" in err
    assert "pre-training" not in err
    assert untimed(second.records) == untimed(first.records)  # same teacher, same seed: same run

    # another seed is another teacher
    train_graph(graph_of(kt(KD)), run_dir=tmp_path / "c", device="cpu", progress=False, dataset=digits,
                teacher_cache=cache, seed=1)
    assert "pre-training" in capsys.readouterr().err
    assert len(list(cache.glob("*.pt"))) == 2


def test_init_checkpoint_is_relative_to_the_kt_file(tmp_path, digits):
    from dclang.models import build_model

    net = build_model("mlp", 10, 1, 8)
    atomic_save(node_checkpoint("mlp", 10, net.state_dict()), tmp_path / "weights" / "t.pt")
    path = tmp_path / "g.kt"
    path.write_text(kt(KD.replace("[frozen]", '[frozen, init="weights/t.pt"]')))
    result = train_graph(graph_of(path.read_text(), str(path)), run_dir=tmp_path / "run", device="cpu",
                         progress=False, dataset=digits, teacher_cache=tmp_path / "no-cache")
    assert not (tmp_path / "no-cache").exists()  # loaded, not pre-trained
    with torch.no_grad():
        from dclang.data import normalize

        expected = (net(normalize(digits.test.images, digits.mean, digits.std)).argmax(1) == digits.test.labels)
    assert result.summary["nodes"]["t"]["final_test_acc"] == pytest.approx(expected.float().mean().item())
    assert f'init="{tmp_path / "weights" / "t.pt"}"' in RunDir(tmp_path / "run").graph_kt.read_text()

    graph = graph_of(path.read_text(), str(path))
    (tmp_path / "weights" / "t.pt").write_bytes(b"not a checkpoint")  # spoilt after the check
    with pytest.raises(UserError, match=r"node `t`: checkpoint .*weights/t\.pt "):  # then why (checkpoints.py)
        train_graph(graph, run_dir=tmp_path / "run2", device="cpu", progress=False, dataset=digits)


def test_refuses_to_overwrite_or_resume_a_different_run(tmp_path, digits):
    graph = graph_of(kt("node s : mlp [target]\nlabel -> s : through\n", epochs=1))
    train_graph(graph, run_dir=tmp_path, device="cpu", progress=False, dataset=digits)
    with pytest.raises(UserError, match="already holds a run") as caught:
        train_graph(graph, run_dir=tmp_path, device="cpu", progress=False, dataset=digits)
    assert "--resume" in caught.value.hint
    with pytest.raises(UserError, match=r"other settings \(train\.epochs: was 1, now 2; train\.seed: was 0, now 3\)"):
        train_graph(graph, run_dir=tmp_path, device="cpu", progress=False, dataset=digits, resume=True, epochs=2,
                    seed=3)
    RunDir(tmp_path).last.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot resume from .*last.pt"):
        train_graph(graph, run_dir=tmp_path, device="cpu", progress=False, dataset=digits, resume=True)


def test_device_errors_are_clear():
    with pytest.raises(UserError, match="unknown device `tpu`"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU") as caught:
            resolve_device("cuda")
        assert "--device cpu" in caught.value.hint
        assert resolve_device("auto") == torch.device("cpu")


def test_concurrent_processes_pretrain_a_teacher_once(tmp_path):
    script = textwrap.dedent(f"""\
        import torch
        torch.set_num_threads(1)
        from pathlib import Path
        from dclang.api import check
        from dclang.train import train_graph
        text = {kt(KD, epochs=3)!r}
        train_graph(check(text).graph, run_dir=None, device="cpu", progress=False,
                    teacher_cache=Path({str(tmp_path / "cache")!r}))
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sorted("pre-training" in e for e in errs) == [False, True], errs
    assert all("teacher `t`" in e for e in errs)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


# ---------------------------------------------------------------- the command line


def test_set_overrides_edit_the_file_and_errors_point_at_them(tmp_path):
    path = tmp_path / "g.kt"
    path.write_text(kt(DML))
    checked = load_with_overrides(path, ("train.epochs=5", "train.optimizer.lr=0.05", "train.optimizer.momentum=0.5",
                                         "data.val_split=300", "train.seed=7", "p.model=cnn_tiny",
                                         "p->s.gate=linear", "t->s.gate=through"))
    assert not checked.ok  # `t` is not a node: the added edge is reported where it was added
    assert any("t" in d.message for d in checked.errors)
    checked = load_with_overrides(path, ("train.epochs=5", "train.optimizer.lr=0.05", "train.optimizer.momentum=0.5",
                                         "data.val_split=300", "train.seed=7", "p.model=cnn_tiny", "p->s.gate=linear"))
    assert checked.ok, checked.diagnostics
    g = checked.graph
    assert (g.graph["train"].epochs, g.graph["train"].seed, g.graph["data"].val_split) == (5, 7, 300)
    assert g.graph["train"].optimizer.args["lr"] == 0.05 and g.graph["train"].optimizer.args["momentum"] == 0.5
    assert g.nodes["p"]["spec"].model == "cnn_tiny" and g.edges["p", "s", "p->s"]["spec"].gate == "linear"
    assert "sgd(lr=0.05, momentum=0.5)" in checked.source


def test_cli_run_messages(tmp_path, monkeypatch):
    from dclang.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    template = tmp_path / "template.kt"
    template.write_text(kt(DML.replace("node p : mlp", "node p : choice(mlp, cnn_tiny)")))
    result = runner.invoke(main, ["run", str(template)])
    assert result.exit_code == 1 and "`p.model` left open" in result.output and "dclang search" in result.output

    bad = tmp_path / "bad.kt"
    bad.write_text(kt(DML))
    result = runner.invoke(main, ["run", str(bad), "--set", "train.epochs=zero"])
    assert result.exit_code == 1 and "bad.kt:3:" in result.output

    result = runner.invoke(main, ["run", str(bad), "--device", "tpu", "--no-progress"])
    assert result.exit_code == 2 and "Invalid value for '--device': 'tpu' is not a device" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(main, ["run", str(bad), "--set", "train.epochs=1", "--no-progress", "--seeds", "0,1",
                                  "--set", "data.val_split=50"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "runs" / "tiny").iterdir()} == {"seed0", "seed1"}
    assert json.loads((tmp_path / "runs" / "tiny" / "seed1" / "summary.json").read_text())["seed"] == 1

    assert runner.invoke(main, ["run", "--help"]).exit_code == 0


TWIN = """\
node s : mlp [target]
node p : mlp
label -> s : through
label -> p : through
p -> s : correct
s -> p : through kl(T=2)
"""


def test_fast_path_options_reach_the_engine_and_change_no_number(tmp_path, digits, monkeypatch):
    """`--hfta` fuses the two mlps into one batched model; the metrics must be those of the
    plain fused engine (equal to 1e-6: fusion reorders no reduction of a node's own loss,
    only float32 rounding of the batched matmul may differ)."""
    from dclang.compile import StepOptions, engine

    built = []
    original = engine.fuse_models
    monkeypatch.setattr(engine, "fuse_models",
                        lambda models, **kw: (built.append(len(models)), original(models, **kw))[1])
    graph = graph_of(kt(TWIN))
    plain = train_graph(graph, run_dir=None, device="cpu", progress=False, dataset=digits)
    assert not built
    fused = train_graph(graph, run_dir=None, device="cpu", progress=False, dataset=digits,
                        options=StepOptions(hfta=True))
    assert built == [2]  # the option reached the engine: the two mlps fused
    assert (plain.summary["step"], fused.summary["step"]) == ("fused", "fused+hfta")  # mlps: no channels-last
    for a, b in zip(untimed(plain.records), untimed(fused.records)):
        for node in ("s", "p"):
            assert b["nodes"][node]["val_acc"] == pytest.approx(a["nodes"][node]["val_acc"], abs=1e-6)
            assert b["nodes"][node]["train_loss"] == pytest.approx(a["nodes"][node]["train_loss"], rel=1e-5)


def test_run_refuses_fast_paths_on_the_reference_engine(tmp_path):
    from dclang.cli import main

    path = tmp_path / "twin.kt"
    path.write_text(kt(TWIN))
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "run"), "--engine", "reference",
                                       "--hfta", "--no-progress"])
    assert result.exit_code == 1
    assert "fast paths apply to the fused engine" in result.output and "Traceback" not in result.output
    if not torch.cuda.is_available():
        result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "run"), "--cuda-graph",
                                           "--device", "cpu", "--no-progress"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "--cuda-graph captures the step in a CUDA graph, but the device is cpu" in result.output


def test_the_validation_loss_is_each_nodes_cross_entropy_on_the_validation_split(digits):
    """Against F.cross_entropy of each model (and the ensemble's combined output) on the
    normalised validation images, computed here independently (float32: to 1e-5)."""
    import torch.nn.functional as F

    from dclang.compile import compile_graph
    from dclang.compile.evaluate import evaluate_nodes
    from dclang.data import normalize
    from dclang.ensembles import combine
    from dclang.train.evaluate import split_batches

    graph = graph_of(kt("""
node p1 : cnn_tiny
node p2 : mlp
node e : ensemble(p1, p2) [target]
label -> p1 : through
label -> p2 : through
"""))
    step = compile_graph(graph, num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                         steps_per_epoch=1, epochs=1)
    val = digits.val
    accuracy, loss = evaluate_nodes(step, split_batches(val, digits.mean, digits.std), ["p1", "p2", "e"],
                                    with_loss=True).read()
    images = normalize(val.images, digits.mean, digits.std)
    with torch.no_grad():
        step.eval()
        logits = {n: step.models[n](images) for n in ("p1", "p2")}
    logits["e"] = combine([logits["p1"], logits["p2"]], "mean_logits")
    assert set(loss) == {"p1", "p2", "e"}
    for name, z in logits.items():
        assert loss[name] == pytest.approx(F.cross_entropy(z, val.labels).item(), rel=1e-5)
        assert accuracy[name] == pytest.approx((z.argmax(1) == val.labels).double().mean().item())
    assert evaluate_nodes(step, split_batches(val, digits.mean, digits.std), ["e"]).read()[1] is None  # not asked


def test_a_run_driven_a_step_at_a_time_is_train_graph(digits):
    """The public `Run` driven as its docstring shows (what a search worker does) gives the
    records `train_graph` gives, to the number."""
    from dclang.train.metrics import EpochStats
    from dclang.train.run import Run

    graph = graph_of(kt(TWIN))
    want = untimed(train_graph(graph, run_dir=None, device="cpu", progress=False, dataset=digits).records)
    run = Run.prepare(graph, device="cpu", dataset=digits, progress=False)
    run.compile(run.initial_states(cache=None))
    got, deterministic = [], torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as train_graph trains on the CPU
    try:
        for epoch in range(1, run.epochs + 1):
            started, lr, stats = time.perf_counter(), run.step.lr(), EpochStats()
            for images, labels, k in run.batches(epoch):
                stats.add(run.step.step(images, labels, k), len(labels), k)
            got.append(run.end_epoch(epoch, stats.read(), lr=lr, started=started))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert untimed(got) == want
