"""Every file the front end writes (`draw -o`, `fmt -w`) ends in a clear error when it cannot
be written: a file where a folder should be, a folder where the file should be, a folder
without write permission, a read-only file system. Real file systems throughout: the
permission case runs without the capabilities that let root write anywhere, the read-only
case in a private mount namespace with a read-only bind mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dclang.cli import main

ROOT = Path(__file__).resolve().parent.parent
KT = ROOT / "examples" / "kd.kt"
DCLANG = [sys.executable, "-c", "from dclang.cli import main; main()"]
UNFORMATTED = "graph g\ndata digits { }\nnode a : mlp [target]\nlabel ->   a : through\n"


def _refused(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


@pytest.mark.needs_dot
def test_a_file_where_a_folder_should_be(tmp_path):
    runner = CliRunner()
    (tmp_path / "afile").write_text("in the way\n", encoding="utf-8")
    for output in ("afile/g.png", "afile/deeper/g.dot"):
        result = runner.invoke(main, ["draw", str(KT), "-o", str(tmp_path / output)])
        _refused(result, f"cannot write {tmp_path / output}: {tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "in the way\n"


def test_a_folder_where_the_file_should_be(tmp_path):
    result = CliRunner().invoke(main, ["draw", str(KT), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_report_into_a_folder_under_a_file(tmp_path):
    import torch

    from dclang.api import check
    from dclang.data import load_dataset
    from dclang.train import train_graph

    graph = check("graph g\ndata digits { val_split = 100 }\ntrain { epochs = 1 }\nnode a : mlp [target]\n"
                  "label -> a : through\n").graph
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digits = load_dataset("digits", data_dir=None, val_split=100, split_seed=0)
        train_graph(graph, run_dir=tmp_path / "run", device="cpu", progress=False, dataset=digits)
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "afile").write_text("x\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path / "run"), "-o", str(tmp_path / "afile" / "report")])
    _refused(result, "cannot write", str(tmp_path / "afile" / "report"))  # report.py's words
    result = runner.invoke(main, ["report", str(tmp_path / "run"), "-o", str(tmp_path / "afile")])
    assert result.exit_code == 2 and "is a file" in result.output  # click's own check of -o


def _without_override() -> list[str]:
    """A prefix that runs a command subject to file permissions: nothing for a user, and for
    root (whom permissions do not stop) `setpriv` without the capabilities that override them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root may write into any folder")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.mark.needs_dot
def test_a_folder_without_write_permission(tmp_path):
    prefix = _without_override()
    locked = tmp_path / "locked"
    locked.mkdir()
    try:
        (locked / "g.kt").write_text(UNFORMATTED, encoding="utf-8")
        locked.chmod(0o555)  # the file may be written, its folder (for the atomic rename) not
        for args, what in ((["draw", str(KT), "-o", str(locked / "g.svg")], locked / "g.svg"),
                           (["draw", str(KT), "-o", str(locked / "sub" / "g.svg")], locked / "sub" / "g.svg"),
                           (["fmt", "-w", str(locked / "g.kt")], locked / "g.kt")):
            result = subprocess.run([*prefix, *DCLANG, *args], capture_output=True, text=True, timeout=120)
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr
            assert f"cannot write {what}: there is no permission to write in {locked}" in result.stderr
        assert (locked / "g.kt").read_text(encoding="utf-8") == UNFORMATTED
    finally:
        locked.chmod(0o755)  # for pytest to remove it


@pytest.mark.needs_dot
def test_a_read_only_file_system(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a private read-only mount needs `unshare` and root")
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "g.kt").write_text(UNFORMATTED, encoding="utf-8")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,ro,bind {folder} {folder}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mounts here: {probe.stderr.decode(errors='replace').strip()}")
    dclang = " ".join(f"'{a}'" for a in DCLANG)
    script = (f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} {folder} && "
              f"{dclang} draw '{KT}' -o '{folder}/g.svg'; {dclang} fmt -w '{folder}/g.kt'")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr
    assert f"cannot write {folder}/g.svg: {folder} is on a read-only file system" in result.stderr
    assert f"cannot write {folder}/g.kt: {folder} is on a read-only file system" in result.stderr
    assert (folder / "g.kt").read_text(encoding="utf-8") == UNFORMATTED


def test_a_graph_too_dense_to_draw_is_refused_at_once_and_still_written_as_dot(tmp_path):
    """40 nodes joined each to each: 820 drawn edges, which `dot` would lay out for minutes."""
    nodes = "".join(f"node n{i} : cnn_tiny{' [target]' * (i == 0)}\n" for i in range(40))
    kt = tmp_path / "dense.kt"
    kt.write_text(f"graph dense\ndata digits {{ val_split = 100 }}\ntrain {{ epochs = 1 }}\n{nodes}"
                  "edges * -> * : through\n")
    refused = CliRunner().invoke(main, ["draw", str(kt), "-o", str(tmp_path / "dense.svg")])
    assert refused.exit_code == 1 and "820 edges are too many to lay out" in refused.output, refused.output
    assert "dense.dot" in refused.output and not (tmp_path / "dense.svg").exists()
    written = CliRunner().invoke(main, ["draw", str(kt), "-o", str(tmp_path / "dense.dot")])
    assert written.exit_code == 0 and (tmp_path / "dense.dot").read_text().count("->") >= 820
