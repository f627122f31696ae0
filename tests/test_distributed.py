"""Data-parallel training (dclang.train.distributed) against one process on the same global batch.

Two real processes (torch.multiprocessing spawn, gloo on the CPU) train several graphs with
`DistributedTrainStep`; the test process trains the same graphs alone on the whole batches.
Models run in float64.

- Without BatchNorm (`mlp` nodes) the two are the same computation summed in another order:
  parameters, optimizer state and step statistics agree to rtol 1e-9 / atol 1e-12, for the
  fused engine, the reference engine (one all-reduce per node), HFTA's fused tensors, a mean
  teacher (`ema`, in both engines), and a batch the processes split unevenly (8 + 7).
- With BatchNorm (`cnn_tiny` nodes) each process normalises with its own slice's statistics,
  as standard DDP does, so training really differs: after 4 SGD steps, parameters, running
  statistics and losses agree to atol 5e-3 (the correct counts differ by a few samples), while the parameters have
  moved by more than 1e-2 (about 3e-2 measured) from where both started.
- The replicas in the two processes are bitwise identical.

`torchrun --nproc_per_node 2 -m dclang run` (the CLI path through `train_graph`'s hooks) is
checked once against `train_graph` alone on an `mlp` graph in float32: last.pt agrees to
atol 1e-6 and the per-epoch metrics to 1e-6, and rank 0 alone wrote the run directory.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensor_trees import assert_tree_close

from dclang.api import check
from dclang.compile import StepOptions, compile_graph
from dclang.diagnostics import UserError
from dclang.train.distributed import DistEnv, setup

EXACT = dict(rtol=1e-9, atol=1e-12)
BATCHNORM = dict(rtol=0, atol=5e-3)
CLASSES, STEPS_PER_EPOCH, EPOCHS = 3, 2, 2
WORLD = 2


def graph_text(model: str, ema: bool = False) -> str:
    """Every gate, a frozen teacher, a schedule step, Nesterov momentum and weight decay; with
    `ema`, a mean teacher of `a` teaching `b` (its update follows the reduced optimizer step)."""
    return f"""
graph ddp
data digits {{ }}
train {{
  epochs = 2
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = step(milestones=[1], gamma=0.5)
}}
node a : {model} [target]
node b : {model}
node t : {model} [frozen]
label -> a : through
label -> b : linear
a -> b : correct kl(T=2)
b -> a : through kl(weight=0.5)
t -> a : linear kl(T=3)
""" + (MEAN_TEACHER if ema else "")


MEAN_TEACHER = "node m : ema(a, decay=0.5)\nm -> b : correct kl(T=2)\n"


# name: (model, engine, options, global batch)
SCENARIOS = {
    "mlp_fused": ("mlp", "fused", None, 16),
    "mlp_reference_uneven": ("mlp", "reference", None, 15),
    "mlp_hfta": ("mlp", "fused", StepOptions(hfta=True), 16),
    "mlp_ema_fused": ("mlp", "fused", None, 16),
    "mlp_ema_reference": ("mlp", "reference", None, 16),
    "bn_fused": ("cnn_tiny", "fused", None, 16),
}


def build(name: str):
    model, engine, options, _ = SCENARIOS[name]
    checked = check(graph_text(model, ema="ema" in name))
    assert checked.ok, checked.errors
    return compile_graph(checked.graph, num_classes=CLASSES, in_channels=1, image_size=8,
                         device=torch.device("cpu"), engine=engine, seed=0, steps_per_epoch=STEPS_PER_EPOCH,
                         epochs=EPOCHS, options=options)


def batches(size: int):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(size, 1, 8, 8, generator=gen, dtype=torch.float64),
             torch.randint(0, CLASSES, (size,), generator=gen)) for _ in range(STEPS_PER_EPOCH * EPOCHS)]


def train(step, size: int) -> dict:
    """Train on the scenario's batches; the models, optimizer state and every step's stats."""
    stats = []
    for k, (x, y) in enumerate(batches(size), start=1):
        s = step.step(x, y, k)
        stats.append({f: {n: v.clone() for n, v in getattr(s, f).items()}
                      for f in ("node_loss", "node_correct", "edge_loss", "edge_gate", "edge_pass")})
        if k % STEPS_PER_EPOCH == 0:
            step.end_epoch()
    return copy.deepcopy({"models": {n: m.state_dict() for n, m in step.models.items()},
                          "optimizers": step.state_dict()["optimizers"], "stats": stats})


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    env = DistEnv(rank, WORLD, rank, "cpu")
    try:
        for name, (*_, size) in SCENARIOS.items():
            step = env.wrap(build(name), train_size=size * STEPS_PER_EPOCH, batch=size)
            torch.save(train(step, size), Path(out) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every scenario trained by 2 processes: {name: [rank 0 result, rank 1 result]}."""
    out = tmp_path_factory.mktemp("ddp")
    # fork, not spawn: the children inherit the imported torch instead of importing it again
    mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(WORLD)] for name in SCENARIOS}


