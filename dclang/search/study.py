"""The Optuna study behind a search: its storage, its stored configuration, and its upkeep.

A study is created once, by `dclang search`, and its configuration (the template text,
sampler, pruner, epochs, seed, the trial budget) goes into the study's user attributes.
Every worker, also one joining from another machine with `--worker`, rebuilds its sampler and
pruner from that stored configuration and never from its own flags: a study searched by
workers that disagree on the pruner or the template would be no single experiment.

Upkeep: a worker that dies (SIGKILL, a lost machine) leaves its trial RUNNING. On the journal
file there is no heartbeat, so each RUNNING trial records the pid, its start time and the host
of its worker (user attribute `owner`); any process of the search on that host (the parent
while it waits, every worker at start and before each trial) fails a trial whose worker is
gone and enqueues a retry with the same parameters. On an RDB storage (PostgreSQL) Optuna's
heartbeat does the same for workers on other machines, with the same retry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from dclang.diagnostics import UserError

#: the study user attribute that holds the configuration
CONFIG_ATTR = "dclang_search"
CONFIG_FORMAT = "dclang-search/1"
#: a trial whose worker died is run again at most this many times (then it stays FAIL)
MAX_RETRY = 2
#: RDB heartbeat: a RUNNING trial silent for GRACE_PERIOD seconds is failed and retried
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 120
#: the states that count towards the trial budget: trials that were trained (or reused)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
#: the `failed` note of a trial whose worker was stopped (Ctrl-C, SIGTERM): it is run again
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM stopped its worker): it runs again first on --resume"


def interrupted(trial: FrozenTrial) -> bool:
    """Whether a FAIL trial was handed back by a stopped worker (not lost with a dead one)."""
    return trial.user_attrs.get("failed") == INTERRUPTED


# ---------------------------------------------------------------- stopping


class StopSignals:
    """How a search process takes SIGINT and SIGTERM: the first one stops it, as a
    KeyboardInterrupt, but never where stopping would leave the study damaged.

    - Once: every later signal is ignored, so the hand-back that follows (the running trials
      marked `interrupted`, their retries queued, the outputs written) is never cut short.
      Two signals are the rule, not the exception: Ctrl-C reaches the parent and the
      parent's SIGTERM reaches each worker.
    - Never inside a journal write: Optuna appends a record under a lock file; a
      KeyboardInterrupt between taking the lock and releasing it leaves the lock behind, and
      every other process waits out its grace period (30 s, with warnings) before breaking it.
      A signal that arrives during a write is raised when the write ends.
    - Only where `interruptible`: a worker between two trials (in Optuna's ask and tell) only
      notes the request (`requested`); it stops where its next trial would start, so no trial
      is ever left RUNNING without the `owner` that lets it be handed back.
    """

    def __init__(self) -> None:
        self.requested = False
        self.interruptible = True
        self._writing = 0
        self._raised = False

    def install(self, *signals: signal.Signals) -> None:
        """Take `signals` with this handler, from a fresh start (no stop requested yet)."""
        self.requested = self._raised = False
        for number in signals:
            signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
        self.requested = True
        self.raise_if_due()

    def raise_if_due(self) -> None:
        """Raise the KeyboardInterrupt of a stop request, where and when it may be raised."""
        if self.requested and self.interruptible and not self._writing and not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A journal write: a stop waits for its end."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        self.raise_if_due()

    @contextlib.contextmanager
    def allowing(self) -> Iterator[None]:
        """Where a stop may interrupt (a worker's trial); one requested before is raised here."""
        before = self.interruptible
        self.interruptible = True
        try:
            self.raise_if_due()
            yield
        finally:
            self.interruptible = before


#: this process's stop handling (signal handlers are per process)
STOPS = StopSignals()


@dataclass(frozen=True)
class StudyConfig:
    """What makes a search one experiment; stored in the study when it is created."""

    template: str  # the prepared template (epochs written in, `init` paths absolute)
    template_path: str
    sampler: str
    seed: int
    pruner: str
    eta: int
    min_resource: int
    epochs: int
    trials: int
    format: str = CONFIG_FORMAT

    def to_attr(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: dict[str, Any]) -> "StudyConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in attr.items() if k in names})

    def sampler_for(self, worker: str, joined_at: int = 0) -> optuna.samplers.BaseSampler:
        """The study's sampler, seeded per worker and per the number of trials the study had
        when the worker joined: workers seeded alike would draw the same graphs, and so would
        a worker restarted (after a kill, on --resume) with its old seed. The same search
        started afresh draws the same graphs again."""
        seed = zlib.crc32(f"{self.seed}/{worker}/{joined_at}".encode("utf-8"))
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # constant_liar: a running trial counts as a poor result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_resource,
                                                          reduction_factor=self.eta, min_early_stopping_rate=0)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.min_resource, max_resource=self.epochs,
                                                  reduction_factor=self.eta)
        return optuna.pruners.NopPruner()

    def rungs(self) -> list[int]:
        """The epochs at which the pruner may stop a trial: min_resource × eta^k before the
        last epoch (paper 3.5: epochs 1, 2, 4, ..., 2^k)."""
        if self.pruner == "none":
            return []
        out, epoch = [], self.min_resource
        while epoch < self.epochs:
            out.append(epoch)
            epoch *= self.eta
        return out


