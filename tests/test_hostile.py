"""Files that are not what they should be: each kind ends in a message that says what it is.

A `.kt` that is binary, UTF-16, holds a NUL or is 50 MB; a number of thousands of digits; an
`init` checkpoint that is a zip of junk or JSON; an `.npz` or image folder path that is a
folder, a device or a file, an `.npz` that holds pickled objects or whose header claims more
than the file has; a torchvision that does not match torch on the data path. None may give a
traceback, a hang, or read what it should refuse (a pickle is never unpickled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dclang.api import MAX_SOURCE_BYTES, check
from dclang.cli import main
from dclang.data import load_dataset
from dclang.data.catalog import DataError
from dclang.diagnostics import render_all

GRAPH = "graph g\ndata digits { val_split = 300 }\nnode a : cnn_tiny [target]\nlabel -> a : through\n"


@pytest.fixture
def runner():
    return CliRunner()


# ---------------------------------------------------------------- .kt files


@pytest.mark.parametrize("kind, content, says", [
    ("utf16", GRAPH.encode("utf-16"), "it is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8"),
    ("nul", GRAPH.replace("node a", "node\x00a").encode(), "byte 0x00 (NUL) on line 3: a .kt file is text"),
    ("binary", bytes(range(256)) * 4, "byte 0x00 (NUL) on line 1"),
    ("latin1", "# caf\u00e9\n".encode("latin-1") + GRAPH.encode(), "byte 0xe9 on line 1 is not UTF-8"),
    ("huge", GRAPH.encode() + b"# padding\n" * (MAX_SOURCE_BYTES // 10 + 1), "MiB, and a .kt file is at most 1 MiB"),
])
def test_a_kt_that_is_not_text_is_refused_by_every_command(runner, tmp_path, kind, content, says):
    path = tmp_path / f"{kind}.kt"
    path.write_bytes(content)
    for command in (["check"], ["fmt"], ["draw", "-o", str(tmp_path / "g.svg")],
                    ["run", "-o", str(tmp_path / "run")]):
        result = runner.invoke(main, [command[0], str(path), *command[1:]])
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        assert f"error[E001]: cannot read {path}: " in result.stderr and says in result.stderr, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "g.svg").exists()


def test_a_crlf_file_with_a_utf8_byte_order_mark_reads_as_its_text(tmp_path):
    path = tmp_path / "windows.kt"
    path.write_bytes(b"\xef\xbb\xbf" + GRAPH.replace("\n", "\r\n").encode())
    result = CliRunner().invoke(main, ["fmt", str(path)])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout and result.stdout.startswith("graph g\n")


def test_a_number_of_thousands_of_digits_is_a_located_error(runner, tmp_path):
    """Python refuses to read an int of more than 4300 digits (and would take minutes for
    millions): the parser refuses any number longer than a range could need, at the number."""
    digits = "9" * 5000
    text = GRAPH.replace("val_split = 300", f"val_split = {digits}")
    checked = check(text, "g.kt")
    assert [(d.code, d.span.line, d.span.column) for d in checked.errors] == [("E404", 2, 27)]
    assert "a number 5,000 characters long" in checked.errors[0].message
    assert len(render_all(checked.diagnostics, text, "g.kt")) < 1000, "the excerpt is a window, not the number"
    path = tmp_path / "g.kt"
    path.write_text(GRAPH, encoding="utf-8")
    result = runner.invoke(main, ["run", str(path), "--set", f"train.epochs={digits}", "-o", str(tmp_path / "r")])
    assert result.exit_code == 1 and "error[E404]: a number 5,000 characters long" in result.stderr, result.output
    assert not (tmp_path / "r").exists()


def test_control_characters_are_shown_not_sent_to_the_terminal():
    text = GRAPH.replace("graph g", "graph g\x1b[2J\x00")
    shown = render_all(check(text).diagnostics, text, "g.kt")
    assert "\x1b" not in shown and "\x00" not in shown
    assert "graph g\u241b[2J\u2400" in shown and "unexpected character `\u241b`" in shown


# ---------------------------------------------------------------- init checkpoints


def _junk_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x04junk")
        archive.writestr("archive/version", b"3\n")


@pytest.mark.parametrize("kind", ["zip of junk", "json", "empty"])
def test_an_init_checkpoint_that_is_no_checkpoint_is_e601(tmp_path, kind):
    path = tmp_path / "teacher.pt"
    if kind == "zip of junk":
        _junk_zip(path)
    elif kind == "json":
        path.write_text(json.dumps({"model": "cnn_small", "state_dict": {}}), encoding="utf-8")
    else:
        path.write_bytes(b"")
    text = GRAPH + 'node t : cnn_small [frozen, init="teacher.pt"]\nt -> a : through\n'
    checked = check(text, str(tmp_path / "g.kt"))
    assert [d.code for d in checked.errors] == ["E601"], render_all(checked.diagnostics, text, "g.kt")
    assert checked.errors[0].span.line == 5


# ---------------------------------------------------------------- data paths


def _good_npz(path: Path, **arrays) -> Path:
    x = np.zeros((6, 4, 4), np.uint8)
    good = dict(x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=np.array([0, 1]))
    np.savez(path, **{**good, **arrays})
    return path


def _load(dataset: str, path) -> None:
    load_dataset(dataset, data_dir=None, val_split=0, split_seed=0, path=str(path))


def test_an_npz_path_that_is_no_file_says_what_it_is(tmp_path):
    (tmp_path / "data.npz").mkdir()
    with pytest.raises(DataError, match=r"data.npz is a directory; the data block's `path` must name an .npz file"):
        _load("npz", tmp_path / "data.npz")
    with pytest.raises(DataError, match=r"/dev/zero is a character device, not a regular file"):
        _load("npz", "/dev/zero")
    with pytest.raises(DataError, match=r"none.npz does not exist"):
        _load("npz", tmp_path / "none.npz")


def test_an_imagefolder_path_that_is_a_file_says_so(tmp_path):
    file = _good_npz(tmp_path / "data.npz")
    with pytest.raises(DataError, match=r"imagefolder: .*data.npz is a file, not a folder"):
        _load("imagefolder", file)
    with pytest.raises(DataError, match=r"imagefolder: /dev/null is a character device, not a folder"):
        _load("imagefolder", "/dev/null")


class _Planted:
    """Unpickling this writes a file: the proof that something was unpickled."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "unpickled"))


