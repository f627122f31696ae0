"""`dclang search --plan`: what a search will cost, before it runs.

    dclang search --template examples/search3.kt --trials 1500 --workers 1 --pack 8 --plan

Nothing is trained and no data is read. The plan prints:

- the search sites and the space's size, and its distinct graphs: trainable, up to renaming
  (`equivalence`), after dead-node elimination, and both (counted exactly up to
  `COUNT_LIMIT` samples; `python -m dclang.search.equivalence T.kt` counts any space);
- ASHA's rungs and the epochs T trials are expected to train: simulated with Optuna's own
  pruner (`StudyConfig.make_pruner`) on an in-memory study, D × K trials in flight, each
  trial's accuracy curve drawn at random (a random level, rising with the epoch), averaged
  over a few seeds. The pruner's rule decides, not an assumed formula;
- seconds per epoch of the architecture mixes the space trains (the model nodes of sampled,
  dead-node-free graphs), measured by compiling a sample of each mix on the chosen device and
  timing a few steps on a synthetic batch of the dataset's shape, plus its evaluation on the
  validation and test splits; with the threads a worker gets when D share the machine;
- the estimated wall time for D workers and pack K: the simulated epochs times the mean
  epoch time of the mixes (weighted by how often a sample trains each), divided over the D
  workers, plus each trial's fixed cost (sampling, checking, compiling: measured) and the
  fixed costs in sequence around them: the search's start and its workers' (each measured in a
  fresh Python: the imports, the dataset's loader, the libraries' one-time set-up on first
  use) and writing the outputs (drawing the best graph with `dot`: measured).

Left out, said in the output: pre-training frozen teachers (once per model per search, cached).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import networkx as nx

from dclang.diagnostics import DiagnosticError, UserError
from dclang.processes import python_argv

#: spaces up to this many samples are counted exactly by the plan (about 10 s)
COUNT_LIMIT = 150_000
#: samples drawn to find the architecture mixes and how often each is trained
MIX_SAMPLES = 400
#: mixes measured (the most frequent); the rest are given the mean of those
MIXES_MEASURED = 6
#: timed steps per measurement, after the warm-up steps
WARMUP_STEPS = 3
TIMED_STEPS = 8
#: seeds of the ASHA simulation averaged
SIMULATIONS = 5
#: (train, test) images of the official splits, before the validation split is carved out
OFFICIAL_SIZES = {"digits": (1437, 360), "cifar10": (50000, 10000), "cifar100": (50000, 10000),
                  "tinyimagenet": (100000, 10000)}


# ---------------------------------------------------------------- ASHA, simulated


@dataclass(frozen=True)
class AshaForecast:
    """What the pruner is expected to do with T trials: mean over simulated searches."""

    rungs: list[int]
    epochs: float  # epochs trained in all, mean
    epochs_spread: tuple[int, int]  # min and max over the simulations
    reached: list[float]  # mean number of trials reaching each rung, then the last epoch


def simulate_asha(config, *, trials: int, in_flight: int, seeds: int = SIMULATIONS) -> AshaForecast:
    """Run the study's pruner on an in-memory study with random accuracy curves.

    `in_flight` trials run at once (D workers × pack K); each step advances every one of them
    by an epoch, reports it and asks the pruner, as workers do. A trial's curve is a random
    level times (1 - 2^-epoch) plus noise: trials keep roughly their rank from rung to rung,
    which is what ASHA assumes of real ones."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rungs = config.rungs()
    totals, reached = [], []
    for seed in range(seeds):
        rng = random.Random(seed)
        study = optuna.create_study(direction="maximize", pruner=config.make_pruner(),
                                    sampler=optuna.samplers.RandomSampler(seed=seed))
        started, epochs_trained, marks = 0, 0, Counter()
        running: list[tuple[optuna.Trial, float, int]] = []
        while running or started < trials:
            while len(running) < in_flight and started < trials:
                running.append((study.ask(), rng.random(), 0))
                started += 1
            still = []
            for trial, level, epoch in running:
                epoch += 1
                epochs_trained += 1
                marks[epoch] += 1
                value = level * (1 - 0.5 ** epoch) + rng.gauss(0, 0.01)
                trial.report(value, epoch)
                if epoch == config.epochs:
                    study.tell(trial, value)
                elif trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    still.append((trial, level, epoch))
            running = still
        totals.append(epochs_trained)
        reached.append([marks[r] for r in [*rungs, config.epochs]])
    return AshaForecast(rungs, statistics.mean(totals), (min(totals), max(totals)),
                        [statistics.mean(r[i] for r in reached) for i in range(len(rungs) + 1)])


