"""The `dclang` command line: check, fmt, draw here; run, report, search, bench from their packages.

User mistakes become messages, never tracebacks (`--debug` shows one). torch and optuna are
imported only inside the commands that need them, so `dclang check` answers fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dclang.diagnostics import DiagnosticError, UserError, render_all, unwritable


class _Group(click.Group):
    """Renders user errors in one place for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, DiagnosticError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, DiagnosticError):
                click.echo(render_all(exc.diagnostics, exc.source, exc.path, color=_color()), err=True)
            else:
                click.echo(_paint("error", "1;31") + f": {exc.message}", err=True)
                if exc.hint:
                    click.echo(f"  = help: {exc.hint}", err=True)
            ctx.exit(1)


def _color() -> bool:
    return sys.stderr.isatty()


def _paint(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if _color() else text


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors (for reporting bugs).")
@click.version_option(package_name="dclang")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dclang: declare a knowledge transfer graph in a .kt file; check, draw, train and search it."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _summary(checked) -> str:
    from dclang.ir import frozen_nodes, model_nodes

    g = checked.graph
    models = model_nodes(g)
    frozen = frozen_nodes(g)
    edges = [e for _, _, e in g.edges(data="spec")]
    live = [e for e in edges if e.gate != "cutoff"]
    sites = g.graph["sites"]
    ensembles = [n for n, spec in g.nodes(data="spec") if spec is not None and spec.is_ensemble]
    nodes = f"{len(models)} node{'s' * (len(models) != 1)}"
    if ensembles:
        names = ", ".join(f"`{n}`" for n in ensembles)
        nodes += f" and {len(ensembles)} ensemble{'s' * (len(ensembles) != 1)} ({names})"
    parts = [nodes, f"{len(edges)} edge{'s' * (len(edges) != 1)} ({len(live)} live)",
             f"target `{g.graph['target']}`", "frozen: " + (", ".join(f"`{n}`" for n in frozen) or "none")]
    teachers = [n for n, spec in g.nodes(data="spec") if spec is not None and spec.is_ema]
    if teachers:
        parts.append("mean teachers: " + ", ".join(f"`{n}`" for n in teachers))
    if sites:
        parts.append(f"template with {len(sites)} search site{'s' * (len(sites) != 1)}")
    return ", ".join(parts)


def _param_lines(graph) -> list[str]:
    """Each node's parameter count, built on torch's meta device (no memory, but torch's
    import takes seconds: hence behind `--params`). Datasets whose image shape is known only
    from the user's file (`npz`) get a note instead of counts for a guessed shape."""
    from dclang.ema import ema_text
    from dclang.registry import dataset_info

    data = graph.graph["data"]
    info = dataset_info(data.dataset)
    if info is None or info.channels is None or info.image_size is None:
        return [f"    parameter counts need the image shape of `{data.dataset}` data, known once it is loaded "
                f"(`dclang run` shows them in its final table)"]
    from dclang.models import parameter_counts

    counts = parameter_counts(graph)
    specs = dict(graph.nodes(data="spec"))

    def note(name: str) -> str:
        spec = specs[name]
        if spec.is_ema:  # a mean teacher's parameters are its source's averaged: held, never trained
            return f" (the moving average of `{spec.derived.source}`'s: not trained)"
        if spec.is_branch:  # a branch counts its head: its trunk is counted once, in its source
            return f" (its own; the trunk is `{spec.derived.source}`'s)"
        return ""

    return [f"    {name:<12} {ema_text(specs[name]) if specs[name].is_ema else model:<14} {count:>12,} parameters"
            + note(name) for name, model, count in counts]


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--params/--no-params", default=False, show_default=True,
              help="Show each node's parameter count (imports torch, which takes a few seconds).")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
def check(files: tuple[Path, ...], params: bool, quiet: bool) -> None:
    """Check .kt files: every mistake with file:line:col, or a one-line summary per file."""
    from dclang.api import check_file

    failed = False
    for path in files:
        checked = check_file(path)
        if checked.diagnostics:
            click.echo(render_all(checked.diagnostics, checked.source, checked.path, color=_color()), err=True)
            click.echo(err=True)
        if not checked.ok:
            failed = True
            n = len(checked.errors)
            click.echo(_paint(f"{path}: {n} error{'s' * (n != 1)}", "1;31"), err=True)
            continue
        if not quiet:
            click.echo(f"{path}: ok, {_summary(checked)}")
            if params and not checked.graph.graph["sites"]:
                for line in _param_lines(checked.graph):
                    click.echo(line)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--check", "check_only", is_flag=True, help="Exit 1 if a file is not in canonical form; change nothing.")
@click.option("-w", "--write", is_flag=True, help="Rewrite the files in place.")
def fmt(files: tuple[Path, ...], check_only: bool, write: bool) -> None:
    """Print .kt files in canonical form (comments kept; the graph never changes)."""
    from dclang.api import read_source
    from dclang.checkpoints import atomic_write_text
    from dclang.syntax.format import format_module
    from dclang.syntax.parser import parse_module

    unformatted = []
    for path in files:
        text = read_source(path)
        module, diags = parse_module(text)
        if module is None:
            raise DiagnosticError(diags, str(path), text)
        canonical = format_module(module)
        if check_only:
            if canonical != text:
                unformatted.append(path)
        elif write:
            if canonical != text:
                try:
                    atomic_write_text(canonical, path)
                except OSError as exc:
                    raise unwritable(path, exc) from exc
                click.echo(f"formatted {path}", err=True)
        else:
            click.echo(canonical, nl=False)
    if unformatted:
        for path in unformatted:
            click.echo(f"{path}: not in canonical form (run `dclang fmt -w {path}`)", err=True)
        sys.exit(1)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file; its suffix picks the format: .svg, .png, .pdf or .dot.")
@click.option("--show-cutoff", is_flag=True, help="Draw cutoff edges dashed instead of leaving them out.")
def draw(file: Path, output: Path, show_cutoff: bool) -> None:
    """Draw the graph as the paper does: target red, frozen blue, gates on the edges."""
    from dclang.api import load
    from dclang.draw import render

    render(load(file), output, show_cutoff=show_cutoff)
    click.echo(f"wrote {output}")


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the table (report.csv, report.md) and the plots "
                   "[default: report/ in the folder the RUN_DIRs share].")
def report_command(run_dirs: tuple[Path, ...], out: Path | None) -> None:
    """Per-node accuracy (mean ± std over runs of one graph): a table and plots, from run directories.

    A RUN_DIR may also be a folder of runs (as `dclang run --seeds` writes).
    """
    from dclang.report import default_out, report

    click.echo(report(list(run_dirs), out or default_out(list(run_dirs))))


# Commands that live with their subsystems; their modules import torch and optuna lazily.
from dclang.bench import bench_command  # noqa: E402
from dclang.models.command import models_command  # noqa: E402
from dclang.search.command import search_command  # noqa: E402
from dclang.train.command import run_command  # noqa: E402

for _command in (run_command, search_command, bench_command, models_command):
    main.add_command(_command)
