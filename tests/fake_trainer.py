"""A cheap, deterministic stand-in for `dclang.train.train_graph`, for search tests.

`dclang search --trainer fake_trainer:train` (a hidden option) makes every worker call this
instead of training: the target's accuracy is a fixed function of the graph (its canonical
text) and the epoch, rising with the epoch so a graph keeps its rank from rung to rung, as
ASHA assumes. Each epoch sleeps `DCLANG_FAKE_SLEEP` seconds (default 0.05) so that workers
overlap and a test can kill one mid-trial. A graph whose hash falls in the `DCLANG_FAKE_CRASH`
fraction (default 0) raises at epoch 1, like a run that diverged.
"""

from __future__ import annotations

import hashlib
import os
import time
from types import SimpleNamespace


def quality(graph) -> float:
    """A number in [0.3, 0.9) fixed by the graph's structure (models, gates, target)."""
    parts = [f"{n}:{s.model}:{s.target}" for n, s in sorted(graph.nodes(data="spec"))]
    parts += [f"{s}->{t}:{e.gate}" for s, t, e in sorted(graph.edges(data="spec"))]
    digest = hashlib.sha256("|".join(parts).encode("utf-8")).digest()
    return 0.3 + 0.6 * int.from_bytes(digest[:4], "big") / 2**32


def accuracy(graph, epoch: int) -> float:
    return quality(graph) * (1 - 0.5 ** epoch)


def train(graph, *, run_dir=None, device="auto", engine="fused", seed=None, epochs=None, data_dir=None,
          resume=False, on_epoch=None, progress=True, teacher_cache=None, dataset=None):
    target = graph.graph["target"]
    epochs = epochs or graph.graph["train"].epochs
    sleep = float(os.environ.get("DCLANG_FAKE_SLEEP", "0.05"))
    crash = float(os.environ.get("DCLANG_FAKE_CRASH", "0"))
    nodes = [n for n, s in graph.nodes(data="spec") if not s.is_label]
    records = []
    for epoch in range(1, epochs + 1):
        time.sleep(sleep)
        if (quality(graph) - 0.3) / 0.6 < crash:
            raise FloatingPointError(f"fake divergence in epoch {epoch}")
        acc = accuracy(graph, epoch)
        record = {"epoch": epoch, "seconds": sleep,
                  "nodes": {n: {"val_acc": acc if n == target else 0.5, "test_acc": acc, "train_loss": 1 / epoch}
                            for n in nodes}}
        records.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return SimpleNamespace(summary={"target": target, "epochs_done": epochs}, records=records)