# ---------------------------------------------------------------- storage


def open_storage(url: str, *, create: bool = False) -> optuna.storages.BaseStorage:
    """A journal file for a path, an RDB storage for a URL (`postgresql://`, `sqlite:///`).

    The journal file needs no server and is safe for many processes on one machine (and on a
    shared file system with working locks). PostgreSQL serves many machines; its workers send
    a heartbeat, and a trial whose worker goes silent is failed and retried. A journal is made
    only with `create` (a new search): resuming or joining one that is not there is an error,
    and leaves no empty journal behind.
    """
    if "://" not in url:
        return _open_journal(Path(url), create)
    if url.startswith("sqlite"):
        warnings.warn("SQLite locks the whole database on every write: with several workers they wait on each "
                      "other and may fail with `database is locked`; use the journal file (the default) on one "
                      "machine, or PostgreSQL for several", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(_with_driver(url), heartbeat_interval=HEARTBEAT_INTERVAL,
                                              grace_period=GRACE_PERIOD, heartbeat_stale_trial_callback=retry)
        except (ImportError, ModuleNotFoundError) as exc:
            raise UserError(f"cannot open the storage {redact(url)}: {exc}",
                            "install the database driver (PostgreSQL: `pip install psycopg2-binary`)") from exc
        except Exception as exc:  # sqlalchemy's errors: a wrong host, password or database
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open the storage {redact(url)}: {first}",
                            "check the URL (postgresql://USER:PASSWORD@HOST:PORT/DATABASE) and that the server "
                            "accepts connections from this machine") from exc


def _open_journal(path: Path, create: bool) -> optuna.storages.BaseStorage:
    """The journal at `path`, read through once so that a damaged one is refused here, with
    its name and what to do, and not by a traceback from deep inside Optuna later."""
    from optuna.storages.journal import JournalStorage

    if not create and not path.is_file():
        raise UserError(f"no study journal at {path}",
                        "give the search folder that holds it (-o OUT, whose journal is OUT/study.journal) or its "
                        "path with --storage; a new search starts with `dclang search --template T.kt --trials N "
                        "-o OUT`")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _mend_torn_end(path)
        _check_records(path)
        storage = JournalStorage(_JournalFile(str(path)))
        storage.get_all_studies()
    except OSError as exc:
        raise UserError(f"cannot open the study journal {path}: {exc.strerror or exc}",
                        "check that the folder exists and is writable") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (Optuna replays the file: any record may break it differently)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the study journal {path} is damaged: a record cannot be replayed "
                        f"({type(exc).__name__}: {first})",
                        "dclang and Optuna only ever append whole records to it, so something else changed it: "
                        "restore it from a copy, or start a new search with another -o") from None
    return storage