# ---------------------------------------------------------------- timing the mixes


def mix_of(graph: nx.DiGraph) -> tuple[str, ...]:
    """The architectures a trained graph computes: its model nodes' models, frozen and mean
    teachers (never trained) marked."""
    from dclang.ir import model_nodes

    specs = [graph.nodes[n]["spec"] for n in model_nodes(graph)]
    return tuple(sorted(f"{s.model}{' (frozen)' if s.frozen else ' (ema)' if s.is_ema else ''}" for s in specs))


def sample_mixes(template: nx.DiGraph, *, samples: int = MIX_SAMPLES, seed: int = 0
                 ) -> tuple[Counter, dict[tuple[str, ...], nx.DiGraph]]:
    """How often random samples train each mix (dead nodes dropped), and one graph of each."""
    from dclang.search.equivalence import concrete, trainable_sample, without_dead_nodes

    rng = random.Random(seed)
    sites = template.graph["sites"]
    counts: Counter = Counter()
    examples: dict[tuple[str, ...], nx.DiGraph] = {}
    for _ in range(samples):
        graph = concrete(template, {s.name: rng.choice(s.options) for s in sites})
        if not trainable_sample(graph):
            continue
        trained = without_dead_nodes(graph)
        mix = mix_of(trained)
        counts[mix] += 1
        examples.setdefault(mix, trained)
    return counts, examples


@dataclass(frozen=True)
class Shape:
    """What a step of the dataset looks like, known without loading it."""

    num_classes: int
    channels: int
    image_size: int
    train: int
    val: int
    test: int
    batch: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train // self.batch)


def dataset_shape(graph: nx.DiGraph) -> Shape:
    """The shape of the template's dataset: a built-in one's from its official sizes, an npz
    file's from the file (`npz_sizes`)."""
    from dclang.data import DataError
    from dclang.data.catalog import DATASETS
    from dclang.data.dataset import split_indices

    data, train = graph.graph["data"], graph.graph["train"]
    info = DATASETS.get(data.dataset)
    try:
        if data.dataset == "npz":
            num_classes, (channels, size, _), official_train, test = npz_sizes(Path(data.path))
        elif data.dataset in OFFICIAL_SIZES and info is not None:
            num_classes, channels, size = info.num_classes, info.channels, info.image_size
            official_train, test = OFFICIAL_SIZES[data.dataset]
        else:
            raise UserError(f"--plan knows the size of {', '.join(OFFICIAL_SIZES)} and of an npz file, not of "
                            f"`{data.dataset}` (its size is in your files)", "plan a search on one of those")
        train_idx, val_idx = split_indices(official_train, data.val_split, data.split_seed)
    except DataError as exc:
        raise UserError(str(exc)) from exc
    return Shape(num_classes, channels, size, len(train_idx), len(val_idx), test, train.batch)


def npz_sizes(path: Path) -> tuple[int, tuple[int, int, int], int, int]:
    """(classes, (channels, height, width), training images, test images) of an npz dataset,
    read from the headers of its `.npy` members: the images are never loaded (the labels
    of y_train are, for the class count, max + 1, as training counts it). The images' dtype
    and layout are checked by the rule loading applies (`npz_images`, on one image of
    their shape)."""
    import zipfile

    import numpy as np

    from dclang.data import DataError
    from dclang.data.sources import npz_images

    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if f"{k}.npy" not in archive.namelist()]
            if missing:
                raise DataError(f"npz: {path} lacks the array(s) {', '.join(missing)}; it needs x_train, y_train, "
                                "x_test, y_test")
            for key in ("x_train", "x_test", "y_train"):
                with archive.open(f"{key}.npy") as member:
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(member))
                    if read_header is None:
                        raise ValueError(f"{key}.npy is in an .npy format version numpy.savez does not write")
                    shape, _, dtype = read_header(member)
                    headers[key] = (shape, dtype)
            with archive.open("y_train.npy") as member:
                labels = np.lib.format.read_array(member, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"npz: no file {path}; the data block's `path` must name an .npz with arrays x_train, "
                        "y_train, x_test, y_test") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"npz: cannot read {path} as an .npz of plain arrays: {exc}") from None
    for key in ("x_train", "x_test"):
        if not headers[key][0] or headers[key][0][0] == 0:
            raise DataError(f"npz: {key} in {path} has no images (shape {headers[key][0]}); "
                            "every split needs at least one")
    # one image of each array's shape and dtype: the layout rule loading applies, without the pixels
    images = {key: npz_images(path, key, np.zeros((1, *headers[key][0][1:]), dtype=headers[key][1]))
              for key in ("x_train", "x_test")}
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise DataError(f"npz: y_train in {path} has shape {labels.shape} and dtype {labels.dtype}; expected "
                        f"integer class labels, one per image of x_train")
    return (int(labels.max()) + 1, tuple(images["x_train"].shape[1:]), headers["x_train"][0][0],
            headers["x_test"][0][0])


