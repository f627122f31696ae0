"""`dclang report` over run directories written by real tiny runs, checked against NumPy."""

from __future__ import annotations

import csv
import json
import re
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
    # two different graphs named `pair`: each labelled with its own key, in the text, the tables and the files
    key = {len(g.runs): g.short_key for g in group_runs(load_runs([runs])[0])}
    assert len(set(key.values())) == 2 and all(re.fullmatch("[0-9a-f]{8}", k) for k in key.values())
    assert f"graph pair [{key[3]}]: 3 runs of 3 epochs (seeds 0, 1, 2)" in text
    assert f"graph pair [{key[1]}]: 1 run of 3 epochs" in text
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    pngs = sorted(f"pair_{k}_{kind}.png" for k in key.values() for kind in ("curves", "edges"))
    assert files == pngs + ["report.csv", "report.md"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "plots" / "report.csv").open(encoding="utf-8")))
    assert {(r["graph"], r["key"], r["runs"]) for r in rows} == {(f"pair [{key[3]}]", key[3], "3"),
                                                                 (f"pair [{key[1]}]", key[1], "1")}
    md = (tmp_path / "plots" / "report.md").read_text(encoding="utf-8")
    assert f"| pair [{key[3]}] | 3 | s |" in md and f"| pair [{key[1]}] | 1 | s |" in md
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


