"""Packed trials: one worker process trains up to K trials, a step of each in turn.

One trial per process leaves most of an accelerator idle and pays a process, a dataset in
memory and a CUDA context per trial. A packed worker holds K trials (`--pack K`) and advances
them in lockstep: one step of every trial, then the next. What makes a trial's figures its
own is kept per trial, exactly as `train_graph` keeps it for one run: its compiled step
(models, optimizer state, learning-rate schedule), its update number `k` (the linear gates),
its data order and augmentation (a generator seeded with the trial's seed and its own epoch).
So a trial trained in a pack computes what it computes alone (`tests/test_search_pack.py`
holds them equal), whoever its pack mates are and whenever they join or leave.

Each trial reaches the end of its epochs on its own schedule: at its epoch's end it is
evaluated and reported, ASHA decides, and a pruned or finished trial leaves the pack while
the others go on; the worker fills the slot with a new trial at once.

This is the lockstep design: the K trials' steps run one after the other in one process, not
as one union graph with one forward and one backward for all. A union forward needs one
input batch for every member, and trials in a pack are at different epochs with their own
data orders, so their batches differ; within each trial, nodes of one architecture are still
fused by the HFTA path when it is on (`StepOptions(hfta=True)`).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import networkx as nx
import torch


class TrialRun:
    """One trial's training cut into steps: what `train_graph` does for a graph without a
    run folder (its own pieces: `_prepare`, the teachers, `_compile`, `_epoch_steps`), one
    batch per `advance`.

    `on_epoch(epoch, record)` is called after each epoch's evaluation with the record
    `train_graph` gives its own `on_epoch`; whatever it raises (optuna's TrialPruned) leaves
    the run where it is, and the caller drops it.
    """

    def __init__(self, graph: nx.DiGraph, *, dataset, device: torch.device, on_epoch: Callable[[int, dict], None],
                 teacher_cache: Path | None = None, data_dir: str | None = None, options=None):
        from dclang.train.loop import _compile, _prepare, train_graph
        from dclang.train.teachers import init_states

        self.run = _prepare(graph, dist=None, run_dir=None, device=str(device), engine="fused", seed=None,
                            epochs=None, data_dir=data_dir, dataset=dataset, progress=False)
        pretrain = partial(train_graph, device=str(device), engine="fused", data_dir=data_dir, progress=False,
                           dataset=dataset)
        states = init_states(self.run.graph, dataset=dataset, cache=teacher_cache, pretrain=pretrain)
        self.training = _compile(self.run, states, options)
        self.graph, self.epochs, self.on_epoch = self.run.graph, self.run.epochs, on_epoch
        self.records: list[dict] = []
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        from dclang.train.loop import _epoch_steps

        self.epoch += 1
        self.steps = _epoch_steps(self.run, self.training, self.epoch)
        self.index = 0

    @property
    def done(self) -> bool:
        return self.epoch > self.epochs

    def advance(self) -> dict | None:
        """One step on the trial's next batch; at the end of an epoch, evaluate, report
        (`on_epoch`) and return the epoch's record."""
        next(self.steps)
        self.index += 1
        if self.index < self.run.steps_per_epoch:
            return None
        try:
            next(self.steps)
        except StopIteration as end:
            record = end.value
        else:
            raise AssertionError("an epoch ran past its steps")
        self.records.append(record)
        epoch = self.epoch
        if epoch < self.epochs:
            self._start_epoch()
        else:
            self.epoch += 1
        self.on_epoch(epoch, record)
        return record


class Pack:
    """Up to K trial runs advanced in lockstep. `fill` is asked for a new run whenever a slot
    is free; it returns None when there is nothing more to run."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a pack holds at least one trial, got {size}")
        self.size = size
        self.runs: dict[Any, TrialRun] = {}

    def add(self, key: Any, run: TrialRun) -> None:
        assert len(self.runs) < self.size, "the pack is full"
        self.runs[key] = run

    @property
    def free(self) -> int:
        return self.size - len(self.runs)

    def step(self, on_error: Callable[[Any, BaseException], None], on_done: Callable[[Any, TrialRun], None]) -> None:
        """One step of every run. A run that raises (pruned, diverged) leaves the pack after
        `on_error(key, exc)`; a run past its last epoch leaves after `on_done(key, run)`."""
        for key, run in list(self.runs.items()):
            try:
                run.advance()
            except Exception as exc:  # optuna.TrialPruned is an Exception too
                del self.runs[key]
                on_error(key, exc)
                continue
            if run.done:
                del self.runs[key]
                on_done(key, run)





# ---------------------------------------------------------------- a packed worker


def work_packed(study, config, objective, *, size: int, options=None) -> None:
    """A worker's loop with a pack of `size` trials: keep the pack full with new trials of the
    study until it has its number of trained trials, and tell the study each one's end.

    `objective` is the worker's `Objective`: it samples a trial (`begin`), reports its epochs
    (`reporter`) and counts failures in a row (`after`). A trial's own end is told as soon as
    it comes, so ASHA judges every trial at every epoch and a pruned trial's slot is refilled
    at once. Ctrl-C or SIGTERM fails every running trial of the pack as `interrupted` and
    queues each to run again; a killed worker's trials are failed and retried by `study.reap`.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from dclang.search.space import Realized
    from dclang.search.study import counted, reap, retry
    from dclang.search.worker import INTERRUPTED, WAIT_POLL, Waiting, say
    from dclang.train.loop import resolve_device

    device = resolve_device(objective.device)
    pack = Pack(size)
    running: dict[int, tuple[optuna.Trial, list[dict]]] = {}
    waiting: dict[int, tuple[optuna.Trial, Any]] = {}  # trials whose graph an earlier trial trains

    def tell(trial: optuna.Trial, state: TrialState, value: float | None = None) -> None:
        try:
            study.tell(trial, value, state=state)
        except UpdateFinishedTrialError:  # failed by another process (a heartbeat missed): going on
            say(f"trial {trial.number} was failed by another process; going on")
            return
        objective.after(study, study._storage.get_trial(trial._trial_id))

    def failed(number: int, exc: BaseException) -> None:
        trial, _ = running.pop(number)
        if isinstance(exc, UpdateFinishedTrialError):
            say(f"trial {trial.number} was failed by another process; going on")
            return
        if isinstance(exc, optuna.TrialPruned):
            tell(trial, TrialState.PRUNED)
            return
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        tell(trial, TrialState.FAIL)

    def finished(number: int, run: TrialRun) -> None:
        trial, metrics = running.pop(number)
        tell(trial, TrialState.COMPLETE, objective.result(run.graph, metrics))

    def settle(trial: optuna.Trial, step: Callable[[], Any]) -> None:
        """Run `step` (sampling the trial, or settling a waiting one) and act on its outcome:
        tell a copied or failed trial's end, park a waiting one, put a new run in the pack."""
        try:
            with objective.recording(trial):
                sample = step()
                if isinstance(sample, Waiting):  # an earlier trial trains this graph: decide when it ends
                    waiting[trial.number] = (trial, sample.sample)
                    return
                if not isinstance(sample, Realized):  # the same graph as an earlier trial: its value
                    tell(trial, TrialState.COMPLETE, sample)
                    return
                graph = sample.checked.graph
                on_epoch, metrics = objective.reporter(trial, graph.graph["target"])
                run = TrialRun(graph, dataset=objective.dataset(graph), device=device, on_epoch=on_epoch,
                               teacher_cache=objective.teacher_cache, data_dir=objective.data_dir, options=options)
        except optuna.TrialPruned:
            tell(trial, TrialState.PRUNED)
            return
        except (KeyboardInterrupt, UpdateFinishedTrialError):
            raise
        except Exception:  # invalid sample, or an error noted on the trial by `recording`
            tell(trial, TrialState.FAIL)
            return
        running[trial.number] = (trial, metrics)
        pack.add(trial.number, run)

    def open_slots() -> int:
        """Slots for new trials: a trial waiting for an earlier trial of its graph holds none (it
        only copies a value when that one ends, and takes a slot then only if it must train),
        so that a duplicate never keeps the pack from training."""
        return pack.free

    def settle_waiting() -> None:
        for number, (trial, sample) in list(waiting.items()):
            if pack.free:
                del waiting[number]
                settle(trial, lambda: objective.settle(trial, sample, wait=False))

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu")  # as `train_graph` trains
    try:
        looked = 0.0
        while True:
            if waiting and time.monotonic() - looked > WAIT_POLL:
                settle_waiting()
                looked = time.monotonic()
            while (open_slots() > 0 and not objective.stopped_because
                   and counted(study.get_trials(deepcopy=False)) + len(pack.runs) + len(waiting) < config.trials):
                trial = study.ask()
                settle(trial, lambda: objective.begin(trial, wait=False))
            if pack.runs:
                pack.step(on_error=failed, on_done=finished)
            elif waiting:
                time.sleep(WAIT_POLL)  # only trials waiting for other workers' trials of their graphs
                reap(study)
            else:
                break
    except KeyboardInterrupt:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the hand-back short
            signal.signal(stop_signal, signal.SIG_IGN)
        for trial, _ in [*running.values(), *waiting.values()]:
            trial.set_user_attr("failed", INTERRUPTED)
            try:
                study.tell(trial, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            retry(study, study._storage.get_trial(trial._trial_id))
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)


__all__ = ["Pack", "TrialRun", "work_packed"]
