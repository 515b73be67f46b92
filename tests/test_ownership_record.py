"""Ownership by record, not by name: what a stage folder's marker lists is ours, anything else is foreign
whatever it is called; stale siblings, non-stage folders of ours (the model cache), ``--json`` files and the
tracking store follow the same rule. Every victim lives in pytest's tmp_path and is hashed before and after."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignment.io import atomic_directory
from alignment.ownership import (
    MARKER,
    NotOurs,
    claim_store,
    file_problem,
    foreign_entries,
    record_entries,
    recorded_entries,
    remove_stale,
    write_own_file,
    write_record,
    write_scratch_marker,
)
from cli.main import main
from tests.test_ownership import _refused, _source, _victim, tree_digest


@pytest.fixture
def own_output(tmp_path, monkeypatch):
    """(the data source, a finished ``align data`` output in tmp_path/d3)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNMENT_RUNS_DIR", raising=False)
    src, out = _source(tmp_path), tmp_path / "d3"
    assert main(["-q", "data", "--source", str(src), "--out", str(out)]) == 0
    return src, out


def test_the_records_a_finished_output_holds_are_listed_by_its_marker(own_output, capsys):
    _, out = own_output
    listed = set(json.loads((out / MARKER).read_text())["entries"])
    assert {"footprint.json", "manifest.json", "train.parquet", "validation.parquet"} <= listed
    assert foreign_entries(out) == []
    write_record(out, "timing.json", {"seconds": 1.0})  # what align compare adds to a finished output
    assert "timing.json" in recorded_entries(out) and foreign_entries(out) == []
    assert json.loads((out / "timing.json").read_text()) == {"seconds": 1.0}


@pytest.mark.parametrize("planted", ["timing.json", "footprint.json", "run.json", ".results.old-2024/r.csv",
                                     ".x.tmp-1234", ".d3.lock", ".d3.holder.json", "manifest.json.bak"])
def test_overwrite_never_removes_a_planted_file_however_it_is_named(own_output, capsys, planted):
    """D1: names the project also uses prove nothing; only the marker's list does."""
    src, out = own_output
    if planted == "footprint.json":  # ours already: the stage's own is listed; a user's copy replaces it
        (out / planted).write_text('{"mine": true}')
        listed = json.loads((out / MARKER).read_text())["entries"]
        (out / MARKER).write_text(json.dumps({"created_by": "alignment-pipeline",
                                              "entries": [e for e in listed if e != planted]}))
    else:
        _victim(out, {planted: "a user's file"})
    top = planted.split("/")[0]
    _refused(["-q", "data", "--source", str(src), "--out", str(out), "--overwrite"], out, capsys,
             f"did not write ({top})")


def test_overwrite_replaces_an_output_whose_records_list_everything(own_output, capsys):
    src, out = own_output
    write_record(out, "timing.json", {"seconds": 2.0})
    assert main(["-q", "data", "--source", str(src), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "timing.json").exists() and foreign_entries(out) == []


def test_a_stale_sibling_is_removed_only_when_its_own_marker_proves_all_of_it_ours(own_output, capsys):
    """D2: a backup beside the output, with a marker copied from an own output plus the user's file, stays;
    a killed writer's scratch folder and an old output listing all it holds go."""
    src, out = own_output
    backup = out.parent / f".{out.name}.old-mybackup"
    shutil.copytree(out, backup)
    (backup / "my-analysis.txt").write_text("not the project's")
    renamed_scratch = _victim(out.parent / f".{out.name}.tmp-copied", {"partial.bin": "x"})
    write_scratch_marker(_victim(out.parent / f".{out.name}.tmp-original", {}))
    shutil.copy(out.parent / f".{out.name}.tmp-original" / MARKER, renamed_scratch / MARKER)  # names another folder
    shutil.rmtree(out.parent / f".{out.name}.tmp-original")
    killed = out.parent / f".{out.name}.tmp-deadbeef"
    killed.mkdir()
    write_scratch_marker(killed)
    (killed / "train.parquet").write_bytes(b"half")
    old = out.parent / f".{out.name}.old-cafebabe"
    shutil.copytree(out, old)
    kept = {p: tree_digest(p) for p in (backup, renamed_scratch)}
    assert main(["-q", "data", "--source", str(src), "--out", str(out), "seed=5", "--overwrite"]) == 0
    assert {p: tree_digest(p) for p in kept} == kept
    assert not killed.exists() and not old.exists()
    assert remove_stale(backup) is False and remove_stale(renamed_scratch) is False


def _model_cache(folder: Path) -> Path:
    """A folder like the converted-model cache (alignment.models): written by atomic_directory, no stage."""
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "model.safetensors").write_bytes(b"\0" * 1024)
        (tmp / "SOURCE.txt").write_text("converted from x.gguf\n")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_ours_that_is_no_stage_output_is_never_replaced_by_one(tmp_path, capsys, monkeypatch, overwrite):
    """D4: the model cache carries the marker but no stage; the refusal says what it is."""
    monkeypatch.chdir(tmp_path)
    cache = _model_cache(tmp_path / "SmolLM2-cache")
    assert foreign_entries(cache) == []  # ours through and through, and still not a data output
    _refused(["-q", "data", "--source", str(_source(tmp_path)), "--out", str(cache),
              *(["--overwrite"] if overwrite else [])], cache, capsys, "is a model folder (the converted-model cache?)")
    assert not (tmp_path / ".SmolLM2-cache.lock").exists()  # refused before the stage lock


