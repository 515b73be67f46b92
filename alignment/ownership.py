"""What this project may remove or replace: only what it can prove, from its own records, that it wrote.

**Folders.** Every folder :func:`alignment.io.atomic_directory` creates carries a marker,
``.alignment-output.json``. While the folder is being written the marker names the folder itself
(``"scratch"``: a writer's temporary folder, everything in it is that writer's); just before it becomes
the final output the marker is rewritten (sealed) with the folder's entries. Records the project adds
to a finished folder later (``footprint.json``, ``align compare``'s ``timing.json``, a resumable stage's
``run.json``) are added to the marker when they are written (:func:`write_record`). A folder that is a
writer's workspace throughout (a Trainer's checkpoint folder ``.<out>.checkpoints``, an ensemble's staging
folder) keeps a scratch marker naming it. What a folder's records list (the marker's entries; for a
folder from before markers, its stage manifest's files and the manifest itself) is **ours**; every other
entry is **foreign**, whatever its name (``timing.json``, ``.x.old-2024`` and ``.x.lock`` included: the
stage locks and their holder records live beside the folder they lock, not in it). The rules, for every
stage, the CLI, the Prefect tasks, ``align compare``, checkpoint folders and the clean-up of stale
temporary siblings:

* a folder is replaced only when it is empty, or a stage output of ours for the same stage with no
  foreign entry; a folder of ours that is no stage output (the converted-model cache, an ensemble's
  staging folder) is never replaced by one;
* a stale temporary sibling (``.<out>.tmp-*``, ``.<out>.old-*``) is removed only when its own marker is
  a scratch marker naming that very folder, or a sealed one listing everything in it;
* a few folders are refused whatever they hold (:func:`protected_reason`): ``/``, the home directory, the
  current directory and its parents, the project checkout and its parents, the runs root and its parents,
  and any folder that contains an input of the stage;
* an existing file is never turned into a folder, and a path that cannot be a folder (inside a file,
  through a broken or looping symbolic link, a name longer than the file system allows) is refused
  (:func:`path_problem`).

**Files outside a stage folder** (``align rm-eval --json``, the tracking store ``<runs>/mlflow.db``,
reports): each is recorded by a sidecar beside it, ``.<name>.alignment.json`` (:func:`record_file`), with
the file's SHA-256 when its content is final (a JSON report) and without one for a file that keeps
changing (a database). An existing file is written over only when its sidecar says it is ours and, where
a hash was recorded, it still has that hash (:func:`file_problem`); anything else is refused.
The tracking store's default, ``<runs>/mlflow.db``, is claimed by its sidecar when it is about to be created
(:func:`claim_store`, called where ``alignment.tracking`` picks the URI); an existing file there without
a sidecar is used only when it already is an MLflow store (:func:`is_mlflow_store`: a store from before
these records, or one ``mlflow`` made; runs are added, nothing removed), any other is refused; ``<runs>`` is the runs folder the
command uses (a single-stage command with an --out outside ``./runs`` and no ``$ALIGNMENT_RUNS_DIR``: the
folder its --out sits in; see ``cli.main._tracking_root``).

Refusals raise the stage's own error or :class:`NotOurs` (a one-line message naming up to five foreign
entries), so the CLI exits 2 and nothing is touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = ".alignment-output.json"
CREATOR = "alignment-pipeline"
RUN_RECORD = "run.json"
MANIFEST = "manifest.json"


class NotOurs(RuntimeError):
    """A folder this project was asked to remove or replace is not (provably) its own."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` (UTF-8) or bytes through a temporary sibling and a rename: a crash leaves the old file or
    the new one, and a failed write removes the temporary it made (the one writer: ``alignment.io`` sits above)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    created = False
    try:
        with open(tmp, "xb") as fh:  # exclusive: fails rather than reuse a file that already has this name
            created = True
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if created:  # only the temporary this call created, never a file it found there
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_marker(folder: Path, record: dict[str, Any]) -> None:
    """Write the marker atomically (a kill leaves the old one or the new one, never half of one)."""
    write_atomic(folder / MARKER, json.dumps({"created_by": CREATOR, **record}) + "\n")


def write_marker(folder: Path, entries: Iterable[str] = ()) -> None:
    """Mark ``folder`` as written by this project, listing its top-level ``entries``."""
    _write_marker(folder, {"entries": sorted(set(entries))})


