"""`dclang report`: per-node accuracy over several runs of one graph, as a table and plots.

Runs are grouped by their graph: the canonical `graph.kt` text without the train seed, so
the runs of `dclang run --seeds 0,1,2` form one group. For each node the table gives the
mean ± sample standard deviation (ddof=1, as papers report over trials) over the runs of

- the last epoch's val and test accuracy, and
- the test accuracy at the node's best-validation epoch (selected on val, never on test).

A group of one run shows its numbers alone: a standard deviation needs two runs.
Everything goes into one folder (`-o`, default `report/` in the runs' folder): `report.csv`
and `report.md` (the table), and per group `<graph>_curves.png` (each node's val accuracy,
the test accuracy of the weights val selects so far, train loss and val cross-entropy over
epochs, mean with a ± std band) and `<graph>_edges.png`
(each live edge's mean gate weight and pass rate over epochs).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dclang.diagnostics import DiagnosticError, UserError
from dclang.plots import draw_line, pyplot, save
from dclang.train.metrics import best_epoch, selected_test
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
        try:
            summary = run_dir.read_summary()
            if summary is None or not run_dir.graph_kt.is_file():
                notes.append(f"{path}: left out, no summary.json or graph.kt (stopped before its first epoch ended)")
                continue
            records = run_dir.read_metrics()
            key = graph_key(run_dir.graph_kt.read_text(encoding="utf-8"))
        except (UserError, DiagnosticError, OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            why = exc.message if isinstance(exc, UserError) else (str(exc).splitlines() or [type(exc).__name__])[0]
            notes.append(f"{path}: left out, its files cannot be read: {why}")
            continue
        problem = _problem(summary, records)
        if problem:
            notes.append(f"{path}: left out, {problem} (not as `dclang run` writes it; run it again)")
            continue
        if not summary["complete"]:
            notes.append(f"{path}: left out, unfinished ({summary['epochs_done']}/{summary['epochs']} epochs; "
                         f"`dclang run --resume` finishes it)")
            continue
        runs.append(Run(path, key, summary, records))
    return runs, notes


def _problem(summary, records) -> str:
    """What keeps a run's summary and metrics from being reported ("" when nothing does):
    every value the report reads is checked, so a damaged file is a note, not a traceback."""
    if not isinstance(summary, dict) or not all(k in summary for k in ("graph", "target", "epochs", "epochs_done",
                                                                       "complete", "seed", "nodes")):
        return "summary.json lacks the run's settings or nodes"
    nodes = summary["nodes"]
    if not isinstance(nodes, dict) or not nodes or not all(
            isinstance(n, dict) and isinstance(n.get("model"), str) and "frozen" in n for n in nodes.values()):
        return "summary.json does not describe the run's nodes"
    if not isinstance(summary["epochs_done"], int) or len(records) != summary["epochs_done"] or (
            summary["complete"] and summary["epochs_done"] != summary["epochs"]) or not records:
        return f"metrics.jsonl holds {len(records)} epochs where summary.json says {summary['epochs_done']}"
    for i, record in enumerate(records, start=1):
        if not (isinstance(record, dict) and record.get("epoch") == i
                and _scores(record.get("nodes"), set(nodes), ("val_acc", "train_loss", "test_acc"), nullable=True)
                and _scores(record.get("edges"), set(records[0].get("edges") or ()), ("gate", "pass_rate"))):
            return f"line {i} of metrics.jsonl is not the record of epoch {i} with every node's accuracies"
    return ""


def _scores(table, names: set, keys: tuple[str, ...], nullable: bool = False) -> bool:
    """`table` maps exactly `names` to dicts whose `keys` are numbers (or null, when `nullable`)."""
    def number(v) -> bool:
        return (v is None and nullable) or (isinstance(v, (int, float)) and not isinstance(v, bool))

    return isinstance(table, dict) and set(table) == names and all(
        isinstance(entry, dict) and all(number(entry.get(k, ...)) for k in keys) for entry in table.values())


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group(run.summary["graph"], run.summary["target"], [])).runs.append(run)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); None for the std of a single run."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
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


_COLUMNS = (("val", "val (last)"), ("test", "test (last)"), ("test_at_best_val", "test @ best val"))


def _cell(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _role(group: Group, node: str) -> str:
    if node == group.target:
        return "target"
    return "frozen" if group.runs[0].summary["nodes"][node]["frozen"] else ""


def table_rows(group: Group) -> list[dict]:
    """One row per node: name, model, role, and (mean, std) of each accuracy column."""
    accs = node_accuracies(group)
    return [{"node": node, "model": group.runs[0].summary["nodes"][node]["model"], "role": _role(group, node),
             **{key: accs[node][key] for key, _ in _COLUMNS}} for node in group.nodes]


def _spread(n: int) -> str:
    return "mean ± sample std over runs" if n > 1 else "one run, so no spread"


def format_group(group: Group) -> str:
    runs = group.runs
    epochs = runs[0].summary["epochs"]
    rows = [("node", "model", *(title for _, title in _COLUMNS))]
    for row in table_rows(group):
        star = {"target": "*", "frozen": " (frozen)"}.get(row["role"], "")
        rows.append((row["node"] + star, row["model"], *(_cell(row[key]) for key, _ in _COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    seeds = ", ".join(str(run.summary["seed"]) for run in runs)
    head = [f"graph {group.name}: {len(runs)} run{'s' * (len(runs) != 1)} of {epochs} epochs (seeds {seeds})",
            *(f"  {run.path}" for run in runs),
            f"accuracy %, {_spread(len(runs))}; `test @ best val`: at each node's best-validation epoch"]
    return "\n".join(head + table)


# ---------------------------------------------------------------- table files


def _percent_or_blank(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def write_tables(groups: list[tuple[str, Group]], out: Path) -> list[Path]:
    """report.csv (one row per group and node; accuracies in %, std blank for one run) and
    report.md (the same table for a README or a paper draft)."""
    from dclang.checkpoints import atomic_write_text

    header = ["graph", "plots", "runs", "seeds", "node", "model", "role"]
    for key, _ in _COLUMNS:
        header += [f"{key}_mean", f"{key}_std"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    md = ["| graph | runs | node | model | role | " + " | ".join(f"{title} %" for _, title in _COLUMNS) + " |",
          "|---|---:|---|---|---|" + "---:|" * len(_COLUMNS)]
    for stem, group in groups:
        seeds = " ".join(str(run.summary["seed"]) for run in group.runs)
        for row in table_rows(group):
            stats = [row[key] or (None, None) for key, _ in _COLUMNS]
            writer.writerow([group.name, stem, len(group.runs), seeds, row["node"], row["model"], row["role"],
                             *(_percent_or_blank(x) for stat in stats for x in stat)])
            md.append(f"| {group.name} | {len(group.runs)} | {row['node']} | {row['model']} | {row['role']} | "
                      + " | ".join(_cell(row[key]) for key, _ in _COLUMNS) + " |")
    atomic_write_text(buffer.getvalue(), out / "report.csv")
    atomic_write_text("\n".join(md) + "\n\naccuracy %: mean ± sample std (ddof=1) over runs; a single run has "
                      "no std. `test @ best val`: test accuracy at each node's best-validation epoch.\n",
                      out / "report.md")
    return [out / "report.csv", out / "report.md"]


# ---------------------------------------------------------------- plots


def _series(group: Group, pick) -> tuple[list[int], list[float | None], list[float] | None]:
    """(epochs, mean, std) over runs of pick(record) at each epoch; std None for one run,
    a mean None where a run has no value (a frozen node's loss, no validation split)."""
    epochs = [r["epoch"] for r in group.runs[0].records]
    means, stds = [], []
    for i in range(len(epochs)):
        values = [pick(run.records[i]) for run in group.runs]
        if any(v is None for v in values):
            means.append(None)
            stds.append(0.0)
            continue
        mean, std = mean_std(values)
        means.append(mean)
        stds.append(std or 0.0)
    return epochs, means, (stds if len(group.runs) > 1 else None)


def _scaled(series, scale: float):
    epochs, mean, std = series
    return (epochs, [None if m is None else scale * m for m in mean],
            None if std is None else [scale * s for s in std])


def _selected_test(group: Group, node: str):
    """A `_series` pick: at each record, the test accuracy of the weights val selects so far
    (`metrics.selected_test`), as runs record test only for those."""
    selected = {id(r): v for run in group.runs for r, v in zip(run.records, selected_test(run.records, node))}
    return lambda record: selected[id(record)]


def plot_group(group: Group, out: Path, stem: str) -> list[Path]:
    """`<stem>_curves.png` (val accuracy, test accuracy, train loss and val cross-entropy per
    node) and, when
    the graph has live edges between nodes, `<stem>_edges.png` (gate weight and pass rate)."""
    plt = pyplot()
    n = len(group.runs)
    spread = f"mean ± std over {n} runs" if n > 1 else "one run"
    written = []
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    panels = (("val_acc", 100, "val accuracy (%)"), ("test_acc", 100, "test @ best val so far (%)"),
              ("train_loss", 1, "train loss"), ("val_loss", 1, "val cross-entropy"))
    for ax, (key, scale, ylabel) in zip(axes, panels):
        for k, node in enumerate(group.nodes):
            # .get: runs from before `val_loss` was recorded have none (an empty panel)
            pick = _selected_test(group, node) if key == "test_acc" else \
                (lambda r, node=node, key=key: r["nodes"][node].get(key))
            epochs, mean, std = _scaled(_series(group, pick), scale)
            if any(m is not None for m in mean):
                draw_line(ax, epochs, mean, f"{node}{'*' * (node == group.target)}", k, std=std)
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{group.name}: {ylabel.split(' (')[0]} ({spread})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save(fig, out / f"{stem}_curves.png"))
    plt.close(fig)

    edges = list(group.runs[0].records[0]["edges"])
    if edges:
        fig, (gate_ax, pass_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
        for k, edge in enumerate(edges):
            for ax, key in ((gate_ax, "gate"), (pass_ax, "pass_rate")):
                epochs, mean, std = _series(group, lambda r, e=edge, key=key: r["edges"][e][key])
                draw_line(ax, epochs, mean, edge, k, std=std)
        gate_ax.set(xlabel="epoch", ylabel="mean gate weight", title=f"{group.name}: gate weight per edge ({spread})")
        pass_ax.set(xlabel="epoch", ylabel="fraction of samples passed", title="pass rate per edge")
        for ax in (gate_ax, pass_ax):
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        pass_ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save(fig, out / f"{stem}_edges.png"))
        plt.close(fig)
    return written


