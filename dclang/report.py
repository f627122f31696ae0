"""`dclang report`: per-node accuracy over several runs of one graph, and plots.

Runs are grouped by their graph: the canonical `graph.kt` text without the train seed, so
the runs of `dclang run --seeds 0,1,2` form one group. For each node the table gives the
mean ± sample standard deviation (ddof=1, as papers report over trials) over the runs of

- the last epoch's val and test accuracy, and
- the test accuracy at the node's best-validation epoch (selected on val, never on test).

Plots (matplotlib, Agg) go to one folder: per group, each node's test accuracy over epochs
(mean, with a ± std band), and each live edge's mean gate weight and pass rate over epochs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from dclang.diagnostics import UserError
from dclang.train.metrics import best_epoch
from dclang.train.rundir import RunDir, graph_key


@dataclass
class Run:
    path: Path
    key: str
    summary: dict
    records: list[dict]


@dataclass
class Group:
    """Runs of one graph."""

    name: str
    target: str
    runs: list[Run]

    @property
    def nodes(self) -> list[str]:
        return list(self.runs[0].summary["nodes"])


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory at or below `paths` (a run directory has a metrics.jsonl)."""
    found: list[Path] = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob("metrics.jsonl"))
    return list(dict.fromkeys(found))


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The finished runs under `paths`, and a note for each one left out (and why)."""
    runs, notes = [], []
    for path in find_runs(paths):
        run_dir = RunDir(path)
        summary = run_dir.read_summary()
        if summary is None or not run_dir.graph_kt.is_file():
            notes.append(f"{path}: left out, no summary.json or graph.kt (stopped before its first epoch ended)")
            continue
        if not summary["complete"]:
            notes.append(f"{path}: left out, unfinished ({summary['epochs_done']}/{summary['epochs']} epochs; "
                         f"`dclang run --resume` finishes it)")
            continue
        key = graph_key(run_dir.graph_kt.read_text(encoding="utf-8"))
        runs.append(Run(path, key, summary, run_dir.read_metrics()))
    return runs, notes


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group(run.summary["graph"], run.summary["target"], [])).runs.append(run)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def node_accuracies(group: Group) -> dict[str, dict[str, tuple[float, float] | None]]:
    """Per node: (mean, std) over runs of last val, last test and test at best val (as
    fractions); None where a run has no validation split."""
    out = {}
    for node in group.nodes:
        last = [run.records[-1]["nodes"][node] for run in group.runs]
        best = [best_epoch(run.records, node) for run in group.runs]
        has_val = all(b is not None for b in best)
        out[node] = {
            "val": mean_std([r["val_acc"] for r in last]) if has_val else None,
            "test": mean_std([r["test_acc"] for r in last]),
            "test_at_best_val": mean_std([b["nodes"][node]["test_acc"] for b in best]) if has_val else None,
        }
    return out


def _cell(stat: tuple[float, float] | None) -> str:
    return "-" if stat is None else f"{100 * stat[0]:.2f} ± {100 * stat[1]:.2f}"


def format_group(group: Group) -> str:
    accs = node_accuracies(group)
    runs = group.runs
    epochs = runs[0].summary["epochs"]
    rows = [("node", "model", "val (last)", "test (last)", "test @ best val")]
    for node, stat in accs.items():
        spec = runs[0].summary["nodes"][node]
        star = "*" if node == group.target else (" (frozen)" if spec["frozen"] else "")
        rows.append((node + star, spec["model"], _cell(stat["val"]), _cell(stat["test"]),
                     _cell(stat["test_at_best_val"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    seeds = ", ".join(str(run.summary["seed"]) for run in runs)
    head = [f"graph {group.name}: {len(runs)} run{'s' * (len(runs) != 1)} of {epochs} epochs (seeds {seeds})",
            *(f"  {run.path}" for run in runs),
            "accuracy %, mean ± sample std over runs; `test @ best val`: at each node's best-validation epoch"]
    return "\n".join(head + table)


# ---------------------------------------------------------------- plots


def _series(group: Group, pick) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, std) over runs of pick(record) at each epoch."""
    epochs = [r["epoch"] for r in group.runs[0].records]
    stats = [mean_std([pick(run.records[i]) for run in group.runs]) for i in range(len(epochs))]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _band(ax, epochs, mean, std, label, scale=1.0) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(epochs, [scale * m for m in mean], label=label, marker="o", markersize=3)
    ax.fill_between(epochs, [scale * (m - s) for m, s in zip(mean, std)],
                    [scale * (m + s) for m, s in zip(mean, std)], alpha=0.2)


def plot_group(group: Group, out: Path, stem: str) -> list[Path]:
    """`<stem>_accuracy.png` (test accuracy per node) and, when the graph has live edges
    between nodes, `<stem>_edges.png` (gate weight and pass rate per edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n = len(group.runs)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for node in group.nodes:
        star = "*" if node == group.target else ""
        _band(ax, *_series(group, lambda r, node=node: r["nodes"][node]["test_acc"]), f"{node}{star}", 100)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{group.name}: test accuracy (mean ± std over {n} run{'s' * (n != 1)})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / f"{stem}_accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    edges = list(group.runs[0].records[0]["edges"])
    if edges:
        fig, (gate_ax, pass_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
        for edge in edges:
            _band(gate_ax, *_series(group, lambda r, e=edge: r["edges"][e]["gate"]), edge)
            _band(pass_ax, *_series(group, lambda r, e=edge: r["edges"][e]["pass_rate"]), edge)
        gate_ax.set(xlabel="epoch", ylabel="mean gate weight", title=f"{group.name}: gate weight per edge")
        pass_ax.set(xlabel="epoch", ylabel="fraction of samples passed", title="pass rate per edge")
        for ax in (gate_ax, pass_ax):
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        pass_ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{stem}_edges.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def report(paths: list[Path], out: Path) -> str:
    """The report's text; writes the plots into `out`."""
    runs, notes = load_runs(paths)
    if not runs:
        raise UserError("no finished runs in " + ", ".join(str(p) for p in paths),
                        "give run directories written by `dclang run` (each holds metrics.jsonl and summary.json)"
                        + ("; " + "; ".join(notes) if notes else ""))
    sections, stems = [], set()
    for group in group_runs(runs):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", group.name)
        if stem in stems:  # two different graphs with one name
            stem = f"{stem}_{len(stems) + 1}"
        stems.add(stem)
        plots = plot_group(group, out, stem)
        sections.append(format_group(group) + "\nplots: " + ", ".join(str(p) for p in plots))
    return "\n\n".join(notes + sections)