@pytest.mark.parametrize("where, key", [("edges", "loss"), ("nodes", "val_loss"), ("nodes", "train_loss")])
def test_a_metrics_value_that_is_not_a_number_leaves_the_run_out(runs, tmp_path, where, key):
    """Every value the tables and figures read is checked: an edge's loss or a node's curve
    point written as text is a note naming the line, not a traceback in the plots."""
    from dclang.cli import main

    bad = Path(shutil.copytree(runs / "dml" / "seed0", tmp_path / "bad"))
    records = [json.loads(line) for line in (bad / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    entry = next(iter(records[1][where].values()))
    entry[key] = "high"
    (bad / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{bad}: left out, line 2 of metrics.jsonl is not the record of epoch 2" in result.output


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


def _captured(monkeypatch) -> dict:
    """Figures by file name, kept instead of written, so their axes can be read back."""
    import dclang.plots as plots
    import dclang.report as report_module

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report_module, "save", keep)
    monkeypatch.setattr(plots, "save", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    return figures


def test_runs_that_share_a_seed_are_warned_about_by_name(runs, tmp_path):
    twins = [Path(shutil.copytree(runs / "dml" / "seed0", tmp_path / "runs" / name)) for name in ("a", "b")]
    shutil.copytree(runs / "dml" / "seed1", tmp_path / "runs" / "c")
    text = report([tmp_path / "runs"], tmp_path / "out")
    warning = (f"warning: graph pair: the runs {twins[0]}, {twins[1]} share seed 0, so their ± std is over "
               f"identical seeds")
    assert warning in text and "some of one seed (see the warning)" in text
    assert warning in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "warning" not in report([runs / "dml"], tmp_path / "distinct")


def test_a_search_folder_reports_no_teacher_and_says_where_its_results_are(runs, tmp_path):
    """A real teacher cache inside a search folder, as a search's trials leave it."""
    from dclang.search.folder import write_record

    search = tmp_path / "search"
    search.mkdir()
    text = HEAD.format(name="kd") + "node s : mlp [target]\nnode t : mlp [frozen]\nlabel -> s : through\n" \
                                    "t -> s : through\n"
    (search / "kd.kt").write_text(text, encoding="utf-8")
    write_record(search, study="kd", storage=str(search / "study.journal"), template=search / "kd.kt")
    digits = load_dataset("digits", data_dir=None, val_split=100, split_seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_graph(check(text).graph, run_dir=None, device="cpu", epochs=1, progress=False, dataset=digits,
                    teacher_cache=search / "teachers")
    finally:
        torch.set_num_threads(threads)
    [teacher] = [p.parent for p in (search / "teachers").rglob("metrics.jsonl")]

    with pytest.raises(UserError) as refused:
        report([search], tmp_path / "out")
    assert refused.value.message == f"{search} is a search folder: its trials keep no run folders (the study " \
                                    f"holds them), so it has no run to report"
    assert f"its results are {search / 'leaderboard.csv'} and {search / 'summary.json'}" in refused.value.hint
    with pytest.raises(UserError) as refused:
        report([search / "teachers"], tmp_path / "out")
    assert f"left out 1 teacher pre-training run in {search / 'teachers'}" in refused.value.hint
    text = report([search, runs / "dml"], tmp_path / "out")
    assert "graph pair: 3 runs" in text and "graph pretrain" not in text and "is a search folder" in text
    assert "graph pretrain_mlp: 1 run" in report([teacher], tmp_path / "asked")  # given itself, it is reported


def test_the_edges_figure_plots_each_edges_loss_and_only_the_gates_that_change(runs, monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    found, _ = load_runs([runs / "dml"])
    [group] = group_runs(found)
    from dclang.report import plot_group

    plot_group(group, tmp_path, "pair")
    fig = figures["pair_edges.png"]
    panels = {ax.get_title(): ax for ax in fig.axes}
    edges = ["label->p", "label->s", "p->s", "s->p"]

    def mean(edge, key):  # over the runs, per epoch: the independent computation
        return np.mean([[r["edges"][edge][key] for r in run.records] for run in group.runs], axis=0)

    loss = {line.get_label(): line.get_ydata() for line in panels["loss per edge"].get_lines()}
    assert sorted(loss) == edges
    for edge in edges:
        assert np.allclose(loss[edge], mean(edge, "loss"), rtol=1e-12)
    for key, title in (("gate", "gate weight (where it changes)"), ("pass_rate", "pass rate (where it changes)")):
        changing = [e for e in edges if np.ptp(mean(e, key)) > 1e-9]
        assert changing == ["s->p"], "through edges pass everything; a correct gate passes what its source gets right"
        assert [line.get_label() for line in panels[title].get_lines()] == changing
    [note] = [t for t in fig.texts if t.get_text() != fig.get_suptitle()]
    assert note.get_text() == ("constant over the epochs, not drawn: gate weight 1: label->p, label->s, p->s; "
                               "pass rate 1: label->p, label->s, p->s")


def test_the_curves_are_a_grid_readable_at_a_glance(runs, tmp_path):
    report([runs / "dml"], tmp_path)
    png = (tmp_path / "pair_curves.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 1000 <= width <= 1600 and height / width > 0.6, "a 2x2 grid, not a strip of four panels"


def test_the_curves_grid_and_its_text_sizes(runs, monkeypatch, tmp_path):
    figures = _captured(monkeypatch)
    found, _ = load_runs([runs / "dml"])
    [group] = group_runs(found)
    from dclang.report import plot_group

    plot_group(group, tmp_path, "pair")
    axes = figures["pair_curves.png"].axes
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in axes] == [(2, 2)] * 4
    assert all(ax.title.get_fontsize() >= 13 and ax.xaxis.label.get_fontsize() >= 12 for ax in axes)
    assert all(t.get_fontsize() >= 11 for ax in axes for t in ax.get_legend().get_texts())


def test_an_ensemble_is_said_to_average_its_members_not_to_be_frozen(monkeypatch, tmp_path):
    import dclang.plots as plots
    from dclang.report import plot_group

    text = HEAD.format(name="ens").replace("epochs = 3", "epochs = 1") + \
        "node a : mlp [target]\nnode b : mlp\nnode e : ensemble(a, b)\nlabel -> a : through\nlabel -> b : through\n" \
        "e -> a : through\n"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_graph(check(text).graph, run_dir=tmp_path / "run", device="cpu", progress=False,
                    dataset=load_dataset("digits", data_dir=None, val_split=100, split_seed=0))
    finally:
        torch.set_num_threads(threads)
    figures = _captured(monkeypatch)
    plots.write_node_curves(tmp_path / "run")
    said = " ".join(t.get_text() for t in figures["e.png"].axes[1].texts)
    assert "an ensemble of a, b" in said and "averages its members" in said and "frozen" not in said
    found, _ = load_runs([tmp_path / "run"])
    [group] = group_runs(found)
    plot_group(group, tmp_path, "ens")
    note = " ".join(t.get_text() for t in figures["ens_curves.png"].axes[2].texts)
    assert "e: an ensemble: no loss of its own, it averages its members" in note and "frozen" not in note
    assert "e (ensemble)  ensemble(a, b)" in report([tmp_path / "run"], tmp_path / "out")
