"""Operations and seconds per step of K packed trials of one architecture mix, against one trial.

    OMP_NUM_THREADS=1 python benchmarks/pack_ops.py --packs 1,2,4,8 --hfta             # default graph below
    python benchmarks/pack_ops.py --graph examples/dml4.kt --packs 1,2,4 --device cuda --hfta
    python benchmarks/pack_ops.py --graph benchmarks/graphs/three_resnet32.kt --packs 8,16 --device cuda \
        --variants hfta,hfta+cudagraph,hfta+bf16+channels_last+cudagraph

A pack step is one step of the fused engine over the K trials (`dclang.compile.engine.Engine`: one forward and
one backward for all, with `--hfta` nodes of one architecture fused across the trials; each trial
with its own batch, optimizer state and k). The baseline is one trial alone: its own fused step
(with `--hfta`, its nodes fused within it), as `dclang run` trains it. Reported per K: the
computing operations a pack step dispatches (`dclang.bench.count_ops`, each a kernel launch on a
GPU), the median seconds of a pack step, and both divided by the lone trial's. Synthetic batches
of the graph's dataset shape: no data is read.

`--variants` measures the pack and the lone trial with each set of fast paths (words joined by
`+`: hfta, bf16, channels_last, cudagraph, compile; `plain` for none), the same options for
both; a CUDA-graph variant's operations are not counted (a replay dispatches none). The first
variant's figures are also the report's top-level `alone` and `rows`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

#: three trainable nodes of one architecture (MODEL: --model) on digits: what HFTA fuses within a trial
DEFAULT_GRAPH = """\
graph three_tiny
data digits { val_split = 300 }
train { epochs = 4  batch = 64 }
node n1 : MODEL [target]
node n2 : MODEL
node n3 : MODEL
edges * -> * : through
"""


def options_of(variant: str):
    """`StepOptions` from a variant's words (`hfta+bf16+channels_last+cudagraph`, `plain`)."""
    from dclang.compile import StepOptions

    words = set(variant.split("+")) - {"plain", "fused"}
    unknown = words - {"hfta", "bf16", "channels_last", "cudagraph", "compile"}
    if unknown:
        raise SystemExit(f"pack_ops.py: unknown fast path(s) {', '.join(sorted(unknown))} in `{variant}`")
    return StepOptions(hfta="hfta" in words, precision="bf16" if "bf16" in words else "fp32",
                       channels_last=True if "channels_last" in words else None, cuda_graph="cudagraph" in words,
                       compile="compile" in words)


def measure(graph, *, packs: list[int], device: str, options, steps: int) -> dict:
    import torch

    from dclang.bench import count_ops
    from dclang.compile import Engine, StepMember, compile_graph
    from dclang.compile.accelerate import CUDA_GRAPH_WARMUP
    from dclang.data.catalog import DATASETS
    from dclang.train.run import resolve_device

    dev = resolve_device(device)
    info = DATASETS[graph.graph["data"].dataset]
    train = graph.graph["train"]
    generator = torch.Generator().manual_seed(0)

    def build(seed: int, options, member: bool = False):
        return compile_graph(graph, num_classes=info.num_classes, in_channels=info.channels,
                             image_size=info.image_size, device=dev, seed=seed, steps_per_epoch=100, epochs=1,
                             options=options, member=member)

    def batch():
        return (torch.randn(train.batch, info.channels, info.image_size, info.image_size, generator=generator).to(dev),
                torch.randint(0, info.num_classes, (train.batch,), generator=generator).to(dev))

    warmup = CUDA_GRAPH_WARMUP + 2 if options.cuda_graph else 2  # a capture comes after its eager warm-up

    def timed(run) -> tuple[int | None, float]:
        for update in range(1, warmup + 1):
            run(update)
        ops = None if options.cuda_graph else count_ops(run, warmup + 1)
        times = []
        for update in range(warmup + 2, warmup + 2 + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
            run(update)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - started)
        return ops, statistics.median(times)

    alone = build(0, options)  # channels-last left unset: where `dclang run` puts it (CPU convolutions)
    x, y = batch()
    alone_ops, alone_seconds = timed(lambda update: alone.step(x, y, update))
    rows = []
    for k in packs:
        members = [StepMember.of(build(i, None, member=True), graph) for i in range(k)]
        engine = Engine(members, options, packed=True)
        data = [batch() for _ in range(k)]
        ops, seconds = timed(lambda update, engine=engine, data=data:
                             engine.step_all([(xi, yi, update) for xi, yi in data]))
        rows.append({"pack": k, "ops_per_step": ops, "seconds_per_step": seconds,
                     "ops_ratio_to_one": None if ops is None else ops / alone_ops,
                     "seconds_ratio_to_one": seconds / alone_seconds, "seconds_per_trial_step": seconds / k})
        del engine, members
    return {"alone": {"label": alone.label, "ops_per_step": alone_ops, "seconds_per_step": alone_seconds},
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    from dclang.api import check

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", type=Path, help="a .kt file (default: three --model nodes on digits)")
    parser.add_argument("--model", default="cnn_tiny", help="the default graph's model")
    parser.add_argument("--packs", default="1,2,4,8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hfta", action="store_true", help="the one variant `hfta` (without --variants)")
    parser.add_argument("--variants", help="fast paths to measure with, e.g. hfta,hfta+bf16+channels_last+cudagraph")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    text = args.graph.read_text() if args.graph else DEFAULT_GRAPH.replace("MODEL", args.model)
    checked = check(text, str(args.graph or "<three_tiny>"))
    if not checked.ok:
        raise SystemExit(f"{args.graph} does not check")
    variants = (args.variants or ("hfta" if args.hfta else "plain")).split(",")
    packs = [int(k) for k in args.packs.split(",")]
    measured = {v: measure(checked.graph, packs=packs, device=args.device, options=options_of(v), steps=args.steps)
                for v in variants}
    report = {"benchmark": "ops per packed step", "graph": str(args.graph or "three_tiny"), "device": args.device,
              "hfta": "hfta" in variants[0].split("+"), **measured[variants[0]], "variants": measured}
    out = json.dumps(report, indent=2)
    print(out)
    if args.json:
        args.json.write_text(out + "\n")
    return report


if __name__ == "__main__":
    main()
