"""One search worker: ask the study for a trial, sample its graph, train it, report, repeat.

A worker is one process with one dataset in memory. `dclang search` starts D of them on its
machine (`python -m dclang search --worker ...`); more can join from other machines with the
same command. A worker stops when the study has its number of trained trials (COMPLETE or
PRUNED), so with D workers T <= finished <= T + D - 1.

What a trial records (user attributes; the dashboard shows them):
  owner                            who runs it: worker, host, pid, start time (see `study.reap`)
  kt                               the sampled graph, as `trials/NNNN.kt` holds it
  graph, dropped                   the trained graph's key (`equivalence.canonical_key`: one key for
                                   graphs that differ only in the names of non-target nodes) and
                                   the dead nodes left out
  metrics                          per epoch: every node's val accuracy and train loss, seconds
  invalid | error | failed         why it is FAIL: a sample that cannot train, an exception in
                                   training, a worker that died or was stopped
  duplicate_of                     the earlier trial of the same graph whose numbers it copied
  renamed                          ... when that graph is this one under other node names: this
                                   trial's node -> the earlier trial's node
  retry_of, retry_count            the trial it runs again, whose worker died or was stopped
Intermediate values are the target's validation accuracy, step = epoch (1-based).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from dclang.api import parse
from dclang.diagnostics import UserError
from dclang.search.equivalence import canonical_key, same_up_to_names
from dclang.search.space import Realized, realize, search_space
from dclang.search.study import (
    COUNTED,
    INTERRUPTED,
    STOPS,
    StudyConfig,
    counted,
    hand_back,
    load_study,
    open_storage,
    owner,
    reap,
    redact,
    retry,
)

#: a worker gives up after this many trials in a row raised (a broken setup, not a bad graph)
MAX_ERRORS_IN_A_ROW = 5
#: ... or after this many invalid samples in a row (a template that hardly ever gives a graph)
MAX_INVALID_IN_A_ROW = 200
#: the failed trials' user attribute -> (how many in a row stop a worker, what the stop says)
_STREAKS = {"error": (MAX_ERRORS_IN_A_ROW, "{n} trials in a row failed; the last: {why}"),
            "invalid": (MAX_INVALID_IN_A_ROW, "{n} samples in a row could not be trained; the last:\n{why}")}
#: seconds between looks at an earlier trial of the same graph that is still running
WAIT_POLL = 1.0


def say(message: str) -> None:
    """A line for the worker's log (stderr): the worker's stdout is not a result anyone reads."""
    print(message, file=sys.stderr, flush=True)


class Waiting(NamedTuple):
    """A sample whose graph an earlier trial is still training: settle it once that ends."""

    sample: Realized


class InvalidSample(Exception):
    """The sampled graph cannot be trained (its diagnostics are in the trial's `invalid`)."""


class _NoTracebackForExpectedEnds(logging.Filter):
    """Optuna logs every failed trial with its traceback; an invalid sample and a stopped
    worker's trial are expected outcomes whose reason is one line (in the trial's `invalid`,
    or `failed`), so their records keep the message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (InvalidSample, KeyboardInterrupt)):
            record.exc_info = None
        return True


def load_trainer(spec: str | None) -> Callable[..., Any]:
    """`train_graph`, or `module:function` with its signature (the tests' cheap trainer).

    A replacement trainer gets `dataset=None` and loads data itself if it needs any: the
    dataset a worker holds is there to spare `train_graph` a load per trial, and loading it
    (torch, scikit-learn) would cost a trainer that needs none more than its trials.
    """
    if spec is None:
        from dclang.train.loop import train_graph

        return train_graph
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load the trainer `{spec}`: {exc}", "give it as module:function") from exc


class Objective:
    """The function Optuna calls per trial, with what it needs loaded once per process."""

    def __init__(self, study: optuna.Study, config: StudyConfig, *, worker: str, device: str,
                 data_dir: str | None, teacher_cache: Path, trainer: Callable[..., Any], preload: bool):
        self.study = study
        self.config = config
        self.worker = worker
        self.device = device
        self.data_dir = data_dir
        self.teacher_cache = teacher_cache
        self.trainer = trainer
        self.preload = preload
        self.template = parse(config.template)
        self.space = search_space(self.template)
        self.datasets: dict[tuple, Any] = {}
        self.current: optuna.Trial | None = None
        self.in_a_row = dict.fromkeys(_STREAKS, 0)  # failed trials in a row, by kind
        self.stopped_because: str | None = None

    def dataset(self, graph) -> Any:
        """The dataset for a graph's data settings, loaded once per process."""
        from dclang.data import DataError, load_dataset

        spec = graph.graph["data"]
        key = (spec.dataset, spec.val_split, spec.split_seed, spec.path)
        if key not in self.datasets:
            try:
                self.datasets[key] = load_dataset(spec.dataset, data_dir=self.data_dir, val_split=spec.val_split,
                                                  split_seed=spec.split_seed, path=spec.path)
            except DataError as exc:
                raise UserError(str(exc)) from exc
        return self.datasets[key]

    def __call__(self, trial: optuna.Trial) -> float:
        with self.recording(trial), STOPS.allowing():  # a stop asked for between trials is raised here
            sample = self.begin(trial)
            return sample if not isinstance(sample, Realized) else self._train(trial, sample)

    @contextlib.contextmanager
    def recording(self, trial: optuna.Trial) -> Iterator[None]:
        """Note on the trial why it fails: `error` for an exception, `failed` for a stop."""
        try:
            yield
        except (optuna.TrialPruned, InvalidSample, UpdateFinishedTrialError):
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("failed", INTERRUPTED)
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise

    def begin(self, trial: optuna.Trial, *, wait: bool = True) -> Realized | float | Waiting:
        """Sample the trial's graph: the sample to train, or the value copied from an earlier
        trial of the same graph (TrialPruned when that one was pruned, InvalidSample for a
        graph that cannot train). While that earlier trial runs, wait for it, or with
        `wait=False` return `Waiting` (a packed worker may be the one training it)."""
        self.current = trial
        trial.set_user_attr("owner", owner(self.worker))
        reap(self.study)
        params = {p.name: trial.suggest_categorical(p.name, p.choices) for p in self.space}
        sample = realize(self.template, params, space=self.space, path=self.config.template_path)
        key = canonical_key(sample.checked.graph) if sample.ok else sample.key
        trial.set_user_attr("kt", sample.text)
        trial.set_user_attr("graph", key)
        if sample.dropped:
            trial.set_user_attr("dropped", list(sample.dropped))
        if not sample.ok:
            trial.set_user_attr("invalid", sample.problem)
            raise InvalidSample(sample.problem.splitlines()[0])
        return self.settle(trial, sample, wait=wait)

    def settle(self, trial: optuna.Trial, sample: Realized, *, wait: bool = True) -> Realized | float | Waiting:
        """The sample to train, or the earliest trial of the same graph's copied value; while
        that one is still running, wait (or return `Waiting`).

        Only earlier-numbered trials count, so two workers that draw one graph at the same
        moment never wait on each other: the later one waits, the earlier one trains.
        """
        key = trial.user_attrs["graph"]
        while True:
            same = [t for t in self.study.get_trials(deepcopy=False)
                    if t.number < trial.number and t.user_attrs.get("graph") == key
                    and "duplicate_of" not in t.user_attrs]
            done = [t for t in same if t.state in COUNTED]
            if done:
                return self._copy(trial, min(done, key=lambda t: t.number), sample)
            if not any(t.state == TrialState.RUNNING for t in same):
                return sample
            if not wait:
                return Waiting(sample)
            time.sleep(WAIT_POLL)
            reap(self.study)

    def _copy(self, trial: optuna.Trial, earlier: FrozenTrial, sample: Realized) -> float:
        """Record an earlier trial's numbers for this one instead of training again.

        The values are reported but `should_prune` is not asked: the pruner's rungs hold the
        graph once, from the trial that trained it, so a graph drawn twice does not weigh twice.
        """
        trial.set_user_attr("duplicate_of", earlier.number)
        renamed = renaming(sample, earlier)
        if renamed:
            trial.set_user_attr("renamed", renamed)
        trial.set_user_attr("metrics", earlier.user_attrs.get("metrics", []))
        for step, value in sorted(earlier.intermediate_values.items()):
            trial.report(value, step)
        if earlier.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"the same graph as trial {earlier.number}, which was pruned")
        return earlier.value

    def _train(self, trial: optuna.Trial, sample: Realized) -> float:
        graph = sample.checked.graph
        on_epoch, metrics = self.reporter(trial, graph.graph["target"])
        self.trainer(graph, run_dir=None, device=self.device, data_dir=self.data_dir, on_epoch=on_epoch,
                     progress=False, teacher_cache=self.teacher_cache,
                     dataset=self.dataset(graph) if self.preload else None)
        return self.result(graph, metrics)

    def reporter(self, trial: optuna.Trial, target: str) -> tuple[Callable[[int, dict], None], list[dict]]:
        """The trainer's `on_epoch` for a trial, and the per-epoch metrics it records: report
        the target's val accuracy, let the pruner decide."""
        last = self.config.epochs
        metrics: list[dict] = []

        def on_epoch(epoch: int, record: dict) -> None:
            nodes = record["nodes"]
            acc = nodes[target]["val_acc"]
            if acc is None:
                raise UserError("the validation split is empty, so search has nothing to score trials on",
                                "set `val_split` in the template's data block")
            metrics.append({"epoch": epoch, "val_acc": {n: v["val_acc"] for n, v in nodes.items()},
                            "train_loss": {n: v.get("train_loss") for n, v in nodes.items()},
                            "seconds": record.get("seconds")})
            trial.set_user_attr("metrics", metrics)
            trial.report(acc, epoch)
            # a trial that trained to the last epoch is complete, never pruned
            if epoch < last and trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {acc:.4f} at epoch {epoch} is below its rung's cut")

        return on_epoch, metrics

    @staticmethod
    def result(graph, metrics: list[dict]) -> float:
        if not metrics:
            raise RuntimeError("the trainer returned without finishing an epoch")
        return metrics[-1]["val_acc"][graph.graph["target"]]

    def after(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's per-trial callback: stop a worker that was asked to stop between trials, or
        whose trials keep failing."""
        if STOPS.requested:
            study.stop()
        kind = next((k for k in _STREAKS if k in trial.user_attrs), None) if trial.state == TrialState.FAIL else None
        if kind is None:
            self.in_a_row = dict.fromkeys(_STREAKS, 0)
            return
        self.in_a_row[kind] += 1
        limit, message = _STREAKS[kind]
        if self.in_a_row[kind] >= limit:
            self.stopped_because = message.format(n=self.in_a_row[kind], why=trial.user_attrs[kind])
            study.stop()


def renaming(sample: Realized, earlier: FrozenTrial) -> dict[str, str]:
    """The node names of `sample`'s trained graph that are other names in the earlier
    trial's (this node -> that node); empty when the two graphs are written alike."""
    from dclang.api import check
    from dclang.search.output import trained_text

    text, _ = trained_text(earlier.user_attrs["kt"])
    if text == sample.trained_text:
        return {}
    mapping = same_up_to_names(sample.checked.graph, check(text).graph) or {}
    return {a: b for a, b in sorted(mapping.items()) if a != b}


def device_for(device: str, slot: int | None) -> str:
    """The device of local worker `slot`: with several GPUs, `auto` and `cuda` deal the
    parent's workers out over them (worker k on GPU k mod count)."""
    if slot is None or device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{slot % count}" if count > 1 else device


def run_worker(storage_url: str, study_name: str, *, worker: str, device: str, data_dir: str | None,
               teacher_cache: Path, trainer: str | None = None, slot: int | None = None, pack: int = 1,
               options=None, autotune: bool = False) -> None:
    """Work on the study until it has its trials; a stopped worker's trial is retried.

    `slot` is this worker's number among the workers `dclang search` started (None for a
    worker that joined by itself). `pack` > 1 trains that many trials at once in this process
    (`dclang.search.pack`); `options` (`StepOptions`: any fast path) also go through the packed
    path, a pack of one being what `dclang run` trains. With `autotune`, dclang's trainer
    measures each trial's fast paths on CUDA (`train_graph`).

    The parent stops its workers with SIGTERM, after Ctrl-C reached it: a worker it started
    ignores SIGINT (Ctrl-C at the terminal reaches the whole process group), so each gets one
    stop and hands its trials back once. A worker joined by hand stops on either. A stopped
    worker exits with status 130, at any point (also while it starts), without a traceback."""
    if slot is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    STOPS.install(*((signal.SIGTERM,) if slot is not None else (signal.SIGINT, signal.SIGTERM)))
    try:
        _work(storage_url, study_name, worker=worker, device=device, data_dir=data_dir, teacher_cache=teacher_cache,
              trainer=trainer, slot=slot, pack=pack, options=options, autotune=autotune)
    except KeyboardInterrupt:
        with contextlib.suppress(UserError):  # stopped before the study was open: nothing to hand back
            hand_back(load_study(open_storage(storage_url), study_name, where=redact(storage_url))[0])
        say(f"worker {worker}: stopped; its running trials are marked interrupted and queued to run again")
        raise SystemExit(130) from None


def _work(storage_url: str, study_name: str, *, worker: str, device: str, data_dir: str | None,
          teacher_cache: Path, trainer: str | None, slot: int | None, pack: int, options,
          autotune: bool) -> None:
    study, config = load_study(open_storage(storage_url), study_name, worker=worker, where=redact(storage_url))
    real = trainer is None  # a replacement trainer (tests) gets neither a dataset nor a GPU dealt out: no torch
    objective = Objective(study, config, worker=worker, device=device_for(device, slot) if real else device,
                          data_dir=data_dir, teacher_cache=teacher_cache,
                          trainer=partial(load_trainer(trainer), autotune=True) if real and autotune else
                          load_trainer(trainer), preload=real)
    from dclang.ir import build_graph, is_open

    template_graph = build_graph(objective.template)
    data = template_graph.graph["data"]
    if objective.preload and not any(is_open(v) for v in (data.val_split, data.split_seed, data.path)):
        objective.dataset(template_graph)  # a missing dataset stops the worker here, not every trial
    reap(study)
    if counted(study.get_trials(deepcopy=False)) >= config.trials:
        say(f"worker {worker}: the study `{study_name}` already has its {config.trials} trials")
        return
    say(f"worker {worker}: joined `{study_name}` ({config.sampler} sampler, {config.pruner} pruner, "
        f"{config.epochs} epochs, {config.trials} trials)")
    logging.getLogger("optuna.study._optimize").addFilter(_NoTracebackForExpectedEnds())  # where it logs them
    if real:
        _freeze_start_up()
    if pack > 1 or options is not None:
        from dclang.search.pack import work_packed

        if not real:
            raise UserError("a packed worker (--pack, or a fast path such as --hfta) trains with dclang's own engine",
                            "leave out --trainer")
        with STOPS.allowing():
            work_packed(study, config, objective, size=pack, options=options)
    else:
        STOPS.interruptible = False  # between trials, a stop waits for the next trial's start
        _optimize(study, config, objective, worker, study_name)
    if objective.stopped_because:
        raise UserError(f"worker {worker} stopped: {objective.stopped_because}")


def _freeze_start_up() -> None:
    """Put what the worker's start created (modules, torch's internals, the dataset) out of the
    garbage collector's sight (`gc.freeze`). Optuna collects after every trial (`gc_after_trial`,
    which keeps a long search's memory flat); walking those few hundred thousand objects took
    0.2 s a trial, a third of a small digits trial. torch imports its compiler's machinery when
    it builds its first optimizer, so one is built first."""
    import gc

    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    gc.collect()
    gc.freeze()


def _optimize(study: optuna.Study, config: StudyConfig, objective: Objective, worker: str, study_name: str) -> None:
    """One trial at a time, through Optuna's own loop."""
    stop = optuna.study.MaxTrialsCallback(config.trials, states=COUNTED)
    try:
        while True:
            try:
                study.optimize(objective, callbacks=[stop, objective.after], catch=(Exception,), gc_after_trial=True)
                break
            except (UpdateFinishedTrialError, ValueError):
                # Another process failed this worker's trial (a heartbeat missed for longer than
                # the grace period): Optuna cannot record its end, but the worker is fine.
                frozen = objective.current and study._storage.get_trial(objective.current._trial_id)
                if frozen is None or frozen.state != TrialState.FAIL or "failed" not in frozen.user_attrs:
                    raise
                say(f"worker {worker}: trial {frozen.number} was failed by another process "
                    f"({frozen.user_attrs['failed']}); going on")
                if objective.stopped_because or counted(study.get_trials(deepcopy=False)) >= config.trials:
                    break
        if STOPS.requested:  # asked to stop between trials: no trial of this worker is running
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if objective.current is not None:
            frozen = study._storage.get_trial(objective.current._trial_id)
            if frozen.state == TrialState.FAIL and frozen.user_attrs.get("failed") == INTERRUPTED:
                retry(study, frozen)
        raise


__all__ = ["INTERRUPTED", "InvalidSample", "Objective", "load_trainer", "run_worker"]
