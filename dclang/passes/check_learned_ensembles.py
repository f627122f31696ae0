"""A learned ensemble is trained by `label`, and only a learned ensemble is.

`node e : ensemble(a, b) [combine=learned]` learns one weight per member
(`dclang.learned_ensembles`) from an edge `label -> e`, its loss cross-entropy (eq. 1): the
members' outputs are detached in it, so only the label can say how to weigh them.

- E370: an edge from `label` into an ensemble that cannot be learned (every `combine` it may
  have is a mean): a mean has no weights, so the edge would train nothing.
- E371: a learned ensemble with no edge from `label`: its weights would never move, and it
  would be `mean_logits` under another name. An error, not a warning: the one way to keep
  them at their start on purpose says so, `label -> e : cutoff`.
- E372: an edge from a node into a learned ensemble: its members' outputs are detached, so
  such an edge would only re-weigh the members towards that node's opinion; the label is the
  ensemble's one teacher.

Edges from a node into a mean ensemble stay `check_structure`'s E313. In a template,
`combine=choice(mean_logits, learned)` may carry a `label -> e` edge: a trial that picks a
mean leaves the edge out (`dclang.search.space`).
"""

from __future__ import annotations

from dclang.diagnostics import Diagnostic, error
from dclang.ensembles import LEARNED
from dclang.ir import LABEL, expand_edges
from dclang.syntax import ast


def may_learn(decl: ast.NodeDecl) -> bool:
    """Whether an ensemble's `combine` is `learned`, or a choice that offers it."""
    combine = decl.attribute("combine")
    if not decl.is_ensemble or combine is None or combine.value is None:
        return False
    values = combine.value.options if isinstance(combine.value, ast.Choice) else (combine.value,)
    return any(isinstance(v, ast.Ident) and v.name == LEARNED for v in values)


def check_learned_ensembles(module: ast.Module, graph) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    nodes: dict[str, ast.NodeDecl] = {}
    for decl in module.of(ast.NodeDecl):
        nodes.setdefault(decl.name.text, decl)
    taught: set[str] = set()
    for edge in expand_edges(module):
        s, t = edge.source.text, edge.target.text
        decl = nodes.get(t)
        if decl is None or not decl.is_ensemble:
            continue
        if s == LABEL and may_learn(decl):
            taught.add(t)
        elif s == LABEL:
            out.append(error("E370", f"an edge from `label` into the ensemble `{t}`, which is not learned",
                             edge.target.span, "a mean of its members has no weights to train",
                             help=f"write `[combine=learned]` on `{t}` (line {decl.span.line}) to learn how to "
                                  "weigh its members from the labels, or drop this edge"))
        elif may_learn(decl):
            out.append(error("E372", f"an edge from `{s}` into the learned ensemble `{t}`", edge.target.span,
                             "only `label` trains a learned ensemble",
                             help=f"its members' outputs are detached in it, so the labels alone weigh them: "
                                  f"`label -> {t} : through`; to teach a member, draw the edge to that member"))
    for name, decl in nodes.items():
        if may_learn(decl) and name not in taught:
            combine = decl.attribute("combine")
            out.append(error("E371", f"the learned ensemble `{name}` has no edge from `label`", combine.value.span,
                             "its weights would never move",
                             help=f"add `label -> {name} : through` to learn them (`cutoff` keeps them at the "
                                  "plain mean on purpose), or write `combine=mean_logits`"))
    return out
