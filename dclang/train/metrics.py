"""Per-epoch statistics: summed on the device during the epoch, read back once at its end.

Reading a tensor back to the host waits for every queued kernel, so the loop never does
it per step. `EpochStats.add` stacks one step's statistics into a vector and adds it to a
running sum on the device; it also remembers, per statistic, the first update at which it
was not finite, so a divergence can be traced to the node and edges where it began without
a per-step check.
"""

from __future__ import annotations

import sys

import torch

from dclang.compile import StatSums, StepStats
from dclang.diagnostics import UserError


def say(message: str) -> None:
    """Messages for the person running dclang go to stderr, keeping stdout for results."""
    print(message, file=sys.stderr, flush=True)


class EpochStats:
    """Sums of one epoch's StepStats, kept on the device: the `StatSums` of one training."""

    def __init__(self) -> None:
        self.sums: StatSums | None = None

    def add(self, stats: StepStats, batch_size: int, k: int) -> None:
        """Add one step's statistics (no host sync)."""
        counts, means = stats.vectors()
        if self.sums is None:
            self.sums = StatSums([stats.keys()], counts.device)
        self.sums.add(torch.cat([counts.to(torch.float64), means.to(torch.float64)]), [batch_size], [k])

    def read(self) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        """(epoch means / accuracies per (field, name), first non-finite update per key):
        the one host sync of the epoch."""
        return self.sums.peek(0)


def check_finite(first_bad: dict[tuple[str, str], int], epoch: int) -> None:
    """Stop the run with the epoch, update, node(s) and edge(s) where the loss first became
    NaN or infinite. Later non-finite values are consequences, so only the earliest update
    is reported."""
    bad_nodes = {name: k for (f, name), k in first_bad.items() if f == "node_loss"}
    if not bad_nodes:
        return
    k = min(bad_nodes.values())
    nodes = [n for n, at in bad_nodes.items() if at == k]
    edges = [name for (f, name), at in first_bad.items()
             if f == "edge_loss" and at == k and name.split("->")[1] in nodes]
    node_text = ", ".join(f"`{n}`" for n in nodes)
    edge_text = ", ".join(f"`{e}`" for e in edges) or "none of its edges alone (their sum overflowed)"
    raise UserError(
        f"training diverged in epoch {epoch} (update {k}): the loss of node {node_text} became NaN or "
        f"infinite, through edge {edge_text}",
        "lower the learning rate (`optimizer = sgd(lr=...)` in the train block, or --set train.optimizer.lr=...), "
        "or the `weight` or `T` of those edges")


def epoch_record(epoch: int, lr: float, means: dict[tuple[str, str], float], models: list[str],
                 figures: dict[str, dict], seconds: float, train_seconds: float) -> dict:
    """One line of metrics.jsonl. Accuracies are fractions in [0, 1]; a frozen node has no
    train loss (null). `train_loss` is the node's L_t (eq. 3: its incoming edges' losses,
    distillation included). `figures` are what the epoch's evaluation measured per node
    (`dclang.train.evaluate`): `val_acc` and `val_loss` (its cross-entropy against the
    validation labels, the usual overfitting sign), null with an empty validation split;
    `test_acc`, null in an epoch whose weights val does not select."""
    edges = sorted({name for f, name in means if f == "edge_loss"})
    return {
        "epoch": epoch,
        "lr": lr,
        "nodes": {n: {"train_loss": means.get(("node_loss", n)),
                      "train_acc": means[("node_correct", n)],
                      "val_acc": figures[n]["val_acc"],
                      "val_loss": figures[n]["val_loss"],
                      "test_acc": figures[n]["test_acc"]} for n in models},
        "edges": {e: {"loss": means[("edge_loss", e)], "gate": means[("edge_gate", e)],
                      "pass_rate": means[("edge_pass", e)]} for e in edges},
        "seconds": seconds,
        "train_seconds": train_seconds,
    }


#: fields of a record that measure time, not learning: they differ between identical runs
TIMING_FIELDS = ("seconds", "train_seconds")


def best_epoch(records: list[dict], node: str) -> dict | None:
    """The record of `node`'s best validation accuracy (earliest on ties), or None without
    a validation split. Never looks at test accuracy."""
    scored = [r for r in records if r["nodes"][node]["val_acc"] is not None]
    return max(scored, key=lambda r: (r["nodes"][node]["val_acc"], -r["epoch"])) if scored else None


def selected_test(records: list[dict], node: str) -> list[float | None]:
    """Per epoch, `node`'s test accuracy at its best validation epoch so far (earliest on
    ties, as `best_epoch`): what the weights selection would pick then score on test, the
    curve a run's test accuracy draws (its records hold test only for such epochs). Without a
    validation split each epoch's own weights are the selected ones."""
    out, best = [], None
    for record in records:
        figures = record["nodes"][node]
        if figures["val_acc"] is None:
            out.append(figures["test_acc"])
            continue
        if best is None or figures["val_acc"] > best["val_acc"]:
            best = figures
        out.append(best["test_acc"])
    return out


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def accuracy_table(summary: dict) -> str:
    """The end-of-run table: per node its final val and test accuracy and the test accuracy
    at its best validation epoch (the target is starred)."""
    rows = [("node", "model", "params", "val %", "test %", "best-val epoch", "test @ best-val %")]
    for name, node in summary["nodes"].items():
        star = "*" if name == summary["target"] else (" (frozen)" if node["frozen"] else "")
        rows.append((name + star, node["model"], f"{node['params']:,}", percent(node["final_val_acc"]),
                     percent(node["final_test_acc"]), str(node["best_val_epoch"] or "-"),
                     percent(node["test_at_best_val"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines)
