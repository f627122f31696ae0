"""Text to AST: the cached Lark LALR parser, the post-lexer, and syntax diagnostics.

The grammar lives in `grammar/dclang.lark` (packed into the wheel as `dclang.grammar`). It is
loaded once per process. A syntax error becomes a `Diagnostic` in the user's words (never
`$END` or `__ANON_0`), so `dclang check` prints it like any other mistake.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lark import PostLex

from dclang.diagnostics import Diagnostic, Span, error, suggest
from dclang.syntax import ast

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}
#: brackets may nest this deep; no value of the language needs more, and the tree walks
#: after parsing are recursive, so a deeper text would exhaust Python's stack
MAX_NESTING = 32


class _TooDeep(Exception):
    """Raised by the post-lexer at the bracket that opens one level too many."""

    def __init__(self, token: Token):
        super().__init__(str(token))
        self.token = token


#: a number written with more characters than this is beyond every range of the language
#: (64-bit whole numbers have 19 digits); converting one of millions of digits to an int
#: would take minutes, and Python refuses beyond 4300
MAX_NUMBER = 100


class _TooLong(Exception):
    """Raised by the post-lexer at a number longer than `MAX_NUMBER` characters."""

    def __init__(self, token: Token):
        super().__init__(str(token)[:MAX_NUMBER])
        self.token = token


class _NewlinesInBrackets(PostLex):
    """Drop newlines inside (), [] and {}: statements end at a newline, values may span lines.

    A newline is what separates `a -> b : through` from a following `kl(T=2)` on the next line,
    so it cannot be ignored everywhere; inside brackets it never matters.
    """

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for token in stream:
            if token.type in _OPEN:
                depth += 1
                if depth > MAX_NESTING:
                    raise _TooDeep(token)
            elif token.type in _CLOSE:
                depth = max(0, depth - 1)
            elif token.type == "_NL" and depth:
                continue
            elif token.type == "NUMBER" and len(token) > MAX_NUMBER:
                raise _TooLong(token)
            yield token


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.files("dclang.grammar").joinpath("dclang.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
        postlex=_NewlinesInBrackets(),
    )


def _name(token: Token) -> ast.Name:
    return ast.Name(str(token), Span.from_token(token))


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree to AST. Structure only: every rule about meaning belongs to a pass."""

    def start(self, meta, items):
        return tuple(items)

    def graph_decl(self, meta, children):
        return ast.GraphDecl(_name(children[0]), Span.from_meta(meta))

    def data_block(self, meta, children):
        return ast.DataBlock(_name(children[0]), children[1], Span.from_meta(meta))

    def train_block(self, meta, children):
        return ast.TrainBlock(children[0], Span.from_meta(meta))

    def block(self, meta, settings):
        return tuple(settings)

    def setting(self, meta, children):
        return ast.Setting(_name(children[0]), children[1], Span.from_meta(meta))

    def node_decl(self, meta, children):
        attributes = children[2] if len(children) > 2 else ()
        return ast.NodeDecl(_name(children[0]), children[1], attributes, Span.from_meta(meta))

    def model_path(self, meta, children):
        """`resnet32` or `torchvision.resnet18`: one Name whose text is the dotted path."""
        return ast.Name(".".join(str(c) for c in children), Span.from_meta(meta))

    def model_name(self, meta, children):
        return children[0]

    def model_call(self, meta, children):
        return ast.Call(children[0], tuple(children[1:]), Span.from_meta(meta))

    def gate_name(self, meta, children):
        return _name(children[0])

    def ensemble(self, meta, children):
        return ast.Ensemble(tuple(_name(c) for c in children), Span.from_meta(meta))

    def derived(self, meta, children):
        kind, source, *args = children
        return ast.Derived(kind, _name(source), tuple(args), Span.from_meta(meta))

    def derived_kind(self, meta, children):
        return str(children[0])

    def attributes(self, meta, children):
        return tuple(children)

    def attribute(self, meta, children):
        value = children[1] if len(children) > 1 else None
        return ast.Attribute(_name(children[0]), value, Span.from_meta(meta))

    def edge_decl(self, meta, children):
        (source, source_layer), (target, target_layer), gate = children[:3]
        loss = children[3] if len(children) > 3 else None
        return ast.EdgeDecl(source, target, gate, loss, Span.from_meta(meta),
                            source_layer=source_layer, target_layer=target_layer)

    def bulk_edge_decl(self, meta, children):
        source, target, gate = children[:3]
        loss = children[3] if len(children) > 3 else None
        return ast.EdgeDecl(source, target, gate, loss, Span.from_meta(meta), bulk=True)

    def endpoint(self, meta, children):
        """(node name, layer or None)."""
        return _name(children[0]), (children[1] if len(children) > 1 else None)

    def layer_path(self, meta, children):
        """`layer3.0.conv2` as one name: the path `named_modules()` gives the module."""
        return ast.Name(".".join(str(c) for c in children), Span.from_meta(meta))

    def bulk_endpoint(self, meta, children):
        return _name(children[0])

    def loss(self, meta, children):
        return ast.Call(_name(children[0]), tuple(children[1:]), Span.from_meta(meta))

    call = loss

    def argument(self, meta, children):
        return ast.Argument(_name(children[0]), children[1], Span.from_meta(meta))

    def number(self, meta, children):
        text = str(children[0])
        is_int = all(ch.isdigit() or ch in "+-" for ch in text)
        return ast.Number(int(text) if is_int else float(text), text, Span.from_meta(meta))

    def string(self, meta, children):
        raw = str(children[0])[1:-1]
        value = raw.replace('\\"', '"').replace("\\\\", "\\")
        return ast.String(value, Span.from_meta(meta))

    def true(self, meta, children):
        return ast.Bool(True, Span.from_meta(meta))

    def false(self, meta, children):
        return ast.Bool(False, Span.from_meta(meta))

    def ident(self, meta, children):
        return ast.Ident(str(children[0]), Span.from_meta(meta))

    def list(self, meta, children):
        return ast.ListValue(tuple(children), Span.from_meta(meta))

    def choice(self, meta, children):
        return ast.Choice(tuple(children), Span.from_meta(meta))

    model_choice = choice  # its options may be `ensemble(...)` too

    def library_option(self, meta, children):
        """A library's model among a choice's options: one word, like any model name."""
        return ast.Ident(".".join(str(c) for c in children), Span.from_meta(meta))


