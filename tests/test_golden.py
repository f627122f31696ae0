"""Golden files for the paper's examples: the AST, the IR, the canonical text and the DOT source.

Each example of `PAPER_EXAMPLES` and each `.kt` file in `tests/golden/` has four golden files
in `tests/golden/`: `NAME.ast` (the parse, spans left out), `NAME.ir` (nodes, edges, settings
and search sites after lowering), `NAME.fmt` (what `dclang fmt` prints) and `NAME.dot`
(what `dclang draw` hands to Graphviz). A change to any stage shows up as a readable diff;
`pytest --update-golden` rewrites them after a change that is meant.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from dclang.api import check
from dclang.draw import to_graphviz
from dclang.ir import Open
from dclang.syntax.format import format_module

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = sorted((ROOT / "examples").glob("*.kt"))

#: the examples that reproduce a graph of the paper, and so must say which figure or table;
#: they, and the inputs in tests/golden/, have golden files
PAPER_EXAMPLES = ("single.kt", "kd.kt", "dml2.kt", "dml4.kt", "kd_dml.kt", "fig3c_4nodes.kt", "search3.kt",
                  "quickstart_search.kt")
CORPUS = [ROOT / "examples" / name for name in PAPER_EXAMPLES] + sorted(GOLDEN.glob("*.kt"))


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- AST dump


def _is_flat(value) -> bool:
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, tuple):
        return not value
    if is_dataclass(value):
        return all(_is_flat(getattr(value, f.name)) or type(getattr(value, f.name)).__name__ == "Name"
                   for f in fields(value) if f.name != "span")
    return False


def _inline(value) -> str:
    if isinstance(value, tuple):
        return "()"
    if is_dataclass(value):
        if type(value).__name__ == "Name":
            return repr(value.text)
        inner = ", ".join(f"{f.name}={_inline(getattr(value, f.name))}" for f in fields(value) if f.name != "span")
        return f"{type(value).__name__}({inner})"
    return repr(value)


def dump_ast(value, indent: int = 0) -> list[str]:
    """An indented, span-free dump of any AST value: one line per flat node, stable across runs."""
    pad = "  " * indent
    if isinstance(value, tuple) and value:
        return [line for item in value for line in dump_ast(item, indent)]
    if _is_flat(value):
        return [pad + _inline(value)]
    lines = [pad + type(value).__name__]
    for f in fields(value):
        if f.name == "span":
            continue
        child = getattr(value, f.name)
        if _is_flat(child):
            lines.append(f"{pad}  {f.name}: {_inline(child)}")
        else:
            lines.append(f"{pad}  {f.name}:")
            lines += dump_ast(child, indent + 2)
    return lines


# ---------------------------------------------------------------- IR summary


def _v(value) -> str:
    """A resolved value as text; an open one shows its site and options."""
    if isinstance(value, Open):
        return f"choice@{value.site}(" + " | ".join(_v(o) for o in value.options) + ")"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={_v(v)}" for k, v in value.items()) + ")"
    if isinstance(value, tuple):
        return "[" + ", ".join(_v(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def ir_summary(graph, positions: bool = True) -> str:
    """Everything the back end reads from the IR, one fact per line, in a stable order.

    `positions=False` leaves out where each search site was written (for comparing a file
    with its formatted self, whose lines and columns differ).
    """
    lines = [f"graph {graph.graph['name']}"]
    data = graph.graph["data"]
    if data is None:
        lines.append("data: none")
    else:
        lines.append(f"data: dataset={_v(data.dataset)} val_split={_v(data.val_split)} "
                     f"split_seed={_v(data.split_seed)} augment={_v(data.augment)} pad={_v(data.pad)} "
                     f"path={_v(data.path)}")
    train = graph.graph["train"]
    lines.append(f"train: epochs={_v(train.epochs)} batch={_v(train.batch)} seed={_v(train.seed)}")
    lines.append(f"  optimizer: {_v(train.optimizer.name)}{_v(train.optimizer.args)}")
    lines.append(f"  schedule: {_v(train.schedule.name)}{_v(train.schedule.args)}")
    lines.append(f"target: {graph.graph['target']}")
    lines.append("nodes:")
    for name, spec in graph.nodes(data="spec"):
        if spec.is_label:
            lines.append(f"  {name} (the labels)")
            continue
        flags = [f for f, on in (("target", spec.target), ("declared_frozen", spec.declared_frozen),
                                 ("frozen", spec.frozen)) if on]
        init = f" init={_v(spec.init)}" if spec.init is not None else ""
        init += f" combine={_v(spec.combine)}" if spec.combine is not None else ""
        init += f" derived={spec.derived!r}" if spec.derived is not None else ""
        role = "no weights" if spec.is_ensemble else "averaged" if spec.is_ema else "trainable"
        lines.append(f"  {name}: model={_v(spec.model)}{init} " + (" ".join(flags) or role))
    lines.append("edges:")
    for _, _, e in graph.edges(data="spec"):
        lines.append(f"  {e.key}: gate={_v(e.gate)} loss={e.loss} T={_v(e.T)} weight={_v(e.weight)}"
                     + (" (bulk)" if e.bulk else ""))
    lines.append("sites:")
    for site in graph.graph["sites"]:
        where = f" at {site.span.line}:{site.span.column}" if positions else ""
        lines.append(f"  {site.name}{where}: " + " | ".join(_v(o) for o in site.options))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def checked():
    cache = {}

    def get(path: Path):
        if path not in cache:
            cache[path] = check(path.read_text(encoding="utf-8"), _id(path))
        return cache[path]

    return get


def test_there_are_examples():
    assert set(PAPER_EXAMPLES) <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", sorted(set(EXAMPLES) | set(CORPUS)), ids=_id)
def test_file_is_valid(path, checked):
    result = checked(path)
    assert result.ok, "\n".join(f"{d.code} {d.message}" for d in result.diagnostics)
    assert not result.diagnostics, "examples should not even warn"


@pytest.mark.parametrize("path", EXAMPLES, ids=_id)
def test_example_starts_with_a_comment_naming_the_paper(path):
    text = path.read_text(encoding="utf-8")
    header = text.split("\ngraph ")[0]
    assert text.startswith(f"# {path.name}:"), "an example starts with `# NAME.kt: what it is`"
    if path.name in PAPER_EXAMPLES:
        assert any(w in header for w in ("Fig.", "Table", "section")), "and says which figure or table it mirrors"


@pytest.mark.parametrize("path", CORPUS, ids=_id)
def test_ast(path, checked, golden):
    golden(GOLDEN / f"{path.stem}.ast", "\n".join(dump_ast(checked(path).module)) + "\n")


@pytest.mark.parametrize("path", CORPUS, ids=_id)
def test_ir(path, checked, golden):
    golden(GOLDEN / f"{path.stem}.ir", ir_summary(checked(path).graph))


@pytest.mark.parametrize("path", CORPUS, ids=_id)
def test_formatted(path, checked, golden):
    golden(GOLDEN / f"{path.stem}.fmt", format_module(checked(path).module))


@pytest.mark.parametrize("path", CORPUS, ids=_id)
def test_dot(path, checked, golden):
    golden(GOLDEN / f"{path.stem}.dot", to_graphviz(checked(path).graph).source)


def test_no_stale_golden_files():
    """Every golden output belongs to an input that still exists."""
    stems = {p.stem for p in CORPUS}
    stale = [p.name for p in GOLDEN.iterdir() if p.suffix in (".ast", ".ir", ".fmt", ".dot") and p.stem not in stems]
    assert not stale, f"golden files without an input: {stale}"
