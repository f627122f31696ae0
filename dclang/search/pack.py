"""Packed trials: one worker process trains up to K trials as one engine of K members.

One trial per process leaves most of an accelerator idle and pays a process, a dataset in
memory and a CUDA context per trial. A packed worker holds K trials (`--pack K`) and trains
them as the union of their graphs: one forward and one backward for all of them per step
(`dclang.compile.engine.Engine`, the engine `dclang run` trains one graph with), with nodes
of one architecture fused across trials when HFTA is on (`--hfta`) and every other fast path
of `dclang run` as asked (`StepOptions`). What makes a trial's figures its own is kept per trial, exactly as
`train_graph` keeps it for one run: its models and optimizer state, its learning-rate schedule,
its update number `k` (the linear gates), its data order and augmentation (a generator seeded
with the trial's seed and its own epoch). So a trial trained in a pack computes what it
computes alone, to rounding, whoever its pack mates are and whenever they join or leave
(`tests/test_search_pack.py` and `tests/test_union.py` hold them equal).

Each trial reaches the end of its epochs on its own schedule: at its epoch's end it is
evaluated and reported, ASHA decides, and a pruned or finished trial leaves the pack while
the others go on; the worker fills the slot with a new trial at once, and the engine is rebuilt
around the trials it then holds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from dclang.compile import Engine, StepOptions


class TrialRun:
    """One trial's training cut into steps: a `dclang.train.run.Run` without a run folder,
    compiled as an engine member (no optimizer of its own), the steps themselves taken by the
    pack's engine.

    `on_epoch(epoch, record)` is called after each epoch's evaluation with the record
    `train_graph` gives its own `on_epoch`; whatever it raises (optuna's TrialPruned) leaves
    the run where it is, and the caller drops it.
    """

    def __init__(self, graph: nx.DiGraph, *, dataset, device: torch.device, on_epoch: Callable[[int, dict], None],
                 teacher_cache: Path | None = None, data_dir: str | None = None):
        from dclang.train.run import Run

        self.run = Run.prepare(graph, device=str(device), data_dir=data_dir, dataset=dataset, progress=False)
        self.step = self.run.compile(self.run.initial_states(teacher_cache), member=True)
        self.graph, self.epochs, self.on_epoch = self.run.graph, self.run.epochs, on_epoch
        self.batch = self.run.batch
        self.records: list[dict] = []
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch += 1
        self.started, self.lr = time.perf_counter(), self.step.lr()
        self.batches = self.run.batches(self.epoch)
        self.index = 0

    @property
    def done(self) -> bool:
        return self.epoch > self.epochs

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The (images, labels, k) of the trial's next step."""
        return next(self.batches)

    def stepped(self) -> bool:
        """Count a step taken; whether the epoch's steps are done."""
        self.index += 1
        return self.index == self.run.steps_per_epoch

    def finish_epoch(self, read: tuple[dict, dict]) -> dict:
        """After the epoch's last step: evaluate, report (`on_epoch`) and return the epoch's
        record. `read` is the epoch's statistics (`EpochStats.read`)."""
        record = self.run.end_epoch(self.epoch, read, lr=self.lr, started=self.started)
        self.records.append(record)
        epoch = self.epoch
        if epoch < self.epochs:
            self._start_epoch()
        else:
            self.epoch += 1
        self.on_epoch(epoch, record)
        return record


class Pack:
    """Up to K trial runs stepped together by one engine (`Engine`) executed with `options`
    (with `hfta`, nodes of one architecture are fused across the trials)."""

    def __init__(self, size: int, options: StepOptions | None = None):
        if size < 1:
            raise ValueError(f"a pack holds at least one trial, got {size}")
        self.size, self.options = size, options or StepOptions()
        self.runs: dict[Any, TrialRun] = {}
        self.engine: Engine | None = None

    def add(self, key: Any, run: TrialRun) -> None:
        assert len(self.runs) < self.size, "the pack is full"
        self.runs[key] = run

    @property
    def free(self) -> int:
        return self.size - len(self.runs)

    def _engine(self, members: list[TrialRun]) -> Engine:
        """The engine of `members`, rebuilt when the pack's trials changed."""
        if self.engine is None or self.engine.members != members:
            carried = self.engine.carry(members) if self.engine is not None else None
            if self.options.compile:  # the old engine's compiled code goes: the new one compiles anew, never
                torch._dynamo.reset()  # reaching torch's limit of recompilations of one function
            self.engine = Engine(members, self.options, carried=carried, packed=True)
        return self.engine

    def step(self, on_error: Callable[[Any, BaseException], None], on_done: Callable[[Any, TrialRun], None]) -> None:
        """One step of every run. A run that raises at its epoch's end (pruned, diverged)
        leaves the pack after `on_error(key, exc)`; a run past its last epoch leaves after
        `on_done(key, run)`. The step itself is shared: if it raises, every run leaves with
        that error."""
        if not self.runs:
            return
        runs = list(self.runs.items())
        try:
            engine = self._engine([run for _, run in runs])
            engine.step_all([run.next_batch() for _, run in runs])
        except Exception as exc:  # noqa: BLE001 (any error of the shared step fails every trial in it, with that error)
            self.runs.clear()
            self.engine = None
            for key, _ in runs:
                on_error(key, exc)
            return
        for m, (key, run) in enumerate(runs):
            if not run.stepped():
                continue
            try:
                run.finish_epoch(engine.read(m))
            except Exception as exc:  # noqa: BLE001 (optuna.TrialPruned too: the trial ends with what it raised)
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
    `options` (`StepOptions`) are `dclang run`'s fast paths, applied to the pack's engine.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from dclang.search.space import Realized
    from dclang.search.study import counted, reap, retry
    from dclang.search.worker import INTERRUPTED, WAIT_POLL, Waiting, say
    from dclang.train.run import check_options, resolve_device

    device = resolve_device(objective.device)
    check_options(options, device)
    pack = Pack(size, options)
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
                if not pack.free:  # its original failed and it must train, but the pack is full
                    waiting[trial.number] = (trial, sample)
                    return
                graph = sample.checked.graph
                on_epoch, metrics = objective.reporter(trial, graph.graph["target"])
                run = TrialRun(graph, dataset=objective.dataset(graph), device=device, on_epoch=on_epoch,
                               teacher_cache=objective.teacher_cache, data_dir=objective.data_dir)
        except optuna.TrialPruned:
            tell(trial, TrialState.PRUNED)
            return
        except (KeyboardInterrupt, UpdateFinishedTrialError):
            raise
        except Exception:  # noqa: BLE001 (invalid sample, or an error noted on the trial by `recording`)
            tell(trial, TrialState.FAIL)
            return
        running[trial.number] = (trial, metrics)
        pack.add(trial.number, run)

    def settle_waiting() -> None:
        """Settle every trial waiting for an earlier trial of its graph whose original has
        ended: a copied value needs no slot, so a full pack never delays it; only a trial that
        must train after all (its original failed) waits for a free slot."""
        for number, (trial, sample) in list(waiting.items()):
            del waiting[number]
            settle(trial, lambda trial=trial, sample=sample: objective.settle(trial, sample, wait=False))

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu")  # as `train_graph` trains
    try:
        looked = 0.0
        while True:
            if waiting and time.monotonic() - looked > WAIT_POLL:
                settle_waiting()
                looked = time.monotonic()
            # a trial waiting for an earlier trial of its graph holds no slot: a duplicate never
            # keeps the pack from training
            while (pack.free > 0 and not objective.stopped_because
                   and counted(study.get_trials(deepcopy=False)) + len(pack.runs) + len(waiting) < config.trials):
                trial = study.ask()
                settle(trial, lambda trial=trial: objective.begin(trial, wait=False))
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
