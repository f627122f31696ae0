"""Curves over epochs, drawn with matplotlib (Agg, no display): one run's per-node curves,
written into its run folder at the end of `dclang run`, and the line style `dclang report`
shares with them.

Lines of several nodes or edges often lie on top of each other (two edges whose gates pass
every sample both read 1.0): each line gets its own marker and dash pattern and is drawn
half-transparent, so a line under another still shows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_line(ax, epochs, values, label: str, k: int, std=None, color=None) -> None:
    """Line number `k` of a panel: its own marker and dashes, 0.75 opaque, with a band of
    ± `std` when given (several runs); a None value (a frozen node's loss) leaves a gap.
    `color` keeps one thing's colour across panels that each show some of the lines."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ys = [float("nan") if v is None else v for v in values]
    line, = ax.plot(epochs, ys, label=label, marker=MARKERS[k % len(MARKERS)], markersize=5,
                    linestyle=DASHES[(k // len(MARKERS) + k) % len(DASHES)], alpha=0.75, color=color)
    if std is not None:
        ax.fill_between(epochs, [y - s for y, s in zip(ys, std)], [y + s for y, s in zip(ys, std)],
                        color=line.get_color(), alpha=0.15)


def save(fig, path: Path) -> Path:
    """Write the figure whole or not at all (a temporary file renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # processes of one run may race
    fig.savefig(partial, dpi=110, format=path.suffix.lstrip("."))
    os.replace(partial, path)
    return path


def _percent(values):
    return [None if v is None else 100 * v for v in values]


def write_node_curves(run_dir: Path) -> list[Path]:
    """RUN_DIR/curves/NODE.png for every node of a run: its train and val accuracy, the test
    accuracy of the weights val selects so far (`metrics.selected_test`: a run measures test
    only for those), and its train loss (L_t) and validation cross-entropy, over the epochs
    of metrics.jsonl.
    Returns the files written; one that cannot be written (a full disk) is a note, as the run itself is done."""
    from dclang.train.metrics import selected_test
    from dclang.train.rundir import RunDir

    records = RunDir(run_dir).read_metrics()
    if not records:
        return []
    models = _models(RunDir(run_dir))
    plt = pyplot()
    epochs = [r["epoch"] for r in records]
    written = []
    for node in records[-1]["nodes"]:
        stats = [r["nodes"][node] for r in records]
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for k, (key, label) in enumerate((("train_acc", "train"), ("val_acc", "val"),
                                          ("test_acc", "test @ best val so far"))):
            values = selected_test(records, node) if key == "test_acc" else [s[key] for s in stats]
            if any(v is not None for v in values):
                draw_line(acc_ax, epochs, _percent(values), label, k)
        acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{node}: accuracy")
        acc_ax.legend()
        drawn = False
        for k, (key, label) in enumerate((("train_loss", "train: L_t, its edges' losses"),
                                          ("val_loss", "val: cross-entropy"))):
            values = [s.get(key) for s in stats]  # runs from before val_loss have none
            if any(v is not None for v in values):
                draw_line(loss_ax, epochs, values, label, k)
                drawn = True
        if drawn:
            loss_ax.legend()
        loss_ax.set(title=f"{node}: loss")
        if all(s["train_loss"] is None for s in stats):
            loss_ax.text(0.03, 0.03, _why_no_loss(models.get(node)), transform=loss_ax.transAxes, va="bottom",
                         ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
        loss_ax.set(xlabel="epoch", ylabel="loss")
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(run_dir) / "curves" / f"{_file_name(node)}.png"
        try:
            written.append(save(fig, path))
        except OSError as exc:  # a picture is a convenience, never a reason to fail a finished run
            print(f"note: curves not drawn: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return written
        finally:
            plt.close(fig)
    return written


def _models(run_dir) -> dict[str, str]:
    """Each node's model as summary.json gives it (`ensemble(a, b)` for an ensemble); empty
    when the summary cannot be read, as the curves need only metrics.jsonl."""
    from dclang.diagnostics import UserError

    try:
        summary = run_dir.read_summary() or {}
    except UserError:
        return {}
    return {name: node["model"] for name, node in summary["nodes"].items()
            if isinstance(node, dict) and isinstance(node.get("model"), str)}


def _why_no_loss(model: str | None) -> str:
    """Why a node has no training loss: an ensemble has none of its own, a teacher is frozen."""
    if model is not None and model.startswith("ensemble("):
        members = model[len("ensemble("):-1]
        return f"no training loss: an ensemble of {members}\nhas no loss of its own, it averages its members"
    return "no training loss: frozen\n(a teacher, trained beforehand)"


def _file_name(name: str) -> str:
    """A node name is a .kt name (letters, digits, `_`); anything else becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


__all__ = ["draw_line", "pyplot", "save", "write_node_curves"]
