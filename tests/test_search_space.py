"""The search space of a template and the concrete graphs sampled from it (no Optuna, no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dclang.api import check, parse
from dclang.diagnostics import UserError
from dclang.search.space import graph_key, prepare_template, realize, sample, search_space
from dclang.syntax.format import format_module

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = """\
graph s3
data digits { val_split = 300 }
train { epochs = 4 }

node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)  # the third node

edges * -> * : choice(through, cutoff)
"""


def first_choices(space):
    return {p.name: p.choices[0] for p in space}


def test_every_choice_site_is_a_parameter_named_by_the_ir():
    template = parse(TEMPLATE)
    space = search_space(template)
    ir_names = [site.name for site in check(TEMPLATE).graph.graph["sites"]]
    assert [p.name for p in space] == ir_names
    assert ir_names[:5] == ["n2.model", "n3.model", "label->n1.gate", "label->n2.gate", "label->n3.gate"]
    assert len(space) == 2 + 9  # two models; 3 sources x 3 targets, no self-edges
    assert space[0].choices == ("mlp", "cnn_tiny")


def test_the_quickstart_template_has_the_papers_sites():
    text = (ROOT / "examples" / "quickstart_search.kt").read_text()
    names = [p.name for p in search_space(parse(text))]
    assert {"n2.model", "n3.model", "label->n1.gate", "n3->n2.gate"} <= set(names)


def test_a_sample_is_explicit_canonical_and_checks():
    template = parse(TEMPLATE)
    space = search_space(template)
    params = {**first_choices(space), "n3.model": "cnn_tiny", "n2->n1.gate": "cutoff"}
    text = format_module(sample(template, params, space))
    assert "choice(" not in text and "edges" not in text and "*" not in text
    assert format_module(parse(text)) == text  # canonical: `dclang fmt --check` accepts it
    checked = check(text)
    assert checked.ok
    assert checked.graph.graph["sites"] == ()
    assert checked.graph.nodes["n3"]["spec"].model == "cnn_tiny"
    assert checked.graph.edges["n2", "n1", "n2->n1"]["spec"].gate == "cutoff"
    assert len(checked.graph.edges) == 9
    assert "# the third node" in text  # the template's comments are kept


def test_loss_arguments_and_settings_are_sites_too():
    text = TEMPLATE.replace("train { epochs = 4 }",
                            "train { epochs = 4  optimizer = sgd(lr=choice(0.1, 0.05)) }")
    text = text.replace("edges * -> * : choice(through, cutoff)",
                        "label -> n1 : through\nn2 -> n1 : through kl(T=choice(1, 4))\nlabel -> n2 : through\n"
                        "label -> n3 : through")
    template = parse(text)
    space = {p.name: p for p in search_space(template)}
    assert space["train.optimizer.lr"].choices == (0.1, 0.05)
    assert space["n2->n1.T"].choices == (1, 4)
    params = {name: p.choices[1] for name, p in space.items()}
    out = format_module(sample(template, params))
    assert "kl(T=4)" in out and "lr=0.05" in out
    graph = check(out).graph
    assert graph.edges["n2", "n1", "n2->n1"]["spec"].T == 4.0
    assert graph.graph["train"].optimizer.args["lr"] == 0.05


def test_a_bulk_loss_stays_cross_entropy_on_label_edges():
    template = parse(TEMPLATE.replace("choice(through, cutoff)", "choice(through, cutoff) kl(T=choice(1, 4))"))
    space = {p.name: p for p in search_space(template)}
    assert "n2->n1.T" in space and "label->n1.T" not in space  # cross-entropy has no temperature
    params = {name: p.choices[-1] if name.endswith(".T") else p.choices[0] for name, p in space.items()}
    text = format_module(sample(template, params))
    assert check(text).ok
    assert "label -> n1 : through\n" in text and "n2    -> n1 : through kl(T=4)" in text


def test_a_choice_search_cannot_pick_is_refused():
    text = TEMPLATE.replace("train { epochs = 4 }", "train { epochs = 4  optimizer = choice(sgd, adam) }")
    with pytest.raises(UserError, match="cannot pick"):
        search_space(parse(text))


def test_unknown_values_and_missing_parameters_are_errors():
    template = parse(TEMPLATE)
    space = search_space(template)
    with pytest.raises(ValueError, match="no option 'resnet32'"):
        sample(template, {**first_choices(space), "n2.model": "resnet32"}, space)
    params = first_choices(space)
    del params["n3.model"]
    with pytest.raises(KeyError, match="n3.model"):
        sample(template, params, space)


def test_a_frozen_target_is_an_invalid_sample():
    template = parse(TEMPLATE)
    space = search_space(template)
    params = {**first_choices(space), "label->n1.gate": "cutoff", "n2->n1.gate": "cutoff", "n3->n1.gate": "cutoff"}
    trial = realize(template, params, space=space)
    assert not trial.ok
    assert "E304" in trial.problem and "`n1` is frozen" in trial.problem
    assert trial.checked is None


def test_dead_nodes_are_dropped_from_the_trained_graph_only():
    template = parse(TEMPLATE)
    space = search_space(template)
    # n3 teaches nobody: no live edge out of it, so it cannot change n1
    params = {**first_choices(space), "n3->n1.gate": "cutoff", "n3->n2.gate": "cutoff"}
    trial = realize(template, params, space=space)
    assert trial.ok and trial.dropped == ("n3",)
    assert "node n3" in trial.text  # the sampled graph keeps it ...
    assert "n3" not in trial.trained_text  # ... the trained one has neither it, its edges nor its comment
    assert "the third node" not in trial.trained_text
    assert set(trial.checked.graph.nodes) == {"label", "n1", "n2"}
    # the dead node's model does not change what is trained: same key, so trained once
    other = realize(template, {**params, "n3.model": "cnn_tiny"}, space=space)
    assert other.key == trial.key and other.text != trial.text


def test_the_key_is_the_trained_graph_without_comments():
    template = parse(TEMPLATE)
    space = search_space(template)
    a = realize(template, first_choices(space), space=space)
    b = realize(parse("# another comment\n" + TEMPLATE), first_choices(space), space=space)
    assert a.key == b.key == graph_key(parse(a.trained_text))
    c = realize(template, {**first_choices(space), "n2.model": "cnn_tiny"}, space=space)
    assert c.key != a.key


def test_prepare_template_writes_epochs_and_absolute_init_paths(tmp_path):
    text = TEMPLATE.replace("node n3 : choice(mlp, cnn_tiny)  # the third node",
                            'node n3 : mlp [frozen, init="teachers/n3.pt"]')
    prepared = format_module(prepare_template(parse(text), epochs=7, base=tmp_path))
    graph = check(prepared).graph
    assert graph.graph["train"].epochs == 7
    assert graph.nodes["n3"]["spec"].init == str(tmp_path / "teachers" / "n3.pt")
    no_train = "\n".join(line for line in TEMPLATE.splitlines() if not line.startswith("train"))
    assert check(format_module(prepare_template(parse(no_train), epochs=3, base=tmp_path))).graph.graph[
        "train"].epochs == 3


def test_every_sample_of_the_online_template_checks():
    """examples/search_online.kt: branch or network, shared or own view, mean or learned
    ensemble, a mean teacher or none; every combination (the temperatures held at their first
    option) is a graph that checks, with the label edge into the ensemble only where it is
    learned and the mean teacher's edges only where it exists."""
    import itertools

    template = parse((ROOT / "examples" / "search_online.kt").read_text())
    space = search_space(template)
    structural = [p for p in space if not p.name.endswith(".T")]
    assert [p.name for p in structural] == ["p1.view", "p2.model", "p3.model", "ens.combine", "m1.model"]
    fixed = first_choices(space)
    for picks in itertools.product(*(p.choices for p in structural)):
        params = {**fixed, **{p.name: pick for p, pick in zip(structural, picks)}}
        text = format_module(sample(template, params, space))
        checked = check(text)
        assert checked.ok, (params, checked.errors)
        g = checked.graph
        assert g.has_edge("label", "ens") == (params["ens.combine"] == "learned")
        assert ("m1" in g) == (params["m1.model"] != "none")
        assert g.nodes["p2"]["spec"].is_branch == params["p2.model"].startswith("branch")
