"""Small file-system helpers shared by every stage: atomic output folders, hashing, JSON, manifests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignment.ownership import write_atomic

MANIFEST = "manifest.json"


class DiskFullError(OSError):
    """The device filled up (or a quota ran out) while a stage wrote its output; nothing partial was kept."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (:func:`alignment.ownership.write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The stage manifest of ``folder``, or None when the folder is missing or was never completed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def files_intact(folder: str | Path, manifest: dict[str, Any]) -> bool:
    """Every file the manifest lists exists with its recorded SHA-256."""
    files = manifest.get("files", {})
    return bool(files) and all(
        (Path(folder) / name).is_file() and sha256_file(Path(folder) / name) == meta.get("sha256")
        for name, meta in files.items())


def _replace_check(final: Path) -> None:
    """Refuse to replace ``final`` unless it is missing, empty, or this project's own output with nothing foreign."""
    from alignment.ownership import NotOurs, replace_problem

    problem = replace_problem(final)
    if problem is not None:
        raise NotOurs(problem)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is left exactly as it was, so a
    crash never leaves a half-written stage output behind; temporary folders of an earlier writer that
    was killed (no exception handler runs on SIGKILL) are removed when the next one starts. Stages write
    their manifest last, so a folder with a manifest is a complete one.

    Only what this project wrote is ever removed (:mod:`alignment.ownership`): the temporary folder carries
    a scratch marker naming it from the start (sealed with the output's entries once it is complete), stale
    siblings are removed only when their own marker proves all they hold ours, and an existing ``final`` is replaced only when it is empty or ours
    with nothing foreign in it (:class:`alignment.ownership.NotOurs` otherwise, before any work and again
    before the rename).
    """
    from alignment.ownership import remove_stale, seal_marker, write_scratch_marker

    final = Path(final)
    _replace_check(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Temporary siblings left by a writer killed mid-write (SIGKILL skips the cleanup below). Whoever writes
    # ``final`` holds its stage lock (alignment.stage), so they belong to dead runs: remove the ones proven ours.
    for stale in (*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")):
        remove_stale(stale)
    token = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.tmp-{token}"
    tmp.mkdir()
    try:
        write_scratch_marker(tmp)
        yield tmp
        seal_marker(tmp)
        _replace_check(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            kept = f"{final} was left as it was" if final.exists() else f"nothing of {final.name} was kept"
            raise DiskFullError(exc.errno, f"no space left on the device while writing {final} ({exc.strerror}); "
                                f"the partial copy was removed and {kept}. Free space (df -h {final.parent}) and "
                                "run the same command again: finished stages and complete checkpoints are "
                                "reused.") from exc
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{token}"
        os.rename(final, old)  # proven ours just above
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
