"""Every number of the language has a range, and a value outside it is a located error.

The settings are enumerated from the tables the checker reads (`registry` and the loss
catalogue), so a number added to the language without a range fails here. A value out of
range, in the file or given with `--set`, must end in `file:line:col` with the range in words
and never start a run (an `epochs` of 10^12 would pre-train a teacher for ever).
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dclang import cli_options, loss_catalogue, ranges, registry
from dclang.api import check
from dclang.cli import main
from dclang.diagnostics import render_all

LAYER_EDGE = "b.layer3 -> a.layer3 : through {loss}"
LOGIT_EDGE = "b -> a : through {loss}"


def _numeric_sites() -> list[tuple[str, str, str, object]]:
    """(where, key, type, range) of every number a file can hold: `data.pad`,
    `train.optimizer.sgd.lr`, `loss.dkd.beta`, ..."""
    sites = [(f"data.{k}", k, o.type, o.range) for k, o in registry.DATA_SETTINGS.items() if o.type in
             ("int", "float", "number")]
    sites += [(f"train.{k}", k, o.type, o.range) for k, o in registry.TRAIN_SETTINGS.items() if o.type in
              ("int", "float", "number")]
    for block, table in (("optimizer", registry.OPTIMIZERS), ("schedule", registry.SCHEDULES)):
        sites += [(f"train.{block}.{name}.{k}", k, o.type, o.range) for name, options in table.items()
                  for k, o in options.items() if o.type in ("int", "float", "number", "int_list")]
    sites += [(f"loss.{name}.{k}", k, a.kind, a.range) for name, info in loss_catalogue.LOSSES.items()
              for k, a in info.args.items()]
    return sites


SITES = _numeric_sites()


def test_every_number_of_the_language_has_a_range():
    assert len(SITES) > 20
    assert [where for where, _k, _t, bounds in SITES if bounds is None] == []


def test_ranges_shared_with_the_command_line():
    """`epochs = N` in a file and `--epochs N` allow the same numbers."""
    for option, setting in ((cli_options.EPOCHS, "epochs"), (cli_options.BATCH, "batch"), (cli_options.SEED, "seed")):
        bounds = registry.TRAIN_SETTINGS[setting].range
        assert (bounds.low, bounds.high) == (option.min, option.max)
        assert option.min in bounds and option.max in bounds
        assert option.min - 1 not in bounds and option.max + 1 not in bounds


def _outside(bounds: ranges.Range, whole: bool) -> st.SearchStrategy:
    """Numbers just past either end, far past it, or on an open end."""
    low, high = bounds.low, bounds.high
    if whole:
        below = st.integers(max_value=int(low) - (0 if bounds.open_low else 1), min_value=-(2 ** 63 - 1))
        above = st.integers(min_value=int(high) + (0 if bounds.open_high else 1), max_value=2 ** 63 - 1)
    else:
        below = st.floats(max_value=low, exclude_max=not bounds.open_low, min_value=-1e300)
        above = st.floats(min_value=high, exclude_min=not bounds.open_high, max_value=1e300)
    return st.one_of(below, above)


@st.composite
def _bad_value(draw) -> tuple[str, str, str, str]:
    """(where, key, file text, the value's text) with one number out of its range."""
    where, key, kind, bounds = draw(st.sampled_from(SITES))
    if isinstance(bounds, ranges.CountOrFraction):
        value = draw(st.one_of(_outside(bounds.count, True), _outside(bounds.fraction, False)))
    else:
        value = draw(_outside(bounds, kind in ("int", "int_list")))
    text = repr(value)
    written = f"[{text}]" if kind == "int_list" else text
    data, train, edge = "", "", LOGIT_EDGE.format(loss="")
    parts = where.split(".")
    if parts[0] == "data":
        data = f"{key} = {written}"
    elif parts[0] == "train" and len(parts) == 2:
        train = f"{key} = {written}"
    elif parts[0] == "train":
        train = f"{parts[1]} = {parts[2]}({key}={written})"
    else:
        loss = f"{parts[1]}({key}={written})"
        edge = (LAYER_EDGE if loss_catalogue.LOSSES[parts[1]].on_layers else LOGIT_EDGE).format(loss=loss)
    source = (f"graph g\ndata digits {{ {data} }}\ntrain {{ {train} }}\nnode a : resnet20 [target]\n"
              f"node b : resnet20\nlabel -> a : through\nlabel -> b : through\n{edge}\n")
    return where, key, source, text


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_bad_value())
def test_any_number_out_of_range_is_a_located_error(case):
    where, key, source, text = case
    checked = check(source, "g.kt")
    line = next(n for n, row in enumerate(source.splitlines(), start=1) if text in row and key in row)
    column = source.splitlines()[line - 1].index(text, source.splitlines()[line - 1].index(key)) + 1
    at = [d for d in checked.errors if d.span is not None and (d.span.line, d.span.column) == (line, column)]
    assert at, f"{where} = {text}: no error at {line}:{column}\n{render_all(checked.diagnostics, source, 'g.kt')}"
    assert at[0].code in ("E401", "E402", "E404"), at[0].message
    assert "must be" in at[0].message and "but got" in at[0].message
    assert f"g.kt:{line}:{column}" in render_all(at, source, "g.kt")


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.function_scoped_fixture])
@given(setting=st.sampled_from([("train.epochs", ranges.EPOCHS), ("train.batch", ranges.BATCH),
                                ("train.seed", ranges.SEED), ("data.split_seed", ranges.SEED),
                                ("data.pad", ranges.PAD), ("train.optimizer.lr", ranges.LR)]),
       data=st.data())
