"""Does knowledge transfer help on digits? The target's test accuracy at its best validation
epoch, mean +/- sample std over seeds, for the graphs dclang can now write:

    solo           the student alone, from the labels
    KD             + a frozen cnn_small teacher at T = 2 (pre-trained on labels, cached)
    KD + AT        + attention transfer `at(p=2)` at the two full-resolution conv blocks
                   (only when this dclang has the `at` loss and layer endpoints)
    DML            the student and a cnn_small peer learning mutually
    DML + ensemble DML with both taught by their ensemble (mean of logits) at T = 2
    ensemble       that ensemble itself (its own best validation epoch)
    peer           the cnn_small peer of those runs, for reference
    ONE            the student and two branches on its trunk, taught by their learned ensemble
    KDCL           the student and a cnn_small peer on their own views, taught by their mean
    PCL            three cnn_tiny peers on their own views, taught by their mean and by each
                   other's mean teachers; the target is peer 1's mean teacher
    mean teacher   the moving average of a cnn_tiny's weights, teaching it (the target)
    RKD            KD's teacher teaching distances and angles between pooled features
    CRD            KD's teacher teaching through contrastive representation distillation

The deployed network is a `cnn_tiny` throughout (1,442 parameters), every graph has the same data
split, training settings and seeds, and nothing is selected on the test set.

    OMP_NUM_THREADS=1 python benchmarks/digits_evidence.py --epochs 15 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/digits_evidence.py --only solo PCL   # some graphs

Runs in-process with `dclang.train.train_graph` (the library `dclang run` calls), one thread,
teachers cached in a temporary folder; it prints a markdown table and, with `--json`, writes
every run's summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HEADER = """\
graph {name}
data digits {{ augment = pad_crop  pad = 1  val_split = 800 }}
train {{
  epochs = {epochs}
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
}}
"""

SOLO = """\
node student : cnn_tiny [target]
label -> student : through
"""

KD = """\
node student : cnn_tiny [target]
node teacher : cnn_small [frozen]
label   -> student : through
teacher -> student : through kl(T=2)
"""

DML = """\
node student : cnn_tiny [target]
node peer    : cnn_small
label   -> student : through
label   -> peer    : through
peer    -> student : through
student -> peer    : through
"""

DML_ENSEMBLE = DML.replace("node peer    : cnn_small\n",
                           "node peer    : cnn_small\nnode ens     : ensemble(student, peer)\n") + """\