def epoch_seconds(graphs: list[nx.DiGraph], shape: Shape, device, *, options=None) -> tuple[float, str]:
    """Seconds for one epoch of each of `graphs` trained together in one process by one engine
    (`dclang.compile.engine.Engine`) executed with `options`, as a packed worker (or, for one
    graph, `dclang run`) trains them, and what executed it (the engine's label, e.g.
    `fused+hfta+channels_last`). A few synthetic steps, times the steps per epoch, plus each
    one's evaluation of the validation and test splits."""
    import torch

    from dclang.compile import Engine, StepMember, compile_graph

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(shape.batch, shape.channels, shape.image_size, shape.image_size,
                         generator=generator).to(device)
    labels = torch.randint(0, shape.num_classes, (shape.batch,), generator=generator).to(device)
    steps = [compile_graph(g, num_classes=shape.num_classes, in_channels=shape.channels,
                           image_size=shape.image_size, device=device, steps_per_epoch=shape.steps_per_epoch,
                           epochs=max(1, g.graph["train"].epochs), member=True) for g in graphs]
    engine = Engine([StepMember.of(step, g) for step, g in zip(steps, graphs)], options, packed=len(graphs) > 1)

    def step_all(k: int) -> None:
        engine.step_all([(images, labels, k)] * len(steps))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu")  # as training runs
    try:
        return _timed(step_all, steps, shape, device, generator, sync), engine.label
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _timed(step_all, steps, shape: Shape, device, generator, sync) -> float:
    import torch

    from dclang.compile.evaluate import EVAL_CHUNK

    for k in range(WARMUP_STEPS):  # allocations, optimizer state, library workspaces
        step_all(k + 1)
    sync()
    started = time.perf_counter()
    for k in range(TIMED_STEPS):
        step_all(WARMUP_STEPS + k + 1)
    sync()
    per_step = (time.perf_counter() - started) / TIMED_STEPS
    chunk = min(EVAL_CHUNK, shape.val + shape.test) or 1
    eval_images = torch.randn(chunk, shape.channels, shape.image_size, shape.image_size,
                              generator=generator).to(device)
    eval_labels = torch.randint(0, shape.num_classes, (chunk,), generator=generator).to(device)
    started = time.perf_counter()
    for step in steps:
        step.evaluate(eval_images, eval_labels, chunk)
    sync()
    per_image = (time.perf_counter() - started) / chunk
    return per_step * shape.steps_per_epoch + per_image * (shape.val + shape.test)


def trial_overhead(template_text: str, template_path: str, shape: Shape, device) -> float:
    """Seconds a trial costs besides its epochs: sampling and checking its graph (`realize`),
    computing its key and compiling its step. Measured on a few random samples."""
    from dclang.api import parse
    from dclang.compile import compile_graph
    from dclang.search.equivalence import canonical_key
    from dclang.search.space import realize, search_space

    module = parse(template_text)
    space = search_space(module)
    rng = random.Random(1)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        sample = realize(module, {p.name: rng.choice(p.choices) for p in space}, space=space, path=template_path)
        if sample.ok:
            canonical_key(sample.checked.graph)
            compile_graph(sample.checked.graph, num_classes=shape.num_classes, in_channels=shape.channels,
                          image_size=shape.image_size, device=device, steps_per_epoch=shape.steps_per_epoch,
                          epochs=1)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def outputs_seconds(graph: nx.DiGraph) -> float:
    """Writing a search's outputs at its end, of which drawing the best graph with Graphviz is
    the part that takes time (nothing without `dot`)."""
    import shutil
    import tempfile

    from dclang.draw import render

    if shutil.which("dot") is None:  # as the search's outputs decide it
        return 0.0
    with tempfile.TemporaryDirectory(prefix="dclang-plan") as tmp:
        started = time.perf_counter()
        render(graph, Path(tmp) / "best.svg")
        return time.perf_counter() - started


