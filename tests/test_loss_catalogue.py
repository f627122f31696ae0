"""Every loss of the catalogue against an independent computation, values and gradients.

The references below are written in numpy with explicit sums, from the papers' formulas
(`dclang/loss_catalogue.py`), in float64; gradients are central finite differences of those
numpy functions (h = 1e-6), so neither side borrows from the other. Values agree to
rtol 1e-10, gradients to rtol 1e-6 / atol 1e-8 (the finite differences' own error).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dclang import loss_catalogue, registry
from dclang.feature_losses import at_per_sample, hint_per_sample, sp_per_sample
from dclang.losses import dkd_per_sample, kl_per_sample, lskd_per_sample
from dclang.models.connector import connector

VALUES = dict(rtol=1e-10, atol=1e-12)
GRADS = dict(rtol=1e-6, atol=1e-8)
B, C = 5, 6


# ---------------------------------------------------------------- numpy references


def np_log_softmax(z):
    out = np.empty_like(z)
    for n in range(z.shape[0]):
        m = z[n].max()
        out[n] = z[n] - m - np.log(np.sum(np.exp(z[n] - m)))
    return out


def np_kl(log_p, log_q):
    return np.array([sum(np.exp(log_p[n, c]) * (log_p[n, c] - log_q[n, c]) for c in range(log_p.shape[1]))
                     for n in range(log_p.shape[0])])


def np_dkd(zs, zt, y, alpha, beta, T):
    out = np.zeros(zs.shape[0])
    for n in range(zs.shape[0]):
        ps, pt = np.exp(np_log_softmax(zs[n:n + 1] / T))[0], np.exp(np_log_softmax(zt[n:n + 1] / T))[0]
        bs, bt = np.array([ps[y[n]], 1 - ps[y[n]]]), np.array([pt[y[n]], 1 - pt[y[n]]])
        tckd = sum(bs[i] * (np.log(bs[i]) - np.log(bt[i])) for i in range(2))
        keep = [c for c in range(zs.shape[1]) if c != y[n]]
        qs = np.exp(np_log_softmax(zs[n:n + 1, keep] / T))[0]
        qt = np.exp(np_log_softmax(zt[n:n + 1, keep] / T))[0]
        nckd = sum(qs[i] * (np.log(qs[i]) - np.log(qt[i])) for i in range(len(keep)))
        out[n] = T * T * (alpha * tckd + beta * nckd)
    return out


def np_standardize(z):
    return np.stack([(row - row.mean()) / (np.std(row, ddof=1) + 1e-7) for row in z])


def np_lskd(zs, zt, T):
    return T * T * np_kl(np_log_softmax(np_standardize(zs) / T), np_log_softmax(np_standardize(zt) / T))


def np_at(fs, ft, p):
    def att(f):
        q = np.abs(f) ** p
        q = q.mean(axis=1).reshape(f.shape[0], -1)
        return q / np.sqrt((q ** 2).sum(axis=1, keepdims=True))

    return ((att(fs) - att(ft)) ** 2).mean(axis=1)


def np_hint(fs, ft, weight=None, bn=None):
    """MSE per sample; with a connector: 1x1 conv (weight (Cs, Ct)) then BN in training mode."""
    if weight is not None:
        ft = np.einsum("oc,bchw->bohw", weight, ft)
        mean = ft.mean(axis=(0, 2, 3), keepdims=True)
        var = ft.var(axis=(0, 2, 3), keepdims=True)  # biased, as BN normalises in training
        gamma, beta = bn
        ft = (ft - mean) / np.sqrt(var + 1e-5) * gamma[None, :, None, None] + beta[None, :, None, None]
    return ((ft - fs) ** 2).reshape(fs.shape[0], -1).mean(axis=1)


def np_sp(fs, ft):
    def gram(f):
        a = f.reshape(f.shape[0], -1)
        g = np.array([[sum(a[i, k] * a[j, k] for k in range(a.shape[1])) for j in range(a.shape[0])]
                      for i in range(a.shape[0])])
        return g / np.sqrt((g ** 2).sum(axis=1, keepdims=True))

    gs, gt = gram(fs), gram(ft)
    return ((gs - gt) ** 2).sum(axis=1) / fs.shape[0]


def numeric_grad(f, x, h=1e-6):
    """d sum(weights * f(x)) / dx by central differences, fixed random weights per sample."""
    w = np.linspace(0.5, 1.5, f(x).shape[0])
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = ((w * f(up)).sum() - (w * f(down)).sum()) / (2 * h)
    return grad, w


def check(torch_fn, np_fn, source: np.ndarray, target: np.ndarray):
    """Values equal; the target's gradient equals the numeric one; the source gets none."""
    s = torch.tensor(source, requires_grad=True)
    t = torch.tensor(target, requires_grad=True)
    got = torch_fn(s, t)
    np.testing.assert_allclose(got.detach().numpy(), np_fn(source, target), **VALUES)
    want, w = numeric_grad(lambda x: np_fn(source, x), target)
    (torch.tensor(w) * got).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), want, **GRADS)
    assert s.grad is None, "a gradient reached the source"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- logit losses


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (0.0, 1.0, 2.5)])
def test_dkd(rng, alpha, beta, T):
    zs, zt = rng.normal(size=(B, C)) * 3, rng.normal(size=(B, C)) * 3
    y = rng.integers(0, C, size=B)
    labels = torch.tensor(y)
    check(lambda s, t: dkd_per_sample(s, t, labels, alpha=alpha, beta=beta, T=T),
          lambda s, t: np_dkd(s, t, y, alpha, beta, T), zs, zt)