class _JournalFile(JournalFileBackend):
    """Optuna's journal file, whose reads and writes a stop signal waits for (`StopSignals`)."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with STOPS.writing():
            super().append_logs(logs)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        with STOPS.writing():  # a replay cut halfway would leave this process's view of the study half updated
            logs = list(super().read_logs(log_number_from))
        yield from logs


def _check_records(path: Path) -> None:
    """Refuse a journal with a line that is not a record, naming the line.

    Optuna skips such a line while it is the last one, but the next record appended after it
    makes the whole journal unreadable (a JSONDecodeError in every process). A kill leaves only
    a last record cut short, without its newline, which `_mend_torn_end` has removed already;
    a whole line that is not a record was written by something else, so it is refused, with
    how to recover (the records before it are the study as it was)."""
    data = path.read_bytes() if path.is_file() else b""
    lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]  # whole lines: one being appended now is not one
    for number, line in enumerate(lines, 1):
        problem = _record_problem(line)
        if not problem:
            continue
        shown = line[:60].decode("utf-8", "replace") + ("…" if len(line) > 60 else "")
        where = (f"it is the last line: if you know what appended it, delete it (`sed -i '{number}d' {path}`) and "
                 f"resume; the records before it are the whole study up to then" if number == len(lines) else
                 f"{len(lines) - number} record(s) follow it, so cutting the journal there would lose them")
        raise UserError(f"the study journal {path} is damaged: line {number} of {len(lines)} is not a journal "
                        f"record ({problem}: {shown!r})",
                        f"dclang and Optuna only append whole JSON records to it, so something else wrote this "
                        f"line; {where}; or restore the journal from a copy, or start a new search in another -o")


def _record_problem(line: bytes) -> str:
    """What makes one journal line no Optuna record ("" when nothing does)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(record, dict) or not isinstance(record.get("op_code"), int):
        return "JSON, but not an object with an integer `op_code`"
    return ""


def _mend_torn_end(path: Path) -> None:
    """Cut off a last record that a killed process left half written. Optuna skips it when
    reading, but the next record appended would be glued to it, and the journal could no
    longer be read at all. Done under the journal's own lock, so no writer is mid-record."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0 or _last_byte(path) == b"\n":
        return  # the common case, seen without taking the lock the workers write under
    lock = JournalFileSymlinkLock(str(path))
    with STOPS.writing():
        lock.acquire()
        try:
            data = path.read_bytes()
            if data.endswith(b"\n"):
                return
            kept = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(kept)
            print(f"note: the study journal {path} ended in a record cut short ({len(data) - kept} bytes, from a "
                  "process killed while writing it); it was never read and is removed", file=sys.stderr)
        finally:
            lock.release()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _with_driver(url: str) -> str:
    """`postgresql://` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, while dclang's `postgres` extra
    installs psycopg2 (the driver most machines have): name psycopg2 when it is the one there.
    """
    import importlib.util

    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        return f"postgresql://{rest}"
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages and files."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def create_study(storage: optuna.storages.BaseStorage, name: str, config: StudyConfig) -> optuna.Study:
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=config.sampler_for("parent"), pruner=config.make_pruner())
    except optuna.exceptions.DuplicatedStudyError as exc:
        raise UserError(f"the storage already holds a study named `{name}`",
                        "continue it with --resume, or name a new one with --study NAME") from exc
    study.set_user_attr(CONFIG_ATTR, config.to_attr())
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str, *, worker: str = "parent",
               where: str = "the storage") -> tuple[optuna.Study, StudyConfig]:
    """The study and its stored configuration, with the stored sampler (seeded for `worker`)
    and pruner. `where` names the storage in messages (a path, or a URL without password)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        raise UserError(f"{where} holds no study named `{name}`",
                        "start one with `dclang search --template T.kt --trials N -o OUT`") from None
    attr = storage.get_study_user_attrs(study_id).get(CONFIG_ATTR)
    problem = _config_problem(attr)
    if problem:
        raise UserError(f"the study `{name}` in {where} was not created by `dclang search` (or not yet fully, or "
                        f"its record is damaged: {problem})", "join a study only after `dclang search` has created it")
    config = StudyConfig.from_attr(attr)
    joined_at = len(storage.get_all_trials(study_id, deepcopy=False))
    study = optuna.load_study(study_name=name, storage=storage, sampler=config.sampler_for(worker, joined_at),
                              pruner=config.make_pruner())
    return study, config


def _config_problem(attr) -> str:
    """What is wrong with a study's stored configuration ("" when nothing is)."""
    if not isinstance(attr, dict) or attr.get("format") != CONFIG_FORMAT:
        return f"no `{CONFIG_FORMAT}` configuration"
    from dclang.search import PRUNERS, SAMPLERS
    from dclang.syntax.parser import parse_module

    wrong = [name for name in ("template", "template_path", "sampler", "pruner") if not isinstance(attr.get(name), str)]
    wrong += [name for name in ("seed", "eta", "min_resource", "epochs", "trials")
              if not isinstance(attr.get(name), int) or isinstance(attr.get(name), bool)]
    if wrong:
        return f"{', '.join(wrong)} missing or of the wrong type"
    if attr["sampler"] not in SAMPLERS or attr["pruner"] not in PRUNERS or attr["eta"] < 2 or min(
            attr["min_resource"], attr["epochs"], attr["trials"]) < 1:
        return "a sampler, pruner, eta, min_resource, epochs or trials that `dclang search` never writes"
    if parse_module(attr["template"])[0] is None:
        return "its template does not parse"
    return ""