def test_rm_eval_json_never_overwrites_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    """D3: an existing file or folder at --json is refused before the model is even loaded."""
    import alignment.rewards.model as M

    monkeypatch.setattr(M.RewardScorer, "from_pretrained", lambda *a, **k: pytest.fail("scored before checking --json"))
    mine = tmp_path / "metrics.json"
    mine.write_text("my own numbers\n")
    folder = _victim(tmp_path / "results", {"a.txt": "x"})
    for victim, match in ((mine, "already exists and this project did not write it"), (folder, "is a folder")):
        _refused(["-q", "rm-eval", str(tmp_path / "rm"), "--data", str(tmp_path / "data"), "--json", str(victim)],
                 victim, capsys, match)


def test_a_file_of_ours_is_rewritten_until_someone_edits_it(tmp_path):
    path = tmp_path / "metrics.json"
    write_own_file(path, '{"a": 1}\n')
    assert file_problem(path) is None
    write_own_file(path, '{"a": 2}\n')
    assert json.loads(path.read_text()) == {"a": 2}
    path.write_text('{"a": 2, "my note": "kept"}\n')
    with pytest.raises(NotOurs, match="was changed since this project wrote it"):
        write_own_file(path, '{"a": 3}\n')
    assert "my note" in path.read_text()


def test_the_default_tracking_store_is_claimed_when_made_and_a_foreign_one_is_refused(tmp_path):
    from alignment.tracking import TrackingConfig

    runs = tmp_path / "runs"
    uri = TrackingConfig().resolved_uri(runs)
    assert uri == f"sqlite:///{runs.resolve() / 'mlflow.db'}"
    (runs / "mlflow.db").write_bytes(b"SQLite format 3\0")  # what MLflow then creates: ours by the claim
    assert TrackingConfig().resolved_uri(runs) == uri
    theirs = tmp_path / "elsewhere"
    _victim(theirs, {"mlflow.db": "a user's SQLite file"})
    before = tree_digest(theirs)
    with pytest.raises(NotOurs, match="did not write it"):
        TrackingConfig().resolved_uri(theirs)
    with pytest.raises(NotOurs):
        claim_store(theirs / "mlflow.db")
    assert tree_digest(theirs) == before


def test_a_tracked_command_never_touches_a_users_mlflow_db(tmp_path, capsys, monkeypatch):
    """D11: the store follows the runs folder the command writes in, and a foreign file there is refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNMENT_RUNS_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    victim = _victim(tmp_path / "runs", {"mlflow.db": "my SQLite file"})
    _refused(["-q", "data", "--source", str(_source(tmp_path)), "tracking.experiment=t"], victim / "mlflow.db",
             capsys, "the tracking store")
    elsewhere = _victim(tmp_path / "project", {"mlflow.db": "another SQLite file of mine"})
    _refused(["-q", "data", "--source", str(_source(tmp_path)), "--out", str(elsewhere / "d"),
              "tracking.experiment=t"], elsewhere / "mlflow.db", capsys, "did not write it")
    assert not (tmp_path / "runs" / ".mlflow.db.alignment.json").exists()


def test_the_tracking_root_of_a_stage_command(tmp_path, monkeypatch):
    from argparse import Namespace

    from cli.main import _tracking_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGNMENT_RUNS_DIR", raising=False)
    assert _tracking_root(Namespace(out=None)) == "runs"
    assert _tracking_root(Namespace(out="runs/data/x")) == "runs"
    assert _tracking_root(Namespace(out=str(tmp_path / "elsewhere" / "d3"))) == str(tmp_path / "elsewhere")
    monkeypatch.setenv("ALIGNMENT_RUNS_DIR", str(tmp_path / "r"))
    assert _tracking_root(Namespace(out="d3")) == str(tmp_path / "r")


def test_record_entries_keeps_what_the_folder_listed(tmp_path):
    folder = _victim(tmp_path / "f", {"a": "1", "b": "2"})
    record_entries(folder, ["a"])
    assert foreign_entries(folder) == ["b"]
    record_entries(folder, ["b"])
    assert foreign_entries(folder) == [] and recorded_entries(folder) == {"a", "b"}


def test_a_record_cut_short_leaves_only_listed_entries(tmp_path, monkeypatch):
    """A kill between writing a record's temporary copy and renaming it leaves nothing unlisted."""
    import alignment.ownership as O

    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("ours")
    out = tmp_path / "out"
    write_record(out, "footprint.json", {"seconds": 1})
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt", "footprint.json"]
    assert recorded_entries(out) == {"a.txt", "footprint.json"}

    real_replace = os.replace

    def killed(src, dst):  # the marker's own write goes through; the record's rename is where the kill lands
        if Path(dst).name == "timing.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(O.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_record(out, "timing.json", {"seconds": 2})
    monkeypatch.undo()
    left = [p.name for p in out.iterdir() if p.name.startswith(".timing.json.tmp-")]
    assert len(left) == 1 and left[0] in recorded_entries(out) and foreign_entries(out) == []
    with atomic_directory(out) as tmp:  # replaced whole: everything in it was listed
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]


