"""Pick a run's fast paths on a GPU by timing them on its own first batches: `autotune`.

Which of HFTA, channels-last, bf16 and CUDA graphs pays off depends on the graph (how many
nodes share an architecture, how small the models are), the batch and the card; on an H200
a CIFAR ResNet step is bound by kernel launches, not arithmetic, so options that remove
launches (CUDA graphs, HFTA) win, and arithmetic in bf16 or a memory layout barely matters.
No fixed rule gets that right for every graph, so on CUDA `dclang run` and
`dclang search` measure: every candidate (`candidates`) is built from the run's seeded
weights, stepped `WARMUP` times untimed (a CUDA graph is captured there) and `STEPS` times
timed, each step synchronised, on the run's first batches; the fastest median wins and one
line says what was chosen and the times it was chosen on (`Tuned.line`).

Training is unchanged by the measurement: each candidate trains its own copy of the models
(built by the caller's `build`, from the same seed and initial states), the batches come
from a generator of their own, and the global random streams (CPU and CUDA) are restored
afterwards (`torch.random.fork_rng`). The real step is then built with the chosen options,
exactly as if they had been given as flags. `tests/test_autotune.py` holds that on the CPU.

torch.compile is not a candidate (it takes minutes to start, more than a run saves by it on
most graphs; `--compile` asks for it). bf16 is: its weights are cast all at once
(`dclang.compile.bf16_weights`), so it launches about as many kernels as fp32, where autocast
alone cast each weight and each gradient on its own (1,893 operations a kd_dml step against
fp32's 1,554, counted on the CPU: why `fused+bf16` was slower than fp32 on an H200).

On the CPU nothing is measured (`AUTOTUNE_DEVICES`): the rule `StepOptions.resolve` applies,
measured once and written down in benchmarks/README.md. A choice is kept per process for
each architecture mix and batch shape (`_key`), so a search's trials of one mix measure once.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor

from dclang.compile.accelerate import CUDA_GRAPH_WARMUP, StepOptions, convolutional, hfta_groups
from dclang.ir import live_edges, trainable_nodes
from dclang.loss_catalogue import LOSSES

#: device types on which `dclang run` and `dclang search` measure (elsewhere: the fixed rule)
AUTOTUNE_DEVICES = ("cuda",)
#: untimed steps per candidate: a CUDA graph's eager warm-up, its capture, and one replay
WARMUP = CUDA_GRAPH_WARMUP + 2
#: timed steps per candidate; the median is compared
STEPS = 5

Batch = tuple[Tensor, Tensor]
#: timer(run_one_step, device) -> seconds of that one step
Timer = Callable[[Callable[[], object], torch.device], float]


@dataclass(frozen=True)
class Tuned:
    """What `autotune` chose: the options, and the median seconds per step of every candidate
    (by label), the candidates that failed with why, and whether it was measured in this call."""

    options: StepOptions
    seconds: dict[str, float]
    failed: dict[str, str]
    measured: bool = True
    skipped: str = ""  # why nothing was timed (a graph no fast path can train)

    def line(self) -> str:
        """One line for the user: the choice, the times it was chosen on, how to skip it."""
        if self.skipped:
            return f"autotune: {self.options.label}, nothing timed: {self.skipped}"
        times = ", ".join(f"{label} {1e3 * s:.1f}" for label, s in sorted(self.seconds.items(), key=lambda x: x[1]))
        failed = "".join(f"; {label} failed: {why}" for label, why in self.failed.items())
        how = f"{STEPS} steps each after {WARMUP} warm-up" if self.measured else "chosen earlier in this process"
        return (f"autotune: {self.options.label}, the fastest on this graph's first batches "
                f"(ms/step: {times}; {how}{failed}); --no-autotune or a fast-path flag skips this")


def applies(device: torch.device) -> bool:
    """Whether a run on `device` measures its options (CUDA) or takes the fixed rule (CPU)."""
    return device.type in AUTOTUNE_DEVICES


def candidates(graph: nx.DiGraph, device: torch.device, *, convolutional: bool,
               precision: str | None = None) -> list[StepOptions]:
    """Every option set worth timing for this graph, the plain fused engine first.

    HFTA where two trainable nodes share an architecture; channels-last where a node has a
    convolution; CUDA graphs and bf16 on CUDA; only `precision` where the user chose one.
    """
    cuda = device.type == "cuda"
    hfta = [False, True] if hfta_groups(graph, trainable_nodes(graph)) else [False]
    layouts = [False, True] if convolutional else [False]
    precisions = (precision,) if precision else ("fp32", "bf16") if cuda else ("fp32",)
    return [StepOptions(hfta=h, channels_last=channels_last, precision=p, cuda_graph=cuda_graph)
            for cuda_graph in ([False, True] if cuda else [False])
            for p in precisions for h in hfta for channels_last in layouts]


def time_step(run: Callable[[], object], device: torch.device) -> float:
    """Seconds one step takes, the device synchronised before and after."""
    _sync(device)
    started = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - started


def measure(step, batches: Sequence[Batch], *, device: torch.device, warmup: int = WARMUP, steps: int = STEPS,
            timer: Timer = time_step) -> float:
    """Median seconds per step of `step` over `steps` timed steps after `warmup` untimed ones,
    cycling through `batches` (update number 1 each time: the gate of eq. 6 is the same
    computation for any k)."""
    for i in range(warmup):
        step.step(*batches[i % len(batches)], 1)
    times = []
    for i in range(steps):
        images, labels = batches[(warmup + i) % len(batches)]
        times.append(timer(lambda: step.step(images, labels, 1), device))  # noqa: B023 (called at once)
    return statistics.median(times)


def autotune(graph: nx.DiGraph, build: Callable[[StepOptions], object], batches: Sequence[Batch], *,
             device: torch.device, precision: str | None = None, timer: Timer = time_step, warmup: int = WARMUP,
             steps: int = STEPS) -> Tuned:
    """The fastest of `candidates` for `graph` (of `precision` alone when given), each built by
    `build(options)` (a fresh step from the run's seeded weights) and timed on `batches` (full
    batches of the run, on `device`).

    The first candidate (plain fused) must work; any other that raises is recorded as failed
    and not chosen. The global random streams are left as they were found.

    A graph with `crd` edges is not timed: its step reads each batch's positions in the
    training split, which no fast path but channels-last passes (`dclang.crd.check_crd`), and
    the timing steps pass none; it trains on the plain fused engine, and `Tuned.line` says so."""
    crd = [e.key for e in live_edges(graph) if LOSSES[e.loss].needs_indices]
    if crd:
        return Tuned(StepOptions(channels_last=False, precision=precision or "fp32"), {}, {}, measured=False,
                     skipped=f"`crd` edges ({', '.join(crd)}) train on the plain fused engine")
    key = (*_key(graph, batches, device), precision)
    if key in _CHOSEN:
        chosen = _CHOSEN[key]
        return Tuned(chosen.options, chosen.seconds, chosen.failed, measured=False)
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a candidate's warnings (HFTA falling back) are not the run's
        plain = build(StepOptions(channels_last=False, precision=precision or "fp32"))
        options = candidates(graph, device, convolutional=convolutional(plain.models), precision=precision)
        for i, option in enumerate(options):
            step = plain if i == 0 else None
            try:
                step = step or build(option)
                seconds[option.label] = measure(step, batches, device=device, warmup=warmup, steps=steps,
                                                timer=timer)
            except Exception as exc:  # noqa: BLE001 (a fast path that fails here is not chosen, and said so)
                if i == 0:
                    raise
                failed[option.label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            del step
            _release(device)
        del plain
        _release(device)
    best = min((o for o in options if o.label in seconds), key=lambda o: seconds[o.label])
    tuned = Tuned(best, seconds, failed)
    _CHOSEN[key] = tuned
    return tuned


#: choices made in this process, by `_key`
_CHOSEN: dict[tuple, Tuned] = {}


def _key(graph: nx.DiGraph, batches: Sequence[Batch], device: torch.device) -> tuple:
    """What decides which options are fastest: the architecture mix (every node's model and
    whether it trains, or is a mean teacher), the layers edges capture, the optimizer's kind, the batch's shape and
    the device. Not the gates and losses of the edges between outputs: a few operations on
    logits whichever they are, so a search's trials of one mix share one measurement."""
    nodes = tuple(sorted((str(attrs["spec"].model), attrs["spec"].frozen, attrs["spec"].is_ema)
                         for _, attrs in graph.nodes(data=True) if "spec" in attrs))
    layers = tuple(sorted((e.source_layer, e.target_layer) for e in live_edges(graph) if e.on_layers))
    images, _ = batches[0]
    return nodes, layers, graph.graph["train"].optimizer.name, tuple(images.shape), str(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free a timed candidate's memory (its models, optimizer state, CUDA graph pool)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = ["AUTOTUNE_DEVICES", "STEPS", "WARMUP", "Tuned", "applies", "autotune", "candidates", "measure",
           "time_step"]