def write_scratch_marker(folder: Path) -> None:
    """Mark ``folder`` as a writer's own working folder (an atomic output being written, a Trainer's checkpoint
    folder, an ensemble's staging folder): everything in it, under this very name, is ours. A copy or a
    renamed folder does not carry the claim (the marker names the folder)."""
    _write_marker(folder, {"scratch": folder.name, "entries": []})


def seal_marker(folder: Path) -> None:
    """Rewrite the marker listing everything ``folder`` now holds (just before it becomes an output)."""
    write_marker(folder, (p.name for p in folder.iterdir() if p.name != MARKER))


def record_entries(folder: str | Path, names: Iterable[str]) -> None:
    """Add ``names`` (entries this project writes into ``folder``) to the folder's record, keeping what it
    already lists: call it when writing a record into a finished output (footprint, timing, run record), so
    the entry is proven ours by the record, not by its name. A scratch folder claims all it holds already."""
    folder = Path(folder)
    if not _is_scratch(folder):
        write_marker(folder, recorded_entries(folder) | set(names))


def write_record(folder: str | Path, name: str, data: Any) -> None:
    """Write the JSON record ``name`` into a ``folder`` of ours atomically, listing it in the folder's marker
    first, and its temporary copy while it exists, so that neither is ever foreign (a kill mid-write leaves a
    listed temporary, which a later overwrite removes with the rest)."""
    folder = Path(folder)
    tmp = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    record_entries(folder, [name, tmp])
    (folder / tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(folder / tmp, folder / name)
    write_marker(folder, recorded_entries(folder) - {tmp})


def _marker(folder: Path) -> dict[str, Any] | None:
    marker = _read_json(folder / MARKER)
    return marker if marker is not None and marker.get("created_by") == CREATOR else None


def recorded_entries(folder: str | Path) -> set[str]:
    """The entries of ``folder`` its records list as this project's: the marker's entries, a stage manifest's
    files and the manifest itself (folders from before markers)."""
    folder = Path(folder)
    known: set[str] = set()
    marker = _marker(folder)
    if marker is not None and isinstance(marker.get("entries"), list):
        known |= {str(name) for name in marker["entries"]}
    manifest = _read_json(folder / MANIFEST)
    if manifest is not None and manifest.get("stage_key") and marker is None:
        known |= {MANIFEST, *(str(name).split("/")[0] for name in manifest.get("files", {}))}
    return known


def recorded_stage(folder: str | Path) -> str | None:
    """The stage a folder of ours records (its manifest's or run record's ``stage``), else None."""
    folder = Path(folder)
    for name in (MANIFEST, RUN_RECORD):
        record = _read_json(folder / name)
        if record is not None and record.get("stage_key") and record.get("stage"):
            return str(record["stage"])
    return None


def is_ours(folder: str | Path) -> bool:
    """``folder`` carries this project's marker, a stage manifest or a run record."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    if _marker(folder) is not None:
        return True
    return any((r := _read_json(folder / name)) is not None and bool(r.get("stage_key"))
               for name in (MANIFEST, RUN_RECORD))


def foreign_entries(folder: str | Path) -> list[str]:
    """The entries of ``folder`` its records do not list (all of them when the folder is not ours)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir())
    if not is_ours(folder):
        return names
    if _is_scratch(folder):
        return []  # a writer's temporary folder: its marker, naming this very folder, claims all of it
    known = recorded_entries(folder) | {MARKER}
    return [n for n in names if n not in known]


def _is_scratch(folder: Path) -> bool:
    """``folder`` is a writer's temporary folder by its own marker (which names this very folder)."""
    marker = _marker(folder)
    return marker is not None and marker.get("scratch") == folder.name


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def checkout_root() -> Path | None:
    """The project checkout this code runs from (None for an installed copy)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "alignment").is_dir() else None


def local_paths(value: Any) -> list[Path]:
    """Every string in a (nested) config dump that names an existing local file or folder: a stage's inputs."""
    found: list[Path] = []
    if isinstance(value, dict):
        for v in value.values():
            found += local_paths(v)
    elif isinstance(value, list | tuple):
        for v in value:
            found += local_paths(v)
    elif isinstance(value, str) and value.strip() and len(value) < 4096 and "\n" not in value:
        try:
            if Path(os.path.expanduser(value)).exists():
                found.append(_resolved(value))
        except (OSError, ValueError):
            pass
    return found


