"""`dclang report`: per-node accuracy over several runs of one graph, as a table and plots.

Runs are grouped by their graph: the canonical `graph.kt` text without the train seed, so
the runs of `dclang run --seeds 0,1,2` form one group. For each node the table gives the
mean ± sample standard deviation (ddof=1, as papers report over trials) over the runs of

- the last epoch's val and test accuracy, and
- the test accuracy at the node's best-validation epoch (selected on val, never on test).

A group of one run shows its numbers alone: a standard deviation needs two runs. Runs of a
group that share a seed are warned about by name: their spread is only the nondeterminism of
one seed, not a spread over seeds. Groups of different graphs with one name are told apart by
their key (`pair [3f2a1c0e]`: the first hex digits of the sha256 of the graph's text).

Teacher pre-training runs that a search or `dclang run` caches (`teachers/<key>/`) are
training runs of a 1-node graph, not results: found inside a folder they are left out with
a note. A search folder holds no run folders for its trials (they live in the study): its
note says where its results are and how to report a best graph over seeds.

Everything goes into one folder (`-o`, default `report/` in the runs' folder): `report.csv`
and `report.md` (the table), and per group `<graph>_curves.png` (a 2x2 grid: each node's val
accuracy, the test accuracy of the weights val selects so far, train loss and val cross-entropy
over epochs, mean with a ± std band) and `<graph>_edges.png` (each live edge's loss over epochs,
and its gate weight and pass rate where those change).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dclang.diagnostics import DiagnosticError, UserError
from dclang.plots import draw_line, pyplot, save
from dclang.search.folder import RECORD
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
    """Runs of one graph; `label` is its name, with its short key when another graph has
    the same name."""

    name: str
    target: str
    runs: list[Run]
    key: str
    label: str = ""  # set by group_runs, which sees every group

    @property
    def nodes(self) -> list[str]:
        return list(self.runs[0].summary["nodes"])

    @property
    def short_key(self) -> str:
        return hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:8]


def is_teacher_run(path: Path) -> bool:
    """A teacher cache's run folder (`<key>/` beside `<key>.lock` and `<key>.pt`, as
    dclang.train.teachers lays the cache out)."""
    return any((path.parent / f"{path.name}{suffix}").is_file() for suffix in (".lock", ".pt"))


def find_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Every run directory at or below `paths` (a run directory has a metrics.jsonl), and a
    note for what was passed over: teacher pre-training runs found inside a folder (one given
    itself is reported), and what a search folder holds instead of run folders."""
    found: list[Path] = []
    notes = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("metrics.jsonl"))
        teachers = [p for p in below if is_teacher_run(p)]
        found += [p for p in below if p not in teachers]
        if (path / RECORD).is_file():
            notes.append("; ".join(_search_advice(path)))
        if teachers:
            where = sorted({str(p.parent) for p in teachers})
            notes.append(f"{path}: left out {len(teachers)} teacher pre-training run{'s' * (len(teachers) != 1)} in "
                         f"{', '.join(where)} (a frozen teacher trained on labels alone, not a result; give its "
                         f"folder itself to report it)")
    return list(dict.fromkeys(found)), notes


