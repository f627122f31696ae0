"""`dclang search`: create a study from a template, run workers on it, write what it found.

    dclang search --template examples/quickstart_search.kt --trials 30 --workers 2 -o runs/qs
    dclang search --resume -o runs/qs                                  # continue a stopped search
    dclang search --worker --storage postgresql://... --study NAME     # join from another machine

The parent process runs no trial itself: it creates (or reopens) the study, starts D worker
processes (`dclang search --worker ...` on the parent's Python and dclang, whatever the working
directory holds: `dclang.processes`; the same command a machine joining the study runs), shows
a live progress line, fails the trials of workers that die (each is retried with the same
parameters), and at the end writes the output folder (`dclang.search.output`). Ctrl-C stops
the workers, which hand their trials back as interrupted (`study.StopSignals`).
This module imports neither torch nor optuna at import time: `dclang --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from dclang.cli_options import DEVICE, EPOCHS, ETA, PACK, SEED, SLOT, TOP_K, TRIALS, WORKERS
from dclang.diagnostics import DiagnosticError, UserError
from dclang.search import PRUNERS, SAMPLERS
from dclang.train.command import fast_path_flags, fast_path_options, fast_paths_asked, step_options

#: seconds between two looks at the study while workers run
POLL = 1.0
#: seconds a stopped worker gets to hand its trial back before it is killed (it takes well under one)
STOP_GRACE = 10

_STUDY_FLAGS = ("template", "epochs", "sampler", "seed", "pruner", "eta", "min_resource")


def _say(message: str) -> None:
    click.echo(message, err=True)


def _flags_given(ctx: click.Context, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names
            if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]


@click.command("search")
@click.option("--template", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The template: a .kt file with choice(...) where the search decides.")
@click.option("--trials", type=TRIALS,
              help="T: stop once this many trials have trained (complete or pruned); with --resume, a new T.")
@click.option("--workers", type=WORKERS, default=1, show_default=True,
              help="D: worker processes on this machine (0: only wait for workers joining with --worker).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: study journal, trials/, best/, leaderboard.csv, summary.json.")
@click.option("--epochs", type=EPOCHS, help="E: epochs per trial (default: the template's).")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N; with several GPUs, auto and cuda spread the workers over them.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where downloadable datasets are stored (default: $DCLANG_DATA or ~/.cache/dclang/data).")
@click.option("--storage", help="Where the study lives: a journal file path (default OUT/study.journal), "
                                "postgresql://USER:PASSWORD@HOST:PORT/DB, or sqlite:///FILE.")
@click.option("--study", "study_name", help="Study name (default: the template's graph name).")
@click.option("--resume", is_flag=True, help="Continue the study in -o OUT (retried and new trials).")
@click.option("--worker", "as_worker", is_flag=True,
              help="Work on an existing study (--storage, --study) until it has its trials, then exit.")
@click.option("--top-k", type=TOP_K, default=5, show_default=True,
              help="How many of the best complete graphs to write to OUT/best/.")
@click.option("--sampler", type=click.Choice(SAMPLERS), help="random (default, the paper's) or tpe.")
@click.option("--seed", type=SEED, help="Seed of the sampler (default 0); each worker derives its own from it.")
@click.option("--pruner", type=click.Choice(PRUNERS),
              help="asha (default: successive halving, asynchronous), hyperband, or none.")
@click.option("--eta", type=ETA,
              help="Reduction factor: keep the top 1/eta at each rung (default 2).")
@click.option("--min-resource", type=EPOCHS,
              help="Epoch of the first rung; rungs at min_resource × eta^k (default 1).")
@click.option("--teacher-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Pre-trained frozen teachers, shared by the workers (default OUT/teachers).")
@click.option("--pack", type=PACK, default=1, show_default=True,
              help="K: trials each worker trains at once, as one step: one forward and one backward for all "
                   "(see docs/search.md).")
@fast_path_options
@click.option("--plan", is_flag=True,
              help="Print the search's cost plan (space, distinct graphs, ASHA's epochs, time for D workers and "
                   "pack K), measured on synthetic batches; trains nothing and needs no data.")
@click.option("--autotune/--no-autotune", default=True, show_default=True,
              help="On CUDA, a worker training one trial at a time times the fast paths on a trial's first batches "
                   "and trains with the fastest (once per architecture mix; see `dclang run --help`).")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="Let CUDA fp32 convolutions and matrix products use TF32.")
@click.option("--trainer", hidden=True, help="module:function replacing dclang's train_graph (tests).")
@click.option("--slot", type=SLOT, hidden=True, help="This worker's number among the parent's workers.")
@click.pass_context
def search_command(ctx: click.Context, template: Path | None, trials: int | None, workers: int,
                   output: Path | None, epochs: int | None, device: str, data_dir: Path | None,
                   storage: str | None, study_name: str | None, resume: bool, as_worker: bool, top_k: int,
                   sampler: str | None, seed: int | None, pruner: str | None, eta: int | None,
                   min_resource: int | None, teacher_cache: Path | None, pack: int, compile_: bool,
                   precision: str, channels_last: bool | None, hfta: bool, cuda_graph: bool, plan: bool,
                   autotune: bool, tf32: bool,
                   trainer: str | None, slot: int | None) -> None:
    """Search a template's choice(...) sites for the graph whose target is most accurate
    on the validation split: random sampling (or TPE) with ASHA early stopping (paper 3.5).

    The fast paths (--compile, --precision, --channels-last, --hfta, --cuda-graph) are `dclang
    run`'s: the trials are trained by the same engine, and --plan measures with them. Any of
    them (--hfta: nodes of one architecture fused within and across a pack's trials) implies
    the packed worker loop, a pack of one by default."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = str(data_dir) if data_dir else None
    flags = dict(compile_=compile_, precision=precision, channels_last=channels_last, hfta=hfta, cuda_graph=cuda_graph)
    asked = fast_paths_asked(**flags)  # none asked: workers train each trial alone, not even as a pack of one
    if plan:
        if template is None:
            raise click.UsageError("--plan needs --template T.kt")
        from dclang.search.plan import print_plan

        print_plan(template, trials=trials or 100, workers=max(workers, 1), pack=pack, epochs=epochs, device=device,
                   eta=eta or 2, min_resource=min_resource or 1, pruner=pruner or "asha",
                   options=step_options(**flags) if asked else None)
        return
    if as_worker:
        _join(ctx, storage, study_name, output, device, data, teacher_cache, trainer, slot, pack,
              step_options(**flags) if asked else None, autotune=autotune, tf32=tf32)
        return
    if output is None:
        raise click.UsageError("give the output folder with -o OUT")
    from dclang.search.folder import RECORD, make_folder, read_record, write_record
    from dclang.search.study import load_study, open_storage, redact, set_trial_budget

    if resume:
        given = _flags_given(ctx, _STUDY_FLAGS)
        if given:
            raise UserError(f"{', '.join(given)} cannot change a study: it keeps the configuration it was "
                            "created with", "leave them out with --resume, or start a new search in another -o")
        stored = read_record(output)
        storage = storage or (stored.storage if stored else str(output / "study.journal"))
        if "***" in storage:
            raise UserError("the study's storage URL holds a password, which dclang did not write to disk",
                            "give it again with --storage")
        study_name = study_name or (stored.study if stored else None)
        if study_name is None:
            raise UserError(f"{output} holds no search (no {RECORD})", "give --storage and --study")
        study, config = load_study(open_storage(storage), study_name, where=redact(storage))
        _refuse_packed_crd(config.template, packed=pack > 1 or asked)
        if trials is not None and trials != config.trials:
            config = set_trial_budget(study, config, trials)
    else:
        if template is None or trials is None:
            raise click.UsageError("a new search needs --template T.kt and --trials N (or --resume -o OUT)")
        _refuse_packed_crd(template.read_text(encoding="utf-8"), packed=pack > 1 or asked)
        if (output / RECORD).exists():
            raise UserError(f"{output} already holds a search", f"continue it with `dclang search --resume -o "
                                                                 f"{output}`, or choose another -o")
        make_folder(output)
        storage = storage or str(output / "study.journal")
        study, config = _create(template, trials, storage, study_name, epochs=epochs, sampler=sampler, seed=seed,
                                pruner=pruner, eta=eta, min_resource=min_resource)
        study_name = study.study_name
        write_record(output, study=study_name, storage=storage, template=template)

    from dclang.search.output import summary_lines, write_outputs

    cache = teacher_cache or output / "teachers"
    worker_args = ["--storage", storage, "--study", study_name, "--teacher-cache", str(cache)]
    worker_args += ["--data-dir", data] if data else []
    worker_args += ["--trainer", trainer] if trainer else []
    worker_args += ["--pack", str(pack)] + (fast_path_flags(**flags) if asked else [])
    worker_args += ["--autotune" if autotune else "--no-autotune", "--tf32" if tf32 else "--no-tf32"]
    if workers == 0:
        _say(f"waiting for workers: on each machine run `dclang search --worker --storage {redact(storage)} "
             f"--study {study_name}`")
    failures: list[str] = []
    stopped = False
    try:
        failures = _run_workers(study, config, workers, worker_args, device, output)
    except KeyboardInterrupt:
        stopped = True
    finally:
        summary = write_outputs(study.get_trials(deepcopy=False), config, output, study=study_name, top_k=top_k)
        _say("")
        for line in summary_lines(summary) + summary.get("notes", []):
            click.echo(line)
        click.echo(f"browse the study: optuna-dashboard {redact(storage)}")
    if stopped:
        handed = summary["trials"]["interrupted"]
        _say(f"search stopped: {handed} running trial{'s' * (handed != 1)} handed back as interrupted (each runs "
             f"again first); the outputs in {output} are written for what was done; continue with "
             f"`dclang search --resume -o {output}`")
        ctx.exit(130)
    if failures:
        raise UserError("; ".join(failures), f"see the worker logs in {output / 'logs'}; "
                                             f"continue with `dclang search --resume -o {output}`")


def _refuse_packed_crd(template: str, *, packed: bool) -> None:
    """A `crd` edge's step reads each batch's positions in the training split, which the packed
    worker loop (--pack, or any fast path) does not pass: refuse before any trial starts."""
    from dclang.crd import written_in
    from dclang.syntax.parser import parse_module

    module, _ = parse_module(template)
    if module is None or not packed:
        return  # a template that does not parse is reported where the study is created
    if written_in(module):
        raise UserError("the template has `crd` edges, which cannot train in a pack of trials or with a fast path "
                        "(--pack, --hfta, --compile, --precision bf16, --channels-last, --cuda-graph)",
                        "search it without --pack and the fast-path flags")


def _join(ctx, storage, study_name, output, device, data, teacher_cache, trainer, slot, pack, options, *,
          autotune: bool, tf32: bool) -> None:
    """`--worker`: everything about the study comes from the study; how it computes (TF32, the
    fast paths) is the worker's."""
    given = _flags_given(ctx, _STUDY_FLAGS + ("trials", "resume", "top_k", "workers"))
    if given:
        raise UserError(f"{', '.join(given)} cannot be given to a worker: it takes the study's configuration "
                        "from the study", "give only --storage, --study and where to work (--device, --data-dir, "
                                          "--teacher-cache)")
    if storage is None or study_name is None:
        raise click.UsageError("a worker needs --storage URL and --study NAME")
    from dclang.search.worker import run_worker

    if teacher_cache is None:
        from dclang.train.teachers import default_cache

        teacher_cache = output / "teachers" if output else default_cache()
    label = f"local-{slot}" if slot is not None else f"{socket.gethostname()}-{os.getpid()}"
    if trainer is None:  # a replacement trainer (tests) needs no torch
        from dclang.compile.tf32 import set_tf32

        set_tf32(tf32)
    run_worker(storage, study_name, worker=label, device=device, data_dir=data, teacher_cache=teacher_cache,
               trainer=trainer, slot=slot, pack=pack, options=options, autotune=autotune and options is None)


def _create(template: Path, trials: int, storage: str, study_name: str | None, **flags):
    """Check the template, store the prepared one in a new study with its configuration."""
    from dclang.api import check, read_source
    from dclang.ir import is_open
    from dclang.search.space import prepare_template, search_space
    from dclang.search.study import StudyConfig, create_study, open_storage
    from dclang.syntax.format import format_module

    text = read_source(template)
    checked = check(text, str(template))
    if not checked.ok:
        raise DiagnosticError(checked.diagnostics, str(template), text)
    space = search_space(checked.module)
    if not space:
        raise UserError(f"{template} has no `choice(...)`: there is nothing to search",
                        f"train it with `dclang run {template}`, or write choice(a, b) where the search decides")
    prepared = format_module(prepare_template(checked.module, epochs=flags["epochs"], base=template.parent))
    graph = check(prepared, str(template)).graph
    epochs = graph.graph["train"].epochs
    if is_open(epochs):
        raise UserError("`epochs` cannot be a choice: the pruner's rungs and the budget are counted in epochs",
                        "write one number, or pass --epochs")
    val_split = graph.graph["data"].val_split
    if not is_open(val_split) and val_split == 0:
        raise UserError("the template's `val_split` is 0, so there is nothing to score trials on",
                        "search ranks graphs by validation accuracy (never test): set `val_split` in the data block")
    config = StudyConfig(template=prepared, template_path=str(template.resolve()),
                         sampler=flags["sampler"] or "random", seed=0 if flags["seed"] is None else flags["seed"],
                         pruner=flags["pruner"] or "asha", eta=flags["eta"] or 2,
                         min_resource=flags["min_resource"] or 1, epochs=epochs, trials=trials)
    study = create_study(open_storage(storage, create=True), study_name or graph.graph["name"], config)
    _say(f"study `{study.study_name}`: {len(space)} parameters ({', '.join(p.name for p in space)}), "
         f"{config.sampler} sampler, {config.pruner} pruner (eta {config.eta}, rungs at epochs "
         f"{', '.join(map(str, config.rungs())) or 'none'}), {epochs} epochs, {trials} trials")
    return study, config


# ---------------------------------------------------------------- local workers


def _run_workers(study, config, n: int, worker_args: list[str], device: str, out: Path) -> list[str]:
    """Start n workers, watch them and the study until they are done; returns why workers
    that gave up did so. A worker killed by a signal is replaced (at most n times in all)."""
    from dclang.processes import dclang_argv
    from dclang.search.study import STOPS, counted, reap

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(n, 1))))

    def start(k: int) -> subprocess.Popen:
        with open(logs / f"worker-{k}.log", "ab") as log:
            return subprocess.Popen(dclang_argv("search", "--worker", "--slot", str(k), "--device", device,
                                                *worker_args),
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    reap(study)
    procs = {k: start(k) for k in range(n)}
    replaced, failures = 0, []
    progress = _Progress(config)
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    STOPS.install(*previous)  # SIGTERM stops like Ctrl-C; neither cuts a journal write or the hand-back short
    try:
        while True:
            for k, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[k]
                if code == 0:
                    continue
                if code < 0 and replaced < n and counted(study.get_trials(deepcopy=False)) < config.trials:
                    _say(f"\nworker local-{k} was killed ({signal.Signals(-code).name}); its trial will be "
                         f"retried; starting a new worker")
                    procs[k] = start(k)
                    replaced += 1
                elif code > 0:
                    failures.append(f"worker local-{k} failed: {_last_line(logs / f'worker-{k}.log')}")
            reap(study)
            trials = study.get_trials(deepcopy=False)
            progress.show(trials)
            if not procs and (n > 0 or (counted(trials) >= config.trials
                                        and not any(t.state.name == "RUNNING" for t in trials))):
                break
            time.sleep(POLL)
    except KeyboardInterrupt:
        _say("\nstopping the workers: each marks its running trial interrupted and queues it to run again")
        _stop(procs.values())
        reap(study)
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        progress.done()
    return failures


def _stop(procs) -> None:
    """SIGTERM each worker (it fails its trial and enqueues it again), then wait; kill the
    ones still there after STOP_GRACE seconds."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_line(log: Path) -> str:
    """The worker's error message (the CLI prints it as `error: ...`), else its last line."""
    try:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error")]
    return (errors or lines or ["no output"])[-1]


class _Progress:
    """The live line on stderr: redrawn in place on a terminal, else printed when it changes."""

    def __init__(self, config) -> None:
        self.config = config
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.current = ""
        self.printed = ""
        self.printed_at = 0.0

    def line(self, trials) -> str:
        from dclang.search.output import top_graphs

        states = [t.state.name for t in trials]
        complete, pruned = states.count("COMPLETE"), states.count("PRUNED")
        failed = [t for t in trials if t.state.name == "FAIL"]
        invalid = sum("invalid" in t.user_attrs for t in failed)
        best = top_graphs(trials, 1)
        best_text = f"best {100 * best[0].value:.2f}% (trial {best[0].number})" if best else "best -"
        seconds = int(time.monotonic() - self.started)
        return (f"trials {complete + pruned}/{self.config.trials} done ({complete} complete, {pruned} pruned) · "
                f"{states.count('RUNNING')} running · {len(failed)} failed"
                + (f" ({invalid} invalid)" if invalid else "")
                + f" · {best_text} · {seconds // 60}m{seconds % 60:02d}s")

    def show(self, trials) -> None:
        self.current = self.line(trials)
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + self.current)
            sys.stderr.flush()
        elif self._changed() and time.monotonic() - self.printed_at > 2:  # a log, not a screen: no flood
            self._print()

    def _changed(self) -> bool:
        return self.current.rsplit(" · ", 1)[0] != self.printed.rsplit(" · ", 1)[0]  # the clock alone is no news

    def _print(self) -> None:
        _say(self.current)
        self.printed, self.printed_at = self.current, time.monotonic()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        elif self.current and self._changed():
            self._print()
