"""README's quickstart is a newcomer's first contact: two commands, what they need before
them, where the results go; and CI runs README's test command, word for word."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
QUICKSTART = README[README.index("## Quickstart"):README.index("\n## ", README.index("## Quickstart") + 1)]
BLOCKS = re.findall(r"```\n(.*?)```", QUICKSTART, flags=re.S)


def test_the_quickstart_has_two_commands_install_and_run_then_test():
    assert len(BLOCKS) == 2, BLOCKS
    run, test = (b.strip() for b in BLOCKS)
    assert "\n" not in run and "\n" not in test, "one line each, to copy and paste"
    assert run.startswith("python3 -m pip install -e . && dclang run examples/quickstart.kt")
    assert "data digits" in (ROOT / "examples" / "quickstart.kt").read_text(encoding="utf-8")
    assert "pytest" in test and '".[test]"' in test


def test_prerequisites_come_before_the_commands():
    first = QUICKSTART.index("```")
    before = QUICKSTART[:first]
    assert "Graphviz" in before and "apt-get install graphviz" in before
    assert "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" in before
    assert re.search(r"about \d+ minutes on an idle 2-core machine", before)


def test_the_tested_torch_pair_is_the_one_ci_installs_and_pyproject_floors():
    """README names one pair of versions; CI installs exactly it, and pyproject accepts
    nothing older (an untested floor would promise what no test has seen)."""
    pair = re.search(r"tested with \*\*torch ([\d.]+) and torchvision ([\d.]+)\*\*", QUICKSTART)
    assert pair, "README states the tested torch and torchvision"
    torch, vision = pair.groups()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"pip install -q torch=={torch} torchvision=={vision}" in ci
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"torch>={torch}"' in pyproject and f'"torchvision>={vision}"' in pyproject
    assert f"torch=={torch} torchvision=={vision} --index-url" in QUICKSTART


def test_the_quickstart_says_where_its_results_are():
    after_run = QUICKSTART[QUICKSTART.index(BLOCKS[0]) + len(BLOCKS[0]):QUICKSTART.index(BLOCKS[1])]
    assert "runs/quickstart/" in after_run and "curves/NODE.png" in after_run and "summary.json" in after_run


def test_ci_runs_readmes_test_command_word_for_word():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test = BLOCKS[1].strip()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert test in commands
    assert sum("pytest" in line for line in commands) == 1, "no other test run beside README's"
