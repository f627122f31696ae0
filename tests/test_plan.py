"""`dclang search --plan`: the ASHA simulation, the dataset's shape, the printed plan."""

from __future__ import annotations

from click.testing import CliRunner

from dclang.api import check
from dclang.search.equivalence import count_distinct
from dclang.search.plan import dataset_shape, sample_mixes, simulate_asha
from dclang.search.study import StudyConfig

TEMPLATE = """\
graph planned
data digits { val_split = 300 }
train { epochs = 4  batch = 128 }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)

label -> n1 : choice(through, cutoff)
n2 -> n1 : choice(through, cutoff)
n3 -> n1 : through
label -> n2 : through
label -> n3 : through
"""


def config(pruner: str = "asha", epochs: int = 8) -> StudyConfig:
    return StudyConfig(template="", template_path="t.kt", sampler="random", seed=0, pruner=pruner, eta=2,
                       min_resource=1, epochs=epochs, trials=40)


def test_without_a_pruner_every_trial_trains_every_epoch():
    forecast = simulate_asha(config("none"), trials=40, in_flight=4, seeds=2)
    assert forecast.epochs == 40 * 8 and forecast.reached == [40.0]


def test_asha_stops_about_half_at_each_rung():
    forecast = simulate_asha(config(), trials=64, in_flight=1, seeds=3)
    assert forecast.rungs == [1, 2, 4]
    reached = forecast.reached
    assert reached[0] == 64  # every trial trains its first epoch
    assert all(a > b for a, b in zip(reached, reached[1:]))
    # each rung keeps at most the top half of what reached it, plus the early trials that
    # met few competitors (asynchronous: the very first one always goes on)
    for a, b in zip(reached, reached[1:]):
        assert b <= a / 2 + 8
    # the epochs trained are the reached counts summed over the epochs between rungs
    epochs = [1, 2, 4, 8]
    per_epoch = sum(reached[i] * (epochs[i] - (epochs[i - 1] if i else 0)) for i in range(4))
    assert forecast.epochs <= per_epoch  # a trial reaching a rung trained up to it, not always beyond
    assert 64 < forecast.epochs < 64 * 8 / 2


def test_the_shape_is_the_loaded_datasets():
    from dclang.data import load_dataset

    graph = check(TEMPLATE, "<t>").graph
    shape = dataset_shape(graph)
    loaded = load_dataset("digits", data_dir=None, val_split=300, split_seed=0)
    assert (shape.train, shape.val, shape.test) == (len(loaded.train), len(loaded.val), len(loaded.test))
    assert (shape.num_classes, shape.channels, shape.image_size) == (10, 1, 8)
    assert shape.steps_per_epoch == -(-len(loaded.train) // 128)


def npz_template(tmp_path, **arrays) -> str:
    import numpy as np

    np.savez(tmp_path / "mine.npz", **arrays)
    return TEMPLATE.replace("data digits { val_split = 300 }",
                            f'data npz {{ path = "{tmp_path / "mine.npz"}"  val_split = 0.25 }}')


def test_an_npz_datasets_shape_is_read_from_its_headers_as_loading_finds_it(tmp_path):
    import numpy as np

    from dclang.data import load_dataset

    rng = np.random.default_rng(0)
    text = npz_template(tmp_path, x_train=rng.integers(0, 256, (203, 12, 12, 3), dtype=np.uint8),
                        y_train=rng.integers(0, 7, 203), x_test=rng.integers(0, 256, (41, 12, 12, 3), dtype=np.uint8),
                        y_test=rng.integers(0, 7, 41))
    shape = dataset_shape(check(text, "<t>").graph)
    loaded = load_dataset("npz", data_dir=None, val_split=0.25, split_seed=0, path=str(tmp_path / "mine.npz"))
    assert (shape.train, shape.val, shape.test) == (len(loaded.train), len(loaded.val), len(loaded.test))
    assert (shape.num_classes, shape.channels, shape.image_size) == (loaded.num_classes, 3, 12)


def test_an_npz_that_cannot_train_is_refused_by_the_plan_as_by_loading(tmp_path):
    import numpy as np
    import pytest

    from dclang.diagnostics import UserError

    floats = npz_template(tmp_path, x_train=np.zeros((10, 8, 8), np.float32), y_train=np.zeros(10, np.int64),
                          x_test=np.zeros((2, 8, 8), np.float32), y_test=np.zeros(2, np.int64))
    with pytest.raises(UserError, match=r"x_train in .*mine\.npz has dtype float32; expected uint8"):
        dataset_shape(check(floats, "<t>").graph)
    lacking = npz_template(tmp_path, x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.zeros(10, np.int64))
    with pytest.raises(UserError, match=r"lacks the array\(s\) x_test, y_test"):
        dataset_shape(check(lacking, "<t>").graph)


def test_mixes_are_the_trained_graphs_models():
    counts, examples = sample_mixes(check(TEMPLATE, "<t>").graph, samples=200)
    # n3 -> n1 is `through`: every sample trains; n2 is dead when n2 -> n1 is cut
    assert set(counts) == {("mlp", "mlp"), ("cnn_tiny", "mlp"), ("mlp", "mlp", "mlp"), ("cnn_tiny", "mlp", "mlp"),
                           ("cnn_tiny", "cnn_tiny", "mlp")}
    assert sum(counts.values()) == 200
    for mix, graph in examples.items():
        assert len([n for n in graph if n != "label"]) == len(mix)


def test_the_plan_prints_what_it_found(tmp_path):
    from dclang.cli import main

    template = tmp_path / "planned.kt"
    template.write_text(TEMPLATE)
    done = CliRunner().invoke(main, ["search", "--template", str(template), "--trials", "10", "--workers", "2",
                                     "--pack", "2", "--device", "cpu", "--plan"])
    assert done.exit_code == 0, done.output
    counted = count_distinct(check(TEMPLATE, "<t>").graph)
    assert f"space: {counted.samples} samples" in done.output
    assert (f"{counted.equivalent} up to renaming" in done.output
            and f"{counted.equivalent_dead_dropped} both" in done.output)
    assert "rungs at epochs 1, 2" in done.output and "estimated wall time" in done.output
    assert "D = 2 workers, pack K = 2" in done.output
