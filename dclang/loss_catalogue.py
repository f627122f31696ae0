"""The typed catalogue of edge losses: what each loss takes, its arguments, how it is scaled.

One table answers every question the front end asks about a loss without importing torch:
which endpoints it compares (`label` -> logits, logits -> logits, layer -> layer, or either of
the last two), which
arguments it accepts with their defaults and ranges, how its per-sample value is reduced and
scaled, and the one-line formula with its reference that `docs/training.md` prints. The
passes check edges against it, the IR fills defaults from it, the search samples from it,
and `dclang.losses` / `dclang.feature_losses` implement exactly these formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

from dclang import ranges

#: what an edge's ends must be for a loss: the label and a node's logits (`label`), two
#: nodes' logits (`logits`), a layer of each of two nodes (`layer`), or either of the last two
#: (`logits or layer`: losses over a batch's embeddings, which take logits or flattened layers)
ENDPOINTS = ("label", "logits", "layer", "logits or layer")


@dataclass(frozen=True)
class Arg:
    """One argument of a loss: its default and the range its value must lie in."""

    default: float
    range: ranges.Range
    help: str = ""
    kind: str = "float"  # "int": a whole number (a size or a count)


def _T(default: float) -> Arg:
    return Arg(default, ranges.TEMPERATURE, help="softmax temperature")


WEIGHT = Arg(1.0, ranges.MULTIPLIER, help="multiplies the edge loss")


@dataclass(frozen=True)
class LossInfo:
    """A loss of the catalogue. `args` always ends with `weight` (every edge has one)."""

    name: str
    endpoints: str  # one of ENDPOINTS
    args: dict[str, Arg]
    formula: str  # per-sample value a_n, one line
    reduction: str
    scaling: str
    reference: str
    note: str = ""
    pairs: bool = False  # a loss over pairs (or triplets) of the batch's samples, gated per pair
    needs_indices: bool = False  # reads each batch's positions in the training split (crd's memory bank)

    @property
    def on_layers(self) -> bool:
        """The loss compares layers only."""
        return self.endpoints == "layer"

    def takes(self, ends: str) -> bool:
        """Whether an edge whose ends are `ends` (`label`, `logits` or `layer`) may carry it."""
        return ends in self.endpoints.split(" or ")


_MEAN = "batch mean of weight x gate x a_n"
_PAIRS = "mean over pairs (i, j) of weight x min(g_i, g_j) x a_ij"

LOSSES: dict[str, LossInfo] = {info.name: info for info in (
    LossInfo("ce", "label", {"weight": WEIGHT},
             "a_n = -log softmax(z_t)[y_n]", _MEAN, "none",
             "Minami et al. 2020, eq. 1 (cross-entropy = KL from a one-hot label)"),
    LossInfo("kl", "logits", {"T": _T(1.0), "weight": WEIGHT},
             "a_n = T^2 KL(softmax(z_s/T) || softmax(z_t/T))", _MEAN, "T^2",
             "Hinton et al. 2015; Minami et al. 2020, eq. 2"),
    LossInfo("dkd", "logits",
             {"alpha": Arg(1.0, ranges.MULTIPLIER, help="weight of the target-class term TCKD"),
              "beta": Arg(8.0, ranges.MULTIPLIER, help="weight of the non-target term NCKD"),
              "T": _T(4.0), "weight": WEIGHT},
             "a_n = T^2 (alpha KL(b_s || b_t) + beta KL(q_s || q_t)); b = (p_y, 1 - p_y), "
             "q = softmax over the non-target classes, at temperature T",
             _MEAN, "T^2",
             "Zhao et al. 2022, Decoupled Knowledge Distillation (CVPR)",
             "the defaults are the paper's CIFAR-100 setting (alpha 1, beta 8, T 4); its warm-up is left to `linear`"),
    LossInfo("lskd", "logits", {"T": _T(2.0), "weight": WEIGHT},
             "a_n = T^2 KL(softmax(std(z_s)/T) || softmax(std(z_t)/T)); std(z) = (z - mean(z)) / (sd(z) + 1e-7)",
             _MEAN, "T^2",
             "Sun et al. 2024, Logit Standardization in Knowledge Distillation (CVPR)",
             "sd is the Bessel-corrected standard deviation over the classes, as in the authors' code"),
    LossInfo("at", "layer", {"p": Arg(2.0, ranges.POWER, help="power of the activations"), "weight": WEIGHT},
             "a_n = mean_j (q_s,j - q_t,j)^2; Q_j = mean_c |A_c,j|^p over channels, q = Q / ||Q||_2 over positions j",
             _MEAN, "none (the paper's beta/2 = 500: write weight=500)",
             "Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR)",
             "channel counts may differ; spatial sizes must match"),
    LossInfo("hint", "layer", {"weight": WEIGHT},
             "a_n = mean_{c,j} (A_s,c,j - r(A_t)_c,j)^2; r a 1x1 conv + BN of the target where channels differ",
             _MEAN, "none",
             "Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)",
             "the connector r belongs to the target node: trained with it, saved in its checkpoints; "
             "spatial sizes must match"),
    LossInfo("sp", "layer", {"weight": WEIGHT},
             "a_n = (1/B) sum_m (G_s,nm - G_t,nm)^2; G = row-normalised A A^T over the batch, A flattened per sample",
             _MEAN, "none (the paper's gamma = 3000: write weight=3000)",
             "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation (ICCV)",
             "compares B x B similarities, so any two layer shapes work; a_n is row n of the batch loss, "
             "so the mean over n is the paper's (1/B^2) ||G_s - G_t||_F^2"),
    # losses over the batch's embeddings (logits, or a layer flattened per sample): rkd and pkt's terms
    # are pairs or triplets of samples, each gated by the smallest gate weight among its samples
    LossInfo("rkd", "logits or layer",
             {"distance": Arg(1.0, ranges.MULTIPLIER, help="weight of the distance-wise term"),
              "angle": Arg(2.0, ranges.MULTIPLIER, help="weight of the angle-wise term"), "weight": WEIGHT},
             "a_ij = distance huber(d_s,ij - d_t,ij) + angle mean_k huber(c_s,ijk - c_t,ijk); "
             "d = ||e_i - e_j|| / mean_{i!=j} ||e_i - e_j||, c_ijk = cos(e_j - e_i, e_k - e_i), huber = smooth L1",
             _PAIRS + " (the angle's triplet (i, j, k) by min(g_i, g_j, g_k))", "none (the paper's 25 and 50: "
             "write weight=25)",
             "Park et al. 2019, Relational Knowledge Distillation (CVPR)",
             "the means run over all B^2 pairs and B^3 triplets, as in the authors' code", pairs=True),
    LossInfo("pkt", "logits or layer", {"weight": WEIGHT},
             "a_ij = p_s,j|i log((p_s,j|i + 1e-7) / (p_t,j|i + 1e-7)); p_j|i = K_ij / sum_m K_im, "
             "K_ij = (1 + cos(e_i, e_j)) / 2",
             _PAIRS, "none (the authors' code uses 30000: write weight=30000)",
             "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV)",
             "the sum over j is KL(p_s,.|i || p_t,.|i): the source's conditional probabilities are the target's "
             "to match", pairs=True),
    LossInfo("nst", "layer", {"weight": WEIGHT},
             "a_n = mean_{c,c'} k(f_s,c, f_s,c') + mean k(f_t,c, f_t,c') - 2 mean k(f_s,c, f_t,c'); "
             "f_c = channel c's map, L2-normalised over positions; k(x, y) = (x . y)^2",
             _MEAN, "none (the authors' code uses 50: write weight=50)",
             "Huang & Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
             "MMD^2 between the two sets of channel maps of one sample: per sample, so gated like `at`; "
             "channel counts may differ, spatial sizes must match"),
    LossInfo("crd", "logits or layer",
             {"feat_dim": Arg(128, ranges.FEATURES, help="size of the embeddings", kind="int"),
              "nce_k": Arg(4096, ranges.NEGATIVES, help="negatives drawn per sample", kind="int"),
              "T": _T(0.07), "weight": WEIGHT},
             "a_n = -log(P_n0 / (P_n0 + K/N + eps)) - sum_{j=1..K} log((K/N) / (P_nj + K/N + eps)), both "
             "directions; P_nj = exp(v_n . m_idx(n,j) / T) / Z, v = L2-normalised linear embedding, m the other "
             "end's memory bank, idx(n,0) = n",
             _MEAN, "none (the authors' code uses 0.8: write weight=0.8)",
             "Tian et al. 2020, Contrastive Representation Distillation (ICLR)",
             "the edge owns both embedding heads (trained with the target) and a memory bank of N training "
             "samples per end (momentum 0.5), kept in the target's checkpoints; it reads each batch's positions in "
             "the training split", needs_indices=True),
)}

#: the loss an edge has when none is written: `ce` from `label`, `kl` between nodes' logits;
#: an edge between layers must name its loss
NATURAL = {"label": "ce", "logits": "kl"}


def losses_for(endpoints: str) -> list[str]:
    """The loss names that fit an edge whose ends are `endpoints` (`label`, `logits` or `layer`)."""
    return [name for name, info in LOSSES.items() if info.takes(endpoints)]


def defaults(name: str) -> dict[str, float]:
    return {key: arg.default for key, arg in LOSSES[name].args.items()}


def catalogue_table() -> str:
    """The Markdown table `docs/training.md` holds (kept in step by tests/test_loss_catalogue.py)."""
    rows = ["| loss | endpoints | arguments (default, range) | per-sample a_n | reduction | scaling | reference |",
            "|---|---|---|---|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731  (a `|` would end the cell)
    for info in LOSSES.values():
        args = ", ".join(f"`{k}`={a.default:g} {a.range.words}" for k, a in info.args.items())
        rows.append(f"| `{info.name}` | {info.endpoints} | {args} | {cell(info.formula)} | {info.reduction} "
                    f"| {cell(info.scaling)} | {info.reference} |")
    return "\n".join(rows)
