"""`dclang report` over run directories written by real tiny runs, checked against NumPy."""

from __future__ import annotations

import csv
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dclang.api import check
from dclang.data import load_dataset
from dclang.diagnostics import UserError
from dclang.report import group_runs, load_runs, node_accuracies, report
from dclang.train import train_graph

HEAD = textwrap.dedent("""\
    graph {name}
    data digits {{ val_split = 100  pad = 1 }}
    train {{ epochs = 3  batch = 64  optimizer = sgd(lr=0.1)  schedule = cosine }}
    """)
DML = "node s : cnn_tiny [target]\nnode p : mlp\nlabel -> s : through\nlabel -> p : through\n" \
      "p -> s : through\ns -> p : correct\n"
SINGLE = "node s : mlp [target]\nlabel -> s : through\n"


class Pruned(Exception):
    """What a search raises from `on_epoch` to stop a trial."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/dml/seed{0,1,2}, runs/single (another graph with the same name) and
    runs/pruned (stopped by on_epoch after one epoch)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    digits = load_dataset("digits", data_dir=None, val_split=100, split_seed=0)
    dml = check(HEAD.format(name="pair") + DML).graph
    for seed in (0, 1, 2):
        train_graph(dml, run_dir=root / "dml" / f"seed{seed}", device="cpu", seed=seed, progress=False, dataset=digits)
    train_graph(check(HEAD.format(name="pair") + SINGLE).graph, run_dir=root / "single", device="cpu",
                progress=False, dataset=digits)

    def prune(epoch: int, record: dict) -> None:
        raise Pruned

    with pytest.raises(Pruned):
        train_graph(dml, run_dir=root / "pruned", device="cpu", progress=False, dataset=digits, on_epoch=prune)
    torch.set_num_threads(threads)
    return root


def test_groups_by_graph_and_leaves_out_unfinished_runs(runs):
    found, notes = load_runs([runs])
    groups = group_runs(found)
    assert sorted(len(g.runs) for g in groups) == [1, 3]
    dml = next(g for g in groups if len(g.runs) == 3)
    assert sorted(r.path.name for r in dml.runs) == ["seed0", "seed1", "seed2"]
    assert [r.summary["seed"] for r in sorted(dml.runs, key=lambda r: r.path.name)] == [0, 1, 2]
    assert len(notes) == 1 and "pruned" in notes[0] and "unfinished (1/3 epochs" in notes[0]


def test_mean_and_std_match_numpy(runs):
    found, _ = load_runs([runs / "dml"])
    [group] = group_runs(found)
    accs = node_accuracies(group)
    for node in ("s", "p"):
        last = [r.records[-1]["nodes"][node] for r in group.runs]
        for key, stat in (("val_acc", "val"), ("test_acc", "test")):
            values = np.array([n[key] for n in last])
            assert accs[node][stat] == pytest.approx((values.mean(), values.std(ddof=1)))
        at_best = []
        for run in group.runs:
            val = np.array([r["nodes"][node]["val_acc"] for r in run.records])
            at_best.append(run.records[int(np.argmax(val))]["nodes"][node]["test_acc"])  # argmax: first on ties
        assert accs[node]["test_at_best_val"] == pytest.approx((np.mean(at_best), np.std(at_best, ddof=1)))


def test_report_text_table_and_plots(runs, tmp_path):
    text = report([runs / "dml", runs / "single"], tmp_path / "plots")
    found, _ = load_runs([runs / "dml"])
    test = np.array([r.records[-1]["nodes"]["s"]["test_acc"] for r in found]) * 100
    assert f"{test.mean():.2f} ± {test.std(ddof=1):.2f}" in text
    assert "graph pair: 3 runs of 3 epochs (seeds 0, 1, 2)" in text and "graph pair: 1 run of 3 epochs" in text
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert files == ["pair_2_curves.png", "pair_2_edges.png", "pair_curves.png", "pair_edges.png", "report.csv",
                     "report.md"]
    for name in files[:4]:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"table: {tmp_path / 'plots' / 'report.csv'}, {tmp_path / 'plots' / 'report.md'}" in text


def test_a_single_run_shows_no_spread(runs, tmp_path):
    text = report([runs / "single"], tmp_path / "one")
    single = runs / "single"
    last = load_runs([single])[0][0].records[-1]["nodes"]["s"]
    assert "±" not in text.split("graph pair: 1 run")[1] and "one run, so no spread" in text
    assert f"{100 * last['test_acc']:.2f}" in text
    rows = list(csv.DictReader((tmp_path / "one" / "report.csv").open(encoding="utf-8")))
    assert [(r["node"], r["test_mean"], r["test_std"]) for r in rows] == [("s", f"{100 * last['test_acc']:.2f}", "")]
    assert "±" not in (tmp_path / "one" / "report.md").read_text(encoding="utf-8").split("\n\n")[0]


def test_the_csv_table_matches_numpy(runs, tmp_path):
    report([runs / "dml"], tmp_path)
    found, _ = load_runs([runs / "dml"])
    rows = {r["node"]: r for r in csv.DictReader((tmp_path / "report.csv").open(encoding="utf-8"))}
    assert set(rows) == {"s", "p"} and rows["s"]["role"] == "target" and rows["s"]["runs"] == "3"
    for node in ("s", "p"):
        for key, column in (("val_acc", "val"), ("test_acc", "test")):
            values = np.array([r.records[-1]["nodes"][node][key] for r in found]) * 100
            assert float(rows[node][f"{column}_mean"]) == pytest.approx(values.mean(), abs=0.005)
            assert float(rows[node][f"{column}_std"]) == pytest.approx(values.std(ddof=1), abs=0.005)
    md = (tmp_path / "report.md").read_text(encoding="utf-8").splitlines()
    assert md[0].startswith("| graph | runs | node |") and any(line.startswith("| pair | 3 | s |") for line in md)


def test_curves_show_val_test_and_loss_with_every_line_visible(runs, monkeypatch, tmp_path):
    """Each panel has one line per node, each with its own marker and dashes, half-transparent,
    so lines that coincide still show; bands only over several runs."""
    import dclang.report as report_module

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report_module, "save", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    found, _ = load_runs([runs / "dml"])
    [group] = group_runs(found)
    report_module.plot_group(group, tmp_path, "pair")
    axes = figures["pair_curves.png"].axes
    assert [ax.get_ylabel() for ax in axes] == ["val accuracy (%)", "test @ best val so far (%)", "train loss",
                                                "val cross-entropy"]
    for ax in axes:
        lines = ax.get_lines()
        assert sorted(line.get_label() for line in lines) == ["p", "s*"]
        assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 2
        assert all(line.get_alpha() < 1 for line in lines)
        assert len(ax.collections) == 2, "a ± std band per node over 3 runs"
    for ax, key in ((axes[2], "train_loss"), (axes[3], "val_loss")):
        loss = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
        expected = np.mean([[r["nodes"]["s"][key] for r in run.records] for run in group.runs], axis=0)
        assert np.allclose(loss["s*"], expected)
    test = {line.get_label(): line.get_ydata() for line in axes[1].get_lines()}
    expected = np.mean([at_best_val_so_far(run.records, "s") for run in group.runs], axis=0)
    assert np.allclose(test["s*"], 100 * expected)
    edges = figures["pair_edges.png"].axes[0].get_lines()
    assert len({(line.get_marker(), line.get_linestyle()) for line in edges}) == len(edges) == 4


def test_report_command(runs):
    from dclang.cli import main

    result = CliRunner().invoke(main, ["report", str(runs / "dml")])
    assert result.exit_code == 0, result.output
    assert "test @ best val" in result.output
    assert (runs / "dml" / "report" / "pair_curves.png").is_file()  # default: inside the runs' folder
    assert (runs / "dml" / "report" / "report.csv").is_file() and not (runs / "report").exists()
    result = CliRunner().invoke(main, ["report", str(runs / "dml" / "seed0"), str(runs / "dml" / "seed1")])
    assert result.exit_code == 0 and "graph pair: 2 runs" in result.output
    result = CliRunner().invoke(main, ["report", str(runs / "pruned")])
    assert result.exit_code == 1 and "no finished runs" in result.output


def test_report_into_a_folder_given_with_o(runs, tmp_path):
    from dclang.cli import main

    result = CliRunner().invoke(main, ["report", str(runs / "single"), "-o", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["pair_curves.png", "pair_edges.png",
                                                                     "report.csv", "report.md"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not an object", "no nodes"])
def test_a_damaged_run_is_left_out_with_a_note(runs, tmp_path, damage):
    from dclang.cli import main

    bad = Path(shutil.copytree(runs / "single", tmp_path / "bad"))
    summary = (bad / "summary.json").read_bytes()
    (bad / "summary.json").write_bytes({"garbage": b"\xff\x00{", "truncated": summary[:len(summary) // 2],
                                        "not an object": b"[1]", "no nodes": b'{"complete": true}'}[damage])
    result = CliRunner().invoke(main, ["report", str(runs / "dml" / "seed0"), str(bad), "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert f"{bad}: left out" in result.output and "Traceback" not in result.output
    alone = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r2")])
    assert alone.exit_code == 1 and f"{bad}: left out" in alone.output


def test_dclang_run_writes_each_nodes_curves(tmp_path):
    from dclang.cli import main

    graph = tmp_path / "pair.kt"
    graph.write_text(HEAD.format(name="pair").replace("epochs = 3", "epochs = 2")
                     + DML.replace("cnn_tiny", "mlp"), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["run", str(graph), "-o", str(tmp_path / "run"), "--device", "cpu",
                                           "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "run" / "curves").iterdir()) == ["p.png", "s.png"]
    for png in (tmp_path / "run" / "curves").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_node_curves_plot_what_metrics_jsonl_holds(runs, monkeypatch, tmp_path):
    import dclang.plots as plots

    figures = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    written = plots.write_node_curves(runs / "dml" / "seed0")
    assert [p.name for p in written] == ["s.png", "p.png"] and all(p.parent.name == "curves" for p in written)
    acc, loss = figures["s.png"].axes
    records = load_runs([runs / "dml" / "seed0"])[0][0].records
    shown = {line.get_label(): list(line.get_ydata()) for line in acc.get_lines()}
    assert sorted(shown) == ["test @ best val so far", "train", "val"]
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        assert shown[label] == pytest.approx([100 * r["nodes"]["s"][key] for r in records])
    assert shown["test @ best val so far"] == pytest.approx(100 * at_best_val_so_far(records, "s"))
    lines = {line.get_label().split(":")[0]: list(line.get_ydata()) for line in loss.get_lines()}
    assert lines["train"] == pytest.approx([r["nodes"]["s"]["train_loss"] for r in records])
    assert lines["val"] == pytest.approx([r["nodes"]["s"]["val_loss"] for r in records])


def at_best_val_so_far(records: list[dict], node: str) -> np.ndarray:
    """Per epoch, the test accuracy recorded at the first epoch of the best val up to it."""
    val = np.array([r["nodes"][node]["val_acc"] for r in records])
    test = [r["nodes"][node]["test_acc"] for r in records]
    return np.array([test[int(np.argmax(val[:e + 1]))] for e in range(len(records))])  # argmax: first on ties


def test_no_runs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no finished runs"):
        report([tmp_path], tmp_path / "out")


def test_curves_that_cannot_be_written_are_a_note_not_a_failure(runs, tmp_path, capsys):
    from dclang.plots import write_node_curves

    run = Path(shutil.copytree(runs / "single", tmp_path / "run"))
    (run / "curves").write_text("a file where the folder would go", encoding="utf-8")
    assert write_node_curves(run) == []
    assert f"note: curves not drawn: cannot write {run / 'curves' / 's.png'}" in capsys.readouterr().err


def test_an_unwritable_report_folder_is_a_message(runs, tmp_path):
    from dclang.cli import main

    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    result = CliRunner().invoke(main, ["report", str(runs / "single"), "-o", str(tmp_path / "file" / "report")])
    assert result.exit_code == 1
    assert f"error: cannot write the report into {tmp_path / 'file' / 'report'}" in result.output
    assert "Traceback" not in result.output


def test_runs_recorded_before_the_validation_loss_still_plot(runs, monkeypatch, tmp_path):
    """metrics.jsonl written before `val_loss` existed: curves and reports draw, its panel empty."""
    import json
    import shutil

    import dclang.plots as plots
    import dclang.report as report_module

    old = tmp_path / "old"
    shutil.copytree(runs / "dml" / "seed0", old)
    metrics = old / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in records:
        for node in record["nodes"].values():
            del node["val_loss"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    assert [p.name for p in plots.write_node_curves(old)] == ["s.png", "p.png"]
    assert [line.get_label() for line in figures["s.png"].axes[1].get_lines()] == ["train: L_t, its edges' losses"]
    found, _ = load_runs([old])
    [group] = group_runs(found)
    report_module.plot_group(group, tmp_path, "old")
    assert figures["old_curves.png"].axes[3].get_lines() == []  # the val cross-entropy panel, empty
