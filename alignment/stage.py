"""The stage contract every stage follows (data, reward model, REINFORCE, scoring, judge, ...).

* A stage's output depends on its **stage key**: a hash of its config and of its inputs' manifests.
* Its default folder is ``<runs_dir>/<stage>/[<name>-]<key[:12]>`` (:func:`stage_folder`); the
  pipeline's planning and the stage itself both take it from the stage's ``plan_*`` function.
* A folder is **complete** when its ``manifest.json`` (written last) carries the key and every file it
  lists is intact (:func:`complete_manifest`); a complete folder is reused, not recomputed.
* A folder holding another config's output is never overwritten by accident (:func:`reuse_or_guard`):
  the stage refuses, naming the folder, unless told to overwrite. Resumable stages (REINFORCE, the
  judge) record their key in ``run.json`` when they start (:func:`claim_output`), so a re-run with the
  same key continues and one with another key is refused.
* **One writer per folder**: a stage function decorated with :func:`exclusive_stage` holds an OS lock
  on each folder it checks with :func:`reuse_or_guard` (``.<folder>.lock``, beside it) until it returns,
  so two runs (two ``align run``s, a served deployment and a CLI run) never write one folder at once.
  The second stops with :class:`StageBusy` naming the holder, or waits ``ALIGN_LOCK_WAIT_S`` seconds
  for it first (and then reuses what it finished). The kernel drops the lock when its holder dies,
  even by SIGKILL, so a crashed run never leaves a stale lock behind.
* Every stage returns a :class:`StageResult`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from alignment import tracking
from alignment.io import files_intact, read_manifest, write_json
from alignment.ownership import (
    is_ours,
    path_problem,
    protected_reason,
    recorded_stage,
    replace_problem,
    write_record,
)

RUN_RECORD = "run.json"


@dataclasses.dataclass
class StageResult:
    """What a stage returns: its output folder, its summary, whether an earlier output was reused, and
    what it cost (seconds, peak memory: see ``alignment.footprint``)."""

    out_dir: Path
    summary: dict[str, Any]
    reused: bool = False
    footprint: dict[str, Any] | None = None


class StagePlan(NamedTuple):
    """Where a stage writes, decided before it runs."""

    key: str  # the stage key: config + input manifests + schema
    out: Path  # the folder the stage writes
    done: Path  # the folder whose manifest marks completion (``out``, or REINFORCE's ``out/final``)


def stage_folder(runs_dir: str | Path, stage: str, key: str, name: str | None = None) -> Path:
    """The one rule for a stage's default output folder: ``<runs_dir>/<stage>/[<name>-]<key[:12]>``."""
    return Path(runs_dir) / stage / (f"{name}-{key[:12]}" if name else key[:12])


def complete_manifest(folder: str | Path, key: str) -> dict[str, Any] | None:
    """The manifest of a finished output for ``key`` (written last, every listed file intact), else None."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("stage_key") != key or not files_intact(folder, manifest):
        return None
    return manifest


def is_complete(plan: StagePlan) -> bool:
    return complete_manifest(plan.done, plan.key) is not None


def _recorded_key(folder: Path) -> str | None:
    """The stage key a folder says it belongs to: its run record (resumable stages) or its manifest."""
    for path in (folder / RUN_RECORD, folder / "manifest.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")).get("stage_key")
            except (OSError, json.JSONDecodeError, AttributeError):
                return None
    return None


class StageBusy(RuntimeError):
    """Another run is writing this stage folder."""


LOCK_WAIT_ENV = "ALIGN_LOCK_WAIT_S"
# The locks the running exclusive_stage function holds: (their exit stack, the folders locked).
_held: contextvars.ContextVar[tuple[contextlib.ExitStack, set[Path]] | None] = contextvars.ContextVar(
    "stage_locks", default=None)


def _tracked(stage_fn: Callable[..., Any], args: tuple) -> contextlib.AbstractContextManager:
    """The stage's tracking run (``alignment.tracking``): named after its config's section, its config as params;
    none on the data-parallel ranks but the first (which reports for all)."""
    if tracking.settings() is None:
        return contextlib.nullcontext()
    from alignment.parallel import launched_rank

    if launched_rank() != 0:
        return contextlib.nullcontext()
    # the stage's config: its first argument that is a config instance (run_online takes the recipe class first)
    config = next((a for a in args if hasattr(a, "model_dump") and not isinstance(a, type)), None)
    name = getattr(config, "section", None) or stage_fn.__name__
    params = config.model_dump(mode="json") if config is not None else None
    return tracking.stage_run(name, params=params, tags={"stage_fn": f"{stage_fn.__module__}.{stage_fn.__name__}"})


def exclusive_stage(stage_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a stage function: every folder it passes to :func:`reuse_or_guard` stays locked until it returns,
    and the call is one tracked run (``alignment.tracking``; nothing when tracking is off)."""

    @functools.wraps(stage_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _held.set((stack, set()))
            try:
                with _tracked(stage_fn, args) as run:
                    result = stage_fn(*args, **kwargs)
                    tracking.record_result(run, result)
                    return result
            finally:
                _held.reset(token)

    return wrapper


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait_s: float | None = None):
    """Hold ``.<folder>.lock`` beside ``folder`` (an flock: released by the kernel when the holder exits,
    however it exits; the empty file stays).

    Raises :class:`StageBusy` naming the holder (process, host, since when, command) when another run
    holds it after ``wait_s`` seconds (default ``ALIGN_LOCK_WAIT_S``, else 0). Under data parallelism
    only the first process locks (the others follow it).
    """
    from filelock import FileLock, Timeout

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    holder = folder.parent / f".{folder.name}.holder.json"
    wait = float(os.environ.get(LOCK_WAIT_ENV, "0")) if wait_s is None else wait_s
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"), thread_local=False)  # hidden: out of stage globs
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        try:
            who = json.loads(holder.read_text(encoding="utf-8"))
            who = f"process {who['pid']} on {who['host']} since {who['since']}: {who['command']}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise StageBusy(f"{folder} is being written by another run ({who}). Wait for it to finish (its output is "
                        f"then reused), set {LOCK_WAIT_ENV}=<seconds> to wait for it, or use another runs folder"
                        ) from None
    try:
        write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))})
        yield
    finally:
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()


