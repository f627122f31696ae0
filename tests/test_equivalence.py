"""Equivalent graphs get one key; a space's distinct graphs are counted right.

The counts are checked against a brute force that shares no code with
`dclang.search.equivalence`: every sample realised by search's own pipeline (`realize`: the
full check, dead nodes dropped) and grouped by NetworkX's isomorphism test with node and edge
matchers.
"""

from __future__ import annotations

import itertools

import networkx as nx
import pytest

from dclang.api import check, parse
from dclang.ir import LABEL
from dclang.search.equivalence import canonical_key, count_distinct, count_distinct_slowly, same_up_to_names, space_size
from dclang.search.space import realize, search_space

HEAD = """\
graph g
data digits { val_split = 300 }
train { epochs = 2 }
"""

GRAPH = HEAD + """\
node n1 : mlp [target]
node n2 : cnn_tiny
node n3 : mlp
label -> n1 : through
n2 -> n1 : linear
n3 -> n1 : through
n2 -> n3 : correct
label -> n2 : through
label -> n3 : cutoff
"""

#: GRAPH with n2 and n3 swapped (names only), declared in the other order
MIRROR = HEAD + """\
node n1 : mlp [target]
node n3 : cnn_tiny
node n2 : mlp
n3 -> n1 : linear
label -> n1 : through
n2 -> n1 : through
n3 -> n2 : correct
label -> n3 : through
label -> n2 : cutoff
"""


def graph_of(text: str) -> nx.DiGraph:
    checked = check(text, "<test>")
    assert checked.ok, checked.errors
    return checked.graph


def test_a_graph_and_its_mirror_have_one_key():
    a, b = graph_of(GRAPH), graph_of(MIRROR)
    assert canonical_key(a) == canonical_key(b)
    assert same_up_to_names(a, b) == {LABEL: LABEL, "n1": "n1", "n2": "n3", "n3": "n2"}


@pytest.mark.parametrize("change", [
    ("n2 -> n1 : linear", "n2 -> n1 : through"),  # a gate
    ("node n2 : cnn_tiny", "node n2 : mlp"),  # a model
    ("n2 -> n3 : correct", "n2 -> n3 : correct kl(T=2)"),  # a loss option
    ("node n3 : mlp", "node n3 : mlp [frozen]\n"),  # frozen-ness (its edges in become errors: drop them)
    ("train { epochs = 2 }", "train { epochs = 3 }"),  # a setting
    ("node n1 : mlp [target]\nnode n2 : cnn_tiny\nnode n3 : mlp",
     "node n1 : mlp\nnode n2 : cnn_tiny [target]\nnode n3 : mlp"),  # the target
])
def test_any_other_difference_changes_the_key(change):
    changed = GRAPH.replace(*change)
    if "[frozen]" in change[1]:
        changed = changed.replace("n2 -> n3 : correct\n", "").replace("label -> n3 : cutoff\n", "")
        base = GRAPH.replace("n2 -> n3 : correct\n", "").replace("label -> n3 : cutoff\n", "")
    else:
        base = GRAPH
    assert changed != base
    assert canonical_key(graph_of(changed)) != canonical_key(graph_of(base))


def test_a_cutoff_edge_is_no_edge():
    assert canonical_key(graph_of(GRAPH)) == canonical_key(graph_of(GRAPH.replace("label -> n3 : cutoff\n", "")))


def test_ensemble_members_are_renamed_with_their_nodes():
    ensemble = "node avg : ensemble({a}, {b})\n"
    base = HEAD + "node n1 : mlp [target]\nnode n2 : cnn_tiny\nnode n3 : mlp\n"
    edges = "label -> n1 : through\nlabel -> n2 : through\nlabel -> n3 : through\navg -> n1 : through\n"
    one = check(base + ensemble.format(a="n2", b="n3") + edges, "<test>").graph
    swapped_text = base.replace("n2 : cnn_tiny\nnode n3 : mlp", "n3 : cnn_tiny\nnode n2 : mlp")
    two = check(swapped_text + ensemble.format(a="n3", b="n2") + edges, "<test>").graph
    other = check(swapped_text + ensemble.format(a="n2", b="n3") + edges, "<test>").graph
    assert canonical_key(one) == canonical_key(two)
    assert canonical_key(one) != canonical_key(other)  # members in another order: another ensemble


#: two interchangeable peers, 5 searched gates: 128 samples, small enough for the brute force
TEMPLATE = HEAD + """\
node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)
label -> n1 : choice(through, cutoff)
n2 -> n1 : choice(through, cutoff)
n3 -> n1 : choice(through, linear)
n2 -> n3 : choice(through, cutoff)
n3 -> n2 : choice(through, cutoff)
label -> n2 : through
label -> n3 : through
"""


def _matchers():
    def node_match(a, b):
        sa, sb = a["spec"], b["spec"]
        fixed = lambda s: s.name if s.name == LABEL or s.target else None  # noqa: E731
        return (fixed(sa), sa.model, sa.frozen, sa.declared_frozen, sa.init) == \
            (fixed(sb), sb.model, sb.frozen, sb.declared_frozen, sb.init)

    def edge_match(a, b):
        ea, eb = a["spec"], b["spec"]
        return (ea.gate, ea.loss, ea.T, ea.weight) == (eb.gate, eb.loss, eb.T, eb.weight)

    return node_match, edge_match


