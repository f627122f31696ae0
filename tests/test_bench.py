"""`dclang bench`: the documented JSON keys, with positive numbers, on a tiny graph.

No timing is asserted here (a test machine's speed says nothing); `benchmarks/README.md`
holds the measured figures. torch.compile is left out (`--variants`) to keep this fast;
tests/test_accelerate.py tests it.
"""

import json

import pytest
from click.testing import CliRunner

from dclang.cli import main

TINY = """
graph tiny
data digits { }
train { epochs = 1  batch = 32  optimizer = sgd(lr=0.05, momentum=0.9) }
node a : cnn_tiny [target]
node b : cnn_tiny
node c : mlp
node t : mlp [frozen]
label -> a : through
label -> b : linear
label -> c : through
a -> b : correct kl(T=2)
b -> a : through
t -> a : linear
c -> a : correct
"""

ENGINE_KEYS = {"s_per_step", "images_per_s", "peak_mem_bytes", "ratio_to_reference"}


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.kt"
    path.write_text(TINY)
    return path


def bench(*args):
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_bench_json_has_the_documented_keys(tiny):
    result = bench(tiny, "--steps", 2, "--warmup", 1, "--device", "cpu", "--variants", "fused,fused+hfta", "--json")
    out = json.loads(result.stdout)
    assert set(out["engines"]) == {"reference", "fused", "fused+hfta"}  # a, b share cnn_tiny
    for name, entry in out["engines"].items():
        assert ENGINE_KEYS <= set(entry), name
        assert all(entry[key] > 0 for key in ENGINE_KEYS), (name, entry)
    assert out["engines"]["reference"]["ratio_to_reference"] == 1.0
    assert out["floor_s_per_step"] > 0 and out["flops_per_step"] > 0
    assert out["steps"] == 2 and out["batch"] == 32 and out["device"]
    assert out["shape"] == {"num_classes": 10, "in_channels": 1, "image_size": 8}
    assert out["skipped"]["fused+cudagraph"] == "CUDA only"
    assert out["run_default"] == "fused+channels_last"  # cnn_tiny convolves, on the CPU
    # a and b (cnn_tiny) run as one grouped network: fewer operations than two
    ops = {name: entry["ops_per_step"] for name, entry in out["engines"].items()}
    assert 0 < ops["fused+hfta"] < ops["fused"] and out["floor_ops_per_step"] > 0


def test_count_ops_counts_each_dispatched_aten_operation():
    import torch

    from dclang.bench import count_ops

    def run(k):
        x = torch.ones(3, requires_grad=True)
        (x * k).sum().backward()  # the three forward operations, then backward's own

    assert count_ops(lambda k: torch.ones(3).add_(k), 2) == 2
    assert count_ops(lambda k: torch.ones(3, 2).t()[1:].add_(k), 2) == 2  # t() and [1:] are views
    assert count_ops(run, 2) > count_ops(lambda k: (torch.ones(3) * k).sum(), 2) == 3


def test_bench_table_and_batch_option(tiny):
    out = bench(tiny, "--steps", 1, "--warmup", 1, "--device", "cpu", "--variants", "fused", "--batch", 8).stdout
    assert "batch 8, 1x8x8, 10 classes" in out
    for name in ("reference", "fused", "floor"):
        assert f"\n{name} " in out


def test_bench_epoch_compares_with_a_dataloader(tiny):
    result = bench(tiny, "--steps", 1, "--warmup", 1, "--device", "cpu", "--variants", "fused", "--epoch",
                   "--workers", 0, "--set", "train.batch=256", "--json")
    epoch = json.loads(result.stdout)["epoch"]
    assert epoch["dataset"] == "digits" and epoch["steps"] == -(-epoch["train_images"] // 256)
    assert epoch["dclang"]["variant"] == "fused" and epoch["dataloader"]["workers"] == 0
    assert epoch["dclang"]["epoch_s"] > 0 and epoch["dataloader"]["epoch_s"] > 0 and epoch["speedup"] > 0


def test_bench_refuses_unknown_variants(tiny):
    result = CliRunner().invoke(main, ["bench", str(tiny), "--device", "cpu", "--variants", "fused+jit"])
    assert result.exit_code == 1
    assert "unknown variant(s) fused+jit" in result.output


def test_bench_times_layer_edges_side_by_side(tmp_path):
    path = tmp_path / "layers.kt"
    path.write_text(TINY + "b.conv2 -> a.conv2 : through at(p=2)\n")
    out = json.loads(bench(path, "--steps", 1, "--warmup", 1, "--device", "cpu", "--variants",
                           "fused-no-layer-edges", "--json").stdout)
    assert set(out["engines"]) == {"reference", "fused", "fused-no-layer-edges"}
    # the same graph without the edge between layers: fewer operations, nothing else removed
    assert 0 < out["engines"]["fused-no-layer-edges"]["ops_per_step"] < out["engines"]["fused"]["ops_per_step"]


def test_bench_lists_the_combinations_and_skips_cuda_ones_on_a_cpu_with_the_reason(tiny):
    out = json.loads(bench(tiny, "--steps", 1, "--warmup", 1, "--device", "cpu", "--variants",
                           "fused+hfta+channels_last", "--json").stdout)
    assert set(out["engines"]) == {"reference", "fused", "fused+hfta+channels_last"}
    for name in ("fused+cudagraph", "fused+hfta+cudagraph", "fused+hfta+bf16+channels_last+cudagraph", "fused+bf16"):
        assert out["skipped"][name] == "CUDA only", name


def test_a_variant_failing_while_timed_is_a_note_not_a_traceback(tiny, monkeypatch):
    """A compiled step that works while warming up and then fails (a recompilation, say): the
    bench goes on with the others and says why that one has no figures."""
    import dclang.compile.accelerate as accelerate

    def flaky_compile(fn, **_):
        calls = []

        def run(*args):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("recompiling failed")
            return fn(*args)
        return run

    monkeypatch.setattr(accelerate.torch, "compile", flaky_compile)
    out = json.loads(bench(tiny, "--steps", 2, "--warmup", 1, "--device", "cpu", "--variants", "fused+compile",
                           "--json").stdout)
    assert set(out["engines"]) == {"reference", "fused"}
    assert out["skipped"]["fused+compile"] == "failed: RuntimeError: recompiling failed"


def test_a_compiler_leaving_torch_state_behind_fails_its_variant_only(tiny, monkeypatch):
    """torch 2.11 on an H200: a failed compile left the Python dispatcher's key on, and building
    the next variant raised "PythonDispatcherTLS was not set". The bench puts torch's thread
    state back after a failing variant."""
    import torch

    import dclang.compile.accelerate as accelerate

    def leaky_compile(fn, **_):
        calls = []

        def run(*args):  # compiles, then fails while timed, leaving the key on
            calls.append(1)
            if len(calls) == 1:
                return fn(*args)
            torch._C._dispatch_tls_set_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher, True)
            raise RuntimeError("backend failed")
        return run

    monkeypatch.setattr(accelerate.torch, "compile", leaky_compile)
    out = json.loads(bench(tiny, "--steps", 2, "--warmup", 1, "--device", "cpu", "--variants",
                           "fused+compile,fused+hfta", "--json").stdout)
    assert set(out["engines"]) == {"reference", "fused", "fused+hfta"}
    assert out["skipped"]["fused+compile"] == "failed: RuntimeError: backend failed"
    assert all(len(engine) > 0 for engine in out["engines"].values()) and out["floor_ops_per_step"] > 0