def _lock_for_this_stage(folder: Path) -> None:
    """Lock ``folder`` until the enclosing :func:`exclusive_stage` function returns (once per folder)."""
    held = _held.get()
    if held is None:
        return
    stack, locked = held
    if folder.resolve() not in locked:
        stack.enter_context(folder_lock(folder))
        locked.add(folder.resolve())


def reuse_or_guard(folder: str | Path, key: str, error: type[Exception], *, stage: str | None = None,
                   overwrite: bool = False, done: str | Path | None = None, resumable: bool = False,
                   inputs: Iterable[str | Path] = (), runs_root: str | Path | None = None) -> dict[str, Any] | None:
    """The manifest of a complete output for ``key`` (reuse it), else None after checking the folder may be written.

    ``done``: the folder whose manifest marks completion (default ``folder``). Raises ``error`` (one line) when
    ``folder`` is one that is never written (:func:`alignment.ownership.protected_reason`: ``/``, the home
    directory, the current directory, the checkout, the runs root ``runs_root``, a folder holding one of
    ``inputs``), is a file, or holds another config's output or files this project did not write. With
    ``overwrite`` an output of this project for the same ``stage`` with nothing foreign in it is replaced
    (atomically, by the stage); anything else is refused all the same. ``resumable``: a folder started by a
    run with the same key is continued. Inside an :func:`exclusive_stage` function the folder is locked first
    (:class:`StageBusy` when another run writes it), so what is decided here stays true while the stage runs.
    """
    folder = Path(folder)
    inputs = list(inputs)
    problem = path_problem(folder, "--out")
    if problem is not None:
        raise error(problem)
    reason = protected_reason(folder, inputs, runs_root)
    if reason is not None:
        raise error(f"{folder} is never used as an output folder: {reason}; choose another --out")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise error(f"{folder} is {'a symbolic link' if folder.is_symlink() else 'a file'}, not a folder; "
                    "choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and (not is_ours(folder) or (stage and not recorded_stage(folder))):
        raise error(replace_problem(folder, stage, inputs=inputs, runs_root=runs_root))  # before the lock: none left
    _lock_for_this_stage(folder)
    if not overwrite:
        manifest = complete_manifest(done if done is not None else folder, key)
        if manifest is not None:
            return manifest
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    owner = _recorded_key(folder)
    same_stage = stage is None or recorded_stage(folder) in (None, stage)
    if resumable and not overwrite and owner is not None and same_stage:
        if owner == key:  # the same run, continued: it writes into its folder, removing nothing it did not record
            return None
        raise error(f"{folder} already holds a different output of this stage (made with a different config or "
                    "inputs); choose another --out")
    problem = replace_problem(folder, stage, inputs=inputs, runs_root=runs_root)
    if overwrite or problem is not None:
        if problem is None:
            return None
        raise error(problem)
    if owner is not None and owner != key:
        what = "a different output of this stage (made with a different config or inputs)"
    else:
        what = "files of this stage that are not a complete output (interrupted, or changed since)"
    hint = "" if resumable else " or pass --overwrite to replace it"
    raise error(f"{folder} already holds {what}; choose another --out{hint}")


def claim_output(folder: str | Path, key: str, config: dict[str, Any], *, stage: str, **extra: Any) -> None:
    """Record in ``folder/run.json`` that a resumable ``stage`` with ``key`` writes here (call after the guard)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, RUN_RECORD, {"stage": stage, "stage_key": key, "config": config, **extra})
