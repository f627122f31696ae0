"""What a run evaluates after each epoch: what selection needs, and nothing it already knows.

- **Validation, every epoch**, for every node whose outputs can change: selection reads it
  (`best.pt` is the target's best validation epoch, `test @ best val` each node's own).
- **Test, for the weights selection picks**: a node is evaluated on the test split in an
  epoch where its validation accuracy improves (strictly: on ties the earlier epoch stays
  selected, as `metrics.best_epoch` picks it), and in the run's last epoch (`final_test_acc`,
  the weights a run ends with). Its record's `test_acc` is null in the other epochs. So the
  test figure of every node's best-validation epoch is always recorded, whenever a run stops.
  Without a validation split every epoch's weights are the selected ones: test every epoch.
- **Constant nodes once**: a frozen network's weights and BatchNorm statistics never change
  (it stays in eval mode), nor does an ensemble of constant members, so their figures are
  measured in the run's first epoch and carried into every later record.

Each split is evaluated in batches of `eval_batch`: the training batch on the CPU, where a
convolutional network's activations must stay in the caches as the step's do (cnn_small on
28x28 images, one thread: 1,024 images took 0.70 s in batches of 64 and 1.68 s in one batch
of 1,024; ResNet32 on 32x32: 1.48 s against 2.06 s for 512 images), and `EVAL_CHUNK` on a GPU,
where larger batches fill the chip.

Everything is decided from the records alone (`restore` replays them), so a resumed run
evaluates exactly what the uninterrupted run evaluated and writes the same records. How each
split is evaluated (one fused forward, sums on the device, one read per split) is
`dclang.compile.evaluate`'s.
"""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import torch

from dclang.compile.evaluate import EVAL_CHUNK, evaluate_nodes
from dclang.ensembles import trained_ensembles
from dclang.ir import frozen_nodes, reported_nodes

#: the figures of a node's record that evaluation fills
FIGURES = ("val_acc", "val_loss", "test_acc")


def constant_nodes(graph: nx.DiGraph) -> set[str]:
    """Nodes whose outputs never change during a run: frozen networks, and ensembles whose
    members (nested ones included) are all constant, unless their own weights learn (a learned
    ensemble, `dclang.ensembles.trained_ensembles`)."""
    constant = set(frozen_nodes(graph))
    learning = set(trained_ensembles(graph))
    changed = True
    while changed:  # ensembles of ensembles: until nothing is added
        changed = False
        for name, spec in graph.nodes(data="spec"):
            if spec.is_ensemble and name not in constant | learning and all(m in constant for m in spec.model):
                constant.add(name)
                changed = True
    return constant


class EpochEvaluation:
    """The evaluation after each epoch of one run (see the module docstring): `after_epoch`
    returns the figures of the epoch's record and remembers them; `restore` replays the
    records of a resumed run."""

    def __init__(self, step, graph: nx.DiGraph, *, val, test, mean, std, epochs: int, batch: int):
        self.step, self.val, self.test, self.mean, self.std, self.epochs = step, val, test, mean, std, epochs
        self.batch = eval_batch(step.device, batch)
        self.names = reported_nodes(graph)
        self.constant = constant_nodes(graph)
        self.best: dict[str, float] = {}  # best validation accuracy so far, per node
        self.known: dict[str, dict] = {}  # a constant node's figures, measured once

    def restore(self, records: list[dict]) -> None:
        """Remember what the records of the epochs already trained say."""
        for record in records:
            self._remember(record["nodes"])

    def after_epoch(self, epoch: int) -> dict[str, dict]:
        """Per node, the epoch's {val_acc, val_loss, test_acc}: None where not evaluated
        (test in an epoch that selects nothing new; val without a validation split)."""
        fresh = [n for n in self.names if n not in self.known]
        val_acc, val_loss = self._evaluate(self.val, fresh, with_loss=True)
        if val_acc is None:
            selected = fresh
        else:
            selected = [n for n in fresh if n not in self.best or val_acc[n] > self.best[n]]
        test_acc, _ = self._evaluate(self.test, fresh if epoch == self.epochs else selected)
        figures = {}
        for name in self.names:
            if name in self.known:
                figures[name] = dict(self.known[name])
            else:
                figures[name] = {"val_acc": None if val_acc is None else val_acc[name],
                                 "val_loss": None if val_loss is None else val_loss[name],
                                 "test_acc": (test_acc or {}).get(name)}
        self._remember(figures)
        return figures

    def _remember(self, nodes: dict[str, dict]) -> None:
        for name in self.names:
            figures = nodes[name]
            val = figures["val_acc"]
            if val is not None and (name not in self.best or val > self.best[name]):
                self.best[name] = val
            if name in self.constant and name not in self.known:
                self.known[name] = {key: figures.get(key) for key in FIGURES}  # .get: records from before val_loss

    def _evaluate(self, split, names: list[str], *, with_loss: bool = False
                  ) -> tuple[dict[str, float] | None, dict[str, float] | None]:
        """(accuracy, mean cross-entropy) of `names` on `split`: both None for an empty split,
        the accuracy {} for no names; the loss None unless asked for. One host sync."""
        if len(split) == 0:
            return None, None
        if not names:
            return {}, ({} if with_loss else None)
        batches = split_batches(split, self.mean, self.std, self.batch)
        return evaluate_nodes(self.step, batches, names, with_loss=with_loss).read()


def eval_batch(device: torch.device, train_batch: int) -> int:
    """Samples per evaluation forward (see the module docstring): the training batch on the
    CPU, `EVAL_CHUNK` on a GPU."""
    return EVAL_CHUNK if device.type == "cuda" else min(train_batch, EVAL_CHUNK)


def split_batches(split, mean, std, batch: int = EVAL_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's (normalised images, labels), `batch` at a time, on the split's device."""
    from dclang.data import normalize

    for start in range(0, len(split), batch):
        yield normalize(split.images[start:start + batch], mean, std), split.labels[start:start + batch]
