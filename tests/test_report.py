"""`dclang report` over run directories written by real tiny runs, checked against NumPy."""

from __future__ import annotations

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


def test_report_text_and_plots(runs, tmp_path):
    text = report([runs / "dml", runs / "single"], tmp_path / "plots")
    found, _ = load_runs([runs / "dml"])
    test = np.array([r.records[-1]["nodes"]["s"]["test_acc"] for r in found]) * 100
    assert f"{test.mean():.2f} ± {test.std(ddof=1):.2f}" in text
    assert "graph pair: 3 runs of 3 epochs (seeds 0, 1, 2)" in text and "graph pair: 1 run of 3 epochs" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["pair_2_accuracy.png", "pair_2_edges.png", "pair_accuracy.png", "pair_edges.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command(runs):
    from dclang.cli import main

    result = CliRunner().invoke(main, ["report", str(runs / "dml")])
    assert result.exit_code == 0, result.output
    assert "test @ best val" in result.output
    assert (runs / "report" / "pair_accuracy.png").is_file()  # default: next to the first RUN_DIR
    result = CliRunner().invoke(main, ["report", str(runs / "pruned")])
    assert result.exit_code == 1 and "no finished runs" in result.output


def test_no_runs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no finished runs"):
        report([tmp_path], tmp_path / "out")