@pytest.mark.parametrize("name", [n for n in SCENARIOS if not n.startswith("bn")])
def test_without_batchnorm_two_processes_equal_one(name, two_processes, float64):
    alone = train(build(name), SCENARIOS[name][3])
    assert_tree_close(two_processes[name][0], alone, **EXACT)


def test_with_batchnorm_two_processes_stay_close_to_one(two_processes, float64):
    alone = train(build("bn_fused"), 16)
    ddp = two_processes["bn_fused"][0]
    start = build("bn_fused").models
    for node in ("a", "b"):
        moved = max((alone["models"][node][k] - v).abs().max().item()
                    for k, v in start[node].named_parameters())
        assert moved > 1e-2, "the test must train enough for a BatchNorm difference to show"
    assert_tree_close(ddp["models"], alone["models"], **BATCHNORM)
    for got, want in zip(ddp["stats"], alone["stats"]):  # (correct counts differ: other normalisation)
        assert_tree_close({f: got[f] for f in ("node_loss", "edge_loss")},
                          {f: want[f] for f in ("node_loss", "edge_loss")}, **BATCHNORM)
    assert_tree_close(ddp["models"]["t"], alone["models"]["t"], rtol=0, atol=0)  # frozen: untouched


@pytest.mark.parametrize("name", SCENARIOS)
def test_replicas_are_identical(name, two_processes):
    rank0, rank1 = two_processes[name]
    assert_tree_close(rank1, rank0, rtol=0, atol=0)


CLI_GRAPH = """
graph cli
data digits { }
train { epochs = 1  batch = 64  optimizer = sgd(lr=0.05, momentum=0.9) }
node a : mlp [target]
node b : mlp
label -> a : through
label -> b : linear
a -> b : correct kl(T=2)
b -> a : through
"""


def test_torchrun_dclang_run_trains_like_one_process(tmp_path):
    from dclang.train.loop import train_graph

    kt = tmp_path / "cli.kt"
    kt.write_text(CLI_GRAPH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCLANG_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dclang", "run", str(kt), "--device", "cpu", "-o", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test @ best-val") == 1  # the final table: rank 0 alone prints
    alone = train_graph(check(CLI_GRAPH).graph, run_dir=tmp_path / "one", device="cpu", progress=False)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=False)["train_step"]["models"]
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=False)["train_step"]["models"]
    assert_tree_close(two, one, rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(records, alone.records):
        assert_tree_close(got["nodes"], want["nodes"], rtol=0, atol=1e-6)


def test_refuses_batches_smaller_than_the_world():
    env = DistEnv(0, 4, 0, "cpu")
    with pytest.raises(UserError, match="4 processes cannot share a batch of 2"):
        env.wrap(None, train_size=1002, batch=100)
    with pytest.raises(UserError, match="cannot share a batch of 3"):
        env.wrap(None, train_size=99, batch=3)


def test_setup_is_none_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup("cpu") is None
