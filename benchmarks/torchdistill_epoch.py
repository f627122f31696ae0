"""A whole epoch, evaluation included, of dclang against torchdistill 1.1.5 on the same KD runs.

    pip install --no-deps torchdistill==1.1.5   # it needs torch, torchvision, numpy, pyyaml, scipy
    OMP_NUM_THREADS=1 python benchmarks/torchdistill_epoch.py --epochs 3 --alternations 2

The runs: a frozen `cnn_small` teacher and a `cnn_tiny` student, knowledge distillation
(cross-entropy and KL at T=2, weight 0.5 each; torchdistill's `KDLoss` with alpha=0.5), and
the same plus attention transfer between `conv1` and `conv2` of both (`at(p=2, weight=30)`;
torchdistill's `ATLoss` in its `code` mode, weight 30 per pair). SGD (lr 0.1, momentum 0.9,
Nesterov, weight decay 5e-4), a cosine schedule, batch 64, no augmentation.

The data: real MNIST cannot be downloaded here, so scikit-learn's digits (1,797 real
handwritten 8x8 digits, shipped with scikit-learn) upscaled bilinearly to MNIST's 28x28,
written as an .npz; dclang reads it (`data npz`), and torchdistill gets the very same
train/val/test splits from dclang's loader, each image normalised as it is read (what
torchvision's `ToTensor` and `Normalize` do). The teacher is pre-trained once by dclang on the
same data and both frameworks load its weights.

What is timed, per run, from the first epoch's first batch to the last evaluation (building
models, loading data and importing are not): for dclang, the epochs of `train_graph` without
a run folder (each epoch's steps and the evaluation dclang does after it; `seconds` of its
records); for torchdistill, its example training script's loop (`train_one_epoch`, then the
student evaluated on val, the best student kept) and, at the end, what that script evaluates
on test: the teacher and the best student. Nothing is written to disk on either side.

Each run is its own process with one thread (`OMP_NUM_THREADS=1`), torchdistill's and dclang's
alternated (the order flips every alternation), so that neither inherits the other's memory
or caches and a load on the machine falls on both. Reported: the median over alternations of
dclang's time over torchdistill's, for the whole run and for the training alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GRAPHS = {"kd": "KD", "kd_at": "KD + attention"}
SIZE = 28  # MNIST's

KT = """\
graph {name}
data npz {{ path = "{npz}"  val_split = {val}  augment = none }}
train {{
  epochs = {epochs}
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
}}
node student : cnn_tiny [target]
node teacher : cnn_small [frozen, init="{teacher}"]
label   -> student : through ce(weight=0.5)
teacher -> student : through kl(T=2, weight=0.5)
"""
AT = """\
teacher.conv1 -> student.conv1 : through at(p=2, weight=30)
teacher.conv2 -> student.conv2 : through at(p=2, weight=30)
"""
#: module paths of cnn_small's and cnn_tiny's `conv1` and `conv2` taps (their ReLUs)
AT_PATHS = {"conv1": "2", "conv2": "5"}


# ---------------------------------------------------------------- the data and the teacher


def make_data(work: Path, *, train: int, test: int) -> Path:
    """digits upscaled to 28x28 uint8, `train` images for train+val and `test` for test."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    if train + test > len(digits.images):
        raise SystemExit(f"digits has {len(digits.images)} images; asked for {train} + {test}")
    order = np.random.default_rng(0).permutation(len(digits.images))
    images = torch.tensor(digits.images[order], dtype=torch.float32).unsqueeze(1) / 16  # 0..16 -> 0..1
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    labels = digits.target[order].astype(np.int64)
    path = work / "digits28.npz"
    np.savez(path, x_train=pixels[:train], y_train=labels[:train],
             x_test=pixels[train:train + test], y_test=labels[train:train + test])
    return path


def make_teacher(work: Path, npz: Path, *, val: int, epochs: int) -> Path:
    """The cnn_small teacher pre-trained by dclang on the data, as a node checkpoint."""
    from dclang.api import check
    from dclang.checkpoints import atomic_save, load_safely
    from dclang.train import RunDir, train_graph

    text = (f'graph teacher\ndata npz {{ path = "{npz}"  val_split = {val}  augment = none }}\n'
            f"train {{ epochs = {epochs}  batch = 64  optimizer = sgd(lr=0.1, momentum=0.9)  schedule = cosine }}\n"
            "node teacher : cnn_small [target]\nlabel -> teacher : through\n")
    checked = check(text)
    assert checked.ok, checked.diagnostics
    result = train_graph(checked.graph, run_dir=work / "teacher_run", device="cpu", progress=False)
    path = work / "teacher.pt"
    atomic_save(load_safely(RunDir(work / "teacher_run").best)["nodes"]["teacher"], path)
    print(f"teacher: cnn_small, {epochs} epochs, test accuracy "
          f"{100 * result.summary['nodes']['teacher']['test_at_best_val']:.1f} %", file=sys.stderr)
    return path