ens -> student : through kl(T=2)
ens -> peer    : through kl(T=2)
"""

MEAN_TEACHER = """\
node student : cnn_tiny
node mean    : ema(student, decay=DECAY) [target, view=own]
label -> student : through
mean  -> student : through kl(T=1)
"""

ONE = """\
node student : cnn_tiny [target]
node b2      : branch(student, from="3")
node b3      : branch(student, from="3")
node ens     : ensemble(student, b2, b3) [combine=learned]
label -> student : through
label -> b2      : through
label -> b3      : through
label -> ens     : through
ens   -> student : through kl(T=3)
ens   -> b2      : through kl(T=3)
ens   -> b3      : through kl(T=3)
"""

KDCL = """\
node student : cnn_tiny  [target, view=own]
node peer    : cnn_small [view=own]
node ens     : ensemble(student, peer)
label -> student : through
label -> peer    : through
ens   -> student : through kl(T=2)
ens   -> peer    : through kl(T=2)
"""

PCL = """\
node p1      : cnn_tiny [view=own]
node p2      : cnn_tiny [view=own]
node p3      : cnn_tiny [view=own]
node ens     : ensemble(p1, p2, p3)
node m1      : ema(p1, decay=DECAY) [target]
node m2      : ema(p2, decay=DECAY)
node m3      : ema(p3, decay=DECAY)
label -> p1 : through
label -> p2 : through
label -> p3 : through
ens   -> p1 : through kl(T=3)
ens   -> p2 : through kl(T=3)
ens   -> p3 : through kl(T=3)
m2    -> p1 : through kl(T=3)
m3    -> p1 : through kl(T=3)
m1    -> p2 : through kl(T=3)
m3    -> p2 : through kl(T=3)
m1    -> p3 : through kl(T=3)
m2    -> p3 : through kl(T=3)
"""

RKD = KD.replace("teacher -> student : through kl(T=2)\n",
                 "teacher.pool -> student.pool : through rkd(distance=1, angle=2, weight=25)\n")

CRD = KD.replace("teacher -> student : through kl(T=2)\n",
                 "teacher.pool -> student.pool : through crd(feat_dim=64, nce_k=512, T=0.07, weight=0.8)\n")


KD_AT = KD + """\
teacher.conv1 -> student.conv1 : through at(p=2, weight=30)
teacher.conv2 -> student.conv2 : through at(p=2, weight=30)
"""


def kd_at() -> str | None:
    """KD plus attention transfer at both full-resolution conv blocks (8x8 on digits, with
    examples/digits_attention.kt's weight), when this dclang has the `at` loss and layer
    endpoints (the graph then checks); else None."""
    from dclang.api import check

    return KD_AT if check(HEADER.format(name="probe", epochs=1) + KD_AT).ok else None


def run(graphs: dict[str, tuple[str, dict[str, str]]], *, epochs: int, seeds: list[int], out: Path | None) -> dict:
    """Train each graph once per seed; each of its rows reads one node's test accuracy at
    that node's best validation epoch."""
    import torch

    from dclang.api import check
    from dclang.data import load_dataset
    from dclang.train import train_graph

    torch.set_num_threads(1)
    dataset = load_dataset("digits", data_dir=None, val_split=800, split_seed=0)
    results: dict[str, list[float]] = {}
    summaries = []
    with tempfile.TemporaryDirectory() as cache:
        for graph, (body, rows) in graphs.items():
            name = graph.lower().replace(" + ", "_").replace(" ", "_")
            checked = check(HEADER.format(name=name, epochs=epochs) + body)
            if not checked.ok:
                raise SystemExit(f"{graph}: the graph does not check:\n{checked.diagnostics}")
            for seed in seeds:
                started = time.perf_counter()
                summary = train_graph(checked.graph, run_dir=None, device="cpu", seed=seed, progress=False,
                                      dataset=dataset, teacher_cache=Path(cache)).summary
                summaries.append({"graph": graph, "seed": seed, "summary": summary})
                for row, node in rows.items():
                    acc = summary["nodes"][node]["test_at_best_val"]
                    results.setdefault(row, []).append(acc)
                    print(f"{row:30s} seed {seed}: {100 * acc:.2f} ({time.perf_counter() - started:.0f}s)",
                          file=sys.stderr, flush=True)
    if out is not None:
        out.write_text(json.dumps(summaries, indent=1, default=str), encoding="utf-8")
    return results


def table(results: dict[str, list[float]]) -> str:
    lines = ["| graph | target test % at best val (mean ± std) | per seed |", "|---|---|---|"]
    for row, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {row} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | "
                     + ", ".join(f"{100 * a:.2f}" for a in accs) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None, help="write every run's summary here")
    parser.add_argument("--decay", type=float, default=0.9, help="the mean teachers' decay (PCL, mean teacher)")
    parser.add_argument("--only", nargs="+", default=None, metavar="GRAPH", help="train only these graphs (by name)")
    args = parser.parse_args()
    graphs = {"solo": (SOLO, {"solo": "student"}), "KD": (KD, {"KD": "student"})}
    at = kd_at()
    if at is None:
        print("KD + AT skipped: this dclang has no `at` loss with layer endpoints", file=sys.stderr)
    else:
        graphs["KD + AT"] = (at, {"KD + AT": "student"})
    graphs["DML"] = (DML, {"DML": "student"})
    graphs["DML + ensemble"] = (DML_ENSEMBLE, {"DML + ensemble": "student",
                                               "ensemble (of DML + ensemble)": "ens",
                                               "peer (of DML + ensemble), for reference": "peer"})
    graphs["ONE"] = (ONE, {"ONE": "student", "learned ensemble (of ONE)": "ens"})
    graphs["KDCL"] = (KDCL, {"KDCL": "student"})
    graphs["PCL"] = (PCL.replace("DECAY", str(args.decay)),
                     {"PCL (mean teacher of peer 1)": "m1", "peer 1 (of PCL)": "p1"})
    graphs["mean teacher"] = (MEAN_TEACHER.replace("DECAY", str(args.decay)), {"mean teacher (the EMA)": "mean",
                                             "its student (of mean teacher)": "student"})
    graphs["RKD"] = (RKD, {"RKD": "student"})
    graphs["CRD"] = (CRD, {"CRD": "student"})
    only = set(args.only or graphs)
    graphs = {name: graph for name, graph in graphs.items() if name in only}
    results = run(graphs, epochs=args.epochs, seeds=args.seeds, out=args.json)
    print(f"digits, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}, mean teachers' decay {args.decay}:")
    print(table(results))


if __name__ == "__main__":
    main()
