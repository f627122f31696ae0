"""The `dclang` command line: help everywhere, check, draw, and errors without tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dclang.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
INVALID = ROOT / "tests" / "invalid"


@pytest.fixture
def runner():
    return CliRunner()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


@pytest.mark.parametrize("path", [()] + list(_commands(main)), ids=lambda p: " ".join(p) or "dclang")
def test_help(runner, path):
    result = runner.invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    assert "Traceback" not in result.output


def test_the_front_end_commands_exist():
    assert {"check", "fmt", "draw"} <= set(main.commands)


def _dclang(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dclang", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


# ---------------------------------------------------------------- check


def test_check_ok_prints_a_summary(runner):
    result = runner.invoke(main, ["check", "--no-params", str(EXAMPLES / "kd_dml.kt")])
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{EXAMPLES / 'kd_dml.kt'}: ok, 3 nodes, 5 edges (5 live), target `student`, "
                             "frozen: `teacher`\n")


def test_check_counts_ensembles_apart_from_networks(runner):
    result = runner.invoke(main, ["check", str(EXAMPLES / "ensemble.kt")])
    assert result.exit_code == 0, result.output
    assert ": ok, 3 nodes and 1 ensemble (`ens`), 6 edges (6 live), target `ens`" in result.stdout


def test_check_names_the_search_sites_of_a_template(runner):
    result = runner.invoke(main, ["check", str(EXAMPLES / "search3.kt")])
    assert result.exit_code == 0
    assert "template with 11 search sites" in result.stdout
    assert "parameters" not in result.stdout, "a template has no fixed models to count"


def test_check_counts_parameters(runner):
    result = runner.invoke(main, ["check", "--params", str(EXAMPLES / "kd.kt")])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any("student" in line and "resnet32" in line and "parameters" in line for line in lines)
    assert any("teacher" in line and "resnet110" in line for line in lines)


def test_check_imports_no_torch():
    """Plain `dclang check` answers without torch (whose import alone takes seconds)."""
    probe = ("import sys\nfrom dclang.cli import main\n"
             "try:\n    main(['check', 'examples/quickstart.kt'])\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print('exit', code, 'torch' in sys.modules, 'optuna' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.splitlines()[-1] == "exit 0 False False", done.stdout + done.stderr
    assert "examples/quickstart.kt: ok" in done.stdout and "parameters" not in done.stdout


def test_check_params_on_npz_data_counts_no_guessed_shape(runner, tmp_path):
    """npz images may have any channel count: no counts for a guessed 3x32x32 input."""
    path = tmp_path / "npz.kt"
    path.write_text('graph g\ndata npz { path = "x.npz" }\nnode a : cnn_tiny [target]\nlabel -> a : through\n',
                    encoding="utf-8")
    result = runner.invoke(main, ["check", "--params", str(path)])
    assert result.exit_code == 0, result.output
    assert "parameter counts need the image shape of `npz` data" in result.stdout
    assert " parameters" not in result.stdout


def _write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_deep_nesting_is_a_located_error_in_check_and_fmt(runner, tmp_path):
    quickstart = (EXAMPLES / "quickstart.kt").read_text(encoding="utf-8")
    deep = _write(tmp_path, "deep.kt", quickstart.replace("train {", "train {\n  x = " + "[" * 1000 + "]" * 1000, 1))
    line = quickstart[:quickstart.index("train {")].count("\n") + 2
    for command in (["check"], ["fmt"]):
        result = runner.invoke(main, [*command, str(deep)])
        assert result.exit_code == 1, result.output
        assert "error[E103]: brackets nested more than 32 deep" in result.stderr
        assert f"--> {deep}:{line}:{7 + 31}" in result.stderr, "train's `{` is level 1, the list's 32nd `[` is 33"
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_a_number_too_large_to_be_finite_is_a_located_error(runner, tmp_path):
    text = (EXAMPLES / "digits_single.kt").read_text(encoding="utf-8").replace("lr=0.1", "lr=1e309")
    path = _write(tmp_path, "inf.kt", text)
    result = runner.invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert "error[E404]: `sgd` option `lr` must be a finite number" in result.stderr and "1e309" in result.stderr
    line = text[:text.index("1e309")].count("\n") + 1
    assert f"--> {path}:{line}:" in result.stderr


def test_pad_as_large_as_the_image_is_refused_before_training(runner, tmp_path):
    result = runner.invoke(main, ["run", str(EXAMPLES / "digits_single.kt"), "--set", "data.pad=8",
                                  "-o", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "error[E404]: `pad` must be smaller than the images of `digits` (8x8 pixels), but got 8" in result.stderr
    assert "at most 7" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    assert runner.invoke(main, ["check", "-q", "--params", str(EXAMPLES / "digits_single.kt")]).exit_code == 0
    ok = _write(tmp_path, "flip.kt", (EXAMPLES / "digits_single.kt").read_text(encoding="utf-8")
                .replace("pad = 1", "pad = 8").replace("augment = pad_crop", "augment = flip"))
    assert runner.invoke(main, ["check", str(ok)]).exit_code == 0, "flip never pads"


def test_fmt_reads_files_as_check_does(runner, tmp_path):
    text = (EXAMPLES / "single.kt").read_text(encoding="utf-8")
    latin = tmp_path / "latin.kt"
    latin.write_bytes(text.encode("utf-8") + "# caf\u00e9\n".encode("latin-1"))
    line = text.count("\n") + 1
    for command in ("check", "fmt"):
        result = runner.invoke(main, [command, str(latin)])
        assert result.exit_code == 1
        assert (f"error[E001]: cannot read {latin}: byte 0xe9 on line {line} is not UTF-8; save the file as UTF-8"
                in result.stderr), result.stderr
        assert "Traceback" not in result.output


def test_a_utf8_byte_order_mark_is_accepted(runner, tmp_path):
    text = (EXAMPLES / "single.kt").read_text(encoding="utf-8")
    path = tmp_path / "bom.kt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert runner.invoke(main, ["check", str(path)]).exit_code == 0
    formatted = runner.invoke(main, ["fmt", str(path)])
    direct = runner.invoke(main, ["fmt", str(EXAMPLES / "single.kt")])
    assert formatted.exit_code == 0 and formatted.stdout == direct.stdout


def test_check_errors_exit_1_with_every_diagnostic(runner):
    path = INVALID / "several_mistakes.kt"
    result = runner.invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert result.stderr.count("error[") == 13
    assert f"{path}: 13 errors" in result.stderr
    assert f"--> {path}:4:6" in result.stderr
    assert "\x1b[" not in result.stderr, "no colour when not on a terminal"
    assert "Traceback" not in result.output


def test_check_several_files(runner):
    good, bad = EXAMPLES / "single.kt", INVALID / "misspelt_gate.kt"
    result = runner.invoke(main, ["check", "--no-params", str(good), str(bad)])
    assert result.exit_code == 1
    assert f"{good}: ok" in result.stdout
    assert "did you mean `through`?" in result.stderr


def test_check_quiet_prints_only_problems(runner):
    assert runner.invoke(main, ["check", "-q", str(EXAMPLES / "single.kt")]).output == ""
    result = runner.invoke(main, ["check", "-q", str(INVALID / "warnings_only.kt")])
    assert result.exit_code == 0
    assert "warning[W500]" in result.stderr and result.stdout == ""


def test_check_missing_file(runner, tmp_path):
    result = runner.invoke(main, ["check", str(tmp_path / "nope.kt")])
    assert result.exit_code == 1
    assert "error[E001]: cannot read" in result.stderr
    assert "Traceback" not in result.output


def test_debug_shows_a_traceback_and_its_absence_hides_it(tmp_path):
    bad = INVALID / "misspelt_gate.kt"
    plain = _dclang("draw", str(bad), "-o", str(tmp_path / "g.svg"))
    assert plain.returncode == 1
    assert "error[E202]: unknown gate `thruogh`" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = _dclang("--debug", "draw", str(bad), "-o", str(tmp_path / "g.svg"))
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DiagnosticError" in debug.stderr


# ---------------------------------------------------------------- draw


@pytest.mark.parametrize("suffix, magic", [pytest.param(".png", b"\x89PNG\r\n\x1a\n", marks=pytest.mark.needs_dot),
                                           pytest.param(".pdf", b"%PDF", marks=pytest.mark.needs_dot),
                                           pytest.param(".svg", b"<?xml", marks=pytest.mark.needs_dot),
                                           (".dot", b"digraph")])
def test_draw_formats(runner, tmp_path, suffix, magic):
    out = tmp_path / f"kd_dml{suffix}"
    result = runner.invoke(main, ["draw", str(EXAMPLES / "kd_dml.kt"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n"
    assert out.read_bytes().startswith(magic)


def _svg(runner, tmp_path, example: str, *flags: str) -> str:
    out = tmp_path / f"{example}{'-'.join(flags)}.svg"
    result = runner.invoke(main, ["draw", str(EXAMPLES / f"{example}.kt"), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


@pytest.mark.needs_dot
def test_draw_svg_reads_like_the_paper(runner, tmp_path):
    svg = _svg(runner, tmp_path, "kd_dml")
    for text in ("student", "peer", "teacher", "resnet32", "resnet110", "Label", "through", "linear", "correct",
                 "correct T=2"):
        assert f">{text}<" in svg, text
    assert 'fill="#e8474b"' in svg, "the target is red"
    assert 'fill="#3b6fd4"' in svg, "the frozen teacher is blue"
    # one node each, and its swatch in the legend
    assert svg.count('fill="#e8474b"') == 2 and svg.count('fill="#3b6fd4"') == 2


def test_the_legend_lists_what_the_drawing_uses_and_nothing_more():
    from dclang.api import load
    from dclang.draw import GATE_MEANING, to_graphviz

    def legend(name: str, **options) -> str:
        source = to_graphviz(load(EXAMPLES / f"{name}.kt"), **options).source
        return source[source.index("legend"):]

    kd_dml = legend("kd_dml")
    for words in ("target: the node", "trained", "frozen: pre-trained", "edge between outputs",
                  *(GATE_MEANING[g] for g in ("through", "linear", "correct"))):
        assert words in kd_dml, words
    for words in (GATE_MEANING["cutoff"], "ensemble", "between layers", "left to search", "cutoff", "both ways"):
        assert words not in kd_dml, words
    quickstart = legend("quickstart")
    assert "the same edge both ways" not in quickstart and GATE_MEANING["linear"] not in quickstart
    assert "grey dashed: cutoff" in legend("fig3c_4nodes", show_cutoff=True)
    assert "grey dashed: cutoff" not in legend("fig3c_4nodes")
    template = legend("quickstart_search")
    assert "a model left to search" in template and "a value left to search" in template
    assert GATE_MEANING["cutoff"] in template  # an option of its gates


@pytest.mark.needs_dot
def test_draw_leaves_cutoff_edges_out_unless_asked(runner, tmp_path):
    svg = _svg(runner, tmp_path, "fig3c_4nodes")
    assert ">cutoff<" not in svg
    assert svg.count('class="edge"') == 10, "only the live edges"
    shown = _svg(runner, tmp_path, "fig3c_4nodes", "--show-cutoff")
    assert ">cutoff<" in shown
    assert shown.count('class="edge"') == 15, "16 edges; n2 -> n4 and n4 -> n2 share one two-headed arrow"


@pytest.mark.needs_dot
def test_draw_merges_mutual_edges_that_say_the_same(runner, tmp_path):
    svg = _svg(runner, tmp_path, "dml4")
    assert svg.count('class="edge"') == 4 + 6, "four label edges and six two-headed arrows"


def test_graphviz_tests_skip_with_a_reason_where_dot_is_missing(tmp_path):
    """Every test that needs `dot` carries the `needs_dot` mark (tests/conftest.py)."""
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
                           "-k", "draw and not without_graphviz"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    skipped = re.search(r"(\d+) skipped", done.stdout)
    assert skipped and int(skipped.group(1)) >= 6, done.stdout[-3000:]  # png, pdf, svg and three drawings
    assert "Graphviz's `dot` is not installed" in done.stdout


def test_draw_unknown_format(runner, tmp_path):
    result = runner.invoke(main, ["draw", str(EXAMPLES / "kd.kt"), "-o", str(tmp_path / "g.jpg")])
    assert result.exit_code == 1
    assert "unknown format `.jpg`" in result.stderr and ".svg" in result.stderr
    assert "Traceback" not in result.output


def test_draw_without_graphviz_installed(tmp_path):
    """With no `dot` on PATH, `.dot` output still works and pictures say what to install."""
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    dot = _dclang("draw", "examples/kd.kt", "-o", str(tmp_path / "g.dot"), env=env)
    assert dot.returncode == 0, dot.stderr
    assert (tmp_path / "g.dot").read_text(encoding="utf-8").startswith("digraph kd {")
    svg = _dclang("draw", "examples/kd.kt", "-o", str(tmp_path / "g.svg"), env=env)
    assert svg.returncode == 1
    assert "Graphviz's `dot` program is not installed" in svg.stderr
    assert "apt-get install graphviz" in svg.stderr and "g.dot" in svg.stderr
    assert "Traceback" not in svg.stderr
    assert not (tmp_path / "g.svg").exists()
