"""A run, a step at a time: what `dclang run` (`train_graph`) and a search worker drive alike.

    >>> run = Run.prepare(graph, run_dir=None, device="cpu")
    >>> run.compile(run.initial_states(cache=None))
    >>> for epoch in range(1, run.epochs + 1):
    ...     started, lr, stats = time.perf_counter(), run.step.lr(), EpochStats()
    ...     for images, labels, k in run.batches(epoch):
    ...         stats.add(run.step.step(images, labels, k), len(labels), k)
    ...     record = run.end_epoch(epoch, stats.read(), lr=lr, started=started)

`prepare` settles everything that can be refused (the settings, the run folder, the data)
before any work; `compile` builds the seeded step and puts the splits on the device;
`batches` are the epoch's seeded batches (with each sample's position in the training split
where the step's `needs_indices`: a `crd` edge's memory bank); `end_epoch` checks the epoch's statistics, advances
the schedule and evaluates what selection needs (`dclang.train.evaluate`). Who takes the
steps is the caller's: `train_graph` steps the run's own compiled step; a packed worker
(`dclang.search.pack`) compiles its trials' steps as members of one engine (`member=True`:
no optimizer of their own) and steps them together.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dclang.diagnostics import UserError
from dclang.ir import model_nodes, reported_nodes
from dclang.train.evaluate import EpochEvaluation
from dclang.train.metrics import check_finite, epoch_record, say
from dclang.train.rundir import RunDir, graph_text
from dclang.train.teachers import init_states

#: the augmentation a dataset gets when its data block names none: the paper's for natural
#: images, no flip for digits (a mirrored digit is another shape), none for the user's own data
DEFAULT_AUGMENT = {"digits": "pad_crop", "cifar10": "pad_crop_flip", "cifar100": "pad_crop_flip",
                   "tinyimagenet": "pad_crop_flip"}

#: augment name -> (random crop, random flip)
AUGMENTS = {"pad_crop_flip": (True, True), "pad_crop": (True, False), "flip": (False, True), "none": (False, False)}


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when PyTorch sees a GPU, else the CPU; `cuda` without one is an error,
    never a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"unknown device `{device}`", "use --device auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: PyTorch sees no CUDA GPU on this machine "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})",
                            "use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)",
                            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif resolved.type != "cpu":
        raise UserError(f"device `{device}` is not supported", "use --device auto, cpu, cuda or cuda:N")
    return resolved


def check_options(options, device: torch.device) -> None:
    """Refuse fast paths this device cannot run (`StepOptions`, None for none), as a UserError
    before any work."""
    if options is not None and options.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph captures the step in a CUDA graph, but the device is {device}",
                        "use --device cuda (or auto on a machine with a GPU), or leave out --cuda-graph")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def resolved_graph(graph: nx.DiGraph, *, epochs: int, seed: int) -> nx.DiGraph:
    """A copy of `graph` with what this run decided filled in: epochs, seed, the augmentation
    (the dataset's default when the file names none), and the data `path` and `init` paths
    made absolute (they are relative to the .kt file). Its canonical text is `graph.kt`."""
    g = graph.copy()
    base = Path(graph.graph.get("path") or ".").parent
    data = graph.graph["data"]
    g.graph["data"] = dataclasses.replace(
        data, augment=data.augment or DEFAULT_AUGMENT.get(data.dataset, "none"),
        path=None if data.path is None else str((base / data.path).resolve()))
    g.graph["train"] = dataclasses.replace(graph.graph["train"], epochs=epochs, seed=seed)
    for _, attrs in g.nodes(data=True):
        if attrs["spec"].init is not None:
            attrs["spec"] = dataclasses.replace(attrs["spec"], init=str((base / attrs["spec"].init).resolve()))
    return g


def batch_augment(data_spec, dataset):
    """The run's batch augmentation on the device (`data.BatchAugment`), as its data block
    names it (`resolved_graph` has named it), normalising with the dataset's statistics."""
    from dclang.data import BatchAugment

    crop, flip = AUGMENTS[data_spec.augment]
    return BatchAugment(data_spec.pad, crop, flip, dataset.mean, dataset.std)


@dataclass
class Run:
    """What a run settled before training (its resolved graph and canonical text, data, run
    folder, device, the process group under torchrun), then, once compiled, its step and its
    splits on the device."""

    graph: nx.DiGraph
    text: str
    dataset: object
    rundir: RunDir | None
    device: torch.device
    dist: object | None
    engine: str
    seed: int
    epochs: int
    progress: bool
    data_dir: str | None = None
    step: object = None  # `compile`'s
    label: str = ""  # what runs, fast paths named (summary.json's `step`)
    train: object = None
    val: object = None
    test: object = None
    augment: object = None
    evaluation: EpochEvaluation | None = None  # `compile`'s: what each epoch's end evaluates

    @classmethod
    def prepare(cls, graph: nx.DiGraph, *, run_dir: Path | None = None, device: str = "auto",
                engine: str = "fused", seed: int | None = None, epochs: int | None = None,
                data_dir: str | None = None, dataset=None, progress: bool = True, dist=None, options=None) -> Run:
        """Check the settings (`options`: the fast paths `compile` will be given), claim the run
        folder and load the data: whatever a run refuses, it refuses here, before a teacher is
        pre-trained or a step compiled."""
        from dclang.compile import ENGINES

        if graph.graph["sites"]:
            raise UserError(f"`{graph.graph['name']}` is a search template (open choices: "
                            + ", ".join(s.name for s in graph.graph["sites"]) + ")", "train it with `dclang search`")
        if engine not in ENGINES:
            raise UserError(f"unknown engine `{engine}`", "use " + " or ".join(ENGINES))
        torch_device = resolve_device(dist.device if dist else device)
        check_options(options, torch_device)
        train_spec = graph.graph["train"]
        seed = train_spec.seed if seed is None else seed
        epochs = train_spec.epochs if epochs is None else epochs
        if epochs < 1:
            raise UserError(f"epochs must be at least 1, got {epochs}")
        g = resolved_graph(graph, epochs=epochs, seed=seed)
        rundir = RunDir(run_dir) if run_dir is not None else None
        if dist is not None:
            rundir = dist.rank_zero(rundir)
        fresh = rundir is not None and rundir.fresh()
        made = rundir is not None and not rundir.root.exists()
        if rundir is not None:
            rundir.claim(g.graph["name"])  # rank 0 alone, under torchrun
        try:
            if dataset is None:
                dataset = _load_dataset(g.graph["data"], data_dir)
            run = cls(g, graph_text(g), dataset, rundir, torch_device, dist, engine, seed, epochs,
                      progress and (dist is None or dist.is_main), data_dir)
            if run.batch > len(dataset.train):
                raise UserError(f"batch = {run.batch} is larger than the training split ({len(dataset.train)} "
                                f"images of {dataset.name}): every epoch would be a single step",
                                "lower `batch` in the train block (or --set train.batch=N), or train on more "
                                "images (a smaller val_split)")
            _check_crd(g, len(dataset.train), options, dist)
        except BaseException:  # refused before any work: a folder this run made is taken away again
            if fresh:
                rundir.abandon(made=made)
            raise
        if len(dataset.val) == 0:
            say("warning: the validation split is empty (val_split = 0), so best.pt is the last epoch; "
                "test accuracy is never used to select")
        return run

    @property
    def target(self) -> str:
        return self.graph.graph["target"]

    @property
    def names(self) -> list[str]:
        return model_nodes(self.graph)

    @property
    def batch(self) -> int:
        return self.graph.graph["train"].batch

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.dataset.train) // self.batch)

    def initial_states(self, cache: Path | None) -> dict:
        """The frozen teachers' weights (cached, or pre-trained now by `train_graph` on this
        run's data) and every `init` checkpoint, by node (`teachers.init_states`)."""
        from dclang.train.loop import train_graph

        pretrain = partial(train_graph, device=str(self.device), engine=self.engine, data_dir=self.data_dir,
                           progress=self.progress, dataset=self.dataset)
        return init_states(self.graph, dataset=self.dataset, cache=cache, pretrain=pretrain)

    def compile(self, states: dict | None, options=None, *, member: bool = False, autotune: bool = False):
        """The seeded step (`compile_graph` with `options`), and the splits on the device.
        `member`: a step that an engine over several runs updates (it builds no optimizer).
        `autotune`: on CUDA, alone (fused engine, not under torchrun), the options are measured
        first on the run's first batches (`dclang.compile.autotune`, which says what it chose);
        of `options` only the precision counts then, and only when given (`options` not None)."""
        from dclang.compile import autotune as tuning
        from dclang.compile import compile_graph

        seed_everything(self.seed)
        dataset = self.dataset
        self.train, self.val, self.test = (s.to(self.device) for s in (dataset.train, dataset.val, dataset.test))
        self.augment = batch_augment(self.graph.graph["data"], dataset)
        build = partial(compile_graph, self.graph, num_classes=dataset.num_classes, in_channels=dataset.channels,
                        image_size=dataset.image_size, device=self.device, engine=self.engine,
                        init_states=states, seed=self.seed, steps_per_epoch=self.steps_per_epoch,
                        epochs=self.epochs, member=member, train_size=len(self.train))
        if (autotune and not member and self.engine == "fused" and self.dist is None
                and tuning.applies(self.device)):
            tuned = tuning.autotune(self.graph, lambda o: build(options=o), self._first_batches(),
                                    device=self.device, precision=options.precision if options else None)
            options = tuned.options
            if self.progress:
                say(tuned.line())
        step = build(options=options)
        self.label = step.label
        if self.dist is not None:  # each process trains on its slice of every batch
            step = self.dist.wrap(step, train_size=len(self.train), batch=self.batch)
        self.step = step
        self.evaluation = EpochEvaluation(step, self.graph, val=self.val, test=self.test, mean=dataset.mean,
                                          std=dataset.std, epochs=self.epochs, batch=self.batch)
        return step

    def batches(self, epoch: int, *, indices: bool = False) -> Iterator[tuple]:
        """The epoch's (augmented images, labels, k), k the 1-based update number, in the run's
        seeded order: drawn from a generator of the run's seed and the epoch alone, so whoever
        steps them (`train_graph` for one run, a packed worker for several) sees the same batches.
        With `indices` (the step's `needs_indices`: `crd`), each tuple ends with the samples'
        positions in the training split. A graph with networks on their own view
        (`[view=own]`) gets each batch as its tuple of views (`own_views`)."""
        from dclang.data.batches import BatchIterator, epoch_generator

        generator = epoch_generator(self.seed, epoch, self.device)
        views = own_views(self.graph, self.augment, seed=self.seed, epoch=epoch, shared=generator, device=self.device)
        for i, (images, labels, index) in enumerate(BatchIterator(self.train, self.batch, generator).indexed()):
            k = (epoch - 1) * self.steps_per_epoch + i + 1
            yield (views(images), labels, k) + ((index,) if indices else ())

    def _first_batches(self, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to `n` full batches of the first epoch, augmented, from a generator of their own
        (the epoch's batches are drawn again, the same, from a new one): what autotune times on."""
        from dclang.data.batches import BatchIterator, epoch_generator

        generator = epoch_generator(self.seed, 1, self.device)
        batches = []
        for images, labels in BatchIterator(self.train, self.batch, generator, drop_last=True):
            batches.append((self.augment(images, generator), labels))
            if len(batches) == n:
                break
        return batches

    def end_epoch(self, epoch: int, read: tuple[dict, dict], *, lr: float, started: float) -> dict:
        """After an epoch's steps: stop on a non-finite loss, advance the schedule, evaluate what
        selection needs (`self.evaluation`); the epoch's record. `read` is the epoch's
        statistics (`EpochStats.read`)."""
        means, first_bad = read
        train_seconds = time.perf_counter() - started
        check_finite(first_bad, epoch)
        self.step.end_epoch()
        figures = self.evaluation.after_epoch(epoch)
        return epoch_record(epoch, lr, means, reported_nodes(self.graph), figures, time.perf_counter() - started,
                            train_seconds)


def own_views(graph: nx.DiGraph, augment, *, seed: int, epoch: int, shared: torch.Generator, device):
    """The function from a batch's uint8 images to what the step reads: the shared augmented
    batch, from the epoch's generator `shared` (after its permutation), as before views
    existed, when every network reads it; else the tuple of views `dclang.views` lays out,
    each own view from its node's generator of (seed, epoch, node) (`views.own_generator`).
    Only the views some network reads are computed."""
    from dclang.views import SHARED, own_generator, view_keys

    keys = view_keys(graph)
    if keys == (SHARED,):
        return lambda images: augment(images, shared)
    generators = [shared if key == SHARED else own_generator(seed, epoch, key, device) for key in keys]
    return lambda images: tuple(augment(images, g) for g in generators)


def _check_crd(graph: nx.DiGraph, train_size: int, options, dist) -> None:
    """`crd` edges the run could not train, refused before any work (`crd.check_crd`: too many
    negatives, a fast path that cannot pass the batch's positions), and under torchrun, where
    each process would keep a memory bank of its own."""
    from dclang.compile import StepOptions
    from dclang.crd import check_crd
    from dclang.ir import live_edges

    crd = [e.key for e in live_edges(graph) if e.loss == "crd"]
    if crd and dist is not None:
        raise UserError(f"`crd` edges ({', '.join(crd)}) do not train data-parallel: each process would keep a "
                        "memory bank of its own", "train the graph in one process (without torchrun)")
    if crd:
        check_crd(graph, train_size=train_size, options=options or StepOptions())


def _load_dataset(data_spec, data_dir: str | None):
    from dclang.data import DataError, load_dataset

    try:
        return load_dataset(data_spec.dataset, data_dir=data_dir, val_split=data_spec.val_split,
                            split_seed=data_spec.split_seed, path=data_spec.path)
    except DataError as exc:
        raise UserError(str(exc)) from exc


__all__ = ["AUGMENTS", "Run", "batch_augment", "check_options", "resolve_device", "resolved_graph",
           "seed_everything"]
