"""The training loop: data on the device, one compiled step per batch, evaluation every epoch.

    >>> result = train_graph(dclang.load("examples/quickstart.kt"), run_dir=Path("runs/quickstart"))
    >>> result.summary["nodes"]["student"]["test_at_best_val"]

Each epoch: a permutation and the batch augmentation drawn from one generator seeded with
(seed, epoch), so a resumed run sees the batches the uninterrupted run saw; one
`TrainStep.step` per batch with statistics summed on the device; one host sync to read them;
then every model node is evaluated on val and test. Val alone selects (`best.pt` is the
epoch of the target's best val accuracy); test is reported, never used to choose anything.

`train_graph` reads as the run goes: prepare (check the settings, claim the run folder,
load the data: everything that can be refused is refused before any work), find the
checkpoint to resume, the teachers' weights, compile, restore, then per epoch train,
evaluate and write. Teachers are pre-trained by `train_graph` itself, handed to
`teachers.init_states` as its `pretrain`: this module imports the teacher cache, not the
other way round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dclang.checkpoints import node_checkpoint
from dclang.diagnostics import UserError
from dclang.ir import model_nodes, reported_nodes
from dclang.train.metrics import EpochStats, accuracy_table, best_epoch, check_finite, epoch_record, percent, say
from dclang.train.rundir import RunDir, graph_text, setting_changes
from dclang.train.teachers import init_states

#: images normalised and evaluated at a time: bounds the float copy of val/test on the device
EVAL_CHUNK = 1024

#: the augmentation a dataset gets when its data block names none: the paper's for natural
#: images, no flip for digits (a mirrored digit is another shape), none for the user's own data
DEFAULT_AUGMENT = {"digits": "pad_crop", "cifar10": "pad_crop_flip", "cifar100": "pad_crop_flip",
                   "tinyimagenet": "pad_crop_flip"}

#: augment name -> (random crop, random flip)
_AUGMENTS = {"pad_crop_flip": (True, True), "pad_crop": (True, False), "flip": (False, True), "none": (False, False)}


@dataclass
class RunResult:
    """What a run returns: `summary` (as in summary.json) and `records` (metrics.jsonl)."""

    summary: dict
    records: list[dict]


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def _rng_state(device: torch.device) -> dict:
    """Global RNG states in types `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


@dataclass
class _Run:
    """What a run settled before training: its resolved graph (and canonical text), data,
    run folder, device and the process group under torchrun."""

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


@dataclass
class _Training:
    """The compiled step and the splits on the device."""

    step: object
    label: str  # what runs, fast paths named (summary.json's `step`)
    train: object
    val: object
    test: object
    augment: object


def train_graph(graph: nx.DiGraph, *, run_dir: Path | None, device: str = "auto", engine: str = "fused",
                seed: int | None = None, epochs: int | None = None, data_dir: str | None = None,
                resume: bool = False, on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
                teacher_cache: Path | None = None, dataset=None, options=None) -> RunResult:
    """Train a checked, concrete graph; write the run directory when `run_dir` is given.

    `seed` and `epochs` override the train block (the linear gate's k_end and the schedule
    follow the overridden epochs). `dataset` is an already loaded `Dataset` for this graph's
    data settings (search loads one per process). `on_epoch(epoch, record)` runs after each
    epoch's files are written; whatever it raises (optuna's TrialPruned) propagates, leaving
    a run directory that `resume=True` continues. User mistakes raise `UserError`.
    `options` (`dclang.compile.StepOptions`) picks the fused engine's fast paths; None is plain.

    Started by torchrun (WORLD_SIZE > 1), it trains data-parallel: see `dclang.train.distributed`.
    """
    from dclang.train import distributed

    dist = distributed.setup(device)  # this process's rank under torchrun; None alone (and for teachers)
    try:
        run = _prepare(graph, dist=dist, run_dir=run_dir, device=device, engine=engine, seed=seed, epochs=epochs,
                       data_dir=data_dir, dataset=dataset, progress=progress)
        checkpoint, records = _to_resume(run, resume)
        # A resumed run's checkpoint holds every model, teachers included: no need to load them.
        pretrain = partial(train_graph, device=device, engine=engine, data_dir=data_dir, progress=run.progress,
                           dataset=run.dataset)
        states = None if checkpoint else init_states(run.graph, dataset=run.dataset, cache=teacher_cache,
                                                     pretrain=pretrain)
        with _training_mode(run):
            training = _compile(run, states, options)
            best_val = _restore(run, training, checkpoint, records)
            for epoch in range(len(records) + 1, run.epochs + 1):
                records.append(_train_epoch(run, training, epoch))
                best_val = _write_epoch(run, training, records, best_val)
                if on_epoch is not None:
                    on_epoch(epoch, records[-1])
    finally:
        distributed.release(dist)
    result = RunResult(_summary(run, training, records), records)
    if run.progress:
        print(accuracy_table(result.summary), flush=True)
    return result


def _prepare(graph: nx.DiGraph, *, dist, run_dir: Path | None, device: str, engine: str, seed: int | None,
             epochs: int | None, data_dir: str | None, dataset, progress: bool) -> _Run:
    """Check the settings, claim the run folder and load the data: whatever a run refuses,
    it refuses here, before a teacher is pre-trained or a step compiled."""
    from dclang.compile import ENGINES

    if graph.graph["sites"]:
        raise UserError(f"`{graph.graph['name']}` is a search template (open choices: "
                        + ", ".join(s.name for s in graph.graph["sites"]) + ")", "train it with `dclang search`")
    if engine not in ENGINES:
        raise UserError(f"unknown engine `{engine}`", "use " + " or ".join(ENGINES))
    torch_device = resolve_device(dist.device if dist else device)
    train_spec = graph.graph["train"]
    seed = train_spec.seed if seed is None else seed
    epochs = train_spec.epochs if epochs is None else epochs
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    g = resolved_graph(graph, epochs=epochs, seed=seed)
    rundir = RunDir(run_dir) if run_dir is not None else None
    if dist is not None:
        rundir = dist.rank_zero(rundir)
    if rundir is not None:
        rundir.claim(g.graph["name"])  # rank 0 alone, under torchrun
    if dataset is None:
        dataset = _load_dataset(g.graph["data"], data_dir)
    run = _Run(g, graph_text(g), dataset, rundir, torch_device, dist, engine, seed, epochs,
               progress and (dist is None or dist.is_main))
    if run.batch > len(dataset.train):
        raise UserError(f"batch = {run.batch} is larger than the training split ({len(dataset.train)} images of "
                        f"{dataset.name}): every epoch would be a single step",
                        "lower `batch` in the train block (or --set train.batch=N), or train on more images "
                        "(a smaller val_split)")
    if len(dataset.val) == 0:
        say("warning: the validation split is empty (val_split = 0), so best.pt is the last epoch; "
            "test accuracy is never used to select")
    return run


def _load_dataset(data_spec, data_dir: str | None):
    from dclang.data import DataError, load_dataset

    try:
        return load_dataset(data_spec.dataset, data_dir=data_dir, val_split=data_spec.val_split,
                            split_seed=data_spec.split_seed, path=data_spec.path)
    except DataError as exc:
        raise UserError(str(exc)) from exc


def _to_resume(run: _Run, resume: bool) -> tuple[dict | None, list[dict]]:
    """(last.pt, the metrics up to its epoch) of the run to continue, or (None, []) to start
    one; every file read back is checked, and a run that differs says which settings do."""
    rundir = run.rundir
    if rundir is None:
        return None, []
    if not rundir.last.is_file():
        if resume:
            say(f"nothing to resume in {rundir.root} (no checkpoints/last.pt): starting the run")
        return None, []
    if not resume:
        raise UserError(f"{rundir.root} already holds a run", f"pass --resume to continue it, or choose "
                        f"another output folder (-o), or delete {rundir.root}")
    checkpoint = rundir.load_last()
    if checkpoint.get("graph") != run.text:
        changes = setting_changes(checkpoint.get("graph"), run.text)
        raise UserError(f"cannot resume {rundir.root}: it was trained with other settings ("
                        + ("; ".join(changes) if changes else f"another graph, see {rundir.graph_kt}") + ")",
                        "resume with the same file, --set, --epochs and --seed, or start a new run folder (-o)")
    done = checkpoint["epoch"]
    records = rundir.read_metrics()
    if len(records) < done:
        raise UserError(f"{rundir.metrics} holds {len(records)} epoch record(s), but {rundir.last} is at epoch "
                        f"{done}", f"it was changed after dclang wrote it; delete {rundir.root} to start afresh")
    if done >= run.epochs:
        say(f"the run in {rundir.root} is already complete ({done} of {run.epochs} epochs): nothing to train")
    else:
        say(f"resuming the run in {rundir.root} from epoch {done + 1} of {run.epochs} (epochs 1-{done} are done)")
    return checkpoint, records[:done]


@contextlib.contextmanager
def _training_mode(run: _Run) -> Iterator[None]:
    """Deterministic algorithms on the CPU (the previous setting restored after), and a CUDA
    out-of-memory error as a UserError saying what to lower."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(run.device.type == "cpu")
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(f"CUDA ran out of memory on {_describe(run.device)} training `{run.graph.graph['name']}`",
                        "lower `batch` in the train block (or --set train.batch=N), or use --device cpu") from exc
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _compile(run: _Run, states: dict | None, options) -> _Training:
    """The seeded step, and the splits on the device."""
    from dclang.compile import compile_graph
    from dclang.data import BatchAugment

    seed_everything(run.seed)
    dataset = run.dataset
    train, val, test = (s.to(run.device) for s in (dataset.train, dataset.val, dataset.test))
    data = run.graph.graph["data"]
    crop, flip = _AUGMENTS[data.augment]
    augment = BatchAugment(data.pad, crop, flip, dataset.mean, dataset.std)
    step = compile_graph(run.graph, num_classes=dataset.num_classes, in_channels=dataset.channels,
                         image_size=dataset.image_size, device=run.device, engine=run.engine, init_states=states,
                         seed=run.seed, steps_per_epoch=run.steps_per_epoch, epochs=run.epochs, options=options,
                         train_size=len(train))
    label = step.label
    if run.dist is not None and step.needs_indices:
        raise UserError("a `crd` edge does not train data-parallel yet: its memory bank would differ between "
                        "the processes", "train it in one process")
    if run.dist is not None:  # each process trains on its slice of every batch
        step = run.dist.wrap(step, train_size=len(train), batch=run.batch)
    return _Training(step, label, train, val, test, augment)


def _restore(run: _Run, training: _Training, checkpoint: dict | None, records: list[dict]) -> float | None:
    """Load the checkpoint's models, optimizers and RNG states into the compiled step; write
    graph.kt and metrics.jsonl (`records`: cut back to the checkpoint). Returns the best val
    so far."""
    best_val = None
    if checkpoint is not None:
        try:
            training.step.load_state_dict(checkpoint["train_step"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"cannot resume from {run.rundir.last}: {str(exc).splitlines()[0]}",
                            f"resume with the same --engine, or delete {run.rundir.root} to start afresh") from exc
        _set_rng_state(checkpoint["rng"], run.device)
        best_val = checkpoint["best_val"]
    if run.rundir is not None:
        run.rundir.write_graph(run.graph, run.text)
        run.rundir.write_metrics(records)
    return best_val


def _train_epoch(run: _Run, training: _Training, epoch: int) -> dict:
    """One epoch: the seeded batches through the step, then val and test; its record."""
    steps = _epoch_steps(run, training, epoch)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _epoch_steps(run: _Run, training: _Training, epoch: int) -> Generator[None, None, dict]:
    """`_train_epoch` a step at a time: yields after each step and returns the epoch's record
    (after val and test) once the batches are done."""
    started = time.perf_counter()
    step = training.step
    lr = step.lr()
    stats, shown = EpochStats(), time.monotonic()
    show_bar = run.progress and sys.stderr.isatty()
    with _bar(run.steps_per_epoch, f"epoch {epoch}/{run.epochs}", show_bar) as bar:
        for images, labels, k, *indices in epoch_batches(run, training, epoch, indices=step.needs_indices):
            stats.add(step.step(images, labels, k, *indices), len(labels), k)
            yield
            bar.update()
            if show_bar and time.monotonic() - shown > 0.5:  # the postfix reads the device: not every step
                bar.set_postfix_str(_postfix(stats, run.target), refresh=False)
                shown = time.monotonic()
    return end_epoch(run, training, epoch, stats.read(), lr=lr, started=started)


def epoch_batches(run: _Run, training: _Training, epoch: int, *, indices: bool = False) -> Iterator[tuple]:
    """The epoch's (augmented images, labels, k), k the 1-based update number, in the run's
    seeded order: drawn from a generator of the run's seed and the epoch alone, so whoever
    steps them (`_epoch_steps` for one run, a packed worker for several) sees the same batches.
    With `indices`, each tuple ends with the samples' positions in the training split (`crd`)."""
    from dclang.data.batches import BatchIterator, epoch_generator

    generator = epoch_generator(run.seed, epoch, run.device)
    for i, (images, labels, index) in enumerate(BatchIterator(training.train, run.batch, generator).indexed()):
        k = (epoch - 1) * run.steps_per_epoch + i + 1
        yield (training.augment(images, generator), labels, k) + ((index,) if indices else ())


def end_epoch(run: _Run, training: _Training, epoch: int, read: tuple[dict, dict], *, lr: float,
              started: float) -> dict:
    """After an epoch's steps: stop on a non-finite loss, advance the schedule, evaluate val and
    test; the epoch's record. `read` is the epoch's statistics (`EpochStats.read`)."""
    means, first_bad = read
    train_seconds = time.perf_counter() - started
    check_finite(first_bad, epoch)
    training.step.end_epoch()
    mean, std = run.dataset.mean, run.dataset.std
    val_acc, val_loss = _evaluate(training.step, training.val, mean, std, with_loss=True)
    test_acc, _ = _evaluate(training.step, training.test, mean, std)
    return epoch_record(epoch, lr, means, reported_nodes(run.graph), val_acc, test_acc, time.perf_counter() - started,
                        train_seconds, val_loss=val_loss)


def _write_epoch(run: _Run, training: _Training, records: list[dict], best_val: float | None) -> float | None:
    """The epoch's files (metrics, summary, best.pt when the target's val improved, last.pt
    last: the commit point) and its progress line. Returns the best val so far."""
    record = records[-1]
    epoch, val = record["epoch"], record["nodes"][run.target]["val_acc"]
    improved = val is None or best_val is None or val > best_val
    if improved:
        best_val = val
    rundir, step, classes = run.rundir, training.step, run.dataset.num_classes
    if rundir is not None:
        rundir.write_metrics(records)
        rundir.write_summary(_summary(run, training, records))
        if improved:
            rundir.save_best({"graph": run.text, "epoch": epoch, "target": run.target, "val_acc": best_val,
                              "nodes": {n: node_checkpoint(run.graph.nodes[n]["spec"].model, classes,
                                                           step.models[n].state_dict()) for n in run.names}})
        rundir.save_last({"graph": run.text, "epoch": epoch, "train_step": step.state_dict(),
                          "rng": _rng_state(run.device), "best_val": best_val})
    if run.progress:
        say(_epoch_line(record, run.epochs, run.target))
    return best_val


def _evaluate(step, split, mean, std, *, with_loss: bool = False) -> tuple[dict[str, float] | None,
                                                                             dict[str, float] | None]:
    """(accuracy, mean cross-entropy) of every node on `split`, both None when the split is
    empty, the loss None unless asked for; one host sync."""
    from dclang.data import normalize

    if len(split) == 0:
        return None, None
    totals: dict[str, torch.Tensor] = {}
    loss_sums: dict[str, torch.Tensor] | None = {} if with_loss else None
    for start in range(0, len(split), EVAL_CHUNK):
        images = normalize(split.images[start:start + EVAL_CHUNK], mean, std)
        counts = step.evaluate(images, split.labels[start:start + EVAL_CHUNK], EVAL_CHUNK, loss_sums)
        totals = {n: totals[n] + c for n, c in counts.items()} if totals else counts
    names = list(totals)
    values = torch.stack([totals[n].double() for n in names] + [loss_sums[n] for n in names if with_loss]).tolist()
    accuracy = dict(zip(names, (v / len(split) for v in values[:len(names)])))
    loss = dict(zip(names, (v / len(split) for v in values[len(names):]))) if with_loss else None
    return accuracy, loss


def _summary(run: _Run, training: _Training, records: list[dict]) -> dict:
    """summary.json, derived from the records alone (plus constants), so a resumed run's
    summary is the one an uninterrupted run would have written."""
    import dclang

    graph, dataset, step, epochs, target = run.graph, run.dataset, training.step, run.epochs, run.target
    nodes = {}
    for name in reported_nodes(graph):  # networks, then ensembles (no parameters of their own)
        spec = graph.nodes[name]["spec"]
        last = records[-1]["nodes"][name] if records else {}
        best = best_epoch(records, name)
        nodes[name] = {
            "model": f"ensemble({', '.join(spec.model)})" if spec.is_ensemble else spec.model, "frozen": spec.frozen,
            "params": sum(p.numel() for p in step.models[name].parameters()) if name in step.models else 0,
            "final_val_acc": last.get("val_acc"), "final_test_acc": last.get("test_acc"),
            "best_val_epoch": best["epoch"] if best else None,
            "best_val_acc": best["nodes"][name]["val_acc"] if best else None,
            "test_at_best_val": best["nodes"][name]["test_acc"] if best else None,
        }
    train_seconds = sum(r["train_seconds"] for r in records)
    steps = run.steps_per_epoch * len(records)
    return {
        "graph": graph.graph["name"], "target": target,
        "epochs": epochs, "epochs_done": len(records), "complete": len(records) == epochs,
        "best_epoch": nodes[target]["best_val_epoch"] if len(dataset.val) else (len(records) or None),
        "selected_on": "val" if len(dataset.val) else "last epoch (empty validation split)",
        "nodes": nodes,
        "wall_seconds": sum(r["seconds"] for r in records), "train_seconds": train_seconds,
        "steps": steps, "steps_per_second": steps / train_seconds if train_seconds else None,
        "seed": run.seed, "device": _describe(run.device), "engine": run.engine, "step": training.label,
        "versions": {"dclang": dclang.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "dataset": {"name": dataset.name, "train": len(dataset.train), "val": len(dataset.val),
                    "test": len(dataset.test), "num_classes": dataset.num_classes, "channels": dataset.channels,
                    "image_size": dataset.image_size},
    }


def _postfix(stats: EpochStats, target: str) -> str:
    """Per-node running loss and accuracy for the progress bar (one host sync)."""
    means, _ = stats.read()
    parts = []
    for (field, name), value in means.items():
        if field == "node_correct":
            loss = means.get(("node_loss", name))
            star = "*" if name == target else ""
            parts.append(f"{name}{star} " + (f"{loss:.3f}/" if loss is not None else "") + f"{100 * value:.1f}%")
    return " ".join(parts)


def _epoch_line(record: dict, epochs: int, target: str) -> str:
    nodes = " | ".join(f"{n}{'*' if n == target else ''} val {percent(r['val_acc'])} test {percent(r['test_acc'])}"
                       for n, r in record["nodes"].items())
    return f"epoch {record['epoch']}/{epochs}  {nodes}  ({record['seconds']:.1f}s)"


def _bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, unit="step", dynamic_ncols=True)
