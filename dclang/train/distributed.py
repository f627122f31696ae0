"""Data-parallel training of a whole graph over several processes (one per GPU), as DDP does.

    torchrun --nproc_per_node 4 -m dclang run examples/kd_dml.kt

torchrun starts N processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins them
(NCCL on CUDA, one GPU per process; gloo on the CPU). Then:

- Data: every process draws the same seeded permutation and augmentation, so each sees the
  same global batch (the file's `batch`); process r trains on its r-th slice of it
  (`Tensor.tensor_split`, so per-process batch = global batch / N, the first slices one
  sample larger when N does not divide it). Same global batch, same number of steps, same
  learning rate as one process: nothing to retune.
- Models: every node is replicated in every process, and rank 0's weights are broadcast
  once at the start, so all replicas begin identical.
- Gradients: after the backward, each process scales its gradients by its share of the
  global batch (n_r / B) and one all-reduce per dtype sums them, bucketed into one flat
  buffer: every loss is a mean over the batch, so the sum is exactly the gradient of the
  global batch's loss. It runs as a pre-hook of the optimizer step, so it serves the fused
  engine (one all-reduce for the whole graph), the HFTA variant and the reference engine
  (one per node) alike. The optimizers then take identical steps everywhere.
- BatchNorm: as in standard DDP, each process normalises with the statistics of its own
  slice (no SyncBatchNorm). A graph without BatchNorm therefore trains exactly like one
  process on the global batch (to rounding); with BatchNorm, training differs slightly, as
  it does between two batch sizes. The running statistics are averaged over the processes
  in the same all-reduce, which keeps the replicas identical (the running mean is then
  exactly one process's; the running variance is the mean of the slices' variances).
- Statistics: each step's losses, accuracies and gate rates are combined over the
  processes (one small all-reduce), so metrics are those of the global batch.
- Outputs: rank 0 alone writes the run directory and prints; every process evaluates the
  (identical) replicas on val and test.

Not supported: CUDA graphs (the all-reduce would have to be captured too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dclang.compile.common import StepStats
from dclang.diagnostics import UserError


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the N processes of a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # what this process trains on: cuda:LOCAL_RANK, or cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, step, *, train_size: int, batch: int) -> DistributedTrainStep:
        """`step` trained data-parallel; refuses an epoch whose last batch cannot be split."""
        smallest = batch if batch < self.world_size else train_size % batch or batch
        if smallest < self.world_size:
            raise UserError(f"{self.world_size} processes cannot share a batch of {smallest} "
                            f"samples (batch = {batch}, {train_size} training images)",
                            "use a batch of at least one sample per process, or change val_split so that the "
                            "epoch's last batch is not smaller than the number of processes")
        return DistributedTrainStep(step, self)

    def rank_zero(self, rundir):
        """The run directory, writable by rank 0 only: other ranks read it (to resume) but
        every `write_*` and `save_*` of theirs does nothing."""
        return rundir if self.is_main or rundir is None else _ReadOnlyRunDir(rundir)


#: a data-parallel run is in progress in this process (between `setup` and `release`)
_running = False


def setup(device: str = "auto") -> DistEnv | None:
    """Join the processes torchrun started, or None when this process trains alone.

    `device` is `dclang run`'s --device: `auto` and `cuda` become this process's GPU
    (cuda:LOCAL_RANK, also made the current device); `cpu` uses gloo. A later run (another
    seed of `--seeds`) reuses the process group.

    A run started inside a data-parallel run gets None and trains alone: that is a frozen
    node's teacher, pre-trained before the graph's training. The teacher cache's lock lets
    one process train it while the others wait and then load it; training it data-parallel
    would deadlock, the others being blocked on that lock. Pair with `release`.
    """
    global _running
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or _running:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise UserError(f"--device {device}: PyTorch sees no CUDA GPU on this machine", "use --device cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here",
                            "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    _running = True
    return DistEnv(rank, world_size, local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def release(env: DistEnv | None) -> None:
    """End the data-parallel run `setup` returned `env` for (None: nothing to end)."""
    global _running
    if env is not None:
        _running = False


class DistributedTrainStep:
    """A TrainStep trained data-parallel: `step` takes the global batch and trains on this
    process's slice; everything else passes through to the wrapped step (its models,
    optimizers, evaluation and checkpoints, identical in every process)."""

    def __init__(self, step, env: DistEnv):
        if getattr(getattr(step, "options", None), "cuda_graph", False):
            raise ValueError("data-parallel training cannot run a CUDA-graph step (the all-reduce is not captured)")
        self.inner, self.env = step, env
        self.share = 1.0  # n_r / B of the step in progress
        self.buffers_pending = False
        self._broadcast_from_rank_zero()
        for optimizer in step.optimizers.values():
            optimizer.register_step_pre_hook(self._reduce_before_update)

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copying, unpickling): no wrapped step to ask
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _broadcast_from_rank_zero(self) -> None:
        """Every model's parameters and buffers as rank 0 has them (teachers pre-trained on
        a GPU, for one, need not come out bitwise equal in every process)."""
        tensors = [t for model in self.inner.models.values() for t in [*model.parameters(), *model.buffers()]]
        with torch.no_grad():
            for group in _by_dtype(tensors):
                flat = _flatten(group)
                dist.broadcast(flat, src=0)
                _unflatten_into(flat, group)

    def _running_stats(self) -> list[Tensor]:
        """The trainable nodes' float buffers (BatchNorm running mean and variance)."""
        return [b for name in self.inner.trainable for b in self.inner.models[name].buffers()
                if b.is_floating_point()]

    def _reduce_before_update(self, optimizer, args, kwargs) -> None:
        """The optimizer's gradients become the global batch's (scaled by this process's
        share, summed over processes); on the step's first update the running statistics
        are averaged in the same all-reduce."""
        # A parameter without a gradient (unused by this graph's losses) is skipped by the
        # optimizer, as in one process; every process runs the same graph, so the same ones.
        tensors = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scales = [self.share] * len(tensors)
        if self.buffers_pending:
            stats = self._running_stats()
            tensors += stats
            scales += [1.0 / self.env.world_size] * len(stats)
            self.buffers_pending = False
        with torch.no_grad():
            for group in _by_dtype(list(zip(tensors, scales))):
                flat = torch.cat([t.reshape(-1) * s for t, s in group])
                dist.all_reduce(flat)
                _unflatten_into(flat, [t for t, _ in group])

    def step(self, images: Tensor | tuple[Tensor, ...], labels: Tensor, k: int) -> StepStats:
        """Update every trainable node once on the global batch (`images`, `labels`), of
        which this process computes its slice; returns the global batch's statistics."""
        batch = len(labels)
        if batch < self.env.world_size:
            raise ValueError(f"a batch of {batch} samples cannot be split over {self.env.world_size} processes")
        r = self.env.rank
        part = lambda x: x.tensor_split(self.env.world_size)[r]  # noqa: E731
        images = tuple(map(part, images)) if isinstance(images, tuple) else part(images)  # each view (`dclang.views`)
        labels = part(labels)
        self.share = len(labels) / batch
        self.buffers_pending = True
        stats = self.inner.step(images, labels, k)
        return self._combine(stats)

    def _combine(self, stats: StepStats) -> StepStats:
        """The global batch's StepStats: batch means weighted by each process's share and
        summed, correct counts summed; one all-reduce."""
        counts, means = stats.vectors()
        values = torch.cat([counts.to(torch.float64), means.to(torch.float64) * self.share])
        dist.all_reduce(values)
        total_counts, mean_values = values.split([len(counts), len(means)])
        return StepStats.from_vectors(stats.keys(), total_counts.round().to(counts.dtype), mean_values.to(means.dtype))


class _ReadOnlyRunDir:
    """A RunDir whose writing methods do nothing (ranks other than 0). `claim` is one: rank 0
    alone checks and marks the folder (another rank could see the folder half-claimed)."""

    def __init__(self, rundir):
        self._rundir = rundir

    def __getattr__(self, name: str):
        if name.startswith(("write_", "save_", "claim")):
            return lambda *args, **kwargs: None
        return getattr(self._rundir, name)


def _by_dtype(items: list) -> list[list]:
    """`items` (tensors, or (tensor, scale) pairs) grouped by dtype: one flat buffer each."""
    groups: dict[torch.dtype, list] = {}
    for item in items:
        t = item[0] if isinstance(item, tuple) else item
        groups.setdefault(t.dtype, []).append(item)
    return list(groups.values())


def _flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
