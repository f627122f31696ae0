"""The user's own models through the `dclang.models` entry-point group.

The example package in examples/plugin/ is installed for real (`pip install --target`, from a
copy, offline), so its entry point is found by importlib.metadata as any installed package's
would be; the graph that uses it is trained by `dclang run` in a real process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dclang.api import check

ROOT = Path(__file__).resolve().parents[1]

GRAPH = """\
graph plugin
data digits { val_split = 100 }
train { epochs = 1  batch = 64 }
node s : cnn_tiny            [target]
node m : tiny_mixer(width=8)
label -> s : through
label -> m : through
m     -> s : through kl(T=2)
s     -> m : through
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """A folder where examples/plugin is pip-installed, dist-info and entry points included."""
    tmp = tmp_path_factory.mktemp("plugin")
    source, site = tmp / "source", tmp / "site"
    shutil.copytree(ROOT / "examples" / "plugin", source)  # the build writes beside the sources
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(source)]
    # offline with this environment's setuptools first; a venv whose own setuptools cannot build
    # wheels (no `wheel`, setuptools < 70.1) builds in pip's isolated environment instead
    for extra in (["--no-build-isolation", "--no-index"], []):
        done = subprocess.run(install + extra, capture_output=True, text=True)
        if done.returncode == 0:
            return site
    pytest.skip("pip cannot build examples/plugin in this environment (offline, and this environment's "
                f"setuptools cannot build wheels): {done.stderr.strip().splitlines()[-1:]}")


def _codes(text: str) -> list[str]:
    return sorted(d.code for d in check(text).errors)


def test_plugin_is_trained_in_a_graph(plugin_site, tmp_path):
    (tmp_path / "g.kt").write_text(GRAPH, encoding="utf-8")
    env = {**__import__("os").environ, "PYTHONPATH": str(plugin_site)}
    proc = subprocess.run([sys.executable, "-m", "dclang", "run", "g.kt", "-o", "out", "--no-progress",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads((tmp_path / "out" / "summary.json").read_text())["nodes"]
    # TinyMixer(width=8) on 1x8x8 digits, 16 tokens: embed 1*8*4+8, two LayerNorms 2*16,
    # token mix 16*16+16, channel mix 8*8+8, head 8*10+10
    assert nodes["m"]["model"] == "tiny_mixer(width=8)"
    assert nodes["m"]["params"] == 40 + 32 + 272 + 72 + 90
    assert 0.0 <= nodes["m"]["final_test_acc"] <= 1.0
    assert "tiny_mixer(width=8)" in (tmp_path / "out" / "graph.kt").read_text()


def test_check_knows_only_what_is_installed(plugin_site, monkeypatch):
    assert _codes(GRAPH) == ["E200"], "not installed: an unknown model"
    monkeypatch.syspath_prepend(str(plugin_site))
    assert _codes(GRAPH) == []
    misspelt = check(GRAPH.replace("tiny_mixer(width=8)", "tiny_mixr"))
    assert [(d.code, d.help) for d in misspelt.errors] == [("E200", "did you mean `tiny_mixer`?")]
    bad = check(GRAPH.replace("width=8", "widht=8, num_classes=3"))
    assert [(d.code, d.message) for d in bad.errors] == [
        ("E221", "`tiny_mixer` takes no argument `widht`"), ("E221", "`num_classes` is set by dclang")]
    assert bad.errors[0].help == "did you mean `width`?"
    assert bad.errors[0].span.line == 5 and bad.errors[0].span.column == 21


def test_a_name_in_a_file_imports_nothing_unregistered(tmp_path, monkeypatch):
    """A module on the path that the file names, but no package registered, is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "kt_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef net(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = GRAPH.replace("tiny_mixer(width=8)", "kt_probe.net(width=8)") + "node p : kt_probe\nlabel -> p : through\n"
    checked = check(textwrap.dedent(text))
    assert [(d.code, d.message) for d in checked.errors] == [
        ("E200", "unknown model library `kt_probe`"), ("E200", "unknown model `kt_probe`")]
    assert not marker.exists() and "kt_probe" not in sys.modules


def test_dclang_models_lists_and_describes_the_plugin(plugin_site, monkeypatch):
    from dclang.models.command import catalogue, describe

    monkeypatch.syspath_prepend(str(plugin_site))
    assert "    tiny_mixer  dclang_example_models.nets:tiny_mixer  from dclang-example-models" in catalogue()
    lines = describe("tiny_mixer(width=8)", "digits")
    assert lines[0] == "tiny_mixer(width=8) for digits (10 classes, 1x8x8 images): 506 parameters"
    assert any(line.split()[:3] == ["embed", "Conv2d", "8x4x4"] for line in lines)
