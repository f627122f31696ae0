"""Random mutations of the examples never crash the front end.

Whatever a user types, `dclang.api.check` answers with diagnostics whose spans lie inside
the text, or with a valid graph; it never raises. Mutations are the slips people make:
characters, tokens or lines deleted, duplicated or swapped; a name replaced by another
word; stray punctuation. The search is derandomised so CI sees the same 300 cases each run.
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
            parts[k] = draw(st.one_of(st.sampled_from(WORDS), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)))
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
