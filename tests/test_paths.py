"""Paths the CLI cannot write are refused in one line (exit 2), never with a traceback: through a file, a broken
or looping symbolic link, a name too long, a --runs-dir that is a file; ``~`` is expanded once, so what is
checked is what is written. Every victim lives in pytest's tmp_path and is hashed before and after."""

from __future__ import annotations

import logging
import os

import pytest

from alignment.ownership import path_problem
from cli.main import main
from tests.test_ownership import _source, tree_digest


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory with a file, a dangling link and a looping link; a fake home."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile.txt").write_text("a user's file\n")
    os.symlink("nowhere", work / "DANGLING")
    os.symlink("LOOP", work / "LOOP")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    monkeypatch.delenv("ALIGNMENT_RUNS_DIR", raising=False)
    return work


def _one_line(argv: list[str], capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err


@pytest.mark.parametrize(("out", "match"), [
    ("afile.txt/sub", "--out afile.txt/sub: afile.txt is a file, not a folder"),
    ("afile.txt/sub/deeper", "afile.txt is a file, not a folder"),
    ("DANGLING/sub", "DANGLING is a broken symbolic link (it points to nowhere)"),
    ("LOOP/sub", "LOOP is a symbolic link that loops"),
    ("LOOP", "--out LOOP is a symbolic link that loops"),
    ("a" * 300 + "/x", "is longer than the file system allows (300 bytes)"),
])
def test_an_out_that_cannot_be_a_folder_is_refused_in_one_line(place, tmp_path, capsys, out, match):
    src = _source(tmp_path)
    before = tree_digest(tmp_path)
    _one_line(["-q", "data", "--source", str(src), "--out", out], capsys, match)
    assert tree_digest(tmp_path) == before


def test_a_quoted_tilde_is_expanded_once_for_the_check_and_the_write(place, tmp_path, capsys):
    src = _source(tmp_path)
    assert main(["-q", "data", "--source", str(src), "--out", "~/sub"]) == 0
    assert (tmp_path / "home" / "sub" / "manifest.json").is_file()
    assert not (place / "~").exists()
    _one_line(["-q", "data", "--source", str(src), "--out", "~"], capsys, "it is the home directory")


def test_runs_dir_that_is_a_file_and_json_through_a_broken_link(place, capsys):
    before = tree_digest(place)
    _one_line(["-q", "run", "--runs-dir", "afile.txt"], capsys, "--runs-dir afile.txt is a file, not a folder")
    _one_line(["-q", "run", "--runs-dir", "DANGLING/runs"], capsys, "DANGLING is a broken symbolic link")
    _one_line(["-q", "rm-eval", "rm", "--data", "d", "--json", "DANGLING/m.json"], capsys,
              "--json DANGLING/m.json: DANGLING is a broken symbolic link")
    _one_line(["-q", "rm-eval", "rm", "--data", "d", "--json", "b" * 300 + ".json"], capsys, "is longer than")
    assert tree_digest(place) == before


def test_path_problem_accepts_what_can_be_made(tmp_path):
    assert path_problem(tmp_path / "new" / "deeper") is None
    assert path_problem(tmp_path) is None
    (tmp_path / "f").write_text("x")
    assert path_problem(tmp_path / "f") is None  # a file itself: the caller decides (a folder is refused there)
    assert "f is a file, not a folder" in path_problem(tmp_path / "f" / "x")


def test_prefect_run_loggers_print_the_projects_own_errors_without_a_traceback(monkeypatch):
    """D9: `align run` refusing a foreign stage folder printed Prefect's whole traceback before its one line."""
    from alignment.data import DataError
    from flows.pipeline import one_line_errors

    logger = logging.getLogger("prefect.task_runs")
    monkeypatch.setattr(logger, "propagate", False)  # only this test's handler: not Prefect's API log handler
    printed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(logging.Formatter().format(record))
    logger.addHandler(handler)
    try:
        with one_line_errors():
            for exc in (DataError("R/data/x holds files this project did not write (mine.txt)"), KeyError("bug")):
                try:
                    raise exc
                except Exception:
                    logger.error("Task run failed with exception: %r", exc, exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert printed[0] == ("Task run failed with exception: DataError('R/data/x holds files this project did not "
                          "write (mine.txt)')")
    assert "Traceback" in printed[1] and "KeyError: 'bug'" in printed[1]  # a bug keeps its traceback
    assert not [f for f in logger.filters if type(f).__name__ == "_OneLineErrors"]  # removed on the way out


def test_a_runs_dir_from_a_key_value_override_is_checked_and_expanded_too(place, tmp_path, capsys):
    before = tree_digest(place)
    _one_line(["-q", "run", "options.runs_dir=afile.txt", "--print-config"], capsys,
              "options.runs_dir afile.txt is a file, not a folder")
    _one_line(["-q", "run", "options.runs_dir=LOOP/runs", "--print-config"], capsys, "LOOP is a symbolic link that loops")
    assert tree_digest(place) == before
    assert main(["-q", "run", "options.runs_dir=~/runs", "--print-config"]) == 0
    assert f'"runs_dir": "{tmp_path / "home" / "runs"}"' in capsys.readouterr().out
