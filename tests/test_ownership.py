"""No command destroys what it did not write: the overwrite rules of every stage, the CLI, the Prefect
tasks, align compare, checkpoint folders and the clean-up of stale temporary folders.

Every victim folder is built inside pytest's tmp_path (a fake home via $HOME, a fake working directory
via chdir); each test hashes the victim's whole tree before and after."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from alignment.data import DataConfig, DataError, plan_data
from alignment.io import atomic_directory
from alignment.ownership import NotOurs, foreign_entries, is_ours, remove_owned, replace_problem
from cli.main import main
from tests.conftest import raw_row, write_jsonl


def tree_digest(root: Path) -> str:
    """One hash of every path, file byte and symlink target under ``root`` (the root itself included)."""
    digest = hashlib.sha256()
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in paths:
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(b"F" + path.read_bytes())
        else:
            digest.update(b"D")
    return digest.hexdigest()


def _victim(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _source(tmp_path: Path) -> Path:
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    (tmp_path / "inputs").mkdir(exist_ok=True)
    return write_jsonl(tmp_path / "inputs" / "in.jsonl", rows)


def _refused(argv: list[str], victim: Path, capsys, match: str) -> None:
    """``align`` exits 2 with one line naming what is wrong, and every byte of ``victim`` survives."""
    before, theirs = tree_digest(victim), not is_ours(victim)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err
    assert tree_digest(victim) == before
    assert not list(victim.parent.glob(f".{victim.name}.tmp-*")) and not list(victim.parent.glob(f".{victim.name}.old-*"))
    if theirs:  # refused before the stage lock: not even a lock file is left beside someone else's folder
        assert not (victim.parent / f".{victim.name}.lock").exists()


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fake home directory and a working directory inside tmp_path (with a runs root holding a data output)."""
    home = _victim(tmp_path / "home", {"thesis.txt": "three years", ".bashrc": "export X=1", "lib/python.so": "elf"})
    monkeypatch.setenv("HOME", str(home))
    work = _victim(tmp_path / "work", {"notes.md": "mine"})
    monkeypatch.chdir(work)
    monkeypatch.delenv("ALIGNMENT_RUNS_DIR", raising=False)
    assert main(["-q", "data", "--source", str(_source(tmp_path))]) == 0  # runs/data/<...>: an earlier output
    return {"home": home, "work": work, "runs": work / "runs", "source": _source(tmp_path)}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("target", ["home", "foreign", "runs root", "cwd", "file", "parent of cwd",
                                    "folder of the input", "stage parent", "another stage"])
def test_align_data_never_destroys_what_it_did_not_write(sandbox, tmp_path, capsys, target, overwrite, tiny_stack):
    src = sandbox["source"]
    if target == "home":
        out, victim, match = str(sandbox["home"]), sandbox["home"], "it is the home directory"
    elif target == "foreign":
        victim = _victim(tmp_path / "my-thesis", {"thesis.txt": "chapter 1", "figs/a.png": "png"})
        out, match = str(victim), "holds files this project did not write (figs, thesis.txt)"
    elif target == "runs root":
        out, victim, match = "runs", sandbox["runs"], "runs root"
    elif target == "cwd":
        out, victim, match = ".", sandbox["work"], "current directory"
    elif target == "parent of cwd":
        out, victim, match = "..", tmp_path, "never used as an output folder"
    elif target == "file":
        victim = tmp_path / "notes.txt"
        victim.write_text("do not turn me into a folder")
        out, match = str(victim), "is a file, not a folder"
    elif target == "folder of the input":
        out, victim, match = str(src.parent), src.parent, "contains an input of this stage"
    elif target == "stage parent":  # runs/data holds every data output: not one of them
        out, victim, match = "runs/data", sandbox["runs"] / "data", "did not write"
    else:  # a reward model's folder is never replaced by a data output
        victim = tmp_path / "rm-copy"
        shutil.copytree(tiny_stack[1], victim)
        out, match = str(victim), "output of another stage (reward_model)"
    _refused(["-q", "data", "--source", str(src), "--out", out, *(["--overwrite"] if overwrite else [])],
             victim, capsys, match)