# ---------------------------------------------------------------- syntax errors

_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "TRUE": "`true`",
    "FALSE": "`false`",
    "STAR": "`*`",
    "INDEX": "a layer index",
    "_NL": "the end of the line",
    "$END": "the end of the file",
}


def _describe(terminal: str) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    for term in _parser().terminals:
        if term.name == terminal and term.pattern.type == "str":
            return f"`{term.pattern.value}`"
    return terminal.lower()


def _expected_list(expected) -> str:
    words = sorted({_describe(t) for t in expected})
    if len(words) > 6:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _token_text(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type == "$END":
        return "end of file"
    return f"`{token}`"


def _syntax_diagnostic(exc: UnexpectedInput, text: str) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        span = Span(exc.line, exc.column, exc.line, exc.column + 1)
        return error("E101", f"unexpected character `{char}`", span, "not part of the language",
                     help="names are letters, digits and `_`; strings use double quotes; comments start with `#`")
    if isinstance(exc, UnexpectedEOF):
        lines = text.splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        expected = _expected_list(exc.expected)
        return error("E102", "unexpected end of file", span,
                     f"expected {expected}" if expected else "the file ends too early")
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    at_end = token.type == "$END"
    code = "E102" if at_end else "E100"  # LALR reports the end of the file as a token, not as UnexpectedEOF
    if at_end:
        lines = text.splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
    elif token.type == "_NL":
        span = Span(token.line, token.column, token.line, token.column + 1)
    else:
        span = Span.from_token(token)
    tokens = _tokens(text)
    unclosed = _unclosed_bracket(tokens, token)
    if unclosed is not None:
        close = _CLOSING[unclosed.type]
        where = "the file ends" if at_end else f"line {token.line} is reached"
        return error(code, f"unclosed `{unclosed}`", Span.from_token(unclosed), f"this `{unclosed}` is never closed",
                     help=f"{where} while still inside it: add `{close}` where it should end")
    named = _named_slip(tokens, token)
    if named is not None:
        message, where, label, help_text = named
        return error(code, message, where, label, help=help_text)
    expected = set(exc.expected)
    if _open_brackets(tokens, token):
        expected.discard("_NL")  # inside brackets a line end is never what is missing
    expected = _expected_list(expected)
    help_text = _hint(exc)
    return error(code, f"unexpected {_token_text(token)}", span,
                 f"expected {expected}" if expected else "", help=help_text)


_CLOSING = {"LPAR": ")", "LSQB": "]", "LBRACE": "}"}
_MATCH = {"RPAR": "LPAR", "RSQB": "LSQB", "RBRACE": "LBRACE"}
_KEYWORDS = {"GRAPH": "graph", "DATA": "data", "TRAIN": "train", "NODE": "node", "EDGES": "edges"}


def _tokens(text: str) -> list[Token]:
    """The file's tokens as far as the lexer gets (a stray character ends the list early)."""
    out: list[Token] = []
    try:
        for tok in _parser().lex(text, dont_ignore=False):
            out.append(tok)
    except (UnexpectedInput, _TooDeep, _TooLong):
        pass
    return out


def _before(tok: Token, error_token: Token) -> bool:
    if error_token.type == "$END" or error_token.line is None:
        return True
    return (tok.line, tok.column) < (error_token.line, error_token.column)


def _open_brackets(tokens: list[Token], error_token: Token) -> list[Token]:
    """The brackets still open just before `error_token`, outermost first."""
    stack: list[Token] = []
    for tok in tokens:
        if not _before(tok, error_token):
            break
        if tok.type in _OPEN:
            stack.append(tok)
        elif tok.type in _CLOSE and stack:
            stack.pop()
    return stack


def _unclosed_bracket(tokens: list[Token], error_token: Token) -> Token | None:
    """The bracket left open where parsing failed, when that, not the token, is the mistake.

    It is: at the end of the file; at a closing bracket of another kind; or, for a bracket
    opened on an earlier line, at a line that starts a new declaration (a keyword, or an edge).
    """
    stack = _open_brackets(tokens, error_token)
    if not stack:
        return None
    top = stack[-1]
    if error_token.type == "$END":
        return top
    if error_token.type in _MATCH:
        return top if _MATCH[error_token.type] != top.type else None
    if top.line >= error_token.line:
        return None
    line = [t for t in tokens if t.line == error_token.line]
    starts_declaration = bool(line) and line[0].type in _KEYWORDS
    is_edge = any(t.value == "->" for t in line)
    return top if (starts_declaration or is_edge) else None


def _named_slip(tokens: list[Token], error_token: Token) -> tuple[str, Span, str, str] | None:
    """(message, span, label, help) for a declaration missing its `->` or `:`, a misspelt
    keyword, or a setting outside its block."""
    if error_token.type in ("_NL", "$END"):
        return None
    prior = [t for t in tokens if t.line == error_token.line and _before(t, error_token)]
    if error_token.type == "STAR" and not (prior and prior[0].type == "EDGES"):
        return ("`*` (every node) is only an end of a bulk edge", Span.from_token(error_token),
                "`*` needs `edges` at the start of the line",
                f"write `edges {_line_text(tokens, error_token.line)}`; an edge without `edges` joins two named "
                "nodes")
    if not prior or any(t.type in _OPEN for t in prior):
        return None
    first, values = prior[0], [t.value for t in prior]
    here = Span.from_token(error_token)
    if first.type == "NAME" and len(prior) == 1:
        keyword = suggest(str(first), _KEYWORDS.values())
        if keyword is not None and keyword != str(first):
            return (f"unknown declaration `{first}`", Span.from_token(first), "not a keyword",
                    f"did you mean `{keyword}`? (an edge is written `source -> target : gate`)")
        if error_token.type == "EQUAL":
            return (f"the setting `{first}` is outside a block", Span.from_token(first), "",
                    "settings go inside `data DATASET { ... }` or `train { ... }`")
    if first.type in ("NAME", "EDGES"):
        if "->" not in values:
            return ("missing `->` between source and target", here, "expected `->` before this",
                    "an edge is written `source -> target : gate`")
        if ":" not in values:
            return ("missing `:` before the gate", here, "expected `:` before this",
                    "an edge is written `source -> target : gate`, for example `label -> a : through`")
    if first.type == "NODE" and ":" not in values:
        return ("missing `:` between the node's name and its model", here, "expected `:` before this",
                "a node is written `node NAME : MODEL`, for example `node a : resnet32 [target]`")
    return None


def _line_text(tokens: list[Token], line: int) -> str:
    """The statement on `line` as written (its tokens at their columns, no comment)."""
    out = ""
    for tok in tokens:
        if tok.line == line and tok.type not in ("_NL", "COMMENT"):
            out += " " * max(tok.column - 1 - len(out), 0) + str(tok)
    return out.strip()


def _hint(exc: UnexpectedToken) -> str:
    """A named cause for the commonest slips, in the words of the language."""
    expected = set(exc.expected)
    names = {t.name: t.pattern.value for t in _parser().terminals if t.pattern.type == "str"}
    arrow = next((k for k, v in names.items() if v == "->"), None)
    colon = next((k for k, v in names.items() if v == ":"), None)
    if arrow in expected and exc.token.type == "NAME":
        return "an edge is written `source -> target : gate`"
    if colon in expected:
        return "a gate follows a `:`: `source -> target : through`; a node's model too: `node a : resnet32`"
    return ""


def parse_module(text: str) -> tuple[ast.Module | None, list[Diagnostic]]:
    """Parse text to a Module, or return a syntax diagnostic (never raise for bad input)."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        return None, [_syntax_diagnostic(exc, text)]
    except _TooDeep as exc:
        return None, [error("E103", f"brackets nested more than {MAX_NESTING} deep", Span.from_token(exc.token),
                            f"level {MAX_NESTING + 1} opens here",
                            help="no setting needs values nested this deep: a list holds numbers, "
                                 "like `milestones = [60, 120]`")]
    except _TooLong as exc:
        return None, [error("E404", f"a number {len(exc.token):,} characters long", Span.from_token(exc.token),
                            "beyond every range", help="every number of the language has a range "
                                                       "(docs/language.md); whole numbers end at 19 digits")]
    items = _ToAst().transform(tree)
    return ast.Module(items, tuple(_scan_comments(text))), []


def _scan_comments(text: str) -> list[ast.Comment]:
    """Every `#` comment with its span, found by the same lexer rules (strings may hold `#`)."""
    found = []
    for token in _parser().lex(text, dont_ignore=True):
        if token.type == "COMMENT":
            found.append(ast.Comment(str(token), Span.from_token(token)))
    return found
