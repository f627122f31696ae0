"""`keep_freed_memory`: a CPU step's freed activations stay in the process for the next step.

Measured by the kernel, not by timing: the minor page faults of a third round of eight 20
MiB allocations (a step's activations), each round freed before the next. 160 MiB is more
than twice glibc's largest adaptive mmap threshold (32 MiB), so with its defaults the freed
round is always trimmed and faulted in again, whatever the interpreter allocated before. Each case runs in a
fresh interpreter, since the setting is process-wide and sticks.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from dclang.compile import compile_graph  # noqa: F401 (importing must not change malloc)
    from dclang.compile.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()

    def one_step():
        activations = [torch.empty(5 * 2**20).fill_(1.0) for _ in range(8)]
        del activations

    one_step(); one_step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one_step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

PAGES_OF_A_BLOCK = 20 * 2**20 // 4096


def third_step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and getrusage page-fault counts")
def test_freed_activations_are_not_faulted_in_again():
    # glibc's defaults hand freed blocks back to the OS and fault them in again: more than one
    # 20 MiB block each time (seen: all eight, 40,928 pages), the check that the measurement
    # can fail.
    # With the setting the step touches no new page, except that now and then one block the
    # heap cannot grow into contiguously is mapped by itself and faulted like any fresh
    # mapping (seen: 5,120 pages, three times in a row on a loaded machine): at most one.
    one_block = PAGES_OF_A_BLOCK + PAGES_OF_A_BLOCK // 20
    assert min(third_step_faults("plain") for _ in range(3)) > one_block
    assert min(third_step_faults("keep") for _ in range(3)) <= one_block

def test_cpu_engines_keep_freed_memory(monkeypatch):
    import torch

    import dclang.compile as compile_pkg
    from dclang.api import check

    calls = []
    monkeypatch.setattr(compile_pkg, "keep_freed_memory", lambda: calls.append(True) or True)
    graph = check("graph g\ndata digits { }\nnode a : mlp [target]\nlabel -> a : through\n").graph
    for engine in ("reference", "fused"):
        compile_pkg.compile_graph(graph, num_classes=10, in_channels=1, image_size=8, device=torch.device("cpu"),
                                  engine=engine, steps_per_epoch=1, epochs=1)
    assert len(calls) == 2