def test_an_npz_of_pickled_objects_is_refused_unread(tmp_path):
    planted = tmp_path / "planted"
    objects = np.empty(6, dtype=object)
    objects[:] = [_Planted(planted)] * 6
    path = _good_npz(tmp_path / "objects.npz", y_train=objects)
    with pytest.raises(DataError, match=r"y_train in .*objects.npz holds Python objects \(dtype object\), which "
                                        r"dclang never unpickles"):
        _load("npz", path)
    assert not planted.exists()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def test_an_npz_header_larger_than_its_file_is_refused_before_allocating(tmp_path):
    """A header claiming 10^12 images would have numpy allocate 58 TiB (a MemoryError
    traceback): the claim is compared with the bytes the member holds first."""
    path = _good_npz(tmp_path / "claims.npz")
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["x_train.npy"] = _npy_header((10**12, 8, 8)) + b"\x00" * 64
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(DataError, match=r"x_train in .*claims.npz declares shape \(1000000000000, 8, 8\) of uint8 "
                                        r"\(64,000,000,000,000 bytes\) but holds 64: the file is truncated or damaged"):
        _load("npz", path)


def test_an_npz_that_is_no_zip_says_what_it_starts_with(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(DataError, match=r"x.npz is not an .npz file \(a zip archive of .npy arrays, as np.savez "
                                        r"writes\); it starts with b'\\x89PNG"):
        _load("npz", tmp_path / "x.npz")


def test_dclang_run_on_a_data_path_that_is_a_folder_stops_at_check(runner, tmp_path):
    (tmp_path / "data.npz").mkdir()
    path = tmp_path / "g.kt"
    path.write_text(GRAPH.replace("digits { val_split = 300 }", 'npz { path = "data.npz" }'), encoding="utf-8")
    result = runner.invoke(main, ["run", str(path), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output
    assert f"error[E604]: data path `data.npz` is a directory\n --> {path}:2:19" in result.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- a broken torchvision


def test_a_broken_torchvision_on_the_data_path_names_the_versions(tmp_path, broken_torchvision):
    """The data readers and the per-image baseline transforms import torchvision through
    `import_library`: a torchvision built for another torch (here a real package first on the
    path whose import fails as such a one does) is an error naming both versions."""
    fake = broken_torchvision
    probe = ("import sys\nfrom dclang.data import load_dataset, per_sample_transforms\n"
             "from dclang.diagnostics import UserError\n"
             "for call in (lambda: load_dataset('cifar10', data_dir=sys.argv[1], val_split=0, split_seed=0,"
             " download=False), lambda: per_sample_transforms(4, True, (0.5,), (0.5,), image_size=8)):\n"
             "    try:\n        call()\n    except UserError as exc:\n        print(exc.message)\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    from importlib import metadata

    said = f"torchvision 0.28.0 cannot be imported with torch {metadata.version('torch')}: operator torchvision::nms"
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count(said) == 2, done.stdout


# ---------------------------------------------------------------- graphs too large to check


def test_more_nodes_than_a_graph_may_have_is_e311_before_bulk_edges_are_expanded():
    """3000 nodes and `edges * -> *` would be 9 million edges (12 GB and minutes in check): the
    node count is checked before lowering, at the first node past the limit."""
    from dclang.passes.check_structure import MAX_NODES

    def graph(n: int) -> str:
        return ("graph g\ndata digits { }\nnode a : mlp [target]\n" + "".join(f"node n{i} : mlp\n" for i in range(n))
                + "edges * -> * : through\nedges label -> * : through\n")

    checked = check(graph(3000), "g.kt")
    assert [(d.code, d.span.line, d.span.column) for d in checked.diagnostics] == [("E311", 3 + MAX_NODES, 6)]
    assert checked.diagnostics[0].message == f"3,001 nodes; a graph has at most {MAX_NODES}"
    assert check(graph(MAX_NODES - 1), "g.kt").ok


def test_a_dataset_file_that_is_a_folder_is_said_to_be_one(tmp_path):
    """CIFAR's batches and Tiny ImageNet's lists are files: one that is a folder is named as
    such, not reported missing (and never downloaded over)."""
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"data_batch_1 is a directory; it should be the file of that name"):
        load_dataset("cifar10", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").mkdir(parents=True)
    with pytest.raises(DataError, match=r"wnids.txt is a directory; it should be the file of that name"):
        load_dataset("tinyimagenet", data_dir=tmp_path, val_split=0, split_seed=0, download=False)
