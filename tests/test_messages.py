"""What the front end says about hostile input: capped and bounded diagnostics, files that are
not files, a model that cannot take the data's images, a broken torchvision, and suggested
commands that run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dclang.api import check
from dclang.cli import main
from dclang.diagnostics import EXCERPT_WIDTH, MAX_SHOWN, MAX_TEXT, Span, error, render, render_all, warning

ROOT = Path(__file__).resolve().parent.parent
DCLANG = [sys.executable, "-c", "from dclang.cli import main; main()"]


def _unknown_options(n: int) -> str:
    options = ", ".join(f"zz{i}=1" for i in range(n))
    return (f"graph g\ndata digits {{ }}\ntrain {{ optimizer = sgd(lr=0.1, {options}) }}\n"
            "node a : mlp [target]\nlabel -> a : through\n")


def test_thousands_of_errors_on_one_line_are_capped_and_each_excerpt_bounded():
    text = _unknown_options(2000)
    checked = check(text, "big.kt")
    assert len(checked.errors) == 2000
    rendered = render_all(checked.diagnostics, text, "big.kt")
    assert rendered.count("error[E206]") == MAX_SHOWN
    assert rendered.endswith(f"note: {2000 - MAX_SHOWN:,} more errors in big.kt not shown (dclang shows the first "
                             f"{MAX_SHOWN}); fix these and check again")
    assert max(len(line) for line in rendered.splitlines()) <= 2 * MAX_TEXT
    assert len(rendered) < 60 * 1000  # 50 excerpts of a 20 KB line would be 1 MB


def test_the_cap_counts_warnings_apart():
    diags = [error("E200", "e", Span(1, 1, 1, 2))] * (MAX_SHOWN + 2) + [warning("W500", "w", Span(1, 1, 1, 2))] * 3
    assert render_all(diags, "x\n", "f.kt").splitlines()[-1].startswith("note: 2 more errors and 3 more warnings")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_any_long_line_renders_bounded_with_the_caret_under_its_character(length, data):
    line = "".join(data.draw(st.lists(st.sampled_from("abc xyz=(,)019"), min_size=length, max_size=length)))
    column = data.draw(st.integers(1, length + 1))
    end = data.draw(st.integers(column + 1, length + 2))
    diag = error("E100", "m", Span(1, column, 1, end), "here")
    out = render(diag, line + "\n", "f.kt").splitlines()
    shown = out[3].split(" | ", 1)[1]
    marker = out[4].split(" | ", 1)[1]
    assert len(shown) <= EXCERPT_WIDTH
    caret = marker.index("^")
    carets = len(marker[caret:].split(" ")[0])
    if column <= length:
        assert shown[caret] == line[column - 1]
        assert caret + carets <= len(shown) and carets <= end - column
    else:  # the end of the line: the caret sits just after it
        assert caret == len(shown) and carets == 1


def test_check_of_twenty_thousand_unknown_options_is_fast_and_small(tmp_path):
    """Issue 19's file: 20,000 unknown options on one 209 KB line (2 GiB of errors before)."""
    path = tmp_path / "big.kt"
    path.write_text(_unknown_options(20000), encoding="utf-8")
    result = subprocess.run([*DCLANG, "check", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr) < 100_000
    assert "19,950 more errors" in result.stderr and "20000 errors" in result.stderr


def test_a_star_without_edges_says_what_it_needs(tmp_path):
    checked = check("graph g\ndata digits { }\nnode a : mlp [target]\nlabel -> * : through\n")
    (diag,) = checked.diagnostics
    assert "only an end of a bulk edge" in diag.message and diag.span.column == 10
    assert "write `edges label -> * : through`" in diag.help


def test_a_path_that_is_not_a_regular_file_is_named_what_it_is(tmp_path):
    runner = CliRunner()
    for path, words in (("/dev/null", "is a character device, not a regular file"), (str(tmp_path), "is a directory"),
                        (str(tmp_path / "none.kt"), "does not exist")):
        for command in (["check"], ["fmt"], ["draw", "-o", str(tmp_path / "g.svg")], ["run"]):
            args = [*command[:1], path, *command[1:]]
            result = runner.invoke(main, args)
            assert result.exit_code != 0, args
            assert "Traceback" not in result.output
            if path.startswith("/dev"):
                assert f"cannot read {path}: it {words}" in result.output, (args, result.output)
            else:  # click refuses a directory or a missing file itself, in these words
                assert words.split()[-1] in result.output, (args, result.output)


def test_a_checkpoint_path_that_names_a_folder_is_said_to_be_one(tmp_path):
    (tmp_path / "t.pt").mkdir()
    kt = tmp_path / "g.kt"
    kt.write_text('graph g\ndata digits { }\nnode a : mlp [target]\nnode t : mlp [frozen, init="t.pt"]\n'
                  "label -> a : through\nt -> a : through\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["check", str(kt)])
    assert result.exit_code == 1 and "error[E600]: checkpoint `t.pt` is a directory" in result.output


def test_the_command_suggested_for_a_template_is_complete(tmp_path):
    from dclang.search.command import search_command

    result = CliRunner().invoke(main, ["run", str(ROOT / "examples" / "quickstart_search.kt")])
    assert result.exit_code == 1
    suggested = result.output.split("search it with `", 1)[1].split("`", 1)[0]
    args = shlex.split(suggested)
    assert args[:2] == ["dclang", "search"] and "--trials" in args
    search_command.make_context("search", args[2:])  # raises for a missing or malformed option


def test_a_library_model_that_cannot_take_the_images_is_found_by_check_and_models():
    text = "graph g\ndata digits { }\nnode s : torchvision.squeezenet1_0 [target]\nlabel -> s : through\n"
    (diag,) = check(text).errors
    assert diag.code == "E222" and diag.span.line == 3 and "shrink them to nothing" in diag.message
    result = CliRunner().invoke(main, ["models", "torchvision.squeezenet1_0", "--data", "digits"])
    assert result.exit_code == 1 and "error[E222]" in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)
    fits = "graph g\ndata cifar10 { }\nnode s : torchvision.squeezenet1_0 [target]\nlabel -> s : through\n"
    assert check(fits).ok  # 32x32 images are large enough


def test_a_vit_whose_patches_do_not_divide_the_images_is_found_by_check():
    text = "graph g\ndata digits { }\nnode s : torchvision.vit_b_16 [target]\nlabel -> s : through\n"
    (diag,) = check(text).errors
    assert diag.code == "E222" and "patch size does not divide 8x8" in diag.message


def test_a_torchvision_that_does_not_match_torch_is_a_clear_error(tmp_path, broken_torchvision):
    """A real failing import: a `torchvision` package first on the path whose import raises what a
    torchvision built for another torch raises, with its own distribution metadata (0.28.0)."""
    fake = broken_torchvision
    kt = tmp_path / "g.kt"
    kt.write_text("graph g\ndata digits { }\nnode r : torchvision.resnet18 [target]\nlabel -> r : through\n",
                  encoding="utf-8")
    from importlib import metadata

    env = {**os.environ, "PYTHONPATH": str(fake)}
    for args in (["check", str(kt)], ["models"], ["models", "torchvision.resnet18", "--data", "digits"]):
        result = subprocess.run([*DCLANG, *args], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 1, (args, result.stdout)
        assert "Traceback" not in result.stderr, result.stderr
        assert f"torchvision 0.28.0 cannot be imported with torch {metadata.version('torch')}" in result.stderr
        assert "operator torchvision::nms does not exist" in result.stderr
        assert "pip install torch==2.14.1 torchvision==0.29.1" in result.stderr