# ---------------------------------------------------------------- one run of each


def run_dclang(args) -> dict:
    from dclang.api import check
    from dclang.train import train_graph

    text = KT.format(name=args.graph, npz=args.npz, val=args.val, epochs=args.epochs, teacher=args.teacher)
    checked = check(text + (AT if args.graph == "kd_at" else ""))
    assert checked.ok, checked.diagnostics
    result = train_graph(checked.graph, run_dir=None, device="cpu", progress=False)
    return {"seconds": sum(r["seconds"] for r in result.records),
            "train_seconds": sum(r["train_seconds"] for r in result.records),
            "test_acc": result.summary["nodes"]["student"]["test_at_best_val"], "step": result.summary["step"]}


def run_torchdistill(args) -> dict:
    """torchdistill's example script for image classification (examples/torchvision/
    image_classification.py), its `train` and `evaluate` loops as written there, on a
    DistillationBox built from the config a YAML file would hold."""
    import copy

    import torch
    from torch.utils.data import Dataset, RandomSampler, SequentialSampler
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.misc.log import MetricLogger, SmoothedValue

    from dclang.checkpoints import load_safely
    from dclang.data import load_dataset
    from dclang.models import build_model

    data = load_dataset("npz", data_dir=None, val_split=args.val, split_seed=0, path=args.npz)

    class Images(Dataset):
        """A split, each image normalised as it is read (ToTensor + Normalize)."""

        def __init__(self, split):
            self.split = split
            self.mean = torch.tensor(data.mean).view(-1, 1, 1)
            self.std = torch.tensor(data.std).view(-1, 1, 1)

        def __len__(self):
            return len(self.split)

        def __getitem__(self, i):
            return (self.split.images[i].float() / 255 - self.mean) / self.std, int(self.split.labels[i])

    device = torch.device("cpu")
    teacher = build_model("cnn_small", data.num_classes, data.channels, data.image_size)
    teacher.load_state_dict(load_safely(args.teacher)["state_dict"])
    student = build_model("cnn_tiny", data.num_classes, data.channels, data.image_size)
    model_io = {"input": [], "output": list(AT_PATHS.values()) if args.graph == "kd_at" else []}
    sub_terms = {"kd": {"criterion": {"key": "KDLoss", "kwargs": {
        "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
        "teacher_module_io": "output", "temperature": 2.0, "alpha": 0.5, "reduction": "batchmean"}}, "weight": 1.0}}
    if args.graph == "kd_at":
        pairs = {name: {"teacher": {"io": "output", "path": path}, "student": {"io": "output", "path": path},
                        "weight": 30} for name, path in AT_PATHS.items()}
        sub_terms["at"] = {"criterion": {"key": "ATLoss", "kwargs": {"at_pairs": pairs, "mode": "code"}},
                           "weight": 1.0}
    eval_batch = 1024  # dclang's evaluation chunk
    config = {
        "num_epochs": args.epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": 64, "num_workers": 0}, "requires_supp": True},
        "val_data_loader": {"dataset_id": "val", "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
                            "kwargs": {"batch_size": eval_batch, "num_workers": 0}},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "forward_hook": model_io, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "forward_hook": model_io, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                               "weight_decay": 5e-4}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": args.epochs}, "scheduling_step": 0},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}},
    }
    datasets = {"train": Images(data.train), "val": Images(data.val)}
    box = get_distillation_box(teacher, student, datasets, config, device, None, False, 1)
    test_loader = torch.utils.data.DataLoader(Images(data.test), batch_size=eval_batch, num_workers=0)

    def train_one_epoch(epoch: int) -> None:
        box.pre_epoch_process(epoch=epoch)
        logger = MetricLogger(delimiter="  ")
        logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
        logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
        for sample_batch, targets, supp_dict in box.train_data_loader:
            started = time.time()
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
            logger.meters["img/s"].update(len(sample_batch) / (time.time() - started))
            if torch.isnan(loss) or torch.isinf(loss):
                raise ValueError(f"The training loop was broken due to loss = {loss}")

    @torch.inference_mode()
    def evaluate(model, loader) -> float:
        model.eval()
        logger = MetricLogger(delimiter="  ")
        for image, target in loader:
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            output = model(image)
            top5 = output.topk(5, dim=1).indices
            correct = top5 == target.unsqueeze(1)
            acc1, acc5 = correct[:, :1].any(1).float().mean() * 100, correct.any(1).float().mean() * 100
            logger.meters["acc1"].update(acc1.item(), n=image.shape[0])
            logger.meters["acc5"].update(acc5.item(), n=image.shape[0])
        return logger.acc1.global_avg

    best, best_state, train_seconds = -1.0, None, 0.0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        begun = time.perf_counter()
        train_one_epoch(epoch)
        train_seconds += time.perf_counter() - begun
        val = evaluate(box.student_model, box.val_data_loader)
        if val > best:  # the script saves a checkpoint here; kept in memory, as dclang keeps its files off
            best, best_state = val, copy.deepcopy(box.student_model.state_dict())
        box.post_epoch_process()
    evaluate(teacher, test_loader)  # what the script evaluates on test at the end
    student.load_state_dict(best_state)
    test = evaluate(student, test_loader)
    return {"seconds": time.perf_counter() - started, "train_seconds": train_seconds, "test_acc": test / 100}


