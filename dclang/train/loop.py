"""The training loop: data on the device, one compiled step per batch, evaluation every epoch.

    >>> result = train_graph(dclang.load("examples/quickstart.kt"), run_dir=Path("runs/quickstart"))
    >>> result.summary["nodes"]["student"]["test_at_best_val"]

Each epoch: a permutation and the batch augmentation drawn from one generator seeded with
(seed, epoch), so a resumed run sees the batches the uninterrupted run saw; one
`TrainStep.step` per batch with statistics summed on the device; one host sync to read them;
then every model node is evaluated on val and test. Val alone selects (`best.pt` is the
epoch of the target's best val accuracy); test is reported, never used to choose anything.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from dclang.checkpoints import node_checkpoint
from dclang.diagnostics import UserError
from dclang.ir import model_nodes, reported_nodes
from dclang.train.metrics import EpochStats, accuracy_table, best_epoch, check_finite, epoch_record, percent, say
from dclang.train.rundir import RunDir, graph_text

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


def _evaluate(step, split, mean, std) -> dict[str, float] | None:
    """Accuracy of every model node on `split` (None when the split is empty); one host sync."""
    from dclang.data import normalize

    if len(split) == 0:
        return None
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, len(split), EVAL_CHUNK):
        images = normalize(split.images[start:start + EVAL_CHUNK], mean, std)
        counts = step.evaluate(images, split.labels[start:start + EVAL_CHUNK], EVAL_CHUNK)
        totals = {n: totals[n] + c for n, c in counts.items()} if totals else counts
    names = list(totals)
    return dict(zip(names, (c / len(split) for c in torch.stack([totals[n] for n in names]).tolist())))


def _summary(graph: nx.DiGraph, records: list[dict], *, step, dataset, seed: int, device: torch.device,
             engine: str, executed: str, epochs: int, steps_per_epoch: int) -> dict:
    """summary.json, derived from the records alone (plus constants), so a resumed run's
    summary is the one an uninterrupted run would have written."""
    import dclang

    target = graph.graph["target"]
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
    steps = steps_per_epoch * len(records)
    return {
        "graph": graph.graph["name"], "target": target,
        "epochs": epochs, "epochs_done": len(records), "complete": len(records) == epochs,
        "best_epoch": nodes[target]["best_val_epoch"] if len(dataset.val) else (len(records) or None),
        "selected_on": "val" if len(dataset.val) else "last epoch (empty validation split)",
        "nodes": nodes,
        "wall_seconds": sum(r["seconds"] for r in records), "train_seconds": train_seconds,
        "steps": steps, "steps_per_second": steps / train_seconds if train_seconds else None,
        "seed": seed, "device": _describe(device), "engine": engine, "step": executed,
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
    from dclang.compile import ENGINES, compile_graph
    from dclang.data import BatchAugment, DataError, load_dataset
    from dclang.data.batches import BatchIterator, epoch_generator
    from dclang.train import distributed
    from dclang.train.teachers import init_states

    if graph.graph["sites"]:
        raise UserError(f"`{graph.graph['name']}` is a search template (open choices: "
                        + ", ".join(s.name for s in graph.graph["sites"]) + ")", "train it with `dclang search`")
    if engine not in ENGINES:
        raise UserError(f"unknown engine `{engine}`", "use " + " or ".join(ENGINES))
    dist = distributed.setup(device)  # this process's rank under torchrun; None alone (and for teachers)
    torch_device = resolve_device(dist.device if dist else device)
    progress = progress and (dist is None or dist.is_main)
    train_spec = graph.graph["train"]
    seed = train_spec.seed if seed is None else seed
    epochs = train_spec.epochs if epochs is None else epochs
    if epochs < 1:
        raise UserError(f"epochs must be at least 1, got {epochs}")
    g = resolved_graph(graph, epochs=epochs, seed=seed)
    data_spec = g.graph["data"]
    if dataset is None:
        try:
            dataset = load_dataset(data_spec.dataset, data_dir=data_dir, val_split=data_spec.val_split,
                                   split_seed=data_spec.split_seed, path=data_spec.path)
        except DataError as exc:
            raise UserError(str(exc)) from exc
    text = graph_text(g)
    target, names = g.graph["target"], model_nodes(g)
    rundir = RunDir(run_dir) if run_dir is not None else None
    if dist is not None:
        rundir = dist.rank_zero(rundir)

    checkpoint = None
    if rundir is not None and rundir.last.is_file():
        if not resume:
            raise UserError(f"{rundir.root} already holds a run", f"pass --resume to continue it, or choose "
                            f"another output folder (-o), or delete {rundir.root}")
        checkpoint = rundir.load_last()
        if checkpoint.get("graph") != text:
            raise UserError(f"cannot resume {rundir.root}: its checkpoint was written for another graph or other "
                            f"settings (see {rundir.graph_kt})",
                            "resume with the same file, --set, --epochs and --seed, or start a new run directory")
    elif resume and rundir is not None:
        say(f"nothing to resume in {rundir.root} (no checkpoints/last.pt): starting the run")

    # A resumed run's checkpoint holds every model, teachers included: no need to load them.
    states = None if checkpoint else init_states(g, dataset=dataset, device=device, engine=engine,
                                                 cache=teacher_cache, data_dir=data_dir, progress=progress)
    if len(dataset.val) == 0:
        say("warning: the validation split is empty (val_split = 0), so best.pt is the last epoch; "
            "test accuracy is never used to select")

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_device.type == "cpu")
    try:
        seed_everything(seed)
        train, val, test = (s.to(torch_device) for s in (dataset.train, dataset.val, dataset.test))
        crop, flip = _AUGMENTS[g.graph["data"].augment]
        augment = BatchAugment(g.graph["data"].pad, crop, flip, dataset.mean, dataset.std)
        batch = g.graph["train"].batch
        steps_per_epoch = -(-len(train) // batch)
        step = compile_graph(g, num_classes=dataset.num_classes, in_channels=dataset.channels,
                             image_size=dataset.image_size, device=torch_device, engine=engine,
                             init_states=states, seed=seed, steps_per_epoch=steps_per_epoch, epochs=epochs,
                             options=options)
        executed = step.label  # what runs, fast paths named
        if dist is not None:  # each process trains on its slice of every batch
            step = dist.wrap(step, train_size=len(train), batch=batch)
        records: list[dict] = []
        best_val = None
        if checkpoint is not None:
            try:
                step.load_state_dict(checkpoint["train_step"])
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"cannot resume from {rundir.last}: {str(exc).splitlines()[0]}",
                                f"resume with the same --engine, or delete {rundir.root} to start afresh") from exc
            _set_rng_state(checkpoint["rng"], torch_device)
            records = rundir.read_metrics()[:checkpoint["epoch"]]
            best_val = checkpoint["best_val"]
        if rundir is not None:
            rundir.write_graph(g, text)
            rundir.write_metrics(records)  # truncated to the checkpoint on resume

        def summary() -> dict:
            return _summary(g, records, step=step, dataset=dataset, seed=seed, device=torch_device, engine=engine,
                            executed=executed, epochs=epochs, steps_per_epoch=steps_per_epoch)

        show_bar = progress and sys.stderr.isatty()
        for epoch in range(len(records) + 1, epochs + 1):
            started = time.perf_counter()
            lr = step.lr()
            generator = epoch_generator(seed, epoch, torch_device)
            batches = BatchIterator(train, batch, generator)
            stats, shown = EpochStats(), time.monotonic()
            with _bar(len(batches), f"epoch {epoch}/{epochs}", show_bar) as bar:
                for i, (images, labels) in enumerate(batches):
                    k = (epoch - 1) * steps_per_epoch + i + 1
                    stats.add(step.step(augment(images, generator), labels, k), len(labels), k)
                    bar.update()
                    if show_bar and time.monotonic() - shown > 0.5:  # the postfix reads the device: not every step
                        bar.set_postfix_str(_postfix(stats, target), refresh=False)
                        shown = time.monotonic()
            means, first_bad = stats.read()
            train_seconds = time.perf_counter() - started
            check_finite(first_bad, epoch)
            step.end_epoch()
            val_acc = _evaluate(step, val, dataset.mean, dataset.std)
            test_acc = _evaluate(step, test, dataset.mean, dataset.std)
            record = epoch_record(epoch, lr, means, reported_nodes(g), val_acc, test_acc, time.perf_counter() - started,
                                  train_seconds)
            records.append(record)
            improved = val_acc is None or best_val is None or val_acc[target] > best_val
            if improved:
                best_val = None if val_acc is None else val_acc[target]
            if rundir is not None:
                rundir.write_metrics(records)
                rundir.write_summary(summary())
                if improved:
                    rundir.save_best({"graph": text, "epoch": epoch, "target": target, "val_acc": best_val,
                                      "nodes": {n: node_checkpoint(g.nodes[n]["spec"].model, dataset.num_classes,
                                                                   step.models[n].state_dict()) for n in names}})
                rundir.save_last({"graph": text, "epoch": epoch, "train_step": step.state_dict(),
                                  "rng": _rng_state(torch_device), "best_val": best_val})
            if progress:
                say(_epoch_line(record, epochs, target))
            if on_epoch is not None:
                on_epoch(epoch, record)
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(f"CUDA ran out of memory on {_describe(torch_device)} training `{g.graph['name']}`",
                        "lower `batch` in the train block (or --set train.batch=N), or use --device cpu") from exc
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.release(dist)

    result = RunResult(summary(), records)
    if progress:
        print(accuracy_table(result.summary), flush=True)
    return result


def _bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, unit="step", dynamic_ncols=True)