def test_set_out_of_range_never_starts_a_run(setting, data, tmp_path_factory):
    """`dclang run --set train.epochs=10**12` ends at the check: exit 1, a located error, no run folder."""
    key, bounds = setting
    value = data.draw(_outside(bounds, key != "train.optimizer.lr"))
    folder = tmp_path_factory.mktemp("run")
    kt = folder / "g.kt"
    kt.write_text("graph g\ndata digits { val_split = 300 }\ntrain { optimizer = sgd(lr=0.1) }\n"
                  "node a : cnn_tiny [target]\nlabel -> a : through\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(kt), "--set", f"{key}={value!r}", "-o", str(folder / "out")])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"{kt}:" in result.stderr and "out of range" in result.stderr and "must be" in result.stderr
    assert not (folder / "out").exists()


def test_the_docs_state_each_setting_range():
    docs = (Path(__file__).parent.parent / "docs" / "language.md").read_text(encoding="utf-8")
    for table in (registry.DATA_SETTINGS, registry.TRAIN_SETTINGS):
        for key, option in table.items():
            if option.range is None:
                continue
            row = next(r for r in docs.splitlines() if r.startswith(f"| `{key}` |"))
            bounds = option.range
            parts = (bounds.count, bounds.fraction) if isinstance(bounds, ranges.CountOrFraction) else (bounds,)
            assert all(part.words in row for part in parts), (key, row)


def test_each_option_of_a_choice_is_held_to_the_range():
    """A search template cannot hide an out-of-range value behind a `choice(...)`."""
    text = ("graph g\ndata digits { }\ntrain { epochs = choice(10, 1000000000000) }\nnode a : cnn_tiny [target]\n"
            "node b : cnn_tiny\nlabel -> a : through\nlabel -> b : through\nb -> a : through kl(T=choice(2, 500))\n")
    checked = check(text, "t.kt")
    assert [(d.code, d.span.line, d.span.column) for d in checked.errors] == [("E404", 3, 29), ("E401", 8, 33)]
    assert checked.errors[0].message == "`epochs` must be from 1 to 100000, but got 1000000000000"
    assert checked.errors[1].message == "`T` must be in (0, 100], but got 500"