def protected_reason(folder: str | Path, inputs: Iterable[str | Path] = (),
                     runs_root: str | Path | None = None) -> str | None:
    """Why ``folder`` may never be written as a stage output, whatever it holds (None when it may)."""
    target = _resolved(folder)
    if target == Path(target.anchor):
        return "it is the file-system root"
    home = _resolved(Path.home())
    if target == home or target in home.parents:
        return "it is the home directory" if target == home else "it contains the home directory"
    cwd = _resolved(Path.cwd())
    if target == cwd or target in cwd.parents:
        return "it is the current directory" if target == cwd else "it contains the current directory"
    root = checkout_root()
    if root is not None and (target == root or target in root.parents):
        return "it is the project checkout" if target == root else "it contains the project checkout"
    if runs_root is not None:
        runs = _resolved(runs_root)
        if target == runs or target in runs.parents:
            return "it is the runs root" if target == runs else "it contains the runs root"
    for item in inputs:
        path = _resolved(item)
        if path == target or target in path.parents:
            return f"it contains an input of this stage ({item})"
    return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _not_a_stage_output(folder: Path) -> str:
    """What a folder of ours that records no stage is, for a refusal."""
    what = "a model folder (the converted-model cache?)" if (folder / "config.json").is_file() else \
        "a folder this project keeps for itself (a cache or staging folder)"
    return (f"{folder} is {what}, not the output of a stage, and is never replaced by one; "
            "choose another --out")


def replace_problem(folder: str | Path, stage: str | None = None, *, inputs: Iterable[str | Path] = (),
                    runs_root: str | Path | None = None) -> str | None:
    """Why ``folder`` may not be (re)placed by an output of ``stage`` (None when it may: missing, empty, or
    ours, an output of that stage, with nothing foreign in it)."""
    folder = Path(folder)
    problem = path_problem(folder, "--out")
    if problem is not None:
        return problem
    reason = protected_reason(folder, inputs, runs_root)
    if reason is not None:
        return f"{folder} is never used as an output folder: {reason}"
    if folder.is_symlink():
        return f"{folder} is a symbolic link; give the folder it points to, or another --out"
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder; choose another --out"
    if not folder.exists() or not any(folder.iterdir()):
        return None
    theirs = recorded_stage(folder)
    if stage is not None and theirs is not None and theirs != stage:
        return (f"{folder} holds the output of another stage ({theirs}), which is never replaced; "
                "choose another --out")
    if stage is not None and theirs is None and is_ours(folder):
        return _not_a_stage_output(folder)
    foreign = foreign_entries(folder)
    if foreign:
        return (f"{folder} holds files this project did not write ({_listing(foreign)}), which are never "
                "removed; choose another --out")
    return None


def remove_owned(folder: str | Path, what: str = "") -> None:
    """Remove ``folder`` only when it is ours with nothing foreign in it (:class:`NotOurs` otherwise)."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    problem = protected_reason(folder)
    if problem is None and (folder.is_symlink() or not folder.is_dir()):
        problem = "it is not a folder"
    elif problem is None and any(folder.iterdir()):
        if not is_ours(folder):
            problem = "it is not an output of this project"
        elif foreign := foreign_entries(folder):
            problem = f"it holds files this project did not write ({_listing(foreign)})"
    if problem is not None:
        raise NotOurs(f"refusing to remove {what or folder}: {problem}")
    shutil.rmtree(folder)


def remove_stale(folder: Path) -> bool:
    """Remove a temporary sibling a killed writer left, when its own marker proves all of it ours (a scratch
    marker naming this very folder, or a sealed one listing every entry); True when removed."""
    if not folder.is_dir() or folder.is_symlink() or not is_ours(folder) or foreign_entries(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


# ----------------------------------------------------------------------------------------- paths


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def path_problem(path: str | Path, what: str = "--out") -> str | None:
    """Why ``path`` (already ``~``-expanded) cannot be written as a file or folder, in one line (None when it
    can): a part of it is a file, a broken or looping symbolic link, or a name too long for the file system."""
    path = Path(path)
    text = str(path)
    if "\0" in text:
        return f"{what} {text!r}: the path holds a NUL character"
    if len(os.fsencode(text)) >= 4096:
        return f"{what} {text[:60]}...: the path is longer than the file system allows (4096 bytes)"
    parts = [path, *path.parents]
    existing = next((p for p in parts if os.path.lexists(p)), None)
    for part in path.parts:
        if len(os.fsencode(part)) > _name_max(existing if existing is not None and existing.is_dir() else Path(".")):
            return (f"{what} {text[:60]}...: the name {part[:40]}... is longer than the file system allows "
                    f"({len(os.fsencode(part))} bytes)")
    for part in reversed(parts):  # from the root down: the first component that is not a usable folder
        if part == path:
            break
        try:
            os.stat(part)
        except OSError as exc:
            if (link := _link_problem(part, exc)) is not None:
                return f"{what} {text}: {part} {link}"
            if exc.errno == errno.ENOTDIR:
                return f"{what} {text}: {part.parent} is a file, not a folder"
            if exc.errno == errno.ENOENT:
                return None  # the rest is made as needed
            return f"{what} {text}: {part} cannot be read ({exc.strerror})"
        if not os.path.isdir(part):
            return f"{what} {text}: {part} is a file, not a folder"
    try:
        os.stat(path)
    except OSError as exc:
        if (link := _link_problem(path, exc)) is not None:
            return f"{what} {text} {link}"
    return None


def _link_problem(path: Path, exc: OSError) -> str | None:
    """What is wrong with ``path`` when ``os.stat`` failed with ``exc`` because it is a symbolic link."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link that loops"
    if os.path.islink(path):
        return f"is a broken symbolic link (it points to {os.readlink(path)})"
    return None