def test_own_output_is_replaced_with_overwrite_but_not_once_it_holds_a_foreign_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, out = _source(tmp_path), tmp_path / "out"
    assert main(["-q", "data", "--source", str(src), "--out", str(out)]) == 0
    assert is_ours(out) and foreign_entries(out) == []  # the marker lists everything the stage wrote
    first = json.loads((out / "manifest.json").read_text())["created_at"]
    assert main(["-q", "data", "--source", str(src), "--out", str(out), "--overwrite"]) == 0
    assert "data written" in capsys.readouterr().out and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["created_at"] >= first
    (out / "my-notes.txt").write_text("an analysis I wrote into the output folder")
    _refused(["-q", "data", "--source", str(src), "--out", str(out), "--overwrite"], out, capsys,
             "holds files this project did not write (my-notes.txt)")
    # with a different config too: the output of another config is only replaced when nothing foreign is in it
    _refused(["-q", "data", "--source", str(src), "--out", str(out), "seed=7"], out, capsys, "did not write")
    (out / "my-notes.txt").unlink()
    assert main(["-q", "data", "--source", str(src), "--out", str(out), "seed=7", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 7


def test_every_stage_output_lists_all_it_holds(tiny_stack, eval_stack):
    """The marker of each stage's finished folder names every entry in it, so none of ours reads as foreign."""
    _, rm, data = tiny_stack
    for folder in (rm, data, eval_stack["scores"], eval_stack["rm"]):
        assert is_ours(folder) and foreign_entries(folder) == [], folder


def test_prefect_tasks_follow_the_same_rules(sandbox, tmp_path):
    """The pipeline's data task, pointed at a fake home as its runs folder whose planned folder holds a
    person's files, refuses and leaves them; a runs root is never the output itself."""
    from alignment.stage import StagePlan
    from tasks.stages import data_task

    config = DataConfig(source=str(sandbox["source"]))
    plan = plan_data(config, sandbox["home"])
    victim = _victim(plan.out, {"report.docx": "mine"})
    before, home = tree_digest(victim), tree_digest(sandbox["home"] / "lib")
    with pytest.raises(DataError, match=r"did not write \(report.docx\)"):
        data_task.fn(config, str(sandbox["home"]), plan=plan)
    assert tree_digest(victim) == before and tree_digest(sandbox["home"] / "lib") == home
    assert (sandbox["home"] / "thesis.txt").read_text() == "three years"
    for out in (sandbox["home"], sandbox["runs"], sandbox["work"]):
        before = tree_digest(out)
        with pytest.raises(DataError, match="never used as an output folder"):
            data_task.fn(config, str(sandbox["runs"]), plan=StagePlan(plan.key, out, out))
        assert tree_digest(out) == before


def test_atomic_directory_replaces_only_what_it_can_prove_it_wrote(tmp_path):
    foreign = _victim(tmp_path / "theirs", {"a.txt": "x"})
    before = tree_digest(foreign)
    with pytest.raises(NotOurs, match=r"did not write \(a.txt\)"), atomic_directory(foreign) as tmp:
        (tmp / "b.txt").write_text("ours")
    assert tree_digest(foreign) == before and not list(tmp_path.glob(".theirs.*"))
    with atomic_directory(tmp_path / "ours") as tmp:
        (tmp / "b.txt").write_text("first")
    with atomic_directory(tmp_path / "ours") as tmp:
        (tmp / "b.txt").write_text("second")
    assert (tmp_path / "ours" / "b.txt").read_text() == "second"
    file = tmp_path / "plain.txt"
    file.write_text("keep")
    with pytest.raises(NotOurs, match="is a file"), atomic_directory(file):
        pass
    assert file.read_text() == "keep"


def test_remove_owned_and_replace_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(_victim(tmp_path / "home", {"x": "1"})))
    mine = tmp_path / "mine"
    with atomic_directory(mine) as tmp:
        (tmp / "w.bin").write_bytes(b"\0")
    theirs = _victim(tmp_path / "theirs", {"y": "2"})
    with pytest.raises(NotOurs, match="not an output of this project"):
        remove_owned(theirs)
    with pytest.raises(NotOurs, match="home directory"):
        remove_owned(tmp_path / "home")
    assert (theirs / "y").read_text() == "2" and (tmp_path / "home" / "x").is_file()
    remove_owned(mine)
    assert not mine.exists()
    assert replace_problem(tmp_path / "absent") is None and replace_problem(_victim(tmp_path / "empty", {})) is None
    assert "file-system root" in replace_problem("/")
    monkeypatch.chdir(theirs)
    assert "current directory" in replace_problem(".")


def test_trainer_checkpoint_folder_of_someone_else_is_never_removed(tmp_path):
    from alignment.checkpoints import checkpoint_folder, remove_checkpoints, resume_point

    folder = checkpoint_folder(tmp_path / "rm")
    victim = _victim(folder, {"precious.txt": "not a checkpoint"})
    before = tree_digest(victim)
    with pytest.raises(NotOurs, match=r"did not write \(precious.txt\)"):
        resume_point(folder, "key-1")
    remove_checkpoints(folder)  # after a finished stage: warns and keeps it
    assert tree_digest(victim) == before
    ours = checkpoint_folder(tmp_path / "rm2")
    assert resume_point(ours, "key-1") is None and is_ours(ours)
    (ours / "checkpoint-1").mkdir()
    assert resume_point(ours, "key-2") is None and not (ours / "checkpoint-1").exists()  # ours, another key
    remove_checkpoints(ours)
    assert not ours.exists()


def test_align_compare_refuses_a_foreign_out_before_training(tmp_path, tiny_stack, capsys, monkeypatch):
    import alignment.compare as C

    policy, rm, data = tiny_stack
    victim = _victim(tmp_path / "results", {"paper.tex": "\\section{}"})
    monkeypatch.setenv("ALIGNMENT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(C, "run_algorithm", lambda *a, **k: pytest.fail("trained before checking --out"))
    _refused(["-q", "compare", "--data", str(data), "--rm", str(rm), "--policy", str(policy), "--out", str(victim)],
             victim, capsys, "did not write (paper.tex)")