def report(paths: list[Path], out: Path) -> str:
    """The report's text; writes the table files and the plots into `out`."""
    runs, notes = load_runs(paths)
    if not runs:
        raise UserError("no finished runs in " + ", ".join(str(p) for p in paths),
                        "give run directories written by `dclang run` (each holds metrics.jsonl and summary.json)"
                        + ("; " + "; ".join(notes) if notes else ""))
    sections, stems, groups = [], set(), []
    for group in group_runs(runs):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", group.name)
        if stem in stems:  # two different graphs with one name
            stem = f"{stem}_{len(stems) + 1}"
        stems.add(stem)
        groups.append((stem, group))
    try:
        out.mkdir(parents=True, exist_ok=True)
        tables = write_tables(groups, out)
        for stem, group in groups:
            plots = plot_group(group, out, stem)
            sections.append(format_group(group) + "\nplots: " + ", ".join(str(p) for p in plots))
    except OSError as exc:
        raise UserError(f"cannot write the report into {out}: {exc.strerror or exc}",
                        "give a folder you can write to with -o") from exc
    return "\n\n".join(notes + sections + ["table: " + ", ".join(str(p) for p in tables)])


def default_out(run_dirs: list[Path]) -> Path:
    """`report/` inside the runs' folder: the folder the RUN_DIRs have in common (a folder of
    runs given alone, the parent of `runs/x/seed0 runs/x/seed1`, or a lone run itself)."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    return Path(os.path.commonpath([p.resolve() for p in run_dirs])) / "report"
