"""Random mutations of the examples never crash the front end.

Whatever a user types, `dclang.api.check` answers with diagnostics whose spans lie inside
the text, or with a valid graph; it never raises. Mutations are the slips people make:
characters, tokens or lines deleted, duplicated or swapped; a name replaced by another
word; stray punctuation. The search is derandomised so CI sees the same cases each run.

The second half drives the command line (click's CliRunner) with mutated files, `--set`
values, and damaged run and search folders (flipped bytes, truncation, inserted bytes,
garbage JSON), made once by real tiny runs and searches.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dclang.api import check
from dclang.diagnostics import render_all
from dclang.syntax import ast
from dclang.syntax.format import format_module
from dclang.syntax.parser import parse_module

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.kt"))
TEXTS = [p.read_text(encoding="utf-8") for p in EXAMPLES]
TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|->|#[^\n]*|\"[^\"\n]*\"|.")
WORDS = ["label", "node", "edges", "graph", "data", "train", "choice", "ensemble", "target", "frozen",
         "init", "through", "cutoff", "linear", "correct", "kl", "ce", "T", "weight", "resnet32", "wrn28_2",
         "cifar100", "digits", "sgd", "step", "epochs", "batch", "true", "false", "x", "label2", "n9", "_",
         "at", "hint", "sp", "dkd", "lskd", "p", "layer3", "pool", "conv1"]
PUNCT = list("{}()[]:,=->*#\"'.;@!\\\t\n") + ["->", "=>", "- >", "\r\n", "\u00e9", "\u2192", "\x00"]


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutations(draw, texts: list[str] = TEXTS) -> str:
    text = draw(st.sampled_from(texts))
    for _ in range(draw(st.integers(1, 4))):
        unit = draw(st.sampled_from(["char", "token", "line"]))
        if unit == "char":
            parts = list(text)
        elif unit == "token":
            parts = _tokens(text)
        else:
            parts = text.splitlines(keepends=True)
        if not parts:
            parts = [""]
        i = draw(st.integers(0, len(parts) - 1))
        j = draw(st.integers(0, len(parts) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "word", "punct"]))
        if op == "delete":
            del parts[i]
        elif op == "duplicate":
            parts.insert(i, parts[i])
        elif op == "swap":
            parts[i], parts[j] = parts[j], parts[i]
        elif op == "word":
            names = [k for k, p in enumerate(parts) if re.fullmatch(r"[A-Za-z_]\w*", p)] or [i]
            k = draw(st.sampled_from(names))
            identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
            parts[k] = draw(st.one_of(st.sampled_from(WORDS), identifier))
        else:
            parts.insert(i, draw(st.sampled_from(PUNCT)))
        text = "".join(parts)
    return text


def _assert_span_inside(span, text: str) -> None:
    lines = text.splitlines() or [""]
    assert 1 <= span.line <= len(lines), (span, len(lines))
    assert 1 <= span.column <= len(lines[span.line - 1]) + 1, (span, lines[span.line - 1])
    assert (span.end_line, span.end_column) >= (span.line, span.column), span


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations())
def test_check_never_raises(text: str) -> None:
    checked = check(text)
    for diag in checked.diagnostics:
        if diag.span is not None:
            _assert_span_inside(diag.span, text)
        assert diag.code[0] in "EW" and diag.message
    assert render_all(checked.diagnostics, text, "<fuzz>", color=False) is not None
    if checked.ok:
        assert checked.graph is not None and checked.graph.graph["target"] is not None
    else:
        assert checked.errors


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations())
def test_format_of_any_parsed_mutant_is_stable(text: str) -> None:
    """Whatever parses formats to text that parses again, to the same AST, and is a fixed point."""
    module, _ = parse_module(text)
    if module is None:
        return
    once = format_module(module)
    again, diags = parse_module(once)
    assert again is not None, (once, diags)
    for kind in (ast.GraphDecl, ast.DataBlock, ast.TrainBlock, ast.NodeDecl, ast.EdgeDecl):
        assert again.of(kind) == module.of(kind)  # the formatter orders kinds, never items of a kind
    assert format_module(again) == once


# ================================================================ the command line
# Whatever a user gives the CLI (a mutated file, a --set value, a damaged run or search folder),
# it answers with exit 0, 1 or 2 and a message, never a traceback; an error is located
# (path:line:col) or names the file (or the --set) it is about.

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from dclang.cli import main  # noqa: E402

FAST = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
ROOT = Path(__file__).resolve().parent.parent


def _answered(result, *about: str) -> None:
    """No traceback; exit 0, 1 or 2; every error located or naming one of `about`."""
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.exception, out)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:
        assert "Usage:" in out and "Error:" in out, out
        return
    assert result.exit_code == 0 or any(a in out for a in about), out
    for i, line in enumerate(out.splitlines()):
        if line.startswith("error["):
            where = out.splitlines()[i + 1]
            assert "-->" in where and any(a in where for a in about), (line, where)
        elif line.startswith("error:"):
            assert any(a in line for a in about), line


def _bytes_damage():
    """Damage to a file's bytes: flipped bytes, truncation, garbage inserted, garbage JSON."""
    garbage_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                                lambda inner: st.lists(inner, max_size=3)
                                | st.dictionaries(st.sampled_from(["study", "storage", "nodes", "epoch", "complete",
                                                                   "val_acc", "x"]), inner, max_size=4),
                                max_leaves=8)
    return st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("json"), garbage_json.map(lambda v: json.dumps(v).encode("utf-8"))),
    )