#: what a worker imports to read each built-in dataset (loading digits is importing scikit-learn)
_LOADERS = {"digits": "sklearn.datasets, sklearn.model_selection", "npz": "numpy"}


def start_seconds(dataset: str) -> tuple[float, float]:
    """(the search's start, a worker's start), measured in a fresh Python: `dclang search` imports
    torch, optuna and dclang; a worker imports them too, then the dataset's loader, and pays
    what the libraries set up once, on first use (torch's first optimizer imports its
    compiler's machinery; the first convolution and its gradient pick their kernels). The
    dataset itself is not read."""
    script = ("import sys, time\n"
              "import torch, optuna, dclang.train.loop, dclang.search.worker\n"
              "imported = time.perf_counter()\n"
              f"import {_LOADERS.get(dataset, 'torchvision.datasets')}\n"
              "m = torch.nn.Conv2d(1, 4, 3)\n"
              "torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
              "m(torch.zeros(2, 1, 8, 8)).sum().backward()\n"
              "print(time.perf_counter() - imported)\n")
    started = time.perf_counter()
    done = subprocess.run(python_argv(script), check=True, capture_output=True, text=True)
    total = time.perf_counter() - started
    first_use = float(done.stdout.split()[-1])
    return total - first_use, total


# ---------------------------------------------------------------- the plan


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def make_plan(template_path: Path, *, trials: int, workers: int, pack: int, epochs: int | None, device: str,
              eta: int, min_resource: int, pruner: str, options=None,
              count_limit: int = COUNT_LIMIT) -> dict:
    """Everything the plan prints, as a dict (`print_plan` writes it out)."""
    import torch

    from dclang.api import check
    from dclang.crd import written_in
    from dclang.search.equivalence import count_distinct, space_size
    from dclang.search.space import prepare_template, search_space
    from dclang.search.study import StudyConfig
    from dclang.syntax.format import format_module
    from dclang.train.run import resolve_device

    text = template_path.read_text(encoding="utf-8")
    checked = check(text, str(template_path))
    if not checked.ok:
        raise DiagnosticError(checked.diagnostics, str(template_path), text)
    if written_in(checked.module):
        raise UserError(f"{template_path} has `crd` edges, which --plan does not measure: their step reads each "
                        "batch's positions in the training split, which its synthetic steps do not have",
                        "plan the search with the `crd` options replaced (e.g. by `kl`)")
    space = search_space(checked.module)
    prepared = format_module(prepare_template(checked.module, epochs=epochs, base=template_path.parent))
    graph = check(prepared, str(template_path)).graph
    config = StudyConfig(template=prepared, template_path=str(template_path), sampler="random", seed=0,
                         pruner=pruner, eta=eta, min_resource=min_resource, epochs=graph.graph["train"].epochs,
                         trials=trials)
    plan: dict = {"template": str(template_path), "trials": trials, "workers": workers, "pack": pack,
                  "epochs": config.epochs, "sites": [(p.name, len(p.choices)) for p in space],
                  "space": space_size(graph)}
    try:
        plan["distinct"] = count_distinct(graph, limit=count_limit).__dict__
    except ValueError:
        plan["distinct"] = None

    forecast = simulate_asha(config, trials=trials, in_flight=workers * pack)
    plan["asha"] = forecast.__dict__

    torch_device = resolve_device(device)
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":  # each of D workers gets its share of the cores (`dclang search` sets it)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    shape = dataset_shape(graph)
    counts, examples = sample_mixes(graph)
    measured, steps = {}, {}
    try:
        for mix, _ in counts.most_common(MIXES_MEASURED):
            seconds, steps[mix] = epoch_seconds([examples[mix]] * pack, shape, torch_device, options=options)
            measured[mix] = seconds / pack
        overhead = trial_overhead(prepared, str(template_path), shape, torch_device)
    finally:
        torch.set_num_threads(threads)
    mean_measured = statistics.mean(measured.values())
    total = sum(counts.values())
    mean_epoch = sum(measured.get(mix, mean_measured) * n for mix, n in counts.items()) / total
    search_start, start = start_seconds(graph.graph["data"].dataset)
    outputs = outputs_seconds(examples[counts.most_common(1)[0][0]])
    compute = forecast.epochs * mean_epoch / workers + trials * overhead / workers
    # in sequence: `dclang search` starts, its workers start, the trials run, the outputs are written
    fixed = search_start + start + outputs
    plan.update({
        "device": str(torch_device), "threads_per_worker": max(1, (os.cpu_count() or 1) // workers)
        if torch_device.type == "cpu" else None,
        "shape": shape.__dict__,
        "mixes": [{"models": list(mix), "share": counts[mix] / total, "epoch_seconds": measured.get(mix),
                   "step": steps.get(mix)}
                  for mix, _ in counts.most_common()],
        "mean_epoch_seconds": mean_epoch, "trial_overhead_seconds": overhead, "search_start_seconds": search_start,
        "worker_start_seconds": start,
        "outputs_seconds": outputs, "estimate_seconds": fixed + compute,
    })
    return plan


def plan_lines(plan: dict) -> list[str]:
    sites = ", ".join(f"{name} ({n})" for name, n in plan["sites"])
    lines = [f"search plan for {plan['template']}: T = {plan['trials']} trials of {plan['epochs']} epochs, "
             f"D = {plan['workers']} workers, pack K = {plan['pack']}",
             f"sites: {sites}", f"space: {plan['space']:,} samples"]
    d = plan["distinct"]
    if d is None:
        lines.append(f"distinct graphs: not counted here (more than {COUNT_LIMIT:,} samples); "
                     f"`python -m dclang.search.equivalence {plan['template']}` counts them")
    else:
        lines.append(f"distinct graphs: {d['trainable']:,} trainable samples; {d['equivalent']:,} up to renaming "
                     f"non-target nodes; {d['dead_dropped']:,} once dead nodes are dropped; "
                     f"{d['equivalent_dead_dropped']:,} both (the most this search trains)")
    a = plan["asha"]
    rungs = " | ".join(f"epoch {e}: {n:.1f} reach" for e, n in zip([*a["rungs"], plan["epochs"]], a["reached"]))
    lines.append(f"ASHA (simulated with its own pruner, {SIMULATIONS} runs): rungs at epochs "
                 f"{', '.join(map(str, a['rungs'])) or 'none'}; {rungs}")
    lines.append(f"epochs trained: {a['epochs']:.0f} expected (from {a['epochs_spread'][0]} to "
                 f"{a['epochs_spread'][1]}) of T × E = {plan['trials'] * plan['epochs']}")
    threads = f", {plan['threads_per_worker']} threads per worker" if plan["threads_per_worker"] else ""
    lines.append(f"seconds per epoch on {plan['device']}{threads}, by architecture mix "
                 f"(share of trained samples; in a pack of {plan['pack']}):")
    for mix in plan["mixes"]:
        seconds = ("not measured (rare)" if mix["epoch_seconds"] is None
                   else f"{mix['epoch_seconds']:.3g} s  ({mix['step']})")
        lines.append(f"  {' + '.join(mix['models']):<48} {100 * mix['share']:5.1f}%  {seconds}")
    lines.append(f"per trial besides its epochs: {plan['trial_overhead_seconds']:.2f} s (sample, check, compile); "
                 f"the search's start: {plan['search_start_seconds']:.1f} s; a worker's: "
                 f"{plan['worker_start_seconds']:.1f} s (imports, first use); writing the outputs: "
                 f"{plan['outputs_seconds']:.1f} s")
    lines.append(f"estimated wall time: {_duration(plan['estimate_seconds'])} "
                 f"(mean epoch {plan['mean_epoch_seconds']:.3g} s; pre-training frozen teachers not counted)")
    return lines


def print_plan(template: Path, **kwargs) -> dict:
    plan = make_plan(template, **kwargs)
    for line in plan_lines(plan):
        click.echo(line)
    return plan


__all__ = ["AshaForecast", "Shape", "dataset_shape", "epoch_seconds", "make_plan", "plan_lines", "print_plan",
           "sample_mixes", "simulate_asha"]
