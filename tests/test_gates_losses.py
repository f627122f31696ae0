"""Gates (eq. 4-7) and losses (eq. 1-3) against independent hand computations.

Expected values come from explicit Python/numpy loops over the formulas, never from the
code under test. Everything runs in float64; tolerance: 1e-12 relative and absolute.
"""

import math

import numpy as np
import pytest
import torch

from dclang.gates import gate_weights
from dclang.ir import EdgeSpec
from dclang.losses import ce_per_sample, edge_loss, edge_losses, kl_per_sample, node_loss

TOL = dict(rtol=1e-12, atol=1e-12)

# 4 samples, 3 classes; source top-1 classes are 0, 1, 2, 0
SOURCE = [[2.0, 1.0, 0.5], [0.1, 3.0, -1.0], [-2.0, 0.0, 0.3], [1.5, 1.4, -0.2]]
TARGET = [[0.3, -0.1, 0.9], [1.0, 1.0, 1.0], [0.0, -3.0, 2.0], [-1.0, 0.5, 0.25]]
LABELS = [0, 2, 2, 1]  # source correct on samples 0 and 2


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def np_log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    return row - math.log(sum(math.exp(v) for v in row))


def gate(name, source=SOURCE, k=1, k_end=4):
    return gate_weights(name, source_logits=None if source is None else t64(source),
                        labels=torch.tensor(LABELS), k=k, k_end=k_end, batch=len(LABELS), dtype=torch.float64)


# ---------------------------------------------------------------- gates


def test_through_gate_is_ones():  # eq. 4
    assert gate("through").tolist() == [1.0, 1.0, 1.0, 1.0]


def test_cutoff_gate_is_zeros():  # eq. 5
    assert gate("cutoff").tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("k,expected", [(1, 0.1), (4, 0.4), (10, 1.0)])
def test_linear_gate_is_k_over_k_end(k, expected):  # eq. 6
    assert gate("linear", k=k, k_end=10).tolist() == [expected] * 4


@pytest.mark.parametrize("k", [0, 11])
def test_linear_gate_rejects_k_outside_training(k):
    with pytest.raises(ValueError, match="1 <= k <= k_end"):
        gate("linear", k=k, k_end=10)


def test_correct_gate_keeps_samples_the_source_gets_right():  # eq. 7
    expected = [1.0 if max(range(3), key=row.__getitem__) == y else 0.0 for row, y in zip(SOURCE, LABELS)]
    assert expected == [1.0, 0.0, 1.0, 0.0]
    assert gate("correct").tolist() == expected


def test_gates_default_to_torch_default_dtype():
    weights = gate_weights("linear", source_logits=None, labels=torch.tensor(LABELS), k=1, k_end=3, batch=4)
    assert weights.dtype == torch.get_default_dtype()


def test_correct_gate_from_label_passes_everything():
    assert gate("correct", source=None).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_unknown_gate_is_an_error():
    with pytest.raises(ValueError, match="unknown gate 'open'"):
        gate("open")


# ---------------------------------------------------------------- losses


def test_ce_is_minus_log_p_of_the_label():  # eq. 1
    expected = [-np_log_softmax(row)[y] for row, y in zip(TARGET, LABELS)]
    got = ce_per_sample(t64(TARGET), torch.tensor(LABELS))
    torch.testing.assert_close(got, t64(expected), **TOL)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kl_is_t_squared_times_the_explicit_sum(T):  # eq. 2
    expected = []
    for s, t in zip(SOURCE, TARGET):
        log_p_s = np_log_softmax([v / T for v in s])
        log_p_t = np_log_softmax([v / T for v in t])
        expected.append(T * T * sum(math.exp(ls) * (ls - lt) for ls, lt in zip(log_p_s, log_p_t)))
    got = kl_per_sample(t64(SOURCE), t64(TARGET), T)
    torch.testing.assert_close(got, t64(expected), **TOL)


def test_kl_of_a_distribution_with_itself_is_zero():
    torch.testing.assert_close(kl_per_sample(t64(SOURCE), t64(SOURCE), 3.0), torch.zeros(4, dtype=torch.float64),
                               **TOL)