def _live(graph: nx.DiGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    out.add_nodes_from(graph.nodes(data=True))
    out.add_edges_from((s, t, d) for s, t, d in graph.edges(data=True) if d["spec"].gate != "cutoff")
    return out


def _classes(graphs: list[nx.DiGraph]) -> int:
    node_match, edge_match = _matchers()
    representatives: list[nx.DiGraph] = []
    for g in graphs:
        if not any(nx.is_isomorphic(g, r, node_match=node_match, edge_match=edge_match) for r in representatives):
            representatives.append(g)
    return len(representatives)


def test_counts_agree_with_a_brute_force_over_realized_samples():
    module = parse(TEMPLATE)
    space = search_space(module)
    sampled, trained, trained_texts = [], [], set()
    for values in itertools.product(*(p.choices for p in space)):
        sample = realize(module, dict(zip((p.name for p in space), values)))
        if not sample.ok:
            continue
        sampled.append(_live(check(sample.text, "<t>").graph))
        trained.append(_live(sample.checked.graph))
        trained_texts.add(sample.trained_text)
    template = graph_of(TEMPLATE)
    counted = count_distinct(template)
    assert counted.samples == space_size(template) == 128
    assert counted.trainable == len(sampled)
    assert counted.dead_dropped == len(trained_texts)
    assert counted.equivalent == _classes(sampled)
    assert counted.equivalent_dead_dropped == _classes(trained)
    assert counted.equivalent_dead_dropped < counted.dead_dropped < counted.trainable
    assert counted.equivalent < counted.trainable
    assert count_distinct_slowly(template) == counted


def test_count_refuses_a_space_over_its_limit():
    with pytest.raises(ValueError, match="128 samples"):
        count_distinct(graph_of(TEMPLATE), limit=100)


#: four samples, three graphs: (mlp, cnn_tiny) and (cnn_tiny, mlp) are mirrors
MIRRORED = HEAD + """\
node n1 : mlp [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)
label -> n1 : through
n2 -> n1 : through
n3 -> n1 : through
label -> n2 : through
label -> n3 : through
"""


def test_a_search_trains_a_mirror_once_and_says_so(tmp_path, run_search, study_trials):
    import csv

    from optuna.trial import TrialState

    template, out = tmp_path / "mirrored.kt", tmp_path / "out"
    template.write_text(MIRRORED.replace("graph g", "graph mirrored"))
    # 30 draws of 4 samples: both mirrors are drawn but with probability 2 × 0.75^30 < 4e-4
    done = run_search("--template", template, "--trials", 30, "--workers", 1, "-o", out, "--trainer",
                      "fake_trainer:train")
    assert done.returncode == 0, done.stderr
    trials, _ = study_trials(out / "study.journal", "mirrored")
    trained = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               and "duplicate_of" not in t.user_attrs]
    assert len(trained) == 3  # three distinct graphs, each trained once (to completion or a rung)
    renamed = [t for t in trials if "renamed" in t.user_attrs]
    assert renamed
    by_number = {t.number: t for t in trials}
    rows = {int(r["trial"]): r for r in csv.DictReader((out / "leaderboard.csv").open())}
    for t in renamed:
        original = by_number[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["renamed"] == {"n2": "n3", "n3": "n2"}
        assert {t.params["n2.model"], t.params["n3.model"]} == {"mlp", "cnn_tiny"}
        assert (t.params["n2.model"], t.params["n3.model"]) == (original.params["n3.model"],
                                                              original.params["n2.model"])
        assert t.user_attrs["graph"] == original.user_attrs["graph"] and t.value == original.value
        assert rows[t.number]["same_as"] == str(original.number)
        assert "with n2 as n3, n3 as n2" in rows[t.number]["note"]


#: an ensemble whose members are interchangeable, or which is left out (`none`)
ENSEMBLE = HEAD + """\
node n1 : cnn_tiny [target]
node n2 : choice(mlp, cnn_tiny)
node n3 : choice(mlp, cnn_tiny)
node e : choice(none, ensemble(n2, n3), ensemble(n3, n2)) [combine=choice(mean_logits, mean_probs)]
label -> n1 : through
label -> n2 : through
label -> n3 : through
e -> n1 : choice(cutoff, through)
"""


def test_counts_follow_ensembles_and_their_absence():
    """Every sample realised by search's pipeline, its trained graph keyed by `canonical_key`:
    the count on the IR agrees. ensemble(n2, n3) with (mlp, cnn_tiny) is ensemble(n3, n2)
    with (cnn_tiny, mlp); `none` leaves e out (and n2, n3 dead)."""
    module = parse(ENSEMBLE)
    space = search_space(module)
    keys, texts, trainable = set(), set(), 0
    for values in itertools.product(*(p.choices for p in space)):
        sample = realize(module, dict(zip((p.name for p in space), values)))
        if sample.ok:
            trainable += 1
            keys.add(canonical_key(sample.checked.graph))
            texts.add(sample.trained_text)
    counted = count_distinct(graph_of(ENSEMBLE))
    assert (counted.trainable, counted.dead_dropped, counted.equivalent_dead_dropped) == \
        (trainable, len(texts), len(keys))
    assert len(keys) < len(texts)
