"""Operations and seconds per step of K packed trials of one architecture mix, against one trial.

    OMP_NUM_THREADS=1 python benchmarks/pack_ops.py --packs 1,2,4,8 --hfta             # default graph below
    python benchmarks/pack_ops.py --graph examples/dml4.kt --packs 1,2,4 --device cuda --hfta

A pack step is one step of each of the K trials (`dclang.search.pack`: each trial keeps its own
compiled step, optimizer, schedule and batch). Each trial's step is compiled from the same
graph (with `--hfta`, its nodes of one architecture fused). Reported per K: the computing
operations one pack step dispatches (`dclang.bench.count_ops`), the median seconds of a pack
step, and both divided by K = 1's. Synthetic batches of the graph's dataset shape: no data is
read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

#: three trainable nodes of one architecture on digits: what HFTA fuses within a trial
DEFAULT_GRAPH = """\
graph three_tiny
data digits { val_split = 300 }
train { epochs = 4  batch = 64 }
node n1 : cnn_tiny [target]
node n2 : cnn_tiny
node n3 : cnn_tiny
edges * -> * : through
"""


def measure(graph, *, packs: list[int], device: str, hfta: bool, steps: int) -> list[dict]:
    import torch

    from dclang.bench import count_ops
    from dclang.compile import StepOptions, compile_graph
    from dclang.data.catalog import DATASETS
    from dclang.train.loop import resolve_device

    dev = resolve_device(device)
    info = DATASETS[graph.graph["data"].dataset]
    batch = graph.graph["train"].batch
    generator = torch.Generator().manual_seed(0)
    options = StepOptions(hfta=hfta, channels_last=False)
    rows = []
    for k in packs:
        trials = [compile_graph(graph, num_classes=info.num_classes, in_channels=info.channels,
                                image_size=info.image_size, device=dev, seed=i, steps_per_epoch=100, epochs=1,
                                options=options) for i in range(k)]
        batches = [(torch.randn(batch, info.channels, info.image_size, info.image_size, generator=generator).to(dev),
                    torch.randint(0, info.num_classes, (batch,), generator=generator).to(dev)) for _ in range(k)]

        def pack_step(update: int) -> None:
            for step, (x, y) in zip(trials, batches):
                step.step(x, y, update)

        for update in (1, 2):  # warm-up
            pack_step(update)
        ops = count_ops(pack_step, 3)
        times = []
        for update in range(4, 4 + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
            pack_step(update)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - started)
        rows.append({"pack": k, "ops_per_step": ops, "seconds_per_step": statistics.median(times),
                     "label": trials[0].label})
    for row in rows:
        row["ops_ratio_to_one"] = row["ops_per_step"] / rows[0]["ops_per_step"]
        row["seconds_ratio_to_one"] = row["seconds_per_step"] / rows[0]["seconds_per_step"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    from dclang.api import check

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", type=Path, help="a .kt file (default: three cnn_tiny nodes on digits)")
    parser.add_argument("--packs", default="1,2,4,8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hfta", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    text = args.graph.read_text() if args.graph else DEFAULT_GRAPH
    checked = check(text, str(args.graph or "<three_tiny>"))
    if not checked.ok:
        raise SystemExit(f"{args.graph} does not check")
    rows = measure(checked.graph, packs=[int(k) for k in args.packs.split(",")], device=args.device,
                   hfta=args.hfta, steps=args.steps)
    report = {"benchmark": "ops per packed step", "graph": str(args.graph or "three_tiny"), "device": args.device,
              "hfta": args.hfta, "rows": rows}
    out = json.dumps(report, indent=2)
    print(out)
    if args.json:
        args.json.write_text(out + "\n")
    return report


if __name__ == "__main__":
    main()
