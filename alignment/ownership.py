"""What this project may remove or replace: only what it can prove it wrote.

Every folder :func:`alignment.io.atomic_directory` creates carries a marker, ``.alignment-output.json``,
written when the temporary folder is made and rewritten with the folder's entries just before it
becomes the final output. A folder is **ours** when it carries that marker, a stage manifest
(``manifest.json`` with a ``stage`` and a ``stage_key``) or a resumable stage's run record (``run.json``).
An entry inside it that the marker (or the manifest) does not list is **foreign**: a file a person put
there. The rules, for every stage, the CLI, the Prefect tasks, ``align compare``, checkpoint folders and
the clean-up of stale temporary siblings:

* a folder is replaced only when it is empty, or ours, of the same stage, with no foreign entry;
* a few folders are refused whatever they hold (:func:`protected_reason`): ``/``, the home directory, the
  current directory and its parents, the project checkout and its parents, the runs root and its parents,
  and any folder that contains an input of the stage;
* an existing file is never turned into a folder.

Refusals raise the stage's own error (a one-line message naming up to five foreign entries), so the CLI
exits 2 and nothing is touched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = ".alignment-output.json"
CREATOR = "alignment-pipeline"
RUN_RECORD = "run.json"
MANIFEST = "manifest.json"
# Records our code adds to a finished output (its footprint, align compare's timing) are ours too.
_OWN_NAMES = {MARKER, MANIFEST, RUN_RECORD, "footprint.json", "timing.json"}


class NotOurs(RuntimeError):
    """A folder this project was asked to remove or replace is not (provably) its own."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: Path, entries: Iterable[str] = ()) -> None:
    """Mark ``folder`` as written by this project, listing its top-level ``entries``."""
    (folder / MARKER).write_text(json.dumps({"created_by": CREATOR, "entries": sorted(entries)}) + "\n",
                                 encoding="utf-8")


def seal_marker(folder: Path) -> None:
    """Rewrite the marker listing everything ``folder`` now holds (just before it becomes an output)."""
    write_marker(folder, (p.name for p in folder.iterdir() if p.name != MARKER))


def _marker(folder: Path) -> dict[str, Any] | None:
    marker = _read_json(folder / MARKER)
    return marker if marker is not None and marker.get("created_by") == CREATOR else None


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
    """The entries of ``folder`` this project did not write (all of them when the folder is not ours)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir())
    if not is_ours(folder):
        return names
    marker = _marker(folder)
    if marker is not None and marker.get("entries"):
        known = set(marker["entries"])
    elif marker is not None or (folder / RUN_RECORD).is_file():
        return []  # a temporary folder (marked when made), or a resumable stage's (it writes as it goes; never removed)
    else:
        manifest = _read_json(folder / MANIFEST) or {}
        known = {str(name).split("/")[0] for name in manifest.get("files", {})}
    return [n for n in names if n not in known and n not in _OWN_NAMES and not _own_hidden(n)]


def _own_hidden(name: str) -> bool:
    """Hidden entries our code leaves inside a folder: JSON and folder temporaries of a killed writer, locks."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name or name.endswith((".lock", ".holder.json")))


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


def replace_problem(folder: str | Path, stage: str | None = None, *, inputs: Iterable[str | Path] = (),
                    runs_root: str | Path | None = None) -> str | None:
    """Why ``folder`` may not be (re)placed by an output of ``stage`` (None when it may: missing, empty, or
    ours for that stage with nothing foreign in it)."""
    folder = Path(folder)
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
    """Remove a temporary sibling a killed writer left, when it carries our marker; True when removed."""
    if folder.is_dir() and not folder.is_symlink() and is_ours(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return True
    return False
