"""`dclang fmt`: canonical, idempotent, comment-keeping, and never a change to the graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_golden import ir_summary

from dclang.api import check
from dclang.cli import main
from dclang.ir import build_graph
from dclang.syntax.format import format_module
from dclang.syntax.parser import parse_module

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
SOURCES = (sorted((ROOT / "examples").glob("*.kt")) + sorted(GOLDEN.glob("*.kt")) + sorted(GOLDEN.glob("*.fmt"))
           + sorted((ROOT / "tests" / "invalid").glob("*.kt")))
PARSEABLE = [p for p in SOURCES if parse_module(p.read_text(encoding="utf-8"))[0] is not None]


def _fmt(text: str) -> str:
    module, diags = parse_module(text)
    assert module is not None, diags
    return format_module(module)


def _ir(text: str) -> str:
    module, _ = parse_module(text)
    graph = build_graph(module)
    return ir_summary(graph, positions=False)


def _codes(text: str) -> list[str]:
    return sorted(d.code for d in check(text).diagnostics)


def test_corpus_is_large():
    assert len(PARSEABLE) >= 50


@pytest.mark.parametrize("path", PARSEABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_round_trip(path):
    text = path.read_text(encoding="utf-8")
    once = _fmt(text)
    assert _fmt(once) == once, "formatting is idempotent"
    assert _ir(once) == _ir(text), "formatting never changes the graph"
    assert _codes(once) == _codes(text), "nor which mistakes are reported"
    module, _ = parse_module(text)
    assert sorted(c.text for c in parse_module(once)[0].comments) == sorted(c.text for c in module.comments)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.kt")), ids=lambda p: p.name)
def test_examples_are_canonical(path):
    text = path.read_text(encoding="utf-8")
    assert _fmt(text) == text


COMMENTED = """\
# leading comment of the file
graph g   # trailing comment after graph

data digits { # after the opening brace
  # leading comment of a setting
  val_split = 300    # trailing comment of a setting
  # comment before the closing brace
}   # comment after the closing brace

train {
  epochs = 8
}
# leading comment of a node
node a : cnn_tiny [target]   # trailing comment of a node
node bb : mlp

# leading comment of an edge
label -> a : through   # trailing comment of an edge
label -> bb : through
bb -> a : through
# comment at the end of the file
"""

CANONICAL = """\
# leading comment of the file
graph g  # trailing comment after graph

data digits {
  # after the opening brace
  # leading comment of a setting
  val_split = 300  # trailing comment of a setting
  # comment before the closing brace
}  # comment after the closing brace

train {
  epochs = 8
}

# leading comment of a node
node a  : cnn_tiny [target]  # trailing comment of a node
node bb : mlp

# leading comment of an edge
label -> a  : through  # trailing comment of an edge
label -> bb : through
bb    -> a  : through

# comment at the end of the file
"""


def test_comments_are_kept_in_place():
    """Leading comments stay above their line, trailing ones at its end (two spaces before `#`),
    a comment after `{` moves to the first line inside the block, one after `}` stays there."""
    assert _fmt(COMMENTED) == CANONICAL
    assert _fmt(CANONICAL) == CANONICAL


def test_a_hash_inside_a_string_is_not_a_comment():
    text = 'graph g\n\ndata npz {\n  path = "runs/#1/data.npz"  # the real comment\n}\n'
    assert _fmt(text) == text
    assert [c.text for c in parse_module(text)[0].comments] == ["# the real comment"]


# ---------------------------------------------------------------- comments inside brackets

_BRACKETS = {"LPAR": 1, "LSQB": 1, "RPAR": -1, "RSQB": -1}


def _tokens(text: str):
    from dclang.syntax.parser import _parser

    return [t for t in _parser().lex(text, dont_ignore=True) if t.type != "_NL" and str(t).strip()]


def _inside_brackets(tokens) -> list[int]:
    """The index of every token written inside `(...)` or `[...]`, the bracket that opens one
    included, the closing one not."""
    depth, out = 0, []
    for i, tok in enumerate(tokens[:-1]):
        depth += _BRACKETS.get(tok.type, 0)
        if depth > 0:
            out.append(i)
    return out


def _insert(text: str, after: list, own_line: list[bool] | None = None) -> str:
    """`text` with `  # cN` after each token of `after` (or `# cN` on a line of its own below it)."""
    own_line = own_line or [False] * len(after)
    for n, (tok, alone) in sorted(enumerate(zip(after, own_line)), key=lambda p: -p[1][0].end_pos):
        note = f"\n# c{n}\n" if alone else f"  # c{n}\n"
        text = text[:tok.end_pos] + note + text[tok.end_pos:]
    return text


EXAMPLES = sorted((ROOT / "examples").glob("*.kt"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_comments_inside_calls_and_lists_stay_with_what_they_follow(path):
    """A comment after a `,` stays on the line of the element before it, one after `(` or `[`
    on the bracket's line, one after a last element on that element's line: in every example,
    at every such place at once."""
    text = path.read_text(encoding="utf-8")
    tokens = _tokens(text)
    places = [i for i in _inside_brackets(tokens)
              if tokens[i].type in ("COMMA", "LPAR", "LSQB") or tokens[i + 1].type in ("RPAR", "RSQB")]
    assert places, "every example has a call or a list"
    followed = [tokens[i - 1] if tokens[i].type == "COMMA" else tokens[i] for i in places]
    commented = _insert(text, [tokens[i] for i in places])
    once = _fmt(commented)
    assert _fmt(once) == once
    assert _ir(once) == _ir(text)
    out = _tokens(once)
    for n, before in enumerate(followed):
        (k,) = [i for i, t in enumerate(out) if t.type == "COMMENT" and str(t) == f"# c{n}"]
        prior = next(t for t in reversed(out[:k]) if t.type != "COMMA")
        assert (str(prior), prior.line) == (str(before), out[k].line), (n, once)
    kept = sorted(c.text for c in parse_module(commented)[0].comments)
    assert sorted(c.text for c in parse_module(once)[0].comments) == kept


def test_a_comment_inside_a_call_is_not_moved_to_another_declaration():
    text = ("graph g\ndata digits { }\ntrain {\n  optimizer = sgd(lr=0.1,  # the lr\n    momentum=0.9)\n"
            "  epochs = 3\n}\nnode a : mlp [target]\nlabel -> a : through\n")
    assert "  optimizer = sgd(\n    lr=0.1,  # the lr\n    momentum=0.9\n  )\n  epochs = 3\n" in _fmt(text)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_formatting_keeps_every_comment_and_is_idempotent(path, data):
    """Comments after any token inside brackets, at its line's end or on lines of their own."""
    text = path.read_text(encoding="utf-8")
    tokens = _tokens(text)
    places = [tokens[i] for i in _inside_brackets(tokens)]
    chosen = data.draw(st.lists(st.sampled_from(places), min_size=1, max_size=6, unique_by=id))
    alone = data.draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
    commented = _insert(text, chosen, alone)
    once = _fmt(commented)
    assert _fmt(once) == once
    assert _ir(once) == _ir(text)
    before = sorted(c.text for c in parse_module(commented)[0].comments)
    assert sorted(c.text for c in parse_module(once)[0].comments) == before


