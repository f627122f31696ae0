"""The abstract syntax tree of a `.kt` file: frozen dataclasses, each with its source span.

The AST says what was written, nothing more: no name is resolved and no rule is checked
here (that is the job of `dclang.ir` and `dclang.passes`). It is also what the formatter
prints and what the search samples into, so it keeps every value the way it was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from dclang.diagnostics import Span


@dataclass(frozen=True)
class Name:
    """An identifier as written, with where it was written."""

    text: str
    span: Span = field(compare=False)


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Number:
    value: int | float
    text: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class String:
    value: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Ident:
    """A bare word used as a value (`augment = pad_crop_flip`)."""

    name: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Argument:
    name: Name
    value: "Value"
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Call:
    """`sgd(lr=0.1, momentum=0.9)`, `step(milestones=[60, 120])`, `kl(T=2)`."""

    name: Name
    args: tuple[Argument, ...]
    span: Span = field(compare=False)

    def arg(self, key: str) -> "Argument | None":
        return next((a for a in self.args if a.name.text == key), None)


@dataclass(frozen=True)
class Choice:
    """`choice(a, b, c)`: a value left open for search."""

    options: tuple["Value", ...]
    span: Span = field(compare=False)


Value = Union[Number, String, Bool, Ident, ListValue, Call, Choice]


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Setting:
    key: Name
    value: Value
    span: Span = field(compare=False)


@dataclass(frozen=True)
class GraphDecl:
    name: Name
    span: Span = field(compare=False)


@dataclass(frozen=True)
class DataBlock:
    dataset: Name
    settings: tuple[Setting, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class TrainBlock:
    settings: tuple[Setting, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Ensemble:
    """`ensemble(a, b)`: a node whose output is the mean of its members' outputs; it has no
    weights. As an option of a node's `choice(...)` it is one of the values search picks."""

    members: tuple[Name, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Derived:
    """A network made from another node's: `ema(s, decay=0.999)`, the exponential moving
    average of `s`'s weights (a mean teacher), or `branch(b1, from=layer3)`, a network sharing
    `b1`'s modules before `layer3` (its trunk) with a head of its own. `kind` is `ema` or
    `branch`, `source` the node it is made from, `args` the rest as written."""

    kind: str
    source: Name
    args: tuple[Argument, ...]
    span: Span = field(compare=False)

    def arg(self, key: str) -> "Argument | None":
        return next((a for a in self.args if a.name.text == key), None)


@dataclass(frozen=True)
class Attribute:
    """`target`, `frozen`, `init="teacher.pt"` inside a node's `[...]`."""

    name: Name
    value: Value | None
    span: Span = field(compare=False)


#: a model by name (`resnet32`, `torchvision.resnet18`: the Name's text is the dotted path),
#: with the constructor's arguments (a Call: `torchvision.resnet18(weights="DEFAULT")`), a
#: choice of names, an ensemble, or a network made from another node's (`ema`, `branch`)
ModelExpr = Union[Name, Call, Choice, Ensemble, Derived]
GateExpr = Union[Name, Choice]
#: a layer endpoint: one module path (`layer3`, `layer3.0.conv2`) or a `choice(...)` of them
LayerExpr = Union[Name, Choice]
#: an edge's loss: `kl(T=2)`, or a `choice(...)` of such calls for search
LossExpr = Union[Call, Choice]


@dataclass(frozen=True)
class NodeDecl:
    name: Name
    model: ModelExpr
    attributes: tuple[Attribute, ...]
    span: Span = field(compare=False)

    def attribute(self, key: str) -> Attribute | None:
        return next((a for a in self.attributes if a.name.text == key), None)

    @property
    def is_ensemble(self) -> bool:
        """An `ensemble(...)` node, or a node whose `choice(...)` offers ensembles (a template)."""
        if isinstance(self.model, Choice):
            return any(isinstance(o, Ensemble) for o in self.model.options)
        return isinstance(self.model, Ensemble)


@dataclass(frozen=True)
class EdgeDecl:
    """`source -> target : gate loss(...)`; for `edges`, either end may be `*`.

    `source_layer` / `target_layer` are set when an end names a layer of its node
    (`teacher.layer3 -> student.layer3 : through at(p=2)`); `source` and `target` stay the
    nodes' names, so everything that reasons about nodes reads an edge the same way.
    """

    source: Name
    target: Name
    gate: GateExpr
    loss: LossExpr | None
    span: Span = field(compare=False)
    bulk: bool = False
    source_layer: LayerExpr | None = None
    target_layer: LayerExpr | None = None

    @property
    def on_layers(self) -> bool:
        return self.source_layer is not None or self.target_layer is not None

    def loss_calls(self) -> list[Call]:
        """The loss as written, or each loss a `choice(...)` of losses offers."""
        if isinstance(self.loss, Choice):
            return [o for o in self.loss.options if isinstance(o, Call)]
        return [self.loss] if self.loss is not None else []


Item = Union[GraphDecl, DataBlock, TrainBlock, NodeDecl, EdgeDecl]


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Module:
    """A whole file: its items in source order and its comments (kept for the formatter)."""

    items: tuple[Item, ...]
    comments: tuple[Comment, ...] = ()

    def of(self, kind: type) -> list:
        return [item for item in self.items if isinstance(item, kind)]
