"""The online-distillation constructs together: a mean teacher, a shared trunk with branches,
own views and a learned ensemble in one graph, with the paper's gates, edges between layers
and a mean ensemble.

The fused engine equals the reference engine in float64 on every weight, buffer and statistic
after several steps over an epoch's end (plain and with HFTA, which fuses the networks it can
and leaves the trunk family and the mean teachers alone); a branch reads its source's view, on which its trunk is
computed once; `view` on a branch is refused (E356).
"""

from __future__ import annotations

import pytest
import torch
from test_engines import (
    CLASSES,
    EPOCHS,
    STEPS,
    TIGHT,
    assert_models_close,
    assert_stats_close,
    graph_of,
    snapshot,
    train,
)

from dclang.api import check
from dclang.compile import StepOptions, compile_graph
from dclang.views import view_index, view_keys

# p1 (own view) with a branch b2 on its trunk (so on p1's view), p3 on its own view, q and r
# on the shared one; m1 the mean teacher of p1 (on its own view), m3 of p3; a learned
# ensemble of p1, b2 and p3 trained from the labels teaching all three; a mean ensemble of q
# and m1 teaching q and r; gates through, correct, linear; layer edges from a mean teacher,
# from a branch's head and into a trunk layer
FAMILY = """
graph family
data digits { }
train { epochs = 2  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4) }
node p1  : cnn_tiny [target, view=own]
node b2  : branch(p1, from="3")
node p3  : cnn_tiny [view=own]
node q   : cnn_tiny
node r   : cnn_tiny
node m1  : ema(p1, decay=0.9) [view=own]
node m3  : ema(p3, decay=0.5)
node ens : ensemble(p1, b2, p3) [combine=learned]
node avg : ensemble(q, m1) [combine=mean_probs]
label -> p1  : through
label -> b2  : through
label -> p3  : correct
label -> q   : through
label -> r   : linear
label -> ens : through
ens   -> p1  : through kl(T=3)
ens   -> b2  : correct kl(T=3)
ens   -> p3  : through kl(T=3)
m1    -> p3  : linear kl(T=2)
m3    -> p1  : correct
avg   -> q   : through kl(T=2)
avg   -> r   : through
q     -> r   : through
m1.conv2 -> q.conv2 : through at(p=2, weight=50)
b2.pool  -> r.pool  : correct at(p=1)
r.conv1  -> p1.conv1 : linear sp(weight=5)
"""


def family_batches(n=STEPS * EPOCHS, size=16):
    """Random batches of the views FAMILY reads: shared, p1's (and b2's), p3's, m1's."""
    gen = torch.Generator().manual_seed(11)
    return [(tuple(torch.randn(size, 1, 8, 8, generator=gen).to(torch.get_default_dtype()) for _ in range(4)),
             torch.randint(0, CLASSES, (size,), generator=gen)) for _ in range(n)]


def compiled(engine, options=None):
    return compile_graph(graph_of(FAMILY), num_classes=CLASSES, in_channels=1, image_size=8,
                         device=torch.device("cpu"), engine=engine, seed=0, steps_per_epoch=STEPS, epochs=EPOCHS,
                         options=options if engine == "fused" else None)


def test_a_branch_reads_its_source_view():
    graph = graph_of(FAMILY)
    assert view_keys(graph) == ("shared", "p1", "p3", "m1")
    index = view_index(graph)
    assert index["b2"] == index["p1"] == 1 and index["p3"] == 2 and index["m1"] == 3
    assert index["q"] == index["r"] == index["m3"] == 0  # m3 reads the shared view, not p3's


@pytest.mark.parametrize("hfta", [False, True], ids=["plain", "hfta"])
def test_fused_equals_reference_on_every_construct_together(float64, hfta):
    data = family_batches()
    reference = compiled("reference")
    fused = compiled("fused", StepOptions(channels_last=False, hfta=hfta))
    if hfta:  # p3, q and r fused (p3's view beside the shared one); the trunk family and the mean teachers not
        assert [sorted(n for _, n in g.slices) for g in fused.groups] == [["p3", "q", "r"]]
    assert_models_close(snapshot(reference), snapshot(fused), rtol=0, atol=0)
    ref_stats, fused_stats = train(reference, data), train(fused, data)
    assert_models_close(snapshot(reference), snapshot(fused), **TIGHT)
    ref_w = {n: w.state_dict()["w"] for n, w in reference.ensemble_weights.items()}
    fused_w = {n: w.state_dict()["w"] for n, w in fused.steps[0].ensemble_weights.items()}
    assert ref_w.keys() == fused_w.keys() == {"ens"}
    torch.testing.assert_close(fused_w["ens"], ref_w["ens"], **TIGHT)
    assert ref_w["ens"].abs().max() > 1e-4  # the learned weights moved
    assert_stats_close(ref_stats, fused_stats, **TIGHT)


def test_view_on_a_branch_is_refused():
    text = FAMILY.replace('node b2  : branch(p1, from="3")', 'node b2  : branch(p1, from="3") [view=own]')
    errors = check(text).errors
    assert [(d.code, d.span.line) for d in errors] == [("E356", 6)]
    assert "reads its source's view" in errors[0].message