def _damage(data: bytes, how) -> bytes:
    kind = how[0]
    if kind == "flip":
        i = how[1] % max(len(data), 1)
        return data[:i] + bytes([data[i] ^ how[2]]) + data[i + 1:] if data else bytes([how[2]])
    if kind == "truncate":
        return data[:int(len(data) * how[1])]
    if kind == "insert":
        i = how[1] % (len(data) + 1)
        return data[:i] + how[2] + data[i:]
    return how[1]


@FAST
@given(mutations())
def test_check_and_fmt_answer_any_text(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("kt") / "g.kt"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for command in (["check"], ["fmt"], ["fmt", "--check"]):
        _answered(CliRunner().invoke(main, [*command, str(path)]), str(path))


SET_KEYS = ["data.pad", "data.val_split", "data.dataset", "data.augment", "data.path", "train.epochs", "train.batch",
            "train.optimizer.lr", "train.schedule.gamma", "train.optimizer", "student.model", "label->student.gate",
            "nope.model", "train.x.y", "->.gate"]
SET_VALUES = st.one_of(
    st.sampled_from(["8", "0", "-1", "1e309", "-1e309", "nan", "inf", "99999999999999999999", "0.5", "[1, 2]",
                     "[" * 40 + "]" * 40, "choice(1, 2)", "choice()", "cnn_tiny", "through", "sgd(lr=0.1)", '"x"',
                     "true", "pad_crop", "#", "\n", "a b", "{", "}", "1,", "=", "é"]),
    st.text(alphabet=st.sampled_from(list("0123456789.eE+-[](),=\"#_abcxyz \n{}")), min_size=1, max_size=12),
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(SET_KEYS), SET_VALUES), min_size=1, max_size=3))
def test_run_answers_any_set_value(sets) -> None:
    """Up to where training would start (train_graph is replaced: nothing trains)."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dclang.train.loop.train_graph", lambda graph, **kwargs: calls.append(graph))
        patch.setattr("dclang.plots.write_node_curves", lambda run_dir: [])
        example = ROOT / "examples" / "quickstart.kt"
        args = ["run", str(example), "-o", "unused", "--no-progress"]
        for key, value in sets:
            args += ["--set", f"{key}={value}"]
        result = CliRunner().invoke(main, args)
    _answered(result, str(example), "--set")
    assert result.exit_code != 0 or calls


# ---------------------------------------------------------------- damaged search folders


@FAST
@given(st.sampled_from(["search.json", "study.journal"]), _bytes_damage())
def test_search_answers_a_damaged_folder(finished_search, tmp_path_factory, name: str, how) -> None:
    """--resume of a damaged folder (no workers: a study with its trials ends at once), and a
    worker joining a damaged journal (it trains with the cheap trainer, in this process)."""
    folder = Path(shutil.copytree(finished_search, tmp_path_factory.mktemp("s") / "out"))
    target = folder / name
    target.write_bytes(_damage(target.read_bytes(), how))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DCLANG_FAKE_SLEEP", "0")
        if name == "search.json":
            result = CliRunner().invoke(main, ["search", "--resume", "-o", str(folder), "--workers", "0"])
        else:
            result = CliRunner().invoke(main, ["search", "--worker", "--storage", str(target), "--study", "tiny",
                                               "--trainer", "fake_trainer:train"])
    _answered(result, str(target), str(folder))


# ---------------------------------------------------------------- damaged run folders


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished tiny real run (digits, an MLP, 2 epochs), made once by `dclang run`."""
    root = tmp_path_factory.mktemp("run")
    (root / "g.kt").write_text("graph tiny\ndata digits { val_split = 100 }\ntrain { epochs = 2 }\n"
                               "node s : mlp [target]\nlabel -> s : through\n", encoding="utf-8")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["run", str(root / "g.kt"), "-o", str(root / "run"), "--device", "cpu",
                                           "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "run"


@FAST
@given(st.sampled_from(["summary.json", "metrics.jsonl", "graph.kt"]), _bytes_damage())
def test_report_answers_a_damaged_run(run_folder, tmp_path_factory, name: str, how) -> None:
    folder = Path(shutil.copytree(run_folder, tmp_path_factory.mktemp("r") / "run"))
    target = folder / name
    target.write_bytes(_damage(target.read_bytes(), how))
    result = CliRunner().invoke(main, ["report", str(folder), "-o", str(folder.parent / "report")])
    _answered(result, str(folder))


RUN_FILES = ["checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "summary.json", "graph.kt",
             "dclang-run.json"]


@FAST
@given(st.sampled_from(RUN_FILES), _bytes_damage())
def test_resume_answers_a_damaged_run(run_folder, tmp_path_factory, name: str, how) -> None:
    """`dclang run --resume` of a finished run whose files were damaged: refused naming the
    file, or (damage it cannot see, such as a changed best.pt) told the run is complete."""
    folder = Path(shutil.copytree(run_folder, tmp_path_factory.mktemp("r") / "run"))
    target = folder / name
    target.write_bytes(_damage(target.read_bytes(), how))
    result = CliRunner().invoke(main, ["run", str(run_folder.parent / "g.kt"), "-o", str(folder), "--resume",
                                       "--device", "cpu", "--no-progress"])
    _answered(result, str(folder))