def test_dkd_on_stacked_edges_equals_each_edge(rng):
    zs, zt = torch.tensor(rng.normal(size=(3, B, C))), torch.tensor(rng.normal(size=(3, B, C)))
    y = torch.tensor(rng.integers(0, C, size=B))
    stacked = dkd_per_sample(zs, zt, y, alpha=1.0, beta=8.0, T=4.0)
    for e in range(3):
        torch.testing.assert_close(stacked[e], dkd_per_sample(zs[e], zt[e], y, alpha=1.0, beta=8.0, T=4.0), **VALUES)


def test_dkd_with_alpha_equal_beta_one_minus_kd_is_the_decoupling(rng):
    """Zhao et al.'s identity: KD = TCKD + (1 - p_t,y) NCKD (teacher's target probability)."""
    zs, zt = torch.tensor(rng.normal(size=(B, C))), torch.tensor(rng.normal(size=(B, C)))
    y = torch.tensor(rng.integers(0, C, size=B))
    tckd = dkd_per_sample(zs, zt, y, alpha=1.0, beta=0.0, T=2.0)
    nckd = dkd_per_sample(zs, zt, y, alpha=0.0, beta=1.0, T=2.0)
    p_y = torch.softmax(zs / 2, dim=1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(kl_per_sample(zs, zt, 2.0), tckd + (1 - p_y) * nckd, **VALUES)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_lskd(rng, T):
    zs, zt = rng.normal(size=(B, C)) * 5 + 2, rng.normal(size=(B, C))
    check(lambda s, t: lskd_per_sample(s, t, T), lambda s, t: np_lskd(s, t, T), zs, zt)


def test_lskd_ignores_the_scale_and_shift_of_logits(rng):
    zs, zt = torch.tensor(rng.normal(size=(B, C))), torch.tensor(rng.normal(size=(B, C)))
    torch.testing.assert_close(lskd_per_sample(zs, zt, 2.0), lskd_per_sample(3 * zs + 1, zt / 7 - 2, 2.0),
                               rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- feature losses


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_transfer(rng, p):
    fs, ft = rng.normal(size=(3, 4, 3, 3)), rng.normal(size=(3, 2, 3, 3))  # channels may differ
    check(lambda s, t: at_per_sample(s, t, p), lambda s, t: np_at(s, t, p), fs, ft)


def test_hint_same_channels(rng):
    fs, ft = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 2, 2, 2))
    check(lambda s, t: hint_per_sample(s, t), np_hint, fs, ft)


def test_hint_through_a_connector(rng):
    torch.manual_seed(0)
    fs, ft = rng.normal(size=(3, 4, 2, 2)), rng.normal(size=(3, 2, 2, 2))
    conn = connector(2, 4).double()
    with torch.no_grad():
        conn[1].weight.uniform_(0.5, 1.5)
        conn[1].bias.uniform_(-0.5, 0.5)
    weight = conn[0].weight.detach().numpy()[:, :, 0, 0]
    bn = (conn[1].weight.detach().numpy(), conn[1].bias.detach().numpy())
    check(lambda s, t: hint_per_sample(s, t, conn), lambda s, t: np_hint(s, t, weight, bn), fs, ft)
    assert conn[0].weight.grad is not None  # the connector learns with its target


def test_similarity_preserving(rng):
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 5, 1, 3))  # any two shapes compare
    check(sp_per_sample, np_sp, fs, ft)


def test_sp_batch_mean_is_the_papers_frobenius_form(rng):
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 2, 2, 2))
    a_s, a_t = fs.reshape(4, -1), ft.reshape(4, -1)
    gs, gt = a_s @ a_s.T, a_t @ a_t.T
    gs, gt = gs / np.linalg.norm(gs, axis=1, keepdims=True), gt / np.linalg.norm(gt, axis=1, keepdims=True)
    paper = np.linalg.norm(gt - gs) ** 2 / 16
    assert sp_per_sample(torch.tensor(fs), torch.tensor(ft)).mean().item() == pytest.approx(paper, rel=1e-12)


# ---------------------------------------------------------------- the catalogue itself


def test_catalogue_is_the_registry_and_every_loss_has_a_weight():
    assert registry.LOSSES == {n: tuple(i.args) for n, i in loss_catalogue.LOSSES.items()}
    for info in loss_catalogue.LOSSES.values():
        assert "weight" in info.args and info.endpoints in loss_catalogue.ENDPOINTS
        assert info.formula and info.reference and info.reduction and info.scaling
    assert loss_catalogue.losses_for("layer") == ["at", "hint", "sp", "rkd", "pkt", "nst", "crd"]
    assert set(loss_catalogue.losses_for("logits")) == {"kl", "dkd", "lskd", "rkd", "pkt", "crd"}
    assert loss_catalogue.losses_for("label") == ["ce"]


def test_docs_hold_the_catalogue_table():
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    assert loss_catalogue.catalogue_table() in docs, "regenerate the table with loss_catalogue.catalogue_table()"
