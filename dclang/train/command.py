"""`dclang run`, added to the CLI group by `dclang.cli`.

This module is imported when the CLI starts, so torch is imported only inside the commands.
`--set key=value` edits the file's text (through the AST's spans) and the edited text is
checked like any file, so a mistake in an override is reported at its place, with a caret.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

import click

from dclang import registry
from dclang.cli_options import DEVICE, EPOCHS, SEED, SEEDS
from dclang.diagnostics import DiagnosticError, UserError, render_all
from dclang.syntax import ast
from dclang.syntax.parser import parse_module

SET_FORMS = ("data.dataset", "data.KEY", "train.KEY", "train.optimizer.ARG", "train.schedule.ARG",
             "NODE.model", "NODE.decay", "SOURCE->TARGET.gate")


# ---------------------------------------------------------------- --set


def _offset(text: str, line: int, column: int) -> int:
    """The index in `text` of a 1-based (line, column)."""
    lines = text.splitlines(keepends=True)
    return sum(len(s) for s in lines[:line - 1]) + column - 1


def _start(text: str, node) -> int:
    return _offset(text, node.span.line, node.span.column)


def _end(text: str, node) -> int:
    return _offset(text, node.span.end_line, node.span.end_column)


def _replace(text: str, node, value: str) -> str:
    """`text` with the source of AST `node` replaced by `value`."""
    return text[:_start(text, node)] + value + text[_end(text, node):]


def _insert_setting(text: str, block, key: str, value: str) -> str:
    """`key = value` as the block's last setting: on a line of its own when the block's `}`
    starts a line, else just before the `}`."""
    close = _end(text, block) - 1
    line_start = text.rfind("\n", 0, close) + 1
    if text[line_start:close].strip() == "":
        return f"{text[:line_start]}  {key} = {value}\n{text[line_start:]}"
    return f"{text[:close]} {key} = {value} {text[close:]}"


def _set_call_arg(text: str, block, setting_key: str, arg: str, value: str) -> str:
    """Set `arg` inside the call of `setting_key` (`optimizer = sgd(lr=...)`), adding the
    argument, the call, or the setting (with the language's default) where missing."""
    setting = next((s for s in block.settings if s.key.text == setting_key), None)
    if setting is None:
        default = registry.TRAIN_SETTINGS[setting_key].default
        return _insert_setting(text, block, setting_key, f"{default}({arg}={value})")
    call = setting.value
    if isinstance(call, ast.Ident):
        return text[:_end(text, call)] + f"({arg}={value})" + text[_end(text, call):]
    if not isinstance(call, ast.Call):
        raise UserError(f"--set train.{setting_key}.{arg}: `{setting_key}` is not a call like `sgd(lr=0.1)`")
    existing = call.arg(arg)
    if existing is not None:
        return _replace(text, existing.value, value)
    close = _end(text, call) - 1
    return text[:close] + (", " if call.args else "") + f"{arg}={value}" + text[close:]


def apply_override(text: str, module: ast.Module, key: str, value: str) -> str:
    """The source text with one `--set key=value` applied (see `SET_FORMS`)."""
    head, _, rest = key.partition(".")
    if head == "data":
        blocks = module.of(ast.DataBlock)
        if not blocks:
            raise UserError(f"--set {key}: the file has no `data` block to change")
        block = blocks[0]
        if rest == "dataset":
            return _replace(text, block.dataset, value)
        option = registry.DATA_SETTINGS.get(rest)
        if option is not None and option.type == "str" and not value.startswith('"'):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        setting = next((s for s in block.settings if s.key.text == rest), None)
        if setting is None:
            return _insert_setting(text, block, rest, value)
        return _replace(text, setting.value, value)
    if head == "train":
        if not module.of(ast.TrainBlock):  # add an empty one to put the setting in
            text = text.rstrip("\n") + "\n\ntrain {\n}\n"
            module, _ = parse_module(text)
        block = module.of(ast.TrainBlock)[0]
        setting_key, _, arg = rest.partition(".")
        if arg:
            if setting_key not in ("optimizer", "schedule"):
                raise UserError(f"--set {key}: only `optimizer` and `schedule` take arguments",
                                "write train.optimizer.lr=0.05 or train.schedule.gamma=0.2")
            return _set_call_arg(text, block, setting_key, arg, value)
        setting = next((s for s in block.settings if s.key.text == setting_key), None)
        if setting is None:
            return _insert_setting(text, block, setting_key, value)
        return _replace(text, setting.value, value)
    if "->" in head and rest == "gate":
        source, _, target = head.partition("->")
        edge = next((e for e in module.of(ast.EdgeDecl)
                     if not e.bulk and (e.source.text, e.target.text) == (source, target)), None)
        if edge is None:  # an explicit edge overrides any `edges` line covering the pair
            return text.rstrip("\n") + f"\n{source} -> {target} : {value}\n"
        return _replace(text, edge.gate, value)
    node = next((n for n in module.of(ast.NodeDecl) if n.name.text == head), None)
    if node is not None and rest == "model":
        return _replace(text, node.model, value)
    if node is not None and rest == "decay" and isinstance(node.model, ast.Derived) and node.model.kind == "ema":
        existing = node.model.arg("decay")  # a mean teacher's decay, written or added
        if existing is not None:
            return _replace(text, existing.value, value)
        close = _end(text, node.model) - 1
        return text[:close] + f", decay={value}" + text[close:]
    raise UserError(f"--set {key}={value}: cannot tell what `{key}` names",
                    "the keys are " + ", ".join(f"`{f}`" for f in SET_FORMS))


def load_with_overrides(path: Path, overrides: tuple[str, ...]):
    """Check `path` with every `--set` applied; DiagnosticError when it does not check."""
    from dclang.api import check, check_file

    checked = check_file(path)
    text = checked.source
    if not overrides or checked.module is None:
        return checked
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise click.UsageError(f"--set expects KEY=VALUE, got {item!r}")
        module, diags = parse_module(text)
        if module is None:
            raise DiagnosticError(diags, str(path), text)
        text = apply_override(text, module, key.strip(), value.strip())
    return check(text, str(path))


# ---------------------------------------------------------------- run


def fast_paths_given(options) -> list[str]:
    """The fast-path flags the user gave: any of them means the user chose, and nothing is
    autotuned (`--precision` alone only narrows what autotune tries)."""
    layout = options.channels_last is not None
    return (["--compile"] * options.compile + ["--channels-last/--no-channels-last"] * layout
            + ["--hfta"] * options.hfta + ["--cuda-graph"] * options.cuda_graph)


def _seeds(seed: int | None, seeds: str | None) -> list[int | None]:
    if seed is not None and seeds:
        raise click.UsageError("give --seed or --seeds, not both")
    if not seeds:
        return [seed]
    try:
        return [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise click.UsageError(f"--seeds expects comma-separated integers like 0,1,2, got {seeds!r}") from exc


#: the fused engine's fast paths (`dclang.compile.StepOptions`): `dclang run`'s flags, which
#: `dclang search` takes too (its trials are trained by the same engine)
_FAST_PATHS = [
    click.option("--compile", "compile_", is_flag=True, help="torch.compile the fused step (slow to start)."),
    click.option("--precision", type=click.Choice(["fp32", "bf16"]),
                 help="bf16 autocast [default: fp32; on CUDA autotune's choice]."),
    click.option("--channels-last/--no-channels-last", default=None,
                 help="Channels-last memory format [default: on for graphs with convolutions on the CPU; on "
                      "CUDA autotune's choice]."),
    click.option("--hfta", is_flag=True, help="Fuse same-architecture trainable nodes into one batched model."),
    click.option("--cuda-graph", is_flag=True, help="Capture the whole step in a CUDA graph (CUDA)."),
]


def fast_path_options(command):
    """A click command with the fast-path flags (`_FAST_PATHS`), passed as compile_, precision,
    channels_last, hfta and cuda_graph."""
    for option in reversed(_FAST_PATHS):
        command = option(command)
    return command


def step_options(*, compile_: bool, precision: str | None, channels_last: bool | None, hfta: bool,
                 cuda_graph: bool):
    """The `StepOptions` the fast-path flags ask for (fp32 where no precision is given)."""
    from dclang.compile import StepOptions

    return StepOptions(compile=compile_, precision=precision or "fp32", channels_last=channels_last, hfta=hfta,
                       cuda_graph=cuda_graph)


def fast_paths_asked(*, compile_: bool, precision: str | None, channels_last: bool | None, hfta: bool,
                     cuda_graph: bool) -> bool:
    """Whether any fast-path flag was given (without importing torch)."""
    return compile_ or precision not in (None, "fp32") or channels_last is not None or hfta or cuda_graph


def fast_path_flags(*, compile_: bool, precision: str | None, channels_last: bool | None, hfta: bool,
                    cuda_graph: bool) -> list[str]:
    """The flags that ask for these fast paths again (what `dclang search` hands its workers)."""
    flags = (["--compile"] * compile_ + ["--precision", precision] * bool(precision) + ["--hfta"] * hfta
             + ["--cuda-graph"] * cuda_graph)
    if channels_last is not None:
        flags.append("--channels-last" if channels_last else "--no-channels-last")
    return flags


@click.command("run")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory [default: runs/<graph name>].")
@click.option("--epochs", type=EPOCHS, help="Override the train block's epochs.")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=SEED, help="Override the train block's seed.")
@click.option("--seeds", type=SEEDS, metavar="0,1,2",
              help="Several runs in turn, into RUN_DIR/seed0, RUN_DIR/seed1, ...")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where downloadable datasets live "
              "[default: $DCLANG_DATA or ~/.cache/dclang/data].")
