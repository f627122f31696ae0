"""Evaluation of a compiled step's nodes, as lean as its training step.

`evaluate_nodes` evaluates the nodes it is asked for, and only the networks they need:

- one forward per batch over those networks, each HFTA group that holds one of them run
  once as the step trains it (`TrainStep.fused_slices`: the fused network, node k its slice),
  the others one by one, all under `torch.inference_mode` in eval mode;
- every ensemble asked for computed from its members' outputs of that same forward
  (`dclang.ensembles`), never by running a member again;
- per batch, one argmax and one cross-entropy over the asked nodes' stacked logits, whatever
  their number, added to two vectors on the device. Nothing is read back per batch: the caller
  reads the sums once per split (`NodeSums.read`), so a GPU never waits for the host inside an
  evaluation.

What to ask for (which nodes, which splits, when) is the training loop's choice
(`dclang.train.evaluate`); this module only makes whatever it asks for cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dclang.ensembles import ensemble_outputs
from dclang.models.branch import trunks_once

#: samples evaluated (and normalised) at a time: bounds the float copy of a split on the device
EVAL_CHUNK = 1024


@dataclass
class NodeSums:
    """Sums over the batches of a split, on the device: per node, in `names`' order, the
    top-1 correct count and (when asked for) the summed cross-entropy against the labels."""

    names: list[str]
    correct: Tensor  # (len(names),) int64
    loss: Tensor | None  # (len(names),) float64
    samples: int

    def read(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """(accuracy, mean cross-entropy) per node, the loss None unless summed: one host sync."""
        parts = [self.correct.to(torch.float64)] + ([] if self.loss is None else [self.loss])
        values = torch.cat(parts).tolist()
        n, k = self.samples, len(self.names)
        accuracy = {name: v / n for name, v in zip(self.names, values[:k])}
        loss = None if self.loss is None else {name: v / n for name, v in zip(self.names, values[k:])}
        return accuracy, loss


def needed_networks(step, names: list[str]) -> tuple[list[str], list[tuple[str, tuple[str, ...], str]]]:
    """(the networks to forward, the ensembles to compute, in dependency order) for `names`:
    the networks named, and every member, direct or nested, of the ensembles named."""
    by_name = {name: members for name, members, _ in step.ensembles}
    wanted, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(by_name.get(name, ()))
    return ([n for n in step.models if n in wanted],
            [entry for entry in step.ensembles if entry[0] in wanted])


def forward_networks(step, images: Tensor, networks: list[str], slices: dict) -> dict[str, Tensor]:
    """Logits of `networks` on one batch: each fused group holding one of them runs once
    (`slices` is `step.fused_slices()`), every other network alone."""
    logits: dict[str, Tensor] = {}
    fused_out: dict[int, tuple[Tensor, ...]] = {}
    with trunks_once(step.tapes):  # a shared trunk computed once, by its source (dclang.models.branch)
        wanted = set(networks)
        for name in (n for n in step.order if n in wanted):  # each branch after its source
            if name in slices:
                fused, k = slices[name]
                if id(fused) not in fused_out:
                    fused_out[id(fused)] = fused(images).unbind(0)  # (K, B, classes): one forward for the group
                logits[name] = fused_out[id(fused)][k]
            else:
                logits[name] = step.models[name](images)
    return logits


def evaluate_nodes(step, batches: Iterable[tuple[Tensor, Tensor]], names: list[str], *,
                   with_loss: bool = False) -> NodeSums:
    """Correct counts (and, `with_loss`, cross-entropy sums) of `names` (networks and
    ensembles of `step`) over `batches` of (images on the step's device, labels), in eval
    mode; the step's previous mode is restored. Sums stay on the device until `read`.

    Images go to channels-last when the step trains in it (`step.options.channels_last`), as
    the step's own inputs do. Only the forward runs under `torch.inference_mode`, not the
    making of the batches: a tensor their preparation caches (`dclang.data.normalize`'s
    constants) must stay a normal tensor, which training may later use under autograd."""
    networks, ensembles = needed_networks(step, names)
    slices = step.fused_slices()
    channels_last = bool(getattr(getattr(step, "options", None), "channels_last", False))
    correct = torch.zeros(len(names), dtype=torch.long, device=step.device)
    loss = torch.zeros(len(names), dtype=torch.float64, device=step.device) if with_loss else None
    samples = 0
    was_training = step.training
    step.eval()
    try:
        for images, labels in batches:
            with torch.inference_mode():
                if channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs = ensemble_outputs(forward_networks(step, images, networks, slices), ensembles)
                stacked = torch.stack([outputs[name] for name in names])  # (nodes, B, classes)
                correct += (stacked.argmax(dim=-1) == labels).sum(dim=-1)
                if loss is not None:  # an ensemble's output is a log-probability up to a constant: its CE is its own
                    loss += F.cross_entropy(stacked.transpose(1, 2), labels.expand(len(names), -1),
                                            reduction="none").to(torch.float64).sum(dim=1)
            samples += len(labels)
    finally:
        if was_training:
            step.train()
    return NodeSums(list(names), correct, loss, samples)


def tensor_batches(images: Tensor, labels: Tensor, batch_size: int, device: torch.device
                   ) -> Iterable[tuple[Tensor, Tensor]]:
    """(images, labels) `batch_size` samples at a time, on `device`."""
    for start in range(0, len(images), batch_size):
        yield (images[start:start + batch_size].to(device, non_blocking=True),
               labels[start:start + batch_size].to(device, non_blocking=True))
