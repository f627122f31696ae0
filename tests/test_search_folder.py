"""A search folder is self-contained: copied or moved, it resumes its own study; a damaged
search.json or journal is an error naming the file; its best graphs train into folders of
their own. Real `dclang search` processes on a real Optuna journal, with the cheap trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dclang.api import check_file

FAKE = ("--trainer", "fake_trainer:train")


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _trials(folder: Path) -> int:
    from dclang.search.study import load_study, open_storage

    study, _ = load_study(open_storage(str(folder / "study.journal")), "tiny")
    return len(study.get_trials(deepcopy=False))


def test_search_json_holds_paths_relative_to_the_folder(finished_search):
    record = json.loads((finished_search / "search.json").read_text(encoding="utf-8"))
    assert record == {"study": "tiny", "storage": "study.journal", "template": "../template.kt"}


def test_a_copied_folder_resumes_its_own_study(finished_search, tmp_path, run_search):
    copy = _copy(finished_search, tmp_path)
    before = _trials(finished_search)
    resumed = run_search("--resume", "-o", copy, "--trials", 6, *FAKE)
    assert resumed.returncode == 0, resumed.stderr
    assert _trials(finished_search) == before, "the original study is untouched"
    assert _trials(copy) > before


def test_a_moved_folder_resumes_and_leaves_nothing_behind(finished_search, tmp_path, run_search):
    old = _copy(finished_search, tmp_path, "old")
    new = tmp_path / "elsewhere" / "new"
    new.parent.mkdir()
    shutil.move(old, new)
    resumed = run_search("--resume", "-o", new, "--trials", 5, *FAKE)
    assert resumed.returncode == 0, resumed.stderr
    assert _trials(new) >= 5
    assert not old.exists(), "no empty journal is left where the folder was"


def test_resuming_a_folder_without_its_journal_creates_none(finished_search, tmp_path, run_search):
    copy = _copy(finished_search, tmp_path)
    (copy / "study.journal").unlink()
    refused = run_search("--resume", "-o", copy)
    assert refused.returncode == 1
    assert f"no study journal at {copy / 'study.journal'}" in refused.stderr and "Traceback" not in refused.stderr
    assert not (copy / "study.journal").exists()


def test_a_record_cut_short_by_a_crash_is_cut_off_before_the_next_is_appended(finished_search, tmp_path,
                                                                               run_search):
    copy = _copy(finished_search, tmp_path)
    journal = copy / "study.journal"
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[:last + (len(data) - last) // 2])  # the last record, half written
    resumed = run_search("--resume", "-o", copy, "--trials", 6, *FAKE)
    assert resumed.returncode == 0, resumed.stderr
    assert "ended in a record cut short" in resumed.stderr
    assert _trials(copy) >= 6, "the journal stays readable after new records"


@pytest.mark.parametrize("content, problem", [
    (b"{\"study\": \"tiny\", \"stor", "it is not JSON"),
    (b"\xff\xfe garbage", "it is not JSON"),
    (b"[1, 2]", "it holds a JSON list"),
    (b"{\"study\": \"tiny\"}", "`storage` is missing"),
    (b"{\"study\": 3, \"storage\": \"study.journal\"}", "`study` is missing or not a non-empty string"),
])
def test_a_damaged_search_json_is_refused_with_its_name(finished_search, tmp_path, content, problem):
    from click.testing import CliRunner

    from dclang.cli import main

    copy = _copy(finished_search, tmp_path)
    (copy / "search.json").write_bytes(content)
    result = CliRunner().invoke(main, ["search", "--resume", "-o", str(copy)])
    assert result.exit_code == 1, result.output
    assert f"error: {copy / 'search.json'} is damaged: {problem}" in result.output
    assert "help: restore" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["flip", "garbage line", "not utf-8", "wrong record"])
def test_a_damaged_journal_is_refused_with_its_name(finished_search, tmp_path, damage):
    from click.testing import CliRunner

    from dclang.cli import main

    copy = _copy(finished_search, tmp_path)
    journal = copy / "study.journal"
    data = journal.read_bytes()
    middle = data.index(b"\n", len(data) // 2) + 1  # the start of a record in the middle
    damaged = {"flip": data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:],
               "garbage line": data[:middle] + b"garbage\n" + data[middle:],
               "not utf-8": data[:middle] + b"\xff\xfe\n" + data[middle:],
               "wrong record": b'{"op_code": 99}\n' + data}[damage]
    journal.write_bytes(damaged)
    result = CliRunner().invoke(main, ["search", "--resume", "-o", str(copy), *FAKE])
    assert result.exit_code == 1, result.output
    assert f"error: the study journal {journal} is damaged" in result.output and "Traceback" not in result.output


def test_each_best_graph_trains_into_a_folder_of_its_own(finished_search):
    best = sorted((finished_search / "best").glob("*.kt"))
    assert len(best) >= 2
    names = [check_file(p).graph.graph["name"] for p in best]
    assert names == [f"tiny_trial{p.stem.split('_trial')[1]}" for p in best]
    assert len(set(names)) == len(names), "dclang run's default folder is runs/<graph name>"


def test_an_unwritable_search_folder_is_refused_before_any_work(tmp_path):
    from click.testing import CliRunner

    from dclang.cli import main

    (tmp_path / "template.kt").write_text((Path(__file__).parent.parent / "examples" / "quickstart_search.kt")
                                          .read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    out = tmp_path / "file" / "out"
    result = CliRunner().invoke(main, ["search", "--template", str(tmp_path / "template.kt"), "--trials", "2",
                                       "-o", str(out)])
    assert result.exit_code == 1
    assert f"error: cannot write the search folder {out}" in result.output and "Traceback" not in result.output
