"""The numbers dclang's commands take on their command lines, each with the range it allows.

They live in one place so that `--epochs` or `--seed` means the same in `dclang run`,
`dclang search` and `dclang bench`, and so that every one is checked before any work starts:
a value out of its range, or not a whole number at all (`nan`, `1e3`, `inf`), is a usage
error (exit status 2) that names the option and its range, never a run that starts and then
fails, hangs or fills a disk. The upper bounds are generous limits on what any run could use
(a seed is what NumPy's generator takes), not tuning advice. `--device` is here too: its
`cuda:N` holds a number, and a misspelt device would otherwise start a search whose workers
all fail on it.
"""

from __future__ import annotations

import click


class Whole(click.IntRange):
    """A whole number in [low, high]; anything else fails with the option's name and range.

    click's own IntRange says "'nan' is not a valid integer range" for a value that is not a
    number at all, without the range: here every refusal says what is allowed.
    """

    def __init__(self, low: int, high: int) -> None:
        super().__init__(min=low, max=high)

    def allowed(self) -> str:
        return f"a whole number from {self.min} to {self.max}"

    def convert(self, value, param, ctx):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(f"{value!r} is not {self.allowed()}", param, ctx)
        try:
            number = value if isinstance(value, int) else int(value.strip(), 10)
        except ValueError:
            self.fail(f"{value!r} is not {self.allowed()}", param, ctx)
        if not self.min <= number <= self.max:
            self.fail(f"{number} is out of range: give {self.allowed()}", param, ctx)
        return number


class SeedList(click.ParamType):
    """Comma-separated distinct seeds (`0,1,2`), each a valid `--seed`; the value is the
    same text, tidied, as each run goes into its own `seed<N>` folder (a repeated seed would
    put two runs into one folder)."""

    name = "seeds"

    def __init__(self, seed: Whole, most: int) -> None:
        self.seed, self.most = seed, most

    def convert(self, value, param, ctx):
        items = [s.strip() for s in str(value).split(",") if s.strip()]
        if not items:
            self.fail(f"{value!r} names no seed: give comma-separated seeds like 0,1,2", param, ctx)
        if len(items) > self.most:
            self.fail(f"{len(items)} seeds; give at most {self.most}", param, ctx)
        seeds = []
        for item in items:
            try:
                number = int(item, 10)
            except ValueError:
                self.fail(f"{item!r} is not a seed: each is {self.seed.allowed()}", param, ctx)
            if not self.seed.min <= number <= self.seed.max:
                self.fail(f"seed {number} is out of range: each is {self.seed.allowed()}", param, ctx)
            if number in seeds:
                self.fail(f"seed {number} is given twice: each seed's run has its own folder", param, ctx)
            seeds.append(number)
        return ",".join(map(str, seeds))


class Device(click.ParamType):
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked as text: whether the GPU exists is asked of
    torch when the command runs (importing torch here would slow every `--help`)."""

    name = "device"

    def __init__(self, most: int) -> None:
        self.index = Whole(0, most)

    def allowed(self) -> str:
        return f"auto, cpu, cuda or cuda:N with N from {self.index.min} to {self.index.max}"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        kind, colon, index = text.partition(":")
        if text in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit() and index.isascii()
                                               and int(index) <= self.index.max):
            return text
        self.fail(f"{value!r} is not a device: give {self.allowed()}", param, ctx)

    def get_metavar(self, param, ctx=None) -> str:
        return "[auto|cpu|cuda|cuda:N]"


#: epochs of a run, of a trial, or of ASHA's first rung (the paper trains 200)
EPOCHS = Whole(1, 100_000)
#: images per batch
BATCH = Whole(1, 65_536)
#: a seed: NumPy's legacy generator takes [0, 2**32); the train block's `seed` must be >= 0 too
SEED = Whole(0, 2**32 - 1)
SEEDS = SeedList(SEED, most=1_000)
#: processes on this machine: search workers, or a DataLoader's
WORKERS = Whole(0, 256)
#: the hidden number a search parent gives each of its workers: 0 .. workers - 1
SLOT = Whole(0, WORKERS.max - 1)
TRIALS = Whole(1, 1_000_000)
TOP_K = Whole(1, 10_000)
#: ASHA's reduction factor: the top 1/eta of each rung goes on
ETA = Whole(2, 100)
#: trials trained at once as one step by a packed search worker
PACK = Whole(1, 256)
#: timed or untimed steps of `dclang bench`
STEPS = Whole(1, 100_000)
#: how many times `dclang bench --epoch` runs each side
REPEAT = Whole(1, 1_000)
#: where to train: its N is a CUDA device's number
DEVICE = Device(most=255)

__all__ = ["BATCH", "DEVICE", "EPOCHS", "ETA", "PACK", "REPEAT", "SEED", "SEEDS", "SLOT", "STEPS", "TOP_K",
           "TRIALS", "WORKERS", "Device", "SeedList", "Whole"]