@click.option("--engine", default="fused", show_default=True, help="fused, or reference (the paper's loop, slower).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of the file before checking it, e.g. train.epochs=3, data.val_split=100, "
                   "train.optimizer.lr=0.05, n2.model=cnn_small. Repeatable.")
@click.option("--resume", is_flag=True, help="Continue the run in RUN_DIR from checkpoints/last.pt.")
@click.option("--no-progress", is_flag=True, help="No progress bar, per-epoch lines or final table.")
@fast_path_options
@click.option("--autotune/--no-autotune", default=True, show_default=True,
              help="On CUDA, without fast-path flags: time the fast paths on the first batches and train with the "
                   "fastest (a few seconds at start; says what it chose). --precision only narrows its choice.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="Let CUDA fp32 convolutions and matrix products use TF32 (recorded in summary.json).")
def run_command(file: Path, run_dir: Path | None, epochs: int | None, device: str, seed: int | None,
                seeds: str | None, data_dir: str | None, engine: str, overrides: tuple[str, ...], resume: bool,
                no_progress: bool, compile_: bool, precision: str | None, channels_last: bool | None, hfta: bool,
                cuda_graph: bool, autotune: bool, tf32: bool) -> None:
    """Train the graph in FILE and write a run directory (metrics, summary, checkpoints).

    The fast paths (--compile, --precision, --channels-last, --hfta, --cuda-graph) change how
    the fused engine computes a step, never what it computes; `dclang bench` says which win.
    On CUDA, given none of them (--precision aside), the run times them on its first batches and
    takes the fastest.
    """
    checked = load_with_overrides(file, overrides)
    if not checked.ok:
        raise DiagnosticError(checked.diagnostics, checked.path, checked.source)
    if checked.diagnostics:  # warnings
        click.echo(render_all(checked.diagnostics, checked.source, checked.path), err=True)
    graph = checked.graph
    if graph.graph["sites"]:
        names = ", ".join(f"`{s.name}`" for s in graph.graph["sites"])
        raise UserError(f"{file} is a search template: {names} left open by `choice(...)`",
                        f"search it with `dclang search --template {shlex.quote(str(file))} --trials 20 -o "
                        f"{shlex.quote(f'searches/{file.stem}')}`, or fix every choice with --set "
                        f"(e.g. --set {graph.graph['sites'][0].name}=...)")
    from dclang.compile.tf32 import set_tf32
    from dclang.plots import write_node_curves
    from dclang.train.loop import train_graph

    options = step_options(compile_=compile_, precision=precision, channels_last=channels_last, hfta=hfta,
                           cuda_graph=cuda_graph)
    if engine != "fused" and not options.plain:
        raise UserError(f"the fast paths apply to the fused engine, not `{engine}`",
                        "the reference engine stays the plain loop it is measured against; drop --engine")
    autotune = autotune and engine == "fused" and not fast_paths_given(options)
    if autotune and precision is None:
        options = None  # autotune's to choose, the precision included
    set_tf32(tf32)

    root = run_dir or Path("runs") / graph.graph["name"]
    plan = _seeds(seed, seeds)
    _note_shortened_teachers(graph, epochs)
    for s in plan:
        out = root / f"seed{s}" if seeds else root
        if len(plan) > 1:
            click.echo(f"run with seed {s} into {out}", err=True)
        try:
            train_graph(graph, run_dir=out, device=device, engine=engine, seed=s, epochs=epochs, data_dir=data_dir,
                        resume=resume, progress=not no_progress, options=options, autotune=autotune)
        except KeyboardInterrupt:
            _stopped(out, graph.graph["target"], epochs or graph.graph["train"].epochs)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone writes the run's files
            click.echo(_results(out, write_node_curves(out)))
    if len(plan) > 1:
        click.echo(f"mean ± std over the seeds: dclang report {root}", err=True)


# ---------------------------------------------------------------- what a run says at its end


def _note_shortened_teachers(graph, epochs: int | None) -> None:
    """Say that --epochs also sets how long frozen teachers are pre-trained (docs/training.md)."""
    from dclang.ir import model_nodes

    declared = graph.graph["train"].epochs
    teachers = [n for n in model_nodes(graph) if graph.nodes[n]["spec"].frozen and graph.nodes[n]["spec"].init is None]
    if epochs is None or epochs >= declared or not teachers:
        return
    names = ", ".join(f"`{n}`" for n in teachers)
    click.echo(f"note: --epochs {epochs} also shortens the pre-training of the frozen node(s) {names} (the train "
               f"block says {declared} epochs): a teacher pre-trained for {epochs} epoch{'s' * (epochs != 1)} "
               f"may teach little; to train a short run with a full teacher, give the teacher `init` a "
               f"checkpoint of a full run (docs/training.md)", err=True)


def _results(out: Path, curves: list[Path]) -> str:
    """Where a run's results are: the folder and its key files."""
    shown = ", ".join(p.name for p in curves[:4]) + (f" and {len(curves) - 4} more" if len(curves) > 4 else "")
    return "\n".join([f"results in {out}/:",
                      "  summary.json       every node's accuracy (best validation epoch, its test accuracy)",
                      "  metrics.jsonl      one record per epoch",
                      f"  curves/            {shown or 'none'} (accuracy and loss per epoch)",
                      "  checkpoints/       best.pt (the target's best validation epoch), last.pt (to --resume)",
                      "  graph.kt           the graph as trained, every default written out"])


def _stopped(out: Path, target: str, epochs: int) -> None:
    """Ctrl-C: say what was trained, where its checkpoint is and how to go on; draw the curves
    of the epochs done; exit 130 (a second Ctrl-C is ignored while this is written).

    The epochs done are those `last.pt` holds (the commit point of an epoch): metrics.jsonl
    may hold one more, whose checkpoint the stop cut short; it is cut back here, as a resume
    would, so the curves show what is kept."""
    from dclang.plots import write_node_curves
    from dclang.train.metrics import percent
    from dclang.train.rundir import RunDir

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rundir = RunDir(out)
    try:
        done = rundir.load_last()["epoch"] if rundir.last.is_file() else 0
        records = rundir.read_metrics()
        if len(records) > done:
            rundir.write_metrics(records[:done])
        records = records[:done]
        curves = write_node_curves(out) if records else []
    except UserError:
        done, records, curves = 0, [], []
    args = sys.argv[1:] if sys.argv[1:2] == ["run"] else ["run", "..."]
    again = shlex.join(["dclang", *args, *(["--resume"] if "--resume" not in args else [])])
    if records:
        best = max(records, key=lambda r: r["nodes"][target]["val_acc"] or 0.0)
        lines = [f"\nstopped: {done} of {epochs} epochs are done and kept in {out}; the epoch in flight is lost",
                 f"  target `{target}`: best val {percent(best['nodes'][target]['val_acc'])}% (epoch {best['epoch']})",
                 f"  last checkpoint: {rundir.last} (epoch {done})",
                 f"  curves of the epochs done: {out / 'curves'}/ ({', '.join(p.name for p in curves) or 'none'})"]
    else:
        lines = ["\nstopped before the run finished its first epoch: nothing of it is kept (a teacher's "
                 "pre-training keeps its finished epochs in the teacher cache)"]
    click.echo("\n".join([*lines, f"continue with: {again}"]), err=True)
    sys.exit(130)
