"""The training loop: data on the device, one compiled step per batch, evaluation every epoch.

    >>> result = train_graph(dclang.load("examples/quickstart.kt"), run_dir=Path("runs/quickstart"))
    >>> result.summary["nodes"]["student"]["test_at_best_val"]

Each epoch: a permutation and the batch augmentation drawn from one generator seeded with
(seed, epoch), so a resumed run sees the batches the uninterrupted run saw; one
`TrainStep.step` per batch with statistics summed on the device; one host sync to read them;
then the evaluation selection needs (`dclang.train.evaluate`: val every epoch, test for the
weights val selects, constant nodes once). Val alone selects (`best.pt` is the
epoch of the target's best val accuracy); test is reported, never used to choose anything.

`train_graph` reads as the run goes: prepare (check the settings, claim the run folder,
load the data: everything that can be refused is refused before any work), find the
checkpoint to resume, the teachers' weights, compile, restore, then per epoch train,
evaluate and write. Preparing, compiling, the epoch's batches and its end are the public
`dclang.train.run.Run`'s, which a packed search worker drives too; this module adds the
run folder (resume, checkpoints, metrics, summary) and the progress bar. Teachers are
pre-trained by `train_graph` itself, handed to `teachers.init_states` as its `pretrain`:
the teacher cache never imports the loop.
"""

from __future__ import annotations

import contextlib
import platform
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dclang.checkpoints import node_checkpoint
from dclang.diagnostics import UserError
from dclang.ema import ema_text
from dclang.ir import reported_nodes
from dclang.models.branch import standalone_state
from dclang.train.metrics import EpochStats, accuracy_table, best_epoch, percent, say
from dclang.train.run import Run
from dclang.train.rundir import RunDir, setting_changes


@dataclass
class RunResult:
    """What a run returns: `summary` (as in summary.json) and `records` (metrics.jsonl)."""

    summary: dict
    records: list[dict]



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


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def train_graph(graph: nx.DiGraph, *, run_dir: Path | None, device: str = "auto", engine: str = "fused",
                seed: int | None = None, epochs: int | None = None, data_dir: str | None = None,
                resume: bool = False, on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
                teacher_cache: Path | None = None, dataset=None, options=None, autotune: bool = False) -> RunResult:
    """Train a checked, concrete graph; write the run directory when `run_dir` is given.

    `seed` and `epochs` override the train block (the linear gate's k_end and the schedule
    follow the overridden epochs). `dataset` is an already loaded `Dataset` for this graph's
    data settings (search loads one per process). `on_epoch(epoch, record)` runs after each
    epoch's files are written; whatever it raises (optuna's TrialPruned) propagates, leaving
    a run directory that `resume=True` continues. User mistakes raise `UserError`.
    `options` (`dclang.compile.StepOptions`) picks the fused engine's fast paths; None is plain.
    With `autotune`, a run alone on CUDA times the candidate options on its first batches and
    takes the fastest (`dclang.compile.autotune`), saying so; of `options` only the precision
    counts then, and only when given (`options` not None).

    Started by torchrun (WORLD_SIZE > 1), it trains data-parallel: see `dclang.train.distributed`.
    """
    from dclang.train import distributed

    dist = distributed.setup(device)  # this process's rank under torchrun; None alone (and for teachers)
    try:
        run = Run.prepare(graph, dist=dist, run_dir=run_dir, device=device, engine=engine, seed=seed,
                          epochs=epochs, data_dir=data_dir, dataset=dataset, progress=progress, options=options)
        checkpoint, records = _to_resume(run, resume)
        # A resumed run's checkpoint holds every model, teachers included: no need to load them.
        states = None if checkpoint else run.initial_states(teacher_cache)
        with _training_mode(run):
            run.compile(states, options, autotune=autotune)
            best_val = _restore(run, checkpoint, records)
            for epoch in range(len(records) + 1, run.epochs + 1):
                records.append(_train_epoch(run, epoch))
                best_val = _write_epoch(run, records, best_val)
                if on_epoch is not None:
                    on_epoch(epoch, records[-1])
    finally:
        distributed.release(dist)
        if run_dir is not None:
            RunDir(run_dir).release()  # the folder's lock (`RunDir.claim`): free at once for the next run
    result = RunResult(_summary(run, records), records)
    if run.progress:
        print(accuracy_table(result.summary), flush=True)
    return result


def _to_resume(run: Run, resume: bool) -> tuple[dict | None, list[dict]]:
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
def _training_mode(run: Run) -> Iterator[None]:
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