def _search_advice(path: Path) -> tuple[str, str]:
    """(what a search folder is, where its results are and how to report one of its graphs)."""
    best = sorted((path / "best").glob("*.kt"))
    example = best[0] if best else path / "best" / "1_trialNNNN.kt"
    return (f"{path} is a search folder: its trials keep no run folders (the study holds them), so it has no run "
            f"to report",
            f"its results are {path / 'leaderboard.csv'} and {path / 'summary.json'}; to report a best graph's test "
            f"accuracy over seeds: `dclang run {example} --seeds 0,1,2 -o runs/best`, then `dclang report runs/best`")


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The finished runs under `paths`, and a note for each one left out (and why)."""
    runs = []
    found, notes = find_runs(paths)
    for path in found:
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
                and _scores(record["nodes"], set(nodes), tuple(key for key, _, _ in _CURVES), nullable=True,
                            optional=True)
                and _scores(record.get("edges"), set(records[0].get("edges") or ()), ("gate", "pass_rate"))
                and _scores(record["edges"], set(record["edges"]), ("loss",), nullable=True, optional=True)):
            return f"line {i} of metrics.jsonl is not the record of epoch {i} with every node's accuracies"
    return ""


def _scores(table, names: set, keys: tuple[str, ...], nullable: bool = False, optional: bool = False) -> bool:
    """`table` maps exactly `names` to dicts whose `keys` are numbers (or null, when `nullable`;
    or absent, when `optional`: keys older runs did not record, such as an edge's `loss`)."""
    def number(v) -> bool:
        return ((v is None and nullable) or (v is ... and optional)
                or (isinstance(v, (int, float)) and not isinstance(v, bool)))

    return isinstance(table, dict) and set(table) == names and all(
        isinstance(entry, dict) and all(number(entry.get(k, ...)) for k in keys) for entry in table.values())


def group_runs(runs: list[Run]) -> list[Group]:
    """The runs grouped by graph (its text without the seed), each group labelled by its
    name, plus its short key where graphs of one name differ."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group(run.summary["graph"], run.summary["target"], [], run.key)).runs.append(run)
    names = Counter(g.name for g in groups.values())
    for group in groups.values():
        group.label = group.name if names[group.name] == 1 else f"{group.name} [{group.short_key}]"
    return list(groups.values())


def same_seed_warnings(group: Group) -> list[str]:
    """A warning naming the runs for each seed that several runs of the group share."""
    by_seed: dict[object, list[Run]] = {}
    for run in group.runs:
        by_seed.setdefault(run.summary["seed"], []).append(run)
    return [f"warning: graph {group.label}: the runs {', '.join(str(r.path) for r in runs)} share seed {seed}, "
            f"so their ± std is over identical seeds (only the nondeterminism of one seed, not the spread over "
            f"seeds); train them with distinct seeds (`dclang run --seeds 0,1,2`)"
            for seed, runs in by_seed.items() if len(runs) > 1]


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


def _kind(group: Group, node: str) -> str:
    """"ensemble", "frozen" (a teacher: never updated) or "" (a network that trains)."""
    summary = group.runs[0].summary["nodes"][node]
    if summary["model"].startswith("ensemble("):
        return "ensemble"  # without a loss of its own like a teacher, but it averages its members
    return "frozen" if summary["frozen"] else ""


def _role(group: Group, node: str) -> str:
    return "target" if node == group.target else _kind(group, node)


def table_rows(group: Group) -> list[dict]:
    """One row per node: name, model, role, and (mean, std) of each accuracy column."""
    accs = node_accuracies(group)
    return [{"node": node, "model": group.runs[0].summary["nodes"][node]["model"], "role": _role(group, node),
             **{key: accs[node][key] for key, _ in _COLUMNS}} for node in group.nodes]


def _spread(group: Group) -> str:
    if len(group.runs) == 1:
        return "one run, so no spread"
    if len({run.summary["seed"] for run in group.runs}) < len(group.runs):
        return "mean ± sample std over runs, some of one seed (see the warning)"
    return "mean ± sample std over runs"


def format_group(group: Group) -> str:
    runs = group.runs
    epochs = runs[0].summary["epochs"]
    rows = [("node", "model", *(title for _, title in _COLUMNS))]
    for row in table_rows(group):
        star = {"target": "*", "frozen": " (frozen)", "ensemble": " (ensemble)"}.get(row["role"], "")
        rows.append((row["node"] + star, row["model"], *(_cell(row[key]) for key, _ in _COLUMNS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    seeds = ", ".join(str(run.summary["seed"]) for run in runs)
    head = [f"graph {group.label}: {len(runs)} run{'s' * (len(runs) != 1)} of {epochs} epochs (seeds {seeds})",
            *(f"  {run.path}" for run in runs), *same_seed_warnings(group),
            f"accuracy %, {_spread(group)}; `test @ best val`: at each node's best-validation epoch"]
    return "\n".join(head + table)


# ---------------------------------------------------------------- table files


def _percent_or_blank(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def write_tables(groups: list[tuple[str, Group]], out: Path) -> list[Path]:
    """report.csv (one row per group and node; accuracies in %, std blank for one run) and
    report.md (the same table for a README or a paper draft)."""
    from dclang.checkpoints import atomic_write_text

    header = ["graph", "key", "plots", "runs", "seeds", "node", "model", "role"]
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
            writer.writerow([group.label, group.short_key, stem, len(group.runs), seeds, row["node"], row["model"],
                             row["role"], *(_percent_or_blank(x) for stat in stats for x in stat)])
            md.append(f"| {group.label} | {len(group.runs)} | {row['node']} | {row['model']} | {row['role']} | "
                      + " | ".join(_cell(row[key]) for key, _ in _COLUMNS) + " |")
    warnings = [w for _, group in groups for w in same_seed_warnings(group)]
    atomic_write_text(buffer.getvalue(), out / "report.csv")
    atomic_write_text("\n".join(md) + "\n\naccuracy %: mean ± sample std (ddof=1) over runs; a single run has "
                      "no std. `test @ best val`: test accuracy at each node's best-validation epoch.\n"
                      + "".join(f"\n{w}\n" for w in warnings), out / "report.md")
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


#: text sizes of the report's figures: read at a glance on a screen or a slide
FONTS = {"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "legend.fontsize": 11,
         "xtick.labelsize": 11, "ytick.labelsize": 11, "figure.titlesize": 16}

_CURVES = (("val_acc", 100, "val accuracy (%)"), ("test_acc", 100, "test @ best val so far (%)"),
           ("train_loss", 1, "train loss"), ("val_loss", 1, "val cross-entropy"))


def _selected_test(group: Group, node: str):
    """A `_series` pick: at each record, the test accuracy of the weights val selects so far
    (`metrics.selected_test`), as runs record test only for those."""
    selected = {id(r): v for run in group.runs for r, v in zip(run.records, selected_test(run.records, node))}
    return lambda record: selected[id(record)]


def plot_group(group: Group, out: Path, stem: str) -> list[Path]:
    """`<stem>_curves.png` (a 2x2 grid: val accuracy, test accuracy, train loss and val
    cross-entropy per node) and, when the graph has live edges, `<stem>_edges.png` (each
    edge's loss, and its gate weight and pass rate where they change)."""
    plt = pyplot()
    n = len(group.runs)
    spread = f"mean ± std over {n} runs" if n > 1 else "one run"
    shared = n - len({run.summary["seed"] for run in group.runs})
    if shared:
        spread += f", {shared} repeating another's seed"
    with plt.rc_context(FONTS):
        written = [_plot_curves(plt, group, out / f"{stem}_curves.png", spread)]
        if group.runs[0].records[0]["edges"]:
            written.append(_plot_edges(plt, group, out / f"{stem}_edges.png", spread))
    return written


def _plot_curves(plt, group: Group, path: Path, spread: str) -> Path:
    fig, grid = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (key, scale, ylabel) in zip(grid.flat, _CURVES):
        for k, node in enumerate(group.nodes):
            # .get: runs from before `val_loss` was recorded have none (an empty panel)
            pick = _selected_test(group, node) if key == "test_acc" else \
                (lambda r, node=node, key=key: r["nodes"][node].get(key))
            epochs, mean, std = _scaled(_series(group, pick), scale)
            if any(m is not None for m in mean):
                draw_line(ax, epochs, mean, f"{node}{'*' * (node == group.target)}", k, std=std)
        ax.set(xlabel="epoch", ylabel=ylabel, title=ylabel.split(" (")[0])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        if key == "train_loss":
            _note_lossless(ax, group)
    fig.suptitle(f"{group.label}: {spread}")
    fig.tight_layout()
    return _saved(plt, fig, path)


def _note_lossless(ax, group: Group) -> None:
    """Say in the train-loss panel why a node has no line there."""
    why = {"frozen": "frozen, trained beforehand", "ensemble": "an ensemble: no loss of its own, it averages its "
                                                                "members"}
    lossless = [f"{node}: {why[_kind(group, node)]}" for node in group.nodes
                if _kind(group, node) in why and all(r["nodes"][node]["train_loss"] is None
                                                     for run in group.runs for r in run.records)]
    if lossless:
        ax.text(0.02, 0.02, "no train loss for\n" + "\n".join(lossless), transform=ax.transAxes, fontsize=10,
                va="bottom", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})


def _plot_edges(plt, group: Group, path: Path, spread: str) -> Path:
    """Every live edge's loss L_{s,t} over epochs; its gate weight and pass rate only where
    they change over the epochs (a `through` edge reads 1.0 throughout): those that stay
    constant are listed under the figure with their value."""
    edges = list(group.runs[0].records[0]["edges"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(edge: str, key: str):
        return _series(group, lambda r: r["edges"][edge].get(key))  # .get: runs from before `loss` was recorded

    shown, constant = {}, {}  # constant: "gate weight 1" -> the edges that keep it
    for key, title in (("gate", "gate weight"), ("pass_rate", "pass rate")):
        shown[key] = [e for e in edges if _varies(series(e, key)[1])]
        for edge in edges:
            if edge not in shown[key]:
                constant.setdefault(f"{title} {_constant(series(edge, key)[1])}", []).append(edge)
    bottom = [key for key in ("gate", "pass_rate") if shown[key]]
    fig = plt.figure(figsize=(12, 9 if bottom else 6))
    spec = fig.add_gridspec(2 if bottom else 1, 2, height_ratios=[1.2, 1] if bottom else None)
    axes = {"loss": fig.add_subplot(spec[0, :])}
    for i, key in enumerate(bottom):
        axes[key] = fig.add_subplot(spec[1, i] if len(bottom) == 2 else spec[1, :])
    labels = {"loss": ("loss L_{s,t} (eq. 2)", "loss"), "gate": ("mean gate weight", "gate weight"),
              "pass_rate": ("fraction of samples passed", "pass rate")}
    for key, ax in axes.items():
        for k, edge in enumerate(edges):
            if key == "loss" or edge in shown[key]:
                epochs, mean, std = series(edge, key)
                if any(m is not None for m in mean):
                    draw_line(ax, epochs, mean, edge, k, std=std, color=colors[k % len(colors)])
        ylabel, title = labels[key]
        known = [m for e in edges for m in series(e, key)[1] if m is not None] if key == "loss" else []
        if known and min(known) > 0 and max(known) / min(known) > 30:  # a KD edge's loss beside a CE's
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title + (" per edge" if key == "loss" else " (where it changes)"))
        if key != "loss":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{group.label}: edges ({spread})")
    if constant:
        kept = "; ".join(f"{what}: {', '.join(kept_by)}" for what, kept_by in constant.items())
        fig.text(0.01, 0.005, f"constant over the epochs, not drawn: {kept}", fontsize=10, va="bottom", ha="left",
                 wrap=True)
    fig.tight_layout(rect=(0, 0.05 if constant else 0, 1, 1))
    return _saved(plt, fig, path)


def _varies(values: list[float | None]) -> bool:
    known = [v for v in values if v is not None]
    return bool(known) and max(known) - min(known) > 1e-9


def _constant(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{known[0]:.3g}" if known else "not recorded"


def _saved(plt, fig, path: Path) -> Path:
    try:
        return save(fig, path)
    finally:
        plt.close(fig)


def report(paths: list[Path], out: Path) -> str:
    """The report's text; writes the table files and the plots into `out`."""
    runs, notes = load_runs(paths)
    if not runs and len(paths) == 1 and (paths[0] / RECORD).is_file():
        raise UserError(*_search_advice(paths[0]))
    if not runs:
        raise UserError("no finished runs in " + ", ".join(str(p) for p in paths),
                        "give run directories written by `dclang run` (each holds metrics.jsonl and summary.json)"
                        + ("; " + "; ".join(notes) if notes else ""))
    sections, groups = [], []
    for group in group_runs(runs):
        name = group.name if group.label == group.name else f"{group.name}_{group.short_key}"
        groups.append((re.sub(r"[^A-Za-z0-9_.-]", "_", name), group))
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
