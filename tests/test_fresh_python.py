"""tests/fresh_python.py turns a crash of a test's own process into one failed test."""

from __future__ import annotations

import os
import signal

import pytest
from fresh_python import run_in_fresh_python


def passes() -> None:
    assert os.getpid() != int(os.environ["PARENT_PID"])  # it did run elsewhere


def fails() -> None:
    assert 1 + 1 == 3, "arithmetic"


def aborts() -> None:
    print("about to abort", flush=True)
    os.abort()


def is_killed() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_body_that_passes_passes_in_another_process(monkeypatch):
    monkeypatch.setenv("PARENT_PID", str(os.getpid()))
    run_in_fresh_python(passes)


def test_an_assertion_fails_the_test_with_the_childs_traceback():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exit status 1.*AssertionError: arithmetic"):
        run_in_fresh_python(fails)


@pytest.mark.parametrize("body, name", [(aborts, "SIGABRT"), (is_killed, "SIGSEGV")])
def test_a_crash_fails_the_test_naming_the_signal(body, name):
    number = getattr(signal, name).value
    said = rf"crashed its Python process: killed by {name} \(signal {number}\)"
    with pytest.raises(pytest.fail.Exception, match=said):
        run_in_fresh_python(body)


def test_a_hang_fails_the_test():
    with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
        run_in_fresh_python(hangs, timeout=1)


def hangs() -> None:
    import time

    time.sleep(60)


def test_only_importable_functions_are_taken():
    with pytest.raises(ValueError, match="not a module-level function"):
        run_in_fresh_python(lambda: None)