def test_an_existing_mlflow_store_is_used_and_any_other_sqlite_file_refused(tmp_path):
    """A store made before the sidecar records (or by ``mlflow`` itself) is an MLflow store: runs are added to it;
    a user's own SQLite database (other tables) is refused untouched, as in D11."""
    import sqlite3

    from alignment.ownership import is_mlflow_store
    from alignment.tracking import TrackingConfig

    old, theirs = tmp_path / "old-runs", tmp_path / "mine"
    for folder, tables in ((old, ("experiments", "runs", "alembic_version")), (theirs, ("customers", "orders"))):
        folder.mkdir()
        db = sqlite3.connect(folder / "mlflow.db")
        for table in tables:
            db.execute(f"CREATE TABLE {table} (id INTEGER)")
        db.commit()
        db.close()
    assert is_mlflow_store(old / "mlflow.db") and not is_mlflow_store(theirs / "mlflow.db")
    before = tree_digest(old)
    assert TrackingConfig().resolved_uri(old) == f"sqlite:///{(old / 'mlflow.db').resolve()}"
    assert tree_digest(old) == before  # adopted as it is: no record claims it as ours
    before = tree_digest(theirs)
    with pytest.raises(NotOurs, match="did not write it"):
        TrackingConfig().resolved_uri(theirs)
    assert tree_digest(theirs) == before


def test_the_rounds_report_writes_only_files_it_recorded(tmp_path):
    """The rounds report lives outside any stage folder: its files are recorded when written, rewritten on the next
    tick, and a file of the same name that this project did not write (or that was edited) is refused untouched."""
    from alignment.rounds.report import write_rounds_report

    folder = tmp_path / "report"
    write_rounds_report([], folder, notes=["first tick"])
    assert "first tick" in (folder / "report.md").read_text()
    write_rounds_report([], folder, notes=["second tick"])  # ours by its record: rewritten
    assert "second tick" in (folder / "report.md").read_text()
    (folder / "report.md").write_text("my edits\n")
    before = tree_digest(folder)
    with pytest.raises(NotOurs, match="changed since this project wrote it"):
        write_rounds_report([], folder, notes=["third tick"])
    assert tree_digest(folder) == before
    theirs = _victim(tmp_path / "theirs", {"rounds.json": "[1, 2]"})
    before = tree_digest(theirs)
    with pytest.raises(NotOurs, match="did not write it"):
        write_rounds_report([], theirs)
    assert tree_digest(theirs) == before


def test_write_atomic_removes_only_the_temporary_it_created(tmp_path, monkeypatch):
    """A failed rename removes the call's own temporary; a file already holding the temporary's name is never
    written over nor removed (the temporary is created exclusively), and the write fails instead."""
    import os
    import uuid

    from alignment import ownership

    target = tmp_path / "out.json"
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0xABCDEF12 << 96))
    tmp = tmp_path / ".out.json.tmp-abcdef12"

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        ownership.write_atomic(target, "new")
    assert not tmp.exists() and not target.exists()  # its own temporary, removed
    monkeypatch.undo()
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0xABCDEF12 << 96))
    tmp.write_text("someone else's")
    with pytest.raises(FileExistsError):
        ownership.write_atomic(target, "new")
    assert tmp.read_text() == "someone else's" and not target.exists()
    monkeypatch.undo()
    ownership.write_atomic(target, b"bytes")
    assert target.read_bytes() == b"bytes"