def _restore(run: Run, checkpoint: dict | None, records: list[dict]) -> float | None:
    """Load the checkpoint's models, optimizers and RNG states into the compiled step; write
    graph.kt and metrics.jsonl (`records`: cut back to the checkpoint). Returns the best val
    so far."""
    best_val = None
    if checkpoint is not None:
        try:
            run.step.load_state_dict(checkpoint["train_step"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"cannot resume from {run.rundir.last}: {str(exc).splitlines()[0]}",
                            f"resume with the same --engine, or delete {run.rundir.root} to start afresh") from exc
        _set_rng_state(checkpoint["rng"], run.device)
        best_val = checkpoint["best_val"]
    run.evaluation.restore(records)  # what the epochs done measured: evaluated again by none
    if run.rundir is not None:
        run.rundir.write_graph(run.graph, run.text)
        run.rundir.write_metrics(records)
    return best_val


def _train_epoch(run: Run, epoch: int) -> dict:
    """One epoch: the seeded batches through the step, then val and test; its record."""
    steps = _epoch_steps(run, epoch)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _epoch_steps(run: Run, epoch: int) -> Generator[None, None, dict]:
    """`_train_epoch` a step at a time: yields after each step and returns the epoch's record
    (after val and test) once the batches are done."""
    started = time.perf_counter()
    step = run.step
    lr = step.lr()
    stats, shown = EpochStats(), time.monotonic()
    show_bar = run.progress and sys.stderr.isatty()
    with _bar(run.steps_per_epoch, f"epoch {epoch}/{run.epochs}", show_bar) as bar:
        for images, labels, k, *indices in run.batches(epoch, indices=step.needs_indices):
            stats.add(step.step(images, labels, k, *indices), len(labels), k)
            yield
            bar.update()
            if show_bar and time.monotonic() - shown > 0.5:  # the postfix reads the device: not every step
                bar.set_postfix_str(_postfix(stats, run.target), refresh=False)
                shown = time.monotonic()
    return run.end_epoch(epoch, stats.read(), lr=lr, started=started)


def _write_epoch(run: Run, records: list[dict], best_val: float | None) -> float | None:
    """The epoch's files (metrics, summary, best.pt when the target's val improved, last.pt
    last: the commit point) and its progress line. Returns the best val so far."""
    record = records[-1]
    epoch, val = record["epoch"], record["nodes"][run.target]["val_acc"]
    improved = val is None or best_val is None or val > best_val
    if improved:
        best_val = val
    rundir, step, classes = run.rundir, run.step, run.dataset.num_classes
    if rundir is not None:
        rundir.write_metrics(records)
        rundir.write_summary(_summary(run, records))
        if improved:
            best = {"graph": run.text, "epoch": epoch, "target": run.target, "val_acc": best_val,
                    "nodes": {n: node_checkpoint(run.graph.nodes[n]["spec"].model, classes,
                                                 standalone_state(step.models[n])) for n in run.names}}
            if step.ensemble_weights:  # a learned ensemble's w beside its members (dclang.learned_ensembles)
                best["ensembles"] = {n: w.state_dict() for n, w in step.ensemble_weights.items()}
            rundir.save_best(best)
        rundir.save_last({"graph": run.text, "epoch": epoch, "train_step": step.state_dict(),
                          "rng": _rng_state(run.device), "best_val": best_val})
    if run.progress:
        say(_epoch_line(record, run.epochs, run.target))
    return best_val


def _params(step, name: str) -> int:
    """A node's parameter count: a network's, a learned ensemble's w (one per member), else 0."""
    module = step.models[name] if name in step.models else step.ensemble_weights.get(name)
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _summary(run: Run, records: list[dict]) -> dict:
    """summary.json, derived from the records alone (plus constants), so a resumed run's
    summary is the one an uninterrupted run would have written."""
    import dclang
    from dclang.compile.tf32 import tf32_enabled

    graph, dataset, step, epochs, target = run.graph, run.dataset, run.step, run.epochs, run.target
    nodes = {}
    for name in reported_nodes(graph):  # networks, then ensembles (none but a learned one's w)
        spec = graph.nodes[name]["spec"]
        last = records[-1]["nodes"][name] if records else {}
        best = best_epoch(records, name)
        nodes[name] = {
            "model": f"ensemble({', '.join(spec.model)})" if spec.is_ensemble else ema_text(spec) if spec.is_ema
            else spec.model, "frozen": spec.frozen,
            "params": _params(step, name),
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
        "seed": run.seed, "device": _describe(run.device), "engine": run.engine, "step": run.label,
        "tf32": tf32_enabled() if run.device.type == "cuda" else None,  # the CPU never uses it
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