# ---------------------------------------------------------------- the side-by-side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run")
    parser.add_argument("--alternations", type=int, default=2, help="runs of each framework per graph")
    parser.add_argument("--train", type=int, default=1500, help="train+val images (digits has 1,797)")
    parser.add_argument("--val", type=int, default=300, help="validation images, carved from --train")
    parser.add_argument("--test", type=int, default=297)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--graphs", nargs="+", choices=list(GRAPHS), default=list(GRAPHS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dclang_torchdistill"))
    parser.add_argument("--worker", choices=("dclang", "torchdistill"), help=argparse.SUPPRESS)
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    parser.add_argument("--npz", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # one run, in its own process; its figures as one JSON line
        import torch

        torch.set_num_threads(1)
        run = run_dclang if args.worker == "dclang" else run_torchdistill
        print(json.dumps(run(args)))
        return

    import torchdistill

    if torchdistill.__version__ != "1.1.5":
        print(f"note: torchdistill {torchdistill.__version__}, not 1.1.5", file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    npz = make_data(args.work, train=args.train, test=args.test)
    teacher = make_teacher(args.work, npz, val=args.val, epochs=args.teacher_epochs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCLANG_CACHE": str(args.work / "cache")}
    runs: dict[tuple[str, str], list[dict]] = {}
    for alternation in range(args.alternations):
        order = ("torchdistill", "dclang") if alternation % 2 == 0 else ("dclang", "torchdistill")
        for graph in args.graphs:
            for framework in order:
                done = subprocess.run([sys.executable, __file__, "--worker", framework, "--graph", graph,
                                       "--npz", str(npz), "--teacher", str(teacher), "--epochs", str(args.epochs),
                                       "--val", str(args.val)], env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{framework} on {graph} failed:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                runs.setdefault((graph, framework), []).append(figures)
                print(f"{GRAPHS[graph]}, {framework}: {figures['seconds']:.2f} s for {args.epochs} epochs "
                      f"(training {figures['train_seconds']:.2f} s), test {100 * figures['test_acc']:.1f} %",
                      file=sys.stderr)
    train_images = args.train - args.val
    print(f"\n{train_images} train / {args.val} val / {args.test} test images (digits upscaled to 28x28), "
          f"{args.epochs} epochs a run, {args.alternations} alternations, one thread; "
          f"dclang's step: {runs[(args.graphs[0], 'dclang')][0]['step']}\n")
    print("| run | dclang / torchdistill, training only | dclang / torchdistill, whole epoch with evaluation |")
    print("|---|---:|---:|")
    for graph in args.graphs:
        pairs = list(zip(runs[(graph, "dclang")], runs[(graph, "torchdistill")]))
        train = statistics.median(d["train_seconds"] / t["train_seconds"] for d, t in pairs)
        whole = statistics.median(d["seconds"] / t["seconds"] for d, t in pairs)
        print(f"| {GRAPHS[graph]} | {train:.2f}x | {whole:.2f}x |")


if __name__ == "__main__":
    main()
