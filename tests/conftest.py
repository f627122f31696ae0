"""Shared pytest options and fixtures."""

from __future__ import annotations

import os as _os
import shutil
import shutil as _shutil
import subprocess as _subprocess
import sys as _sys
from pathlib import Path

import pytest

# ---------------------------------------------------------------- float64


@pytest.fixture
def float64():
    """Build and run models in float64, so engines can be compared to a tight tolerance."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def no_tf32():
    """fp32 CUDA kernels without TF32 (`dclang.compile.tf32`): what a test holding two ways of
    computing a step equal in float32 compares, since TF32 rounds each product to ~1e-3."""
    from dclang.compile.tf32 import tf32

    with tf32(False):
        yield


# ---------------------------------------------------------------- a broken torchvision


@pytest.fixture
def broken_torchvision(tmp_path) -> Path:
    """A folder to put first on PYTHONPATH holding a real `torchvision` package whose import
    fails as a torchvision built for another torch does, with its own metadata (0.28.0)."""
    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n', encoding="utf-8")
    (fake / "torchvision-0.28.0.dist-info").mkdir()
    (fake / "torchvision-0.28.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n", encoding="utf-8")
    return fake


# ---------------------------------------------------------------- golden files


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="Rewrite golden files (tests/golden/*, tests/invalid/*.expected) from the current "
                          "output instead of comparing against them.")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_dot: the test draws with Graphviz's `dot`; skipped where it is missing")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_dot") is not None and shutil.which("dot") is None:
        pytest.skip("Graphviz's `dot` is not installed (apt-get install graphviz, brew install graphviz)")


@pytest.fixture
def golden(request):
    """`golden(path, actual)`: assert `actual` equals the file's text, or rewrite it under --update-golden."""
    update = request.config.getoption("--update-golden")

    def compare(path: Path, actual: str) -> None:
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text(encoding="utf-8") != actual:
                path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"no golden file {path}; run `pytest --update-golden` and review the new file")
        expected = path.read_text(encoding="utf-8")
        assert actual == expected, f"{path} differs; if the change is intended, run `pytest --update-golden`"

    return compare


# ================================================================ dclang search
# Fixtures of the search tests (tests/test_search*.py). Workers are real processes
# (`python -m dclang search --worker`), so these run the CLI in a subprocess, with
# tests/ importable for the cheap deterministic trainer `fake_trainer:train`.


_TESTS = Path(__file__).resolve().parent


@pytest.fixture
def search_env():
    """Environment for `dclang search` subprocesses: tests/ on the path (fake_trainer), fast fake epochs."""
    env = dict(_os.environ)
    env["PYTHONPATH"] = _os.pathsep.join(p for p in (str(_TESTS), env.get("PYTHONPATH")) if p)
    env.setdefault("DCLANG_FAKE_SLEEP", "0.05")
    return env


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory) -> Path:
    """A finished search of 4 trials (none pruned, the cheap trainer) in made/out, made once by
    a real `dclang search` from made/template.kt; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("made")
    (root / "template.kt").write_text(
        "graph tiny\ndata digits { val_split = 300 }\ntrain { epochs = 2 }\n\n"
        "node n1 : mlp [target]\nnode n2 : choice(mlp, cnn_tiny)\n\n"
        "label -> n1 : through\nn2    -> n1 : choice(through, linear)\nlabel -> n2 : through\n", encoding="utf-8")
    env = dict(_os.environ)
    env["PYTHONPATH"] = _os.pathsep.join(p for p in (str(_TESTS), env.get("PYTHONPATH")) if p)
    env["DCLANG_FAKE_SLEEP"] = "0"
    done = _subprocess.run([_sys.executable, "-m", "dclang", "search", "--template", "template.kt", "--trials", "4",
                            "--pruner", "none", "-o", "out", "--trainer", "fake_trainer:train"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root / "out"


@pytest.fixture
def run_search(search_env):
    """`run_search(*args, env=None, timeout=120)`: run `python -m dclang search ARGS`, return the CompletedProcess."""

    def run(*args, env=None, timeout=120):
        return _subprocess.run([_sys.executable, "-m", "dclang", "search", *map(str, args)], capture_output=True,
                               text=True, env={**search_env, **(env or {})}, timeout=timeout)

    return run


@pytest.fixture
def study_trials():
    """`study_trials(storage, name)`: every trial of a study, read from its storage."""
    from dclang.search.study import load_study, open_storage

    def read(storage, name):
        study, config = load_study(open_storage(str(storage)), name)
        return study.get_trials(deepcopy=False), config

    return read


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL URL: $DCLANG_TEST_POSTGRES, else a server started by .ci/start-postgres
    (as root, with Debian's PostgreSQL installed) and stopped at the end; else the test skips."""
    if _os.environ.get("DCLANG_TEST_POSTGRES"):
        yield _os.environ["DCLANG_TEST_POSTGRES"]
        return
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    initdb = installed[-1] if installed else None
    if _os.geteuid() != 0 or initdb is None or _shutil.which("runuser") is None:
        pytest.skip("no PostgreSQL: set DCLANG_TEST_POSTGRES=postgresql://..., or run as root with PostgreSQL "
                    "installed (apt-get install postgresql) so .ci/start-postgres can start one")
    started = _subprocess.run(["bash", str(_TESTS.parent / ".ci" / "start-postgres")], capture_output=True,
                              text=True, timeout=120)
    if started.returncode != 0:
        pytest.skip(f".ci/start-postgres failed: {started.stderr.strip()[-500:]}")
    folder = started.stderr.split("server in ", 1)[1].split(" ", 1)[0]
    yield started.stdout.strip()
    _subprocess.run(["runuser", "-u", "postgres", "--", str(initdb.parent / "pg_ctl"), "-D", f"{folder}/data",
                     "-m", "immediate", "stop"], capture_output=True, timeout=60)
    _shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads
    spin against each other; one keeps these tests fast and steady. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
