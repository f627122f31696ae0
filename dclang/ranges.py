"""The range every number of the language must lie in, with the words that state it.

A value out of range is refused by `dclang check` with its location and the range
(`epochs` = 10^12 would otherwise start a run, or a teacher's pre-training, that never
ends). Where a command-line option sets the same thing (`--epochs`, `--seed`), its range is
the one of `dclang.cli_options`, so the file and the command line allow the same numbers.
The upper bounds are generous limits on what any run could use, not tuning advice.
"""

from __future__ import annotations

from dataclasses import dataclass

from dclang import cli_options


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high`; `open_low`/`open_high` leave out that end."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    @property
    def words(self) -> str:
        """`from 1 to 100000` when both ends are in, else interval notation: `in (0, 10]`."""
        if not (self.open_low or self.open_high):
            return f"from {_number(self.low)} to {_number(self.high)}"
        return (f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.open_high else ']'}")

    @property
    def rule(self) -> str:
        return f"must be {self.words}"


@dataclass(frozen=True)
class CountOrFraction:
    """`val_split`: a whole count in `count`, or a fraction (a number with a point) in `fraction`."""

    count: Range
    fraction: Range

    def __contains__(self, value: float) -> bool:
        return value in (self.count if isinstance(value, int) else self.fraction)

    @property
    def rule(self) -> str:
        return f"must be a count {self.count.words} or a fraction {self.fraction.words}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def whole(option: cli_options.Whole) -> Range:
    """The range of a command-line option, for the setting it overrides."""
    return Range(option.min, option.max)


EPOCHS = whole(cli_options.EPOCHS)
BATCH = whole(cli_options.BATCH)
SEED = whole(cli_options.SEED)
#: a learning rate (and cosine's floor `eta_min`): above 10 every network diverges
LR = Range(0, 10, open_low=True)
#: reflect padding: at most the side of the largest images a run could hold
PAD = Range(0, 1024)
#: images held out for validation: a count, or a fraction of the training set
VAL_SPLIT = CountOrFraction(Range(0, 100_000_000), Range(0, 1, open_high=True))
MOMENTUM = Range(0, 1, open_high=True)
#: a mean teacher's `ema(s, decay=...)`: 0 would copy the source, 1 never move
DECAY = Range(0, 1, open_low=True, open_high=True)
WEIGHT_DECAY = Range(0, 1)
GAMMA = Range(0, 1, open_low=True)
#: a schedule milestone is an epoch of the run
MILESTONE = Range(1, cli_options.EPOCHS.max)
#: a softmax temperature: the catalogue's losses use 1 to 4; beyond 100 every softmax is flat
TEMPERATURE = Range(0, 100, open_low=True)
#: a multiplier of a loss or of one of its terms (the paper's attention transfer is 500, SP 3000)
MULTIPLIER = Range(0, 100_000)
#: the size of an embedding a loss learns (crd's `feat_dim`; the paper's is 128)
FEATURES = Range(1, 65_536)
#: negatives drawn per sample (crd's `nce_k`; the paper's is 16384), below the training set's size
NEGATIVES = Range(1, 1_000_000)
#: attention transfer's power of the activations (the paper's is 2); large powers overflow
POWER = Range(0, 8, open_low=True)
