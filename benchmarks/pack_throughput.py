"""Trials per hour of real `dclang search` runs, side by side: workers D and pack K.

    python benchmarks/pack_throughput.py --runs 2:1,1:2 --device cpu            # CPU: --workers vs --pack
    python benchmarks/pack_throughput.py --runs 1:1,1:4,1:16 --device cuda \\
        --model resnet32 --data npz --trials 32 --epochs 2                        # GPU: K = 1, 4, 16

Each run is `dclang search --workers D --pack K` on the same template and study settings, in
its own output folder, one after the other; its wall time is the command's own, start to end
(workers starting, trials sampled and trained, outputs written). Reported per run: trials
finished, epochs trained, trials/hour and epochs/hour, and both as a ratio to the first run.

The template is a 3-node search (`template`): the models fixed (all `--model`), the gate of
every edge searched, so trials differ in what they compute only by their gates, dead nodes and
how far ASHA lets them go: epochs/hour is the fairer figure, trials/hour the one users see.
`--data digits` needs no files; `--data npz` writes a CIFAR-100-shaped file of random images
(`make_cifar_like_npz.py`), for machines without CIFAR and without network.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def template(model: str, *, data: str, npz: Path | None, epochs: int, batch: int) -> str:
    """The benchmark's search template: three `model` nodes, every edge's gate searched."""
    if data == "npz":
        block = f'data npz {{\n  path = "{npz}"\n  val_split = 256\n  augment = pad_crop_flip\n}}'
    else:
        block = "data digits {\n  val_split = 300\n  augment = pad_crop\n  pad = 1\n}"
    return f"""graph packbench

{block}

train {{
  epochs = {epochs}
  batch = {batch}
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine(eta_min=0.0)
  seed = 0
}}

node n1 : {model} [target]
node n2 : {model}
node n3 : {model}

edges * -> * : choice(through, cutoff, linear, correct)
"""


def parse_runs(text: str) -> list[tuple[int, int]]:
    """`2:1,1:2` -> [(2, 1), (1, 2)]: (workers D, pack K) per run."""
    runs = []
    for part in text.split(","):
        d, _, k = part.partition(":")
        runs.append((int(d), int(k or 1)))
    if not runs or any(d < 1 or k < 1 for d, k in runs):
        raise argparse.ArgumentTypeError(f"runs are D:K pairs with D, K >= 1, got {text!r}")
    return runs


def figures(summary: dict, wall: float) -> dict:
    """Throughput of one search from its summary.json and wall time."""
    finished = summary["trials"]["finished"]
    epochs = summary["budget"]["epochs_trained"]
    return {"wall_seconds": wall, "trials_finished": finished, "epochs_trained": epochs,
            "trials_per_hour": 3600 * finished / wall, "epochs_per_hour": 3600 * epochs / wall}


def with_ratios(results: list[dict]) -> list[dict]:
    """Each run's throughputs divided by the first run's (where both were measured)."""
    first = results[0]
    for r in results:
        for key in ("trials_per_hour", "epochs_per_hour"):
            if key in r and first.get(key):
                r[f"{key}_ratio"] = r[key] / first[key]
    return results


def run_search(kt: Path, out: Path, *, workers: int, pack: int, trials: int, device: str, hfta: bool,
               timeout: float, window: float | None) -> dict:
    """One search; with `window`, stopped (as Ctrl-C stops it) after that many seconds and
    measured over the window: trials that finished within it."""
    command = [sys.executable, "-m", "dclang", "search", "--template", str(kt), "--trials", str(trials),
               "--workers", str(workers), "--pack", str(pack), "--device", device, "-o", str(out)]
    command += ["--hfta"] if hfta else []
    row = {"workers": workers, "pack": pack, "hfta": hfta, "command": " ".join(command[1:])}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if window is not None:
            try:
                proc.wait(timeout=window)
            except subprocess.TimeoutExpired:
                # as Ctrl-C: the workers hand back their trials, the outputs are written
                proc.send_signal(signal.SIGTERM)
                # (not SIGINT: a shell starting this in the background ignores SIGINT for its children)
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {**row, "error": f"still running after {timeout:.0f} s"}
    wall = time.perf_counter() - started if window is None else min(window, time.perf_counter() - started)
    summary_file = out / "summary.json"
    if not summary_file.is_file() or (proc.returncode != 0 and window is None):
        return {**row, "error": f"exit code {proc.returncode}: {err[-2000:]}"}
    return {**row, **figures(json.loads(summary_file.read_text()), wall)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=parse_runs, default=parse_runs("2:1,1:2"), help="D:K pairs, in order")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="cnn_tiny")
    parser.add_argument("--data", choices=("digits", "npz"), default="digits")
    parser.add_argument("--train-images", type=int, default=2304, help="--data npz: training images")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hfta", action="store_true")
    parser.add_argument("--window", type=float, help="stop each search after this many seconds and count the "
                                                      "trials finished by then (default: run to --trials)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run at most")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="packbench") as tmp:
        tmp = Path(tmp)
        npz = tmp / "cifar_like.npz"
        if args.data == "npz":
            subprocess.run([sys.executable, str(HERE / "make_cifar_like_npz.py"), str(npz), "--train",
                            str(args.train_images), "--test", "256"], check=True)
        kt = tmp / "packbench.kt"
        kt.write_text(template(args.model, data=args.data, npz=npz, epochs=args.epochs, batch=args.batch))
        results = [run_search(kt, tmp / f"out_{i}", workers=d, pack=k, trials=args.trials, device=args.device,
                              hfta=args.hfta, timeout=args.timeout, window=args.window)
                   for i, (d, k) in enumerate(args.runs)]
    report = {"benchmark": "packed search throughput", "device": args.device, "model": args.model,
              "data": args.data, "trials": args.trials, "epochs": args.epochs, "window": args.window,
              "cpus": os.cpu_count(),
              "runs": with_ratios(results)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
