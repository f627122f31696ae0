"""Every number on every command line is checked before any work starts: a value out of its
range, or no whole number at all, ends with exit status 2 and a message naming the option
and its range, never a traceback or a started run."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dclang.cli import main
from dclang.cli_options import DEVICE, SEED, SEEDS, Device, SeedList, Whole

#: what each command needs besides the option under test (FILE is parsed, never read, when an option fails)
REQUIRED = {"run": ["examples/quickstart.kt"], "bench": ["examples/quickstart.kt"]}


def numeric_options() -> list[tuple[str, click.Option]]:
    """(command, option) for every option of every command whose value is or holds a number."""
    return [(name, p) for name, command in sorted(main.commands.items()) for p in command.params
            if isinstance(p, click.Option) and isinstance(p.type, (Whole, SeedList, Device))]


OPTIONS = numeric_options()


def test_no_number_escapes_the_shared_types():
    """An option typed with click's own int or float (or a range of them) would skip the checks."""
    loose = [f"dclang {name} {p.opts[0]}" for name, command in main.commands.items() for p in command.params
             if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
             and not isinstance(p.type, Whole)]
    assert loose == []
    names = {(name, p.opts[-1]) for name, p in OPTIONS}
    assert {("run", "--epochs"), ("run", "--seed"), ("run", "--seeds"), ("run", "--device"), ("search", "--trials"),
            ("search", "--workers"), ("search", "--pack"), ("search", "--eta"), ("search", "--min-resource"),
            ("bench", "--steps"), ("bench", "--batch"), ("bench", "--workers"), ("bench", "--repeat")} <= names


NOT_NUMBERS = ("nan", "NaN", "inf", "-inf", "1e3", "2.5", "0x10", "ten")


def _bad_value(option: click.Option):
    """A strategy of text that option must refuse."""
    kind = option.type if isinstance(option.type, Whole) else DEVICE.index if isinstance(option.type, Device) else SEED
    outside = st.one_of(st.integers(max_value=kind.min - 1), st.integers(min_value=kind.max + 1)).map(str)
    if isinstance(option.type, Device):  # cuda:N with N out of range or not a number, or no device at all
        return st.one_of(outside.map(lambda n: f"cuda:{n}"), st.sampled_from(NOT_NUMBERS).map(lambda s: f"cuda:{s}"),
                         st.sampled_from(("tpu", "gpu", "cuda:", "cpu:0", "", "CUDA")))
    if isinstance(option.type, Whole):
        return st.one_of(outside, st.sampled_from((*NOT_NUMBERS, "", " ", "1,5")))
    # --seeds: one bad seed among good ones, a repeated seed, or none at all
    good = st.integers(kind.min, kind.max).map(str)
    mixed = st.tuples(st.lists(good, max_size=3), st.one_of(outside, st.sampled_from(NOT_NUMBERS)))
    return st.one_of(mixed.map(lambda t: ",".join([*t[0], t[1]])), good.map(lambda s: f"{s},{s}"),
                     st.sampled_from(("", ",", " , ")))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_number_out_of_range_is_a_usage_error_naming_the_option(data):
    command, option = data.draw(st.sampled_from(OPTIONS), label="option")
    value = data.draw(_bad_value(option), label="value")
    result = CliRunner().invoke(main, [command, *REQUIRED.get(command, []), f"{option.opts[-1]}={value}"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert f"Invalid value for '{option.opts[-1]}'" in result.output
    kind = option.type if isinstance(option.type, Whole) else DEVICE.index if isinstance(option.type, Device) else SEED
    said = (f"from {kind.min} to {kind.max}", "given twice", "names no seed")
    assert any(words in result.output for words in said), result.output


@given(st.sampled_from(["auto", "cpu", "cuda"]) | st.integers(0, DEVICE.index.max).map(lambda n: f"cuda:{n}"))
def test_every_device_is_taken_as_it_is(device):
    assert DEVICE.convert(device, None, None) == device


@given(st.data())
def test_every_number_in_range_is_taken_as_it_is(data):
    command, option = data.draw(st.sampled_from([o for o in OPTIONS if isinstance(o[1].type, Whole)]))
    kind = option.type
    number = data.draw(st.integers(kind.min, kind.max))
    assert kind.convert(f" {number} ", option, None) == number


@given(st.lists(st.integers(SEED.min, SEED.max), min_size=1, max_size=8, unique=True))
def test_distinct_seeds_are_kept_in_order(seeds):
    assert SEEDS.convert(" , ".join(map(str, seeds)) + ",", None, None) == ",".join(map(str, seeds))


@pytest.mark.parametrize("args, option, words", [
    (["run", "examples/quickstart.kt", "--epochs", "0"], "--epochs", "0 is out of range"),
    (["run", "examples/quickstart.kt", "--seeds", "0,1,0"], "--seeds", "seed 0 is given twice"),
    (["search", "--template", "examples/quickstart_search.kt", "--trials", "nan"], "--trials", "'nan' is not"),
    (["bench", "examples/quickstart.kt", "--batch", "-64"], "--batch", "-64 is out of range"),
    (["search", "--template", "examples/quickstart_search.kt", "--trials", "1", "--device", "cuda:x"], "--device",
     "'cuda:x' is not a device: give auto, cpu, cuda or cuda:N with N from 0 to 255"),
])
def test_messages_read_well(args, option, words):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.output and words in result.output, result.output