# ----------------------------------------------------------------------------------------- files outside stage folders


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}.alignment.json"


def file_problem(path: str | Path, what: str = "the file") -> str | None:
    """Why this project may not write ``path`` (a file outside a stage folder), in one line; None when it is
    missing or ours by its sidecar record (and unchanged since, where a hash was recorded)."""
    path = Path(path)
    problem = path_problem(path, what)
    if problem is not None:
        return problem
    if path.is_symlink() or path.is_dir():
        return f"{what} {path} is a {'symbolic link' if path.is_symlink() else 'folder'}; give another path"
    if not path.exists():
        return None
    record = _read_json(_sidecar(path))
    if record is None or record.get("created_by") != CREATOR or record.get("file") != path.name:
        return f"{what} {path} already exists and this project did not write it; it is never overwritten"
    if record.get("sha256") and _sha256(path) != record["sha256"]:
        return f"{what} {path} was changed since this project wrote it; it is never overwritten"
    return None


def record_file(path: str | Path, final: bool = True) -> None:
    """Record that this project wrote ``path`` (its sidecar; with the file's SHA-256 when ``final``: a file
    that keeps changing, such as a database, is recorded without one)."""
    path = Path(path)
    record: dict[str, Any] = {"created_by": CREATOR, "file": path.name}
    if final:
        record["sha256"] = _sha256(path)
    write_atomic(_sidecar(path), json.dumps(record) + "\n")


def write_own_file(path: str | Path, text: str | bytes, what: str = "the file") -> None:
    """Write ``text`` (or bytes) to ``path`` (atomically) and record it as ours; :class:`NotOurs` when the path holds
    something this project did not write (check :func:`file_problem` early, before the work)."""
    path = Path(path)
    problem = file_problem(path, what)
    if problem is not None:
        raise NotOurs(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    record_file(path)


def is_mlflow_store(path: str | Path) -> bool:
    """``path`` is a SQLite file that already holds an MLflow tracking store (its ``experiments`` and
    ``alembic_version`` tables), read without writing it."""
    import sqlite3

    try:
        with open(path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\0":
                return False
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except (OSError, sqlite3.Error):
        return False
    return {"experiments", "runs", "alembic_version"} <= tables


def claim_store(path: str | Path) -> None:
    """Before a tracking store (a SQLite file) at ``path`` is used: refuse (:class:`NotOurs`) a file this
    project did not create, unless it already is an MLflow tracking store (adding runs to one is what it is
    for: a store made before these records, or by ``mlflow`` itself); record one about to be created as ours."""
    path = Path(path)
    problem = file_problem(path, "the tracking store")
    if problem is not None and path.is_file() and not path.is_symlink() and is_mlflow_store(path):
        return
    if problem is not None:
        raise NotOurs(f"{problem} (give tracking.uri, or tracking=none)")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # the runs folder, which the stages make anyway
            record_file(path, final=False)
        except OSError:
            pass  # an unwritable runs folder: the tracking set-up says so (alignment.tracking.store_problem)