# ---------------------------------------------------------------- the command


@pytest.fixture
def runner():
    return CliRunner()


def test_fmt_prints_canonical_text(runner):
    result = runner.invoke(main, ["fmt", str(GOLDEN / "messy.kt")])
    assert result.exit_code == 0
    assert result.stdout == (GOLDEN / "messy.fmt").read_text(encoding="utf-8")


def test_fmt_check_exit_codes(runner, tmp_path):
    canonical = ROOT / "examples" / "kd_dml.kt"
    assert runner.invoke(main, ["fmt", "--check", str(canonical)]).exit_code == 0
    messy = tmp_path / "messy.kt"
    shutil.copy(GOLDEN / "messy.kt", messy)
    result = runner.invoke(main, ["fmt", "--check", str(canonical), str(messy)])
    assert result.exit_code == 1
    assert f"{messy}: not in canonical form" in result.stderr
    assert "kd_dml.kt" not in result.stderr
    golden_text = (GOLDEN / "messy.kt").read_text(encoding="utf-8")
    assert messy.read_text(encoding="utf-8") == golden_text, "--check writes nothing"


def test_fmt_write_rewrites_only_what_changes(runner, tmp_path):
    messy, canonical = tmp_path / "messy.kt", tmp_path / "kd_dml.kt"
    shutil.copy(GOLDEN / "messy.kt", messy)
    shutil.copy(ROOT / "examples" / "kd_dml.kt", canonical)
    before = canonical.stat().st_mtime_ns
    result = runner.invoke(main, ["fmt", "-w", str(messy), str(canonical)])
    assert result.exit_code == 0
    assert messy.read_text(encoding="utf-8") == (GOLDEN / "messy.fmt").read_text(encoding="utf-8")
    assert f"formatted {messy}" in result.stderr and "kd_dml" not in result.stderr
    assert canonical.stat().st_mtime_ns == before
    assert runner.invoke(main, ["fmt", "--check", str(messy)]).exit_code == 0


def test_fmt_of_a_file_with_a_syntax_error(runner, tmp_path):
    bad = tmp_path / "bad.kt"
    bad.write_text("graph g\nlabel a : through\n", encoding="utf-8")
    for args in (["fmt", str(bad)], ["fmt", "--check", str(bad)], ["fmt", "-w", str(bad)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 1
        assert "error[E100]: missing `->` between source and target" in result.stderr
        assert "Traceback" not in result.output
    assert bad.read_text(encoding="utf-8") == "graph g\nlabel a : through\n"


def test_derived_networks_round_trip_with_their_comments():
    text = ("node s : resnet32\nnode t : ema(s , decay = 0.999)  # mean teacher\n"
            "node b : choice(branch(s, from=layer3), resnet20, ema(\n  s,  # the student\n  decay=0.9\n))\n")
    once = _fmt(text)
    assert once == ("node s : resnet32\nnode t : ema(s, decay=0.999)  # mean teacher\n"
                    "node b : choice(\n  branch(s, from=layer3),\n  resnet20,\n  ema(\n    s,  # the student\n"
                    "    decay=0.9\n  )\n)\n")
    assert _fmt(once) == once
    assert _ir(once) == _ir(text)


def test_a_word_that_starts_with_true_or_false_is_a_word():
    module, diags = parse_module("node a : resnet32 [x=trueish, y=false, z=falsehood, w=true]\n")
    values = [a.value for a in module.items[0].attributes]
    assert not diags
    assert [type(v).__name__ for v in values] == ["Ident", "Bool", "Ident", "Bool"]
    assert _fmt("node a : resnet32 [x=trueish]\n") == "node a : resnet32 [x=trueish]\n"
