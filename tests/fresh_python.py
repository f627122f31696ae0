"""Run a test's body in a fresh Python process, so that a crash fails one test, not the suite.

A native crash (a compiler backend that aborts, a segfault in an extension) kills the whole
pytest process: every later test is lost and no report is written. `run_in_fresh_python`
runs a module-level function of a test module in a child interpreter instead; an assertion
in it fails the test with the child's output, and a death by signal fails it naming the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

#: how much of the child's output a failure shows (its end: the traceback or the crash)
TAIL = 6000


def run_in_fresh_python(function, timeout: float = 900) -> None:
    """Call `function()` (module-level, no arguments, in a module under tests/) in a new
    interpreter with this one's environment; pytest.fail unless it returns normally."""
    module, name = function.__module__, function.__qualname__
    if "." in name or module == "__main__":
        raise ValueError(f"{module}.{name} is not a module-level function a fresh Python can import")
    code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}]; import importlib; "
            f"importlib.import_module({module!r}).{name}()")
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a native crash prints the Python stack it happened in
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=TESTS.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{module}.{name} did not finish within {timeout:.0f} s in its own Python process; its output "
                    f"ends with:\n{_tail(exc.stdout, exc.stderr)}")
    if done.returncode == 0:
        return
    output = _tail(done.stdout, done.stderr)
    if done.returncode < 0:
        number = -done.returncode
        try:
            what = signal.Signals(number).name
        except ValueError:
            what = "an unknown signal"
        pytest.fail(f"{module}.{name} crashed its Python process: killed by {what} (signal {number}); "
                    f"its output ends with:\n{output}", pytrace=False)
    pytest.fail(f"{module}.{name} failed in its own Python process (exit status {done.returncode}):\n{output}",
                pytrace=False)


def _tail(stdout, stderr) -> str:
    def text(x) -> str:
        return x.decode("utf-8", "replace") if isinstance(x, bytes) else (x or "")

    return (text(stdout) + text(stderr))[-TAIL:]
