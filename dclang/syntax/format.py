"""AST to canonical `.kt` text: what `dclang fmt` prints and what search writes for a trial.

The canonical form puts the declarations in a fixed order (graph, data, train, nodes,
edges; nodes and edges keep their order), one setting per line with two-space indent,
node and edge columns aligned, one space around `->`, `:` and `=`. Comments are kept:
a comment on its own line stays above the declaration that follows it, a comment after
code stays at the end of that line. A comment inside a call's or a list's brackets stays
with the element it follows (`sgd(lr=0.1,  # the lr`): that value is then written one
element a line, so the comment keeps its place. Formatting is idempotent and never
changes the IR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dclang.syntax import ast


def format_value(v: ast.Value, notes: _Inner | None = None, indent: str = "") -> str:
    """A value's canonical text: on one line, or, where `notes` holds comments inside its
    brackets, one element a line (indented from `indent`) with each comment where it was."""
    if isinstance(v, ast.Number):
        return v.text
    if isinstance(v, ast.String):
        return '"' + v.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.Ident):
        return v.name
    inner = indent + "  "
    if isinstance(v, ast.ListValue):
        return _wrap(notes, id(v), "[", [(i, format_value(i, notes, inner)) for i in v.items], "]", indent)
    if isinstance(v, ast.Call):
        return format_call(v, notes, indent)
    if isinstance(v, ast.Choice):
        return _wrap(notes, id(v), "choice(", [(o, format_value(o, notes, inner)) for o in v.options], ")", indent)
    if isinstance(v, ast.Ensemble):  # an option of a node's choice
        return _wrap(notes, id(v), "ensemble(", [(m, m.text) for m in v.members], ")", indent)
    if isinstance(v, ast.Derived):  # `ema(s, decay=0.999)`, `branch(b1, from=layer3)`
        parts = [(v.source, v.source.text)] + [(a, f"{a.name.text}={format_value(a.value, notes, inner)}")
                                                for a in v.args]
        return _wrap(notes, id(v), v.kind + "(", parts, ")", indent)
    raise TypeError(f"not a value: {v!r}")


def format_call(call: ast.Call, notes: _Inner | None = None, indent: str = "") -> str:
    parts = [(a, f"{a.name.text}={format_value(a.value, notes, indent + '  ')}") for a in call.args]
    return _wrap(notes, id(call), call.name.text + "(", parts, ")", indent)


def _wrap(notes: _Inner | None, key, opening: str, parts: list[tuple[object, str]], closing: str,
          indent: str) -> str:
    """A bracketed list of elements: `a, b` on one line, or one element a line when a comment
    sits inside (after the opening bracket, before or after an element, before the closing one)."""
    if notes is None or key not in notes.spread:
        return opening + ", ".join(text for _, text in parts) + closing
    inner = indent + "  "
    head = notes.head.get(key)
    lines = [opening + ("  " + " ".join(head) if head else "")]
    for i, (element, text) in enumerate(parts):
        lines += [inner + c for c in notes.leading.get(id(element), [])]
        trailing = notes.trailing.get(id(element))
        comma = "," if i < len(parts) - 1 else ""
        lines.append(inner + text + comma + ("  " + " ".join(trailing) if trailing else ""))
    lines += [inner + c for c in notes.tail.get(key, [])]
    return "\n".join(lines + [indent + closing])


def _model(expr: ast.ModelExpr, notes: _Inner | None = None) -> str:
    if isinstance(expr, (ast.Ensemble, ast.Choice, ast.Call, ast.Derived)):
        return format_value(expr, notes)
    return expr.text


def _gate(expr: ast.GateExpr, notes: _Inner | None = None) -> str:
    return format_value(expr, notes) if isinstance(expr, ast.Choice) else expr.text


def format_endpoint(node: ast.Name, layer: ast.LayerExpr | None, notes: _Inner | None = None) -> str:
    """`node`, or `node.layer3` / `node.choice(layer2, layer3)` for a layer endpoint."""
    return node.text if layer is None else f"{node.text}.{_gate(layer, notes)}"


def format_loss(loss: ast.LossExpr, notes: _Inner | None = None) -> str:
    return format_call(loss, notes) if isinstance(loss, ast.Call) else format_value(loss, notes)


def _attributes(decl: ast.NodeDecl, notes: _Inner | None = None) -> str:
    if not decl.attributes:
        return ""
    parts = [(a, a.name.text if a.value is None else f"{a.name.text}={format_value(a.value, notes, '  ')}")
             for a in decl.attributes]
    return _wrap(notes, ("attributes", id(decl)), "[", parts, "]", "")


# ---------------------------------------------------------------- comments


@dataclass
class _Notes:
    """Comments attached to one declaration or setting."""

    leading: list[str] = field(default_factory=list)
    trailing: str = ""


@dataclass
class _Inner:
    """Comments inside brackets, kept with the element they follow: after it on its line
    (`trailing`), on their own line before the next element (`leading`), on the opening
    bracket's line (`head`) or before the closing one (`tail`). Elements are keyed by `id`,
    brackets by their value's `id` (a node's attributes by ("attributes", id(node))); a
    bracket in `spread`, or holding one, is laid out one element a line."""

    trailing: dict[int, list[str]] = field(default_factory=dict)
    leading: dict[int, list[str]] = field(default_factory=dict)
    head: dict[object, list[str]] = field(default_factory=dict)
    tail: dict[object, list[str]] = field(default_factory=dict)
    spread: set = field(default_factory=set)


@dataclass(frozen=True)
class _Bracket:
    key: object
    elements: tuple
    opens_on: int  # the line of the opening bracket
    start: tuple[int, int]
    end: tuple[int, int]


def _elements(value) -> tuple | None:
    """The elements of a bracketed value; None for a value without brackets."""
    if isinstance(value, ast.Call):
        return value.args
    if isinstance(value, ast.ListValue):
        return value.items
    if isinstance(value, ast.Choice):
        return value.options
    if isinstance(value, ast.Ensemble):
        return value.members
    if isinstance(value, ast.Derived):
        return (value.source, *value.args)
    return None


def _brackets(values) -> list[_Bracket]:
    """The bracketed values among `values` (an argument or attribute stands for its value)."""
    out = []
    for value in values:
        value = value.value if isinstance(value, (ast.Argument, ast.Attribute)) else value
        elements = _elements(value)
        if elements is not None:
            sp = value.span
            out.append(_Bracket(id(value), elements, sp.line, (sp.line, sp.column), (sp.end_line, sp.end_column)))
    return out


def _outer_brackets(anchor) -> list[_Bracket]:
    """The bracketed parts written directly in a setting or declaration."""
    if isinstance(anchor, ast.Setting):
        return _brackets([anchor.value])
    if isinstance(anchor, ast.NodeDecl):
        out = _brackets([anchor.model])
        if anchor.attributes:
            model = anchor.model.span
            out.append(_Bracket(("attributes", id(anchor)), anchor.attributes, model.end_line,
                                (model.end_line, model.end_column), (anchor.span.end_line, anchor.span.end_column)))
        return out
    if isinstance(anchor, ast.EdgeDecl):
        return _brackets([v for v in (anchor.source_layer, anchor.target_layer, anchor.gate, anchor.loss)
                          if v is not None])
    return []


def _place_inner(inner: _Inner, anchor, comment: ast.Comment) -> bool:
    """Attach a comment written inside the brackets of `anchor` to the element it follows;
    False when no bracket holds it (a sampled template whose choice was replaced)."""
    at = (comment.span.line, comment.span.column)
    chain: list[_Bracket] = []
    candidates = _outer_brackets(anchor)
    while True:
        holder = next((b for b in candidates if b.start < at < b.end), None)
        if holder is None:
            break
        chain.append(holder)
        candidates = _brackets(holder.elements)
    if not chain:
        return False
    bracket = chain[-1]
    before = [e for e in bracket.elements if (e.span.end_line, e.span.end_column) <= at and e.span.end_line == at[0]]
    after = [e for e in bracket.elements if (e.span.line, e.span.column) > at]
    if before:
        inner.trailing.setdefault(id(before[-1]), []).append(comment.text)
    elif at[0] == bracket.opens_on:
        inner.head.setdefault(bracket.key, []).append(comment.text)
    elif after:
        inner.leading.setdefault(id(after[0]), []).append(comment.text)
    else:
        inner.tail.setdefault(bracket.key, []).append(comment.text)
    inner.spread.update(b.key for b in chain)
    return True


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
    inner = _Inner()
    anchors = _anchors(module)
    header, glued = _header(anchors, module.comments)
    for comment in module.comments[len(header):]:
        line, col = comment.span.line, comment.span.column
        holder = next((node for node, _ in anchors if not isinstance(node, (ast.DataBlock, ast.TrainBlock))
                       and (node.span.line, node.span.column) < (line, col) < (node.span.end_line,
                                                                                node.span.end_column)), None)
        if holder is not None and _place_inner(inner, holder, comment):
            continue
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
    return notes, footers, ([c.text for c in header], glued), tail, inner


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
    notes, footers, header, tail, inner = _attach(module)

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
            emit(lines, setting, f"{setting.key.text} = {format_value(setting.value, inner, '  ')}", "  ")
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
            model = _model(n.model, inner)
            model += " " * (mwidth - len(model)) if "\n" not in model else ""  # a spread model is not aligned
            text = f"node {n.name.text:<{width}} : {model} {_attributes(n, inner)}"
            emit(lines, n, text.rstrip())
        sections.append(lines)

    edges = module.of(ast.EdgeDecl)
    if edges:
        def ends(e: ast.EdgeDecl, notes: _Inner | None = None) -> tuple[str, str]:
            prefix = "edges " if e.bulk else ""
            return (prefix + format_endpoint(e.source, e.source_layer, notes),
                    format_endpoint(e.target, e.target_layer, notes))

        swidth = max(len(ends(e)[0]) for e in edges)
        twidth = max(len(ends(e)[1]) for e in edges)
        lines = []
        for e in edges:
            s, t = ends(e, inner)
            s += " " * (swidth - len(s)) if "\n" not in s else ""
            t += " " * (twidth - len(t)) if "\n" not in t else ""
            loss = " " + format_loss(e.loss, inner) if e.loss is not None else ""
            emit(lines, e, f"{s} -> {t} : {_gate(e.gate, inner)}{loss}")
        sections.append(lines)

    if tail:
        sections.append(tail)
    body = "\n\n".join("\n".join(section) for section in sections)
    lines, glued = header
    if lines:
        return "\n".join(lines) + ("\n" if glued else "\n\n") + body + "\n"
    return body + "\n"