def set_trial_budget(study: optuna.Study, config: StudyConfig, trials: int) -> StudyConfig:
    """Raise (or lower) the number of trials of a stopped study when it is resumed."""
    config = StudyConfig.from_attr({**config.to_attr(), "trials": trials})
    study.set_user_attr(CONFIG_ATTR, config.to_attr())
    return config


def counted(trials: list[FrozenTrial]) -> int:
    return sum(t.state in COUNTED for t in trials)


# ---------------------------------------------------------------- who runs a trial


@lru_cache(maxsize=None)
def host_id() -> str:
    """This machine: its host name and boot id (two machines may share a host name, and a
    pid means something only until the machine restarts)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noboot"
    return f"{socket.gethostname()}/{boot}"


def process_started(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), "" where /proc
    does not exist, None for no such process. A pid is reused after its process dies: the
    start time tells the worker from a newcomer with the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ""
    except OSError:
        return None
    after = stat.rsplit(")", 1)[1].split()
    return None if after[0] in ("Z", "X") else after[19]  # state, ..., starttime (field 22)


def owner(worker: str) -> dict[str, Any]:
    """What a worker records on the trial it runs (one attribute, written at once, so no
    process ever sees half of it), so that the trial can be declared dead later."""
    pid = os.getpid()
    return {"worker": worker, "host": host_id(), "pid": pid, "started": process_started(pid)}


def _is_owner(who) -> bool:
    """Whether a trial's `owner` is one `owner()` wrote (a journal changed by hand may hold
    anything: such a trial is left alone, not a traceback)."""
    return (isinstance(who, dict) and isinstance(who.get("host"), str) and isinstance(who.get("worker"), str)
            and isinstance(who.get("pid"), int) and isinstance(who.get("started"), (str, type(None))))


def _alive(owner: dict[str, Any]) -> bool:
    started = process_started(owner["pid"])
    if started == "":  # no /proc (macOS): ask the kernel whether the pid exists
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return started is not None and started == owner["started"]


def reap(study: optuna.Study) -> list[int]:
    """Fail every RUNNING trial whose worker ran on this host and is gone, and enqueue its
    retry; returns the numbers failed. Safe to run from many processes at once: failing a
    trial is atomic in the storage, and only the process that failed it enqueues the retry."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = trial.user_attrs.get("owner")
        if not _is_owner(who) or who["host"] != host_id() or _alive(who):
            continue
        storage = study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "failed", f"its worker {who['worker']} (pid {who['pid']} "
                                                                    f"on {who['host'].split('/')[0]}) died")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process failed it first and retries it
        failed.append(trial.number)
        retry(study, storage.get_trial(trial._trial_id))
    return failed


def hand_back(study: optuna.Study) -> list[int]:
    """Fail as `interrupted` every trial this process still runs, and enqueue its retry: what a
    stopped worker leaves RUNNING after its own hand-back (a packed worker's trial stopped
    while it was being set up); returns their numbers."""
    me = owner("")
    handed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = trial.user_attrs.get("owner")
        if not _is_owner(who) or (who["host"], who["pid"], who["started"]) != (me["host"], me["pid"], me["started"]):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "failed", INTERRUPTED)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        handed.append(trial.number)
        retry(study, study._storage.get_trial(trial._trial_id))
    return handed


def retry(study: optuna.Study, failed: FrozenTrial) -> None:
    """Enqueue a trial with the parameters of `failed`, whose worker died or was stopped.

    This is also the RDB heartbeat's callback. Optuna's own retry callback copies the failed
    trial's system attributes, which hold the pruner's rung records, so the retry would skip
    the rungs its predecessor passed; this one starts the retry afresh and notes `retry_of`.
    """
    count = failed.user_attrs.get("retry_count", 0) + 1
    if count > MAX_RETRY:
        return
    study.enqueue_trial(failed.params, user_attrs={"retry_of": failed.number, "retry_count": count})


__all__ = ["COUNTED", "CONFIG_ATTR", "INTERRUPTED", "MAX_RETRY", "STOPS", "StopSignals", "StudyConfig", "counted",
           "create_study", "hand_back", "host_id", "interrupted", "load_study", "open_storage", "owner", "reap",
           "redact", "retry", "set_trial_budget"]
