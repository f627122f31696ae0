"""`dclang bench FILE`: how fast each engine and fast path trains this graph, on this machine.

Every variant (the `reference` engine, the `fused` engine and its `StepOptions`) trains its
own copy of the graph on the same random batch of the dataset's shape (no dataset files are
read). Timed steps are interleaved round-robin, one step of each variant per round, with the
order rotated every round, so a noisy machine slows every variant alike. The same rounds
time the FLOOR: the sum, over trainable nodes, of a plain single-model training step
(forward, cross-entropy, backward, optimizer step) plus the inference forward of each frozen
node: what training the nodes one by one, with no knowledge transfer, would cost.

A graph with edges between layers also gets `fused-no-layer-edges`, the fused engine on the
same graph without them, so what capturing and comparing layers costs is measured side by
side in the same rounds.

`--epoch` then trains one epoch end to end (batches, augmentation, steps, validation) the
way `dclang run` does, with the fastest variant, against the straightforward loop a
researcher writes: the reference engine fed by a `torch.utils.data.DataLoader` over
`TransformedSplit` with per-sample torchvision transforms. That one needs the dataset.

`ops/step` counts the ATen operations one step dispatches, views aside (eager variants and
the floor):
on a GPU each launches at least one kernel, so it shows what fusion (HFTA) saves where
launches, not arithmetic, bound the step.

Peak memory: on CUDA, `max_memory_allocated` from building the variant through its warm-up
steps, minus what was allocated before (so it includes a CUDA graph's pool and compile
workspaces). On the CPU, the bytes of the variant's own tensors (parameters, buffers,
gradients, optimizer state) plus the growth of the process's resident set (VmHWM, reset
through /proc/self/clear_refs) during one warm step: an estimate, since the allocator may
reuse memory it already holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from dclang.cli_options import BATCH, DEVICE, REPEAT, STEPS, WORKERS
from dclang.diagnostics import DiagnosticError, UserError

#: dense peak TFLOP/s of the cards MFU is reported for, by precision (NVIDIA data sheets;
#: "tf32" is what fp32 convolutions run at, cuDNN's TF32 being on by default)
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


@dataclass
class Variant:
    """One way of training the graph: `run(k)` performs update k; `state` holds its tensors."""

    name: str
    run: Callable[[int], object]
    state: object  # a TrainStep-like object with `models` and `optimizers`
    precision: str = "fp32"
    times: list[float] = field(default_factory=list)
    peak_mem_bytes: int = 0
    note: str | None = None


# ---------------------------------------------------------------- the machine


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peak_tflops(device, precision: str) -> float | None:
    """The card's dense peak for `precision` ("bf16" or "fp32"), None off the table."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            if precision == "bf16":
                return peaks["bf16"]
            return peaks["tf32"] if torch.backends.cudnn.allow_tf32 else peaks["fp32"]
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    """Return freed heap to the OS and restart the high-water mark; False where Linux's
    /proc/self/clear_refs is not available (the peak is then the process's since its start)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(state) -> int:
    """Bytes of the distinct storages behind a step's parameters, buffers, gradients and
    optimizer state (views of one storage, as HFTA's, count once)."""
    import torch

    storages: dict[int, int] = {}

    def add(t) -> None:
        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()

    for model in state.models.values():
        for t in [*model.parameters(), *model.buffers()]:
            add(t)
            add(t.grad)
    for opt in state.optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                add(p)
                add(p.grad)
        for per_param in opt.state.values():
            for v in per_param.values():
                add(v)
    return sum(storages.values())


# ---------------------------------------------------------------- variants


@dataclass
class _Floor:
    """Each model node alone: its own plain training step (trainable), forward (frozen), or
    forward and moving average (a mean teacher); nodes sharing a trunk (`branch(...)`) one
    step together, the trunk computed once."""

    models: dict
    optimizers: dict


def _floor(graph, shape: dict, device, images, labels) -> Variant:
    import torch
    import torch.nn.functional as F

    from dclang.compile.common import build_models
    from dclang.compile.ema import EmaUpdate
    from dclang.compile.optim import build_optimizer
    from dclang.ema import ema_sources
    from dclang.ir import frozen_nodes, trainable_nodes
    from dclang.models.branch import families, forward_order, tapes_of, trunks_once

    models = build_models(graph, **shape, device=device, init_states=None, seed=0)
    spec = graph.graph["train"].optimizer
    groups = families(trainable_nodes(graph), models)  # a shared trunk once, with its branches
    optimizers = {root: build_optimizer(spec, [p for n in members for p in models[n].parameters()])
                  for root, members in groups.items()}
    frozen = frozen_nodes(graph)
    # a mean teacher: a forward without autograd and its own average of its source's weights
    averages = {n: EmaUpdate([(models[n], models[source], decay)]) for n, (source, decay) in ema_sources(graph).items()}
    tapes = tapes_of(models.values())

    def run(k: int) -> None:
        for name in [*frozen, *averages]:
            with torch.inference_mode():
                models[name](images)
        with trunks_once(tapes):
            for root, members in groups.items():
                opt = optimizers[root]
                opt.zero_grad()
                sum(F.cross_entropy(models[n](images), labels) for n in forward_order(models, members)).backward()
                opt.step()
        for update in averages.values():
            update()

    return Variant("floor", run, _Floor(models, optimizers))


def variant_specs(graph, device) -> tuple[list[tuple[str, str, object]], dict[str, str]]:
    """(name, engine, StepOptions) of every variant that applies here, and why others do not.

    The fused variants are every option set `dclang run` chooses among on CUDA
    (`autotune.candidates`: HFTA, channels-last, CUDA graphs, bf16, and their
    combinations), then torch.compile, which it does not time at start; on
    the CPU the CUDA-only ones are listed as skipped, with the reason. Compiled variants come
    last: a compiler that fails is built after everything else, so it cannot disturb them."""
    import torch

    from dclang.compile import StepOptions
    from dclang.compile.autotune import candidates
    from dclang.ir import live_edges

    everywhere = candidates(graph, torch.device("cpu"), convolutional=True)
    on_cuda = candidates(graph, torch.device("cuda"), convolutional=True)
    # `fused` keeps the models' own layout, the floor's, whatever `dclang run` picks by default
    specs = [("reference", "reference", None)]
    skipped = {}
    for options in on_cuda:
        if options in everywhere or device.type == "cuda":
            specs.append((options.label, "fused", options))
        else:
            skipped[options.label] = "CUDA only"
    if "fused+hfta" not in {name for name, _, _ in specs} | set(skipped):
        skipped["fused+hfta"] = "no two trainable nodes share an architecture"
    if any(e.on_layers for e in live_edges(graph)):  # what the edges between layers cost, side by side
        specs.append((WITHOUT_LAYER_EDGES, "fused", StepOptions(channels_last=False)))
    specs.append(("fused+compile", "fused", StepOptions(compile=True, channels_last=False)))
    return specs, skipped


#: the fused engine on the graph without its edges between layers (a variant only for graphs
#: that have some): the difference to `fused` is what capturing and comparing layers costs
WITHOUT_LAYER_EDGES = "fused-no-layer-edges"


def without_layer_edges(graph):
    """A copy of the IR without its edges between layers."""
    out = graph.copy()
    out.remove_edges_from([(s, t, key) for s, t, key, spec in graph.edges(keys=True, data="spec") if spec.on_layers])
    return out


def _build(name: str, engine: str, options, graph, shape: dict, device, k_end: int, images, labels) -> Variant:
    from dclang.compile import compile_graph

    if name == WITHOUT_LAYER_EDGES:
        graph = without_layer_edges(graph)
    step = compile_graph(graph, **shape, device=device, engine=engine, seed=0, steps_per_epoch=k_end, epochs=1,
                         options=options)
    return Variant(name, lambda k: step.step(images, labels, k), step,
                   precision=getattr(options, "precision", "fp32"))


def eager(name: str) -> bool:
    """Whether every operation of the variant goes through PyTorch's dispatcher, so that
    `count_ops` sees each (a compiled step runs inductor's kernels, a CUDA graph replays
    without dispatching)."""
    return "compile" not in name and "cudagraph" not in name


def count_ops(run: Callable[[int], object], k: int) -> int:
    """ATen operations `run(k)` dispatches that compute something (forward, backward and
    optimizer step; views, which only relabel memory, left out). On a GPU each launches at
    least one kernel, so this counts what fusion saves where launches dominate."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Counter():
        run(k)
    return Counter.n


def _run_noting(variant: Variant, ks: range) -> None:
    """Run updates `ks`, keeping what a fast path warned about (a compile fallback) as its note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in ks:
            variant.run(k)
    notes = sorted({str(w.message).splitlines()[0] for w in caught if "compile" in str(w.message)})
    if notes:
        variant.note = "; ".join(notes)


def _warm(variant: Variant, warmup: int, device, allocated_before: int) -> None:
    """Run the warm-up steps but the last (compiling, capturing). On CUDA run the last too and
    take the variant's peak memory from `allocated_before`, CUDA's allocated bytes before the
    variant was built; on the CPU `_measure_cpu` runs it once every variant is warm."""
    import torch

    if device.type != "cuda":
        _run_noting(variant, range(1, warmup))
        return
    _run_noting(variant, range(1, warmup + 1))
    _sync(device)
    variant.peak_mem_bytes = torch.cuda.max_memory_allocated(device) - allocated_before


def _measure_cpu(variant: Variant, k: int) -> None:
    """The variant's own tensors plus what its warm-up step `k` adds to the resident set; run
    after every variant's earlier steps, so one-time library allocations count for none."""
    reset = _reset_rss_peak()
    before = _proc_status("VmRSS") if reset else _proc_status("VmHWM")
    _run_noting(variant, range(k, k + 1))
    variant.peak_mem_bytes = tensor_bytes(variant.state) + max(0, _proc_status("VmHWM") - before)


def bench_steps(graph, *, steps: int, warmup: int, device, batch: int, shape: dict,
                only: list[str] | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Time every variant that applies (or those in `only`) and the floor; see the module doc."""
    import torch

    from dclang.compile.accelerate import convolutional
    from dclang.compile.tf32 import tf32_enabled
    from dclang.compile.thread_state import restored_on_failure
    from dclang.data import normalize

    k_end = warmup + steps + 2  # + the FLOP-counting step (fused) and the op-counting step
    gen = torch.Generator().manual_seed(0)
    channels, size = shape["in_channels"], shape["image_size"]
    raw = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=gen)
    images = normalize(raw.to(device), (0.5,) * channels, (0.25,) * channels)
    labels = torch.randint(0, shape["num_classes"], (batch,), generator=gen).to(device)

    specs, skipped = variant_specs(graph, device)
    if only:
        unknown = sorted(set(only) - {name for name, _, _ in specs} - set(skipped))
        if unknown:
            raise UserError(f"unknown variant(s) {', '.join(unknown)}",
                            "choose among " + ", ".join([n for n, _, _ in specs] + list(skipped)))
        specs = [s for s in specs if s[0] in only or s[0] in ("reference", "fused")]  # the baselines
    variants: list[Variant] = []
    for name, engine, options in [("floor", None, None), *specs]:
        log(f"building and warming up {name}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        try:
            with restored_on_failure():  # a failed compile's leftovers must not fail the variants after it
                if name == "floor":
                    variant = _floor(graph, shape, device, images, labels)
                else:
                    variant = _build(name, engine, options, graph, shape, device, k_end, images, labels)
                    if options is not None and options.channels_last and not convolutional(variant.state.models):
                        skipped[name] = "no convolution in the graph: the same step as fused"
                        continue
                _warm(variant, warmup, device, before)
        except Exception as exc:  # a fast path that does not work here is reported, not fatal
            if name in BASELINES:
                raise
            skipped[name] = _failed(exc)
            continue
        variants.append(variant)
    if device.type != "cuda":
        for variant in variants:
            _measure_cpu(variant, warmup)

    log(f"timing {steps} interleaved rounds")
    for r in range(steps):
        k = warmup + r + 1
        for variant in [variants[(i + r) % len(variants)] for i in range(len(variants))]:
            _sync(device)
            started = time.perf_counter()
            try:
                with restored_on_failure():
                    variant.run(k)
                    _sync(device)
            except Exception as exc:  # a fast path failing mid-way is reported, and not timed further
                if variant.name in BASELINES:
                    raise
                skipped[variant.name] = _failed(exc)
                variants.remove(variant)
                continue
            variant.times.append(time.perf_counter() - started)

    from torch.utils.flop_counter import FlopCounterMode

    fused = next(v for v in variants if v.name == "fused")
    with FlopCounterMode(display=False) as counter:
        fused.run(k_end - 1)
    flops = counter.get_total_flops()
    ops = {}
    for v in variants:
        if eager(v.name):
            try:
                ops[v.name] = count_ops(v.run, k_end)
            except Exception as exc:  # noqa: BLE001 (counting is a figure, not the benchmark: noted)
                if v.name in BASELINES:
                    raise
                v.note = "; ".join(filter(None, [v.note, f"operations not counted: {_failed(exc)}"]))

    floor = next(v for v in variants if v.name == "floor")
    floor_s = statistics.median(floor.times)
    ref_s = statistics.median(next(v for v in variants if v.name == "reference").times)
    engines = {}
    for v in variants:
        if v.name == "floor":
            continue
        s = statistics.median(v.times)
        entry = {"s_per_step": s, "s_per_step_min": min(v.times), "images_per_s": batch / s,
                 "peak_mem_bytes": v.peak_mem_bytes,
                 "ratio_to_reference": s / ref_s, "ratio_to_floor": s / floor_s,
                 "tflops": flops / s / 1e12}
        peak = peak_tflops(device, v.precision)
        if peak is not None:
            entry["mfu"] = entry["tflops"] / peak
        if v.name in ops:
            entry["ops_per_step"] = ops[v.name]
        if v.note:
            entry["note"] = v.note
        engines[v.name] = entry
    return {
        "engines": engines, "floor_s_per_step": floor_s, "floor_s_per_step_min": min(floor.times),
        "floor_peak_mem_bytes": floor.peak_mem_bytes, "floor_ops_per_step": ops["floor"],
        "device": describe_device(device), "tf32": tf32_enabled() if device.type == "cuda" else None,
        "steps": steps, "warmup": warmup, "batch": batch,
        "graph": graph.graph["name"], "shape": shape, "flops_per_step": flops,
        "peak_mem_method": ("cuda max_memory_allocated over build + warm-up" if device.type == "cuda" else
                            "cpu: own tensor bytes + VmHWM growth during one warm step"),
        "skipped": skipped,
        "run_default": run_default(device, fused.state.models, engines),
    }


def run_default(device, models, engines: dict) -> str:
    """What `dclang run` trains with here without flags: on CUDA the fastest of the options it
    times at start (`autotune`), as this bench timed them; elsewhere the fixed rule."""
    from dclang.compile import StepOptions
    from dclang.compile.autotune import applies

    if applies(device):
        timed = [name for name in engines if name.startswith("fused") and "compile" not in name
                 and name != WITHOUT_LAYER_EDGES]
        if timed:
            return min(timed, key=lambda name: engines[name]["s_per_step"])
    return StepOptions().resolve(device, models).label


#: the variants a bench cannot do without: their failure is the bench's
BASELINES = ("reference", "fused", "floor")


def _failed(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ---------------------------------------------------------------- one epoch end to end


def bench_epoch(graph, dataset, *, device, options, workers: int, repeat: int = 1,
                log: Callable[[str], None] = lambda _: None) -> dict:
    """`graph` resolved as `dclang run` resolves it (`loop.resolved_graph`: its augmentation
    named). One epoch (train steps + validation) with `options` and the dclang data path, against
    the reference engine fed by a DataLoader with per-sample transforms; the median of
    `repeat` alternating runs of each. Both are warmed up by one step first (compiling, CUDA
    start-up), which is reported separately as `first_step_s`."""
    import torch
    from torch.utils.data import DataLoader

    from dclang.compile import compile_graph
    from dclang.data import BatchAugment, TransformedSplit, normalize, per_sample_transforms
    from dclang.data.batches import BatchIterator, epoch_generator
    from dclang.train.run import AUGMENTS

    data = graph.graph["data"]
    crop, flip = AUGMENTS[data.augment]
    batch = graph.graph["train"].batch
    steps = math.ceil(len(dataset.train) / batch)
    shape = dict(num_classes=dataset.num_classes, in_channels=dataset.channels, image_size=dataset.image_size)
    mean, std = dataset.mean, dataset.std

    def dclang_epoch() -> tuple[float, float]:
        step = compile_graph(graph, **shape, device=device, engine="fused", seed=0, steps_per_epoch=steps + 1,
                             epochs=1, options=options)
        train, val = dataset.train.to(device), dataset.val.to(device)
        augment = BatchAugment(data.pad, crop, flip, mean, std)
        generator = epoch_generator(0, 0, device)
        started = time.perf_counter()
        images, labels = next(iter(BatchIterator(train, batch, generator)))
        step.step(augment(images, generator), labels, steps + 1)
        _sync(device)
        first = time.perf_counter() - started
        started = time.perf_counter()
        generator = epoch_generator(0, 1, device)
        for k, (images, labels) in enumerate(BatchIterator(train, batch, generator), start=1):
            step.step(augment(images, generator), labels, k)
        correct = None
        for start in range(0, len(val), 1024):
            counts = step.evaluate(normalize(val.images[start:start + 1024], mean, std),
                                   val.labels[start:start + 1024], 1024)
            correct = counts if correct is None else {n: correct[n] + c for n, c in counts.items()}
        if correct:
            torch.stack(list(correct.values())).tolist()  # the one host sync, as the loop's
        _sync(device)
        return time.perf_counter() - started, first

    def dataloader_epoch() -> tuple[float, float]:
        step = compile_graph(graph, **shape, device=device, engine="reference", seed=0, steps_per_epoch=steps + 1,
                             epochs=1)
        size = dataset.image_size
        train_set = TransformedSplit(dataset.train, per_sample_transforms(data.pad, flip, mean, std,
                                                                          image_size=size, crop=crop))
        val_set = TransformedSplit(dataset.val, per_sample_transforms(0, False, mean, std, image_size=size,
                                                                      crop=False))
        pin = device.type == "cuda"
        loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin)
        started = time.perf_counter()
        images, labels = next(iter(DataLoader(train_set, batch_size=batch, shuffle=True)))
        step.step(images.to(device), labels.to(device), steps + 1)
        _sync(device)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for k, (images, labels) in enumerate(loader, start=1):
            step.step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), k)
        total = 0
        for images, labels in DataLoader(val_set, batch_size=1024, num_workers=workers, pin_memory=pin):
            counts = step.evaluate(images.to(device), labels.to(device), 1024)
            total += sum(int(c) for c in counts.values())
        _sync(device)
        return time.perf_counter() - started, first

    runs: dict[str, list[tuple[float, float]]] = {"dclang": [], "dataloader": []}
    for r in range(repeat):
        log(f"epoch {r + 1}/{repeat}: reference engine + DataLoader ({workers} workers)")
        runs["dataloader"].append(dataloader_epoch())
        log(f"epoch {r + 1}/{repeat}: {options.label} + on-device batches")
        runs["dclang"].append(dclang_epoch())
    out = {name: {"epoch_s": statistics.median(t for t, _ in rs), "first_step_s": statistics.median(f for _, f in rs)}
           for name, rs in runs.items()}
    out["dclang"]["variant"] = options.label
    out["dataloader"]["workers"] = workers
    out["speedup"] = out["dataloader"]["epoch_s"] / out["dclang"]["epoch_s"]
    out.update(dataset=dataset.name, train_images=len(dataset.train), val_images=len(dataset.val), batch=batch,
               steps=steps)
    return out


# ---------------------------------------------------------------- the command


def _options_of(name: str):
    from dclang.compile import StepOptions

    parts = set(name.split("+")[1:])
    return StepOptions(compile="compile" in parts, precision="bf16" if "bf16" in parts else "fp32",
                       channels_last="channels_last" in parts, hfta="hfta" in parts, cuda_graph="cudagraph" in parts)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def render(result: dict) -> str:
    """The step benchmark as a table, plus the epoch comparison when there is one."""
    w = max(22, *(len(name) + 2 for name in result["engines"]))  # the variant column
    lines = [f"{result['graph']}: batch {result['batch']}, {result['shape']['in_channels']}x"
             f"{result['shape']['image_size']}x{result['shape']['image_size']}, {result['shape']['num_classes']} "
             f"classes on {result['device']}",
             f"{result['steps']} timed steps per variant after {result['warmup']} warm-up, interleaved round-robin; "
             f"medians (and the fastest step: the least disturbed on a busy machine)",
             f"{'variant':<{w}}{'s/step':>10}{'min':>9}{'images/s':>11}{'peak mem':>12}{'x reference':>13}"
             f"{'x floor':>9}{'ops/step':>10}"
             + ("  MFU" if any("mfu" in e for e in result["engines"].values()) else "")]
    for name, e in result["engines"].items():
        mfu = f"  {100 * e['mfu']:.1f}%" if "mfu" in e else ""
        lines.append(f"{name:<{w}}{e['s_per_step']:>10.4f}{e['s_per_step_min']:>9.4f}{e['images_per_s']:>11.1f}"
                     f"{_mib(e['peak_mem_bytes']):>12}"
                     f"{e['ratio_to_reference']:>13.3f}{e['ratio_to_floor']:>9.3f}"
                     f"{e.get('ops_per_step', '-'):>10}{mfu}")
        if e.get("note"):
            lines.append(f"{'':<{w}}note: {e['note']}")
    lines.append(f"{'floor':<{w}}{result['floor_s_per_step']:>10.4f}{result['floor_s_per_step_min']:>9.4f}"
                 f"{'':>45}{result['floor_ops_per_step']:>10}   (each node's own plain step, summed)")
    engines = result["engines"]
    if WITHOUT_LAYER_EDGES in engines and "fused" in engines:
        cost = engines["fused"]["s_per_step"] / engines[WITHOUT_LAYER_EDGES]["s_per_step"] - 1
        lines.append(f"edges between layers: {100 * cost:+.1f}% of the fused step ({WITHOUT_LAYER_EDGES} is the "
                     "same graph without them)")
    lines.append(f"FLOPs per step: {result['flops_per_step'] / 1e9:,.2f} GFLOP; "
                 f"peak memory: {result['peak_mem_method']}")
    lines.append(f"`dclang run` without flags uses {result['run_default']} here")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    if "epoch" in result:
        ep = result["epoch"]
        lines.append(f"one epoch of {ep['dataset']} ({ep['train_images']} train + {ep['val_images']} val images, "
                     f"{ep['steps']} steps): {ep['dclang']['variant']} {ep['dclang']['epoch_s']:.2f} s vs reference + "
                     f"DataLoader({ep['dataloader']['workers']} workers) {ep['dataloader']['epoch_s']:.2f} s: "
                     f"{ep['speedup']:.2f}x (first steps, not in the epoch: {ep['dclang']['first_step_s']:.2f} s vs "
                     f"{ep['dataloader']['first_step_s']:.2f} s)")
    return "\n".join(lines)


@click.command("bench")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", type=STEPS, default=10, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=STEPS, default=2, show_default=True,
              help="Untimed steps per variant first (compiling, capturing, caches).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch", type=BATCH, help="Batch size [default: the train block's].")
@click.option("--variants", metavar="NAME,...", help="Only these variants (reference and fused are always timed), "
              "e.g. fused+hfta.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting, as in `dclang run`.")
@click.option("--epoch", is_flag=True, help="Also one epoch end to end: the fastest variant with dclang's data path "
              "vs the reference engine with a standard DataLoader (needs the dataset).")
@click.option("--workers", type=WORKERS, default=2, show_default=True,
              help="DataLoader workers of the --epoch baseline.")
@click.option("--repeat", type=REPEAT, default=1, show_default=True,
              help="--epoch runs of each side (alternating); the median is reported.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where downloadable datasets live (--epoch).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="Let CUDA fp32 convolutions and matrix products use TF32, as `dclang run` does by default.")
def bench_command(file: Path, steps: int, warmup: int, device: str, batch: int | None, variants: str | None,
                  overrides: tuple[str, ...], epoch: bool, workers: int, repeat: int, data_dir: str | None,
                  as_json: bool, tf32: bool) -> None:
    """Time the engines and fast paths on FILE's graph with random batches of its dataset's shape.

    Prints per variant the median seconds per step, images/s, peak memory, the ratio of its
    time to the reference engine's and to the FLOOR (each node's own plain training step,
    summed), the computing operations one step dispatches (each a kernel launch on a GPU),
    on CUDA the achieved TFLOP/s and MFU, and which variant `dclang run` uses here.
    """
    from dclang.compile.accelerate import quiet_cpu_compiler
    from dclang.compile.tf32 import set_tf32
    from dclang.data import DATASETS, DataError, load_dataset
    from dclang.ir import live_edges
    from dclang.train.command import load_with_overrides
    from dclang.train.run import resolve_device, resolved_graph

    checked = load_with_overrides(file, overrides)
    if not checked.ok:
        raise DiagnosticError(checked.diagnostics, checked.path, checked.source)
    if checked.graph.graph["sites"]:
        raise UserError(f"{file} is a search template", "fix its choices with --set to benchmark one graph")
    crd = [e.key for e in live_edges(checked.graph) if e.loss == "crd"]
    if crd:
        raise UserError(f"{file} has `crd` edges ({', '.join(crd)}), which `dclang bench` does not time yet",
                        "their step reads each batch's positions in the training split; time it with `dclang run`")
    train = checked.graph.graph["train"]
    graph = resolved_graph(checked.graph, epochs=train.epochs, seed=train.seed)  # as `dclang run` trains it
    torch_device = resolve_device(device)
    quiet_cpu_compiler(torch_device)
    set_tf32(tf32)
    data = graph.graph["data"]
    info = DATASETS.get(data.dataset)
    dataset = None
    if epoch or info is None or None in (info.num_classes, info.channels, info.image_size):
        try:
            dataset = load_dataset(data.dataset, data_dir=data_dir, val_split=data.val_split,
                                   split_seed=data.split_seed, path=data.path)
        except DataError as exc:
            raise UserError(str(exc)) from exc
        shape = dict(num_classes=dataset.num_classes, in_channels=dataset.channels, image_size=dataset.image_size)
    else:
        shape = dict(num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)

    def log(message: str) -> None:
        click.echo(message, err=True)

    only = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    result = bench_steps(graph, steps=steps, warmup=warmup, device=torch_device,
                         batch=batch or graph.graph["train"].batch,
                         shape=shape, only=only, log=log)
    if epoch:
        fastest = min((n for n in result["engines"] if n != "reference"),
                      key=lambda n: result["engines"][n]["s_per_step"])
        result["epoch"] = bench_epoch(graph, dataset, device=torch_device, options=_options_of(fastest),
                                      workers=workers, repeat=repeat, log=log)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    sys.stdout.flush()