def test_kl_is_finite_where_probabilities_underflow():
    source, target = t64([[1000.0, -1000.0, 0.0]]), t64([[-1000.0, 1000.0, 0.0]])
    got = kl_per_sample(source, target, 1.0)
    # p_s is one-hot on class 0 in float64, so KL = log p_s[0] - log p_t[0] = 0 - (-2000)
    torch.testing.assert_close(got, t64([2000.0]), **TOL)


def edge(gate_name, loss="kl", T=1.0, weight=1.0, source="s"):
    return EdgeSpec(source, "t", gate_name, loss, T, weight)


def test_edge_loss_is_the_batch_mean_of_weighted_gated_losses():  # eq. 2, batch mean
    T, weight = 2.0, 0.5
    per_sample = kl_per_sample(t64(SOURCE), t64(TARGET), T).tolist()
    mask = [1.0, 0.0, 1.0, 0.0]  # correct gate, from the hand computation above
    expected = sum(weight * m * a for m, a in zip(mask, per_sample)) / 4
    loss, weights = edge_loss(edge("correct", T=T, weight=weight), t64(SOURCE), t64(TARGET), torch.tensor(LABELS),
                              k=1, k_end=4)
    assert weights.tolist() == mask
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **TOL)


def test_edge_loss_from_label_is_cross_entropy():
    expected = sum(0.3 * 2 / 4 * -np_log_softmax(row)[y] for row, y in zip(TARGET, LABELS)) / 4
    loss, _ = edge_loss(edge("linear", loss="ce", weight=0.3, source="label"), None, t64(TARGET),
                        torch.tensor(LABELS), k=2, k_end=4)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **TOL)


def test_node_loss_is_the_sum_of_edge_losses():  # eq. 3
    torch.testing.assert_close(node_loss([t64(1.25), t64(0.5), t64(2.0)]), t64(3.75), **TOL)


@pytest.mark.parametrize("gate_name", ["through", "linear", "correct"])
def test_gradient_reaches_the_target_only(gate_name):
    source = t64(SOURCE).requires_grad_()
    target = t64(TARGET).requires_grad_()
    loss, _ = edge_loss(edge(gate_name, T=2.0), source, target, torch.tensor(LABELS), k=3, k_end=4)
    loss.backward()
    assert source.grad is None
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_edge_losses_of_a_group_equal_each_edge_by_hand():
    """Three kl edges into stacked targets at once (eq. 2 per edge, correct gate) against an
    explicit loop over edges and samples."""
    T, weights = 2.0, [0.5, 0.5, 0.5]
    rng = np.random.default_rng(0)
    sources, targets = rng.normal(size=(3, 4, 3)), rng.normal(size=(3, 4, 3))
    group = [EdgeSpec(f"s{i}", f"t{i}", "correct", "kl", T, w) for i, w in enumerate(weights)]
    losses, gates = edge_losses(group, t64(sources.tolist()), t64(targets.tolist()), torch.tensor(LABELS), k=1, k_end=4)
    for e in range(3):
        expected, mask = 0.0, []
        for n, y in enumerate(LABELS):
            log_p_s, log_p_t = np_log_softmax(sources[e, n] / T), np_log_softmax(targets[e, n] / T)
            kl = T * T * sum(math.exp(a) * (a - b) for a, b in zip(log_p_s, log_p_t))
            mask.append(float(np.argmax(sources[e, n]) == y))
            expected += weights[e] * mask[-1] * kl / len(LABELS)
        assert gates[e].tolist() == mask
        torch.testing.assert_close(losses[e], torch.tensor(expected, dtype=torch.float64), **TOL)


def test_edge_losses_of_label_edges_and_mixed_groups():
    targets = t64([TARGET, SOURCE])
    group = [EdgeSpec("label", t, "through", "ce", 1.0, 1.0) for t in ("a", "b")]
    losses, _ = edge_losses(group, None, targets, torch.tensor(LABELS), k=1, k_end=4)
    for e, rows in enumerate((TARGET, SOURCE)):
        expected = sum(-np_log_softmax(row)[y] for row, y in zip(rows, LABELS)) / 4
        torch.testing.assert_close(losses[e], torch.tensor(expected, dtype=torch.float64), **TOL)
    for other in (edge("linear"), edge("through", weight=0.5)):
        with pytest.raises(ValueError, match="must share source kind, loss and its arguments, gate and weight"):
            edge_losses([edge("through"), other], t64([SOURCE, SOURCE]), t64([TARGET, TARGET]),
                        torch.tensor(LABELS), k=1, k_end=4)
