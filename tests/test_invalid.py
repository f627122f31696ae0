"""A corpus of invalid files, one mistake each, with the exact diagnostics a user sees.

Each `tests/invalid/NAME.kt` says in its second line which codes it must produce
(`# expect: E202`); `NAME.expected` holds the rendered text (`render_all(..., color=False)`),
regenerated with `pytest --update-golden`. Files are checked from a scratch folder laid out
like the repository, so checkpoints the test writes sit beside them and paths in the
messages are the same on every machine.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from dclang.api import check
from dclang.diagnostics import render_all

HERE = Path(__file__).resolve().parent
CORPUS = sorted((HERE / "invalid").glob("*.kt"))

#: mistakes whose help line must offer the right spelling
MISSPELT = {
    "misspelt_gate": "`through`", "misspelt_gate_in_choice": "`cutoff`", "misspelt_model": "`resnet",
    "misspelt_dataset": "`cifar100`", "misspelt_node": "`teacher` (declared on line", "misspelt_setting": "`epochs`",
    "misspelt_optimizer": "`sgd`", "misspelt_optimizer_option": "`momentum`",
    "misspelt_schedule_option": "`milestones`",
    "misspelt_loss": "`kl`", "misspelt_loss_option": "`T`", "misspelt_attribute": "`target`",
    "unknown_augment": "`pad_crop_flip`", "library_model_misspelt": "`resnet18`",
    "model_bad_arguments": "`weights`", "ema_unknown_source": "`student`", "ema_unknown_argument": "`decay`",
    "branch_unknown_source": "`a`", "branch_arguments": "`from`", "branch_unknown_layer": "`layer3`",
}


def _teacher_checkpoint(case: str, folder: Path) -> None:
    """The checkpoint a `ckpt_*` case points at, made with the real model zoo and torch.save."""
    if case in ("ckpt_missing",) or not case.startswith("ckpt_"):
        return
    path = folder / "teacher.pt"
    if case == "ckpt_is_directory":  # it exists, but is no file
        path.mkdir()
        return
    if case == "ckpt_corrupt":
        path.write_text("this is not a checkpoint\n", encoding="utf-8")
        return
    if case == "ckpt_truncated":
        path.write_bytes(b"")
        return
    import torch

    from dclang.checkpoints import node_checkpoint
    from dclang.models import build_model

    torch.manual_seed(0)
    if case in ("ckpt_wrong_model", "ckpt_wrong_classes"):
        state = build_model("cnn_tiny", 10, 1, 8).state_dict()
        torch.save(node_checkpoint("cnn_tiny", 10, state), path)
    elif case == "ckpt_tampered":  # written by dclang, then one byte of the weights changed
        from dclang.checkpoints import atomic_save

        atomic_save(node_checkpoint("cnn_small", 10, build_model("cnn_small", 10, 1, 8).state_dict()), path)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif case == "ckpt_bare_state_dict_mismatch":
        torch.save(build_model("mlp", 10, 1, 8).state_dict(), path)
    else:
        raise AssertionError(f"no checkpoint recipe for {case}")


def _expected_codes(text: str) -> list[str]:
    match = re.search(r"^# expect: (.+)$", text, re.M)
    assert match, "the second line of an invalid file says `# expect: CODE ...`"
    return sorted(match.group(1).split())


def _check_case(path: Path, tmp_path: Path, monkeypatch):
    display = f"tests/invalid/{path.name}"
    folder = tmp_path / "tests" / "invalid"
    folder.mkdir(parents=True)
    shutil.copy(path, folder / path.name)
    _teacher_checkpoint(path.stem, folder)
    if path.stem == "library_not_installed":  # installed or not here, the case is about a machine without it
        monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.chdir(tmp_path)
    text = path.read_text(encoding="utf-8")
    return text, check(text, display)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_diagnostics(path, tmp_path, monkeypatch, golden):
    text, checked = _check_case(path, tmp_path, monkeypatch)
    codes = sorted(d.code for d in checked.diagnostics)
    assert codes == _expected_codes(text), render_all(checked.diagnostics, text, path.name)
    if path.stem != "warnings_only":
        assert not checked.ok
    else:
        assert checked.ok
    rendered = render_all(checked.diagnostics, text, f"tests/invalid/{path.name}", color=False)
    assert "Traceback" not in rendered
    golden(path.with_suffix(".expected"), rendered + "\n")


@pytest.mark.parametrize("case", sorted(MISSPELT))
def test_misspellings_get_a_suggestion(case, tmp_path, monkeypatch):
    path = HERE / "invalid" / f"{case}.kt"
    _, checked = _check_case(path, tmp_path, monkeypatch)
    helps = [d.help for d in checked.diagnostics]
    assert any(h.startswith("did you mean") and MISSPELT[case] in h for h in helps), helps


def test_every_mistake_in_a_file_is_reported(tmp_path, monkeypatch):
    path = HERE / "invalid" / "several_mistakes.kt"
    text, checked = _check_case(path, tmp_path, monkeypatch)
    assert len(checked.errors) == len(_expected_codes(text)) >= 10
    lines = [d.span.line for d in checked.diagnostics if d.span]
    assert lines == sorted(lines), "diagnostics come in source order"


def test_each_diagnostic_points_inside_its_line(tmp_path, monkeypatch):
    """Every caret sits under text that exists: a span never points past its line."""
    for path in CORPUS:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for diag in check(text, str(path)).diagnostics:
            if diag.span is None:
                continue
            assert 1 <= diag.span.line <= len(lines), (path.name, diag)
            assert 1 <= diag.span.column <= len(lines[diag.span.line - 1]) + 1, (path.name, diag)


def test_corpus_covers_every_code():
    """Each diagnostic code the front end can give appears in at least one corpus file."""
    root = HERE.parent / "dclang"
    codes = set()
    for source in [*root.glob("passes/*.py"), root / "syntax" / "parser.py", root / "checkpoints.py"]:
        codes |= set(re.findall(r'"([EW]\d{3})"', source.read_text(encoding="utf-8")))
    covered = set()
    for path in CORPUS:
        covered |= set(_expected_codes(path.read_text(encoding="utf-8")))
    assert codes - covered == set()
