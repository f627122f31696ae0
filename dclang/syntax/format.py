"""AST to canonical `.kt` text: what `dclang fmt` prints and what search writes for a trial.

The canonical form puts the declarations in a fixed order (graph, data, train, nodes,
edges; nodes and edges keep their order), one setting per line with two-space indent,
node and edge columns aligned, one space around `->`, `:` and `=`. Comments are kept:
a comment on its own line stays above the declaration that follows it, a comment after
code stays at the end of that line. Formatting is idempotent and never changes the IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dclang.syntax import ast


def format_value(v: ast.Value) -> str:
    if isinstance(v, ast.Number):
        return v.text
    if isinstance(v, ast.String):
        return '"' + v.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.Ident):
        return v.name
    if isinstance(v, ast.ListValue):
        return "[" + ", ".join(format_value(i) for i in v.items) + "]"
    if isinstance(v, ast.Call):
        return format_call(v)
    if isinstance(v, ast.Choice):
        return "choice(" + ", ".join(format_value(o) for o in v.options) + ")"
    if isinstance(v, ast.Ensemble):  # an option of a node's choice
        return _model(v)
    raise TypeError(f"not a value: {v!r}")


def format_call(call: ast.Call) -> str:
    return call.name.text + "(" + ", ".join(f"{a.name.text}={format_value(a.value)}" for a in call.args) + ")"


def _model(expr: ast.ModelExpr) -> str:
    if isinstance(expr, ast.Ensemble):
        return "ensemble(" + ", ".join(m.text for m in expr.members) + ")"
    if isinstance(expr, (ast.Choice, ast.Call)):
        return format_value(expr)
    return expr.text


def _gate(expr: ast.GateExpr) -> str:
    return format_value(expr) if isinstance(expr, ast.Choice) else expr.text


def format_endpoint(node: ast.Name, layer: ast.LayerExpr | None) -> str:
    """`node`, or `node.layer3` / `node.choice(layer2, layer3)` for a layer endpoint."""
    return node.text if layer is None else f"{node.text}.{_gate(layer)}"


def format_loss(loss: ast.LossExpr) -> str:
    return format_call(loss) if isinstance(loss, ast.Call) else format_value(loss)


def _attributes(attrs: tuple[ast.Attribute, ...]) -> str:
    if not attrs:
        return ""
    parts = [a.name.text if a.value is None else f"{a.name.text}={format_value(a.value)}" for a in attrs]
    return "[" + ", ".join(parts) + "]"


# ---------------------------------------------------------------- comments


@dataclass
class _Notes:
    """Comments attached to one declaration or setting."""

    leading: list[str] = field(default_factory=list)
    trailing: str = ""


def _anchors(module: ast.Module) -> list[tuple[object, object]]:
    """(node, container) for every item and setting, in source order."""
    out: list[tuple[object, object]] = []
    for item in module.items:
        out.append((item, None))
        if isinstance(item, (ast.DataBlock, ast.TrainBlock)):
            out += [(s, item) for s in item.settings]
    return sorted(out, key=lambda pair: (pair[0].span.line, pair[0].span.column))


def _attach(module: ast.Module):
    """Give each comment a home: the file's header, a declaration, a block's end, or the tail.

    The comment lines that open the file are its header and stay on top when a blank line
    or the `graph` declaration follows them, even if the canonical order moves the
    declaration below them down.
    """
    notes: dict[int, _Notes] = {}
    footers: dict[int, list[str]] = {}  # comments before a block's `}`
    tail: list[str] = []
    anchors = _anchors(module)
    header, glued = _header(anchors, module.comments)
    for comment in module.comments[len(header):]:
        line, col = comment.span.line, comment.span.column
        same_line = [(node, c) for node, c in anchors
                     if node.span.end_line == line and node.span.end_column <= col]
        if same_line:
            node = max(same_line, key=lambda pair: (pair[0].span.end_column, pair[1] is None))[0]
            note = notes.setdefault(id(node), _Notes())
            note.trailing = (note.trailing + " " + comment.text).strip() if note.trailing else comment.text
            continue
        after = [(node, c) for node, c in anchors if node.span.line > line]
        block = next((item for item in module.items if isinstance(item, (ast.DataBlock, ast.TrainBlock))
                      and item.span.line < line < item.span.end_line), None)
        if block is not None and not any(c is block for _, c in after[:1]):
            footers.setdefault(id(block), []).append(comment.text)
        elif after:
            notes.setdefault(id(after[0][0]), _Notes()).leading.append(comment.text)
        else:
            tail.append(comment.text)
    return notes, footers, ([c.text for c in header], glued), tail


def _header(anchors, comments) -> tuple[list[ast.Comment], bool]:
    """The run of comments on lines 1, 2, ... that a blank line or `graph` ends, and whether
    the `graph` line follows it directly (then the canonical text keeps them together)."""
    run: list[ast.Comment] = []
    for comment in comments:
        if comment.span.line != len(run) + 1 or comment.span.column != 1:
            break
        run.append(comment)
    if not run:
        return [], False
    following = next((node for node, _ in anchors if node.span.line > run[-1].span.line), None)
    glued = following is not None and following.span.line == run[-1].span.line + 1
    if glued and not isinstance(following, ast.GraphDecl):
        return [], False  # it describes the declaration below it, and moves with it
    return run, glued


# ---------------------------------------------------------------- layout


def format_module(module: ast.Module) -> str:
    """The canonical text of a module (ends with one newline)."""
    notes, footers, header, tail = _attach(module)

    def emit(lines: list[str], node, text: str, indent: str = "") -> None:
        note = notes.get(id(node), _Notes())
        lines += [indent + c for c in note.leading]
        lines.append(indent + text + (("  " + note.trailing) if note.trailing else ""))

    sections: list[list[str]] = []
    for decl in module.of(ast.GraphDecl):
        lines: list[str] = []
        emit(lines, decl, f"graph {decl.name.text}")
        sections.append(lines)
    for block in module.of(ast.DataBlock) + module.of(ast.TrainBlock):
        note = notes.get(id(block), _Notes())
        head = f"data {block.dataset.text} {{" if isinstance(block, ast.DataBlock) else "train {"
        lines = [*note.leading, head]
        for setting in block.settings:
            emit(lines, setting, f"{setting.key.text} = {format_value(setting.value)}", "  ")
        lines += ["  " + c for c in footers.get(id(block), [])]
        # a comment after the block's last line stays after its closing `}`
        lines.append("}" + (f"  {note.trailing}" if note.trailing else ""))
        sections.append(lines)

    nodes = module.of(ast.NodeDecl)
    if nodes:
        width = max(len(n.name.text) for n in nodes)
        mwidth = max(len(_model(n.model)) for n in nodes)
        lines = []
        for n in nodes:
            text = f"node {n.name.text:<{width}} : {_model(n.model):<{mwidth}} {_attributes(n.attributes)}"
            emit(lines, n, text.rstrip())
        sections.append(lines)

    edges = module.of(ast.EdgeDecl)
    if edges:
        def ends(e: ast.EdgeDecl) -> tuple[str, str]:
            prefix = "edges " if e.bulk else ""
            return prefix + format_endpoint(e.source, e.source_layer), format_endpoint(e.target, e.target_layer)

        swidth = max(len(ends(e)[0]) for e in edges)
        twidth = max(len(ends(e)[1]) for e in edges)
        lines = []
        for e in edges:
            s, t = ends(e)
            loss = " " + format_loss(e.loss) if e.loss is not None else ""
            emit(lines, e, f"{s:<{swidth}} -> {t:<{twidth}} : {_gate(e.gate)}{loss}")
        sections.append(lines)

    if tail:
        sections.append(tail)
    body = "\n\n".join("\n".join(section) for section in sections)
    lines, glued = header
    if lines:
        return "\n".join(lines) + ("\n" if glued else "\n\n") + body + "\n"
    return body + "\n"

