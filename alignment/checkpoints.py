"""Resumable checkpoints, of both kinds of training loop in the project.

**The online loop's** (``alignment.algorithms.online``: REINFORCE, GRPO, PPO): exact resume. Policy
weights, optimizer, every process's RNG state and the trainer's own state in one atomic folder
(``checkpoints/step-NNNNNN`` in the run's folder, :func:`save_checkpoint`), the SHA-256 of every file
recorded in its ``state.json``; the newest ``keep`` are kept plus any the caller protects (the last
healthy one). :func:`latest_checkpoint` resumes from the newest intact one, removing damaged ones with a
warning (:func:`step_checkpoint_problem` says why); :func:`load_checkpoint` reads the optimizer and RNG
files with ``torch.load(weights_only=True)`` (:func:`load_tensors`: tensors and plain values only, a
pickled object is refused with :class:`ResumeError`).

**The stages that train with a transformers ``Trainer``** (reward models, DPO, SFT): the Trainer writes
``checkpoint-N/`` folders (weights, optimizer, scheduler, RNG states, and ``trainer_state.json`` with the
data position) into a folder of its own beside the stage's output, ``.<out>.checkpoints/``, which outlives
a killed run; the stage's output folder itself is still written atomically at the end, and the
checkpoints are removed once it is complete. A checkpoint is written every ``checkpoint_every``
optimizer steps or every ``checkpoint_every_s`` seconds, whichever comes first
(:func:`timed_checkpoint_callback`).

A Trainer checkpoint counts only when it is sealed: after the Trainer has written it,
:class:`SealCheckpoints` records every file's size and SHA-256 in ``sealed.json``. On a re-run
:func:`resume_point` drops what cannot be trusted, with a warning each: checkpoints cut short by a kill
or a full disk (unsealed), ones whose files changed or were truncated since (a hash differs,
:func:`checkpoint_problem`), and the whole folder when it was written for another stage key (another
config or other inputs). The newest intact checkpoint is where training continues; with none, training
starts over.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.io import atomic_directory, files_intact, sha256_file, write_json
from alignment.ownership import (
    MARKER,
    NotOurs,
    foreign_entries,
    is_ours,
    remove_owned,
    remove_stale,
    write_scratch_marker,
)

log = logging.getLogger(__name__)

SEAL = "sealed.json"
OWNER = "stage.json"
CKPT_DIR = "checkpoints"  # the online loop's checkpoints, in the run's folder


# --------------------------------------------------------------------------------------------
# The Trainer stages' checkpoints
# --------------------------------------------------------------------------------------------
def checkpoint_folder(out: str | Path) -> Path:
    """Where a stage writing ``out`` keeps its Trainer checkpoints: ``.<name>.checkpoints`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.checkpoints"


def seal(checkpoint: str | Path) -> None:
    """Record the size and SHA-256 of every file of a finished checkpoint (``sealed.json``, written last)."""
    checkpoint = Path(checkpoint)
    files = {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != SEAL}
    write_json(checkpoint / SEAL, {"files": files})


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is intact)."""
    try:
        sealed = json.loads((Path(checkpoint) / SEAL).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not sealed (cut short while it was being written)"
    except (OSError, ValueError) as exc:
        return f"unreadable seal ({exc})"
    if not files_intact(checkpoint, sealed):
        return "a file is missing, truncated or changed since it was written"
    return None


def _step(folder: Path) -> int:
    try:
        return int(folder.name.split("-")[-1])
    except ValueError:
        return -1


def resume_point(folder: str | Path, key: str, clean: bool = True) -> Path | None:
    """The newest intact ``checkpoint-N`` in ``folder`` for stage ``key``, after removing what cannot be used.

    Claims the folder for ``key`` (``stage.json``); checkpoints of another key are removed, as are
    unsealed or damaged ones (each with a warning naming it and why), so that the Trainer neither
    resumes from them nor counts them when it rotates old checkpoints. ``clean=False`` (the other
    processes of a data-parallel run): the same answer, read only.
    """
    folder = Path(folder)
    owner = folder / OWNER
    if not clean:
        try:
            if json.loads(owner.read_text(encoding="utf-8")).get("stage_key") != key:
                return None
        except (OSError, ValueError):
            return None
        intact = [p for p in folder.glob("checkpoint-*") if p.is_dir() and checkpoint_problem(p) is None]
        return max(intact, key=_step, default=None)
    if folder.is_dir():
        try:
            recorded = json.loads(owner.read_text(encoding="utf-8")).get("stage_key")
        except (OSError, ValueError):
            recorded = None
        if recorded != key and any(folder.iterdir()):
            if recorded is None and not is_ours(folder):  # not a checkpoint folder of ours: never removed
                raise NotOurs(f"{folder} is where this stage keeps its checkpoints, but it holds files this project "
                              f"did not write ({', '.join(foreign_entries(folder)[:5])}); move them away")
            log.warning("%s holds checkpoints of another run (stage key %s, this one %s): removing them",
                        folder, (recorded or "unknown")[:12], key[:12])
            remove_owned(folder, "the checkpoints of another run")
    folder.mkdir(parents=True, exist_ok=True)
    write_scratch_marker(folder)  # the Trainer's working folder: all it holds is ours (alignment.ownership)
    write_json(owner, {"stage_key": key})
    newest = None
    for ckpt in sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=_step, reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            newest = newest or ckpt
            continue
        log.warning("checkpoint %s is unusable: %s; removing it%s", ckpt, problem,
                    "" if newest else " and falling back to the one before")
        shutil.rmtree(ckpt, ignore_errors=True)
    if newest is not None:
        log.info("resuming from %s", newest)
    return newest


def seal_callback():
    """A transformers TrainerCallback that seals each checkpoint once the Trainer has written it."""
    from transformers import TrainerCallback

    class SealCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    seal(ckpt)
            return control

    return SealCheckpoints()


@contextlib.contextmanager
def refusing_pickles(checkpoint: str | Path | None, error: type[Exception]):
    """Around ``trainer.train(resume_from_checkpoint=checkpoint)``: transformers reads the checkpoint's
    ``rng_state.pth``, ``optimizer.pt`` and ``scheduler.pt`` with ``torch.load(weights_only=True)``, so a
    file carrying a pickled object (one whose loading would run code) is refused there and nothing in it
    runs; this turns that refusal into the stage's ``error``, one line naming the checkpoint."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        if checkpoint is None:
            raise
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled reference to {named.group(1)}" if named else "a pickled object"
        raise error(f"{checkpoint} holds a file with {what}, not only tensors and plain values: it was not written "
                    "by this program or was changed since, and loading it could run code, so it is refused. "
                    f"Remove {checkpoint} to resume from the checkpoint before it (or from the start)") from None


def trainer_checkpoint_args(folder: str | Path, every: int) -> dict:
    """The Trainer arguments of this checkpoint policy: into ``folder`` (:func:`checkpoint_folder`) every
    ``every`` optimizer steps (0: never), the newest two kept."""
    return {"output_dir": str(folder), "save_strategy": "steps" if every else "no", "save_steps": max(1, every),
            "save_total_limit": 2}


def progress_callback(report: Callable[[int, int], None]):
    """A transformers TrainerCallback that reports (step, max_steps) after every optimizer step."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report(state.global_step, state.max_steps)

    return Progress()


def _first_process_decides(flag: bool, device) -> bool:
    """Process 0's ``flag`` on every process of a distributed run (so all save together); ``flag`` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def timed_checkpoint_callback(every_s: float):
    """A transformers TrainerCallback that asks for a checkpoint after the optimizer step at which
    ``every_s`` seconds have passed since the last one (or since training began), beside the Trainer's
    own every-N-steps rule: whichever comes first. The clock restarts at every save."""
    from transformers import TrainerCallback

    class TimedCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if _first_process_decides(time.monotonic() - self.last >= every_s, args.device):
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return TimedCheckpoints()


def trainer_callbacks(progress: Callable[[int, int], None] | None = None, checkpoint_every_s: float = 0.0,
                      label: str = "training: optimizer steps") -> list:
    """What every Trainer-based stage passes: the checkpoint seal, a checkpoint every ``checkpoint_every_s``
    seconds as well as every N steps (0: by steps only; pass 0 when the stage keeps no checkpoints), the
    progress report when asked, the logged numbers to the tracking run (``alignment.tracking``) and the
    console's one progress display (``label``; see ``alignment.console.quiet_trainer``)."""
    from alignment.console import trainer_console_callback
    from alignment.tracking import trainer_callback

    return [seal_callback(), *([timed_checkpoint_callback(checkpoint_every_s)] if checkpoint_every_s > 0 else []),
            *([progress_callback(progress)] if progress else []), trainer_callback(), trainer_console_callback(label)]


def remove_checkpoints(folder: str | Path) -> None:
    """Remove a finished stage's checkpoint folder (:func:`checkpoint_folder`), only when it is ours."""
    folder = Path(folder)
    if folder.is_dir() and (folder / OWNER).is_file() and not is_ours(folder):
        write_scratch_marker(folder)  # a folder of ours from before markers (stage.json written by resume_point)
    try:
        remove_owned(folder, "the checkpoints")
    except NotOurs as exc:  # the output is complete all the same: keep the folder and say why
        log.warning("%s", exc)


# --------------------------------------------------------------------------------------------
# The online loop's checkpoints
# --------------------------------------------------------------------------------------------
class ResumeError(ValueError):
    """A checkpoint cannot be resumed as launched (the message says why)."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values only, so that a checkpoint loads with
    ``torch.load(weights_only=True)`` (no pickled objects, no code run by loading it)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (also the tuples of checkpoints written before it kept tensors)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint. Checkpoints are written atomically (a kill leaves none or a whole one);
    one damaged since (a file truncated or changed: its SHA-256, recorded in ``state.json``, differs) is
    removed with a warning and the one before it is used."""
    folder = out_dir / CKPT_DIR
    if not folder.is_dir():
        return None
    for partial in folder.glob(".step-*.tmp-*"):  # left by a kill during a checkpoint write (only ours: marked)
        remove_stale(partial)
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
    damaged, good = [], None
    for ckpt in reversed(done):
        problem = step_checkpoint_problem(ckpt)
        if problem is None:
            good = ckpt
            break
        damaged.append((ckpt, problem))
    for ckpt, problem in damaged:
        log.warning("checkpoint %s is unusable: %s; removing it and resuming from %s", ckpt, problem,
                    good.name if good else "the start (no intact checkpoint is left)")
        _remove_step(ckpt)
    return good


def _remove_step(ckpt: Path) -> None:
    """Remove an online checkpoint (an atomic folder whose marker lists what it holds), only when all of it is
    ours; a warning naming what is not, otherwise."""
    try:
        remove_owned(ckpt, f"the checkpoint {ckpt}")
    except NotOurs as exc:
        log.warning("%s; keeping it", exc)


def step_checkpoint_problem(ckpt: Path) -> str | None:
    """Why an online checkpoint (``step-NNNNNN``) cannot be resumed from (None when its state parses and its
    files match their hashes)."""
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable state.json ({exc})"
    if "files" in state and not files_intact(ckpt, state):  # (checkpoints from before hashes were kept: trusted)
        return "a file is missing, truncated or changed since it was written"
    return None


def save_checkpoint(out_dir: Path, step: int, policy, optimizer, state: dict[str, Any], keep: int = 2,
                    rng: dict[str, Any] | None = None) -> Path:
    """Policy weights, optimizer, RNG states and trainer state, in one atomic folder rename.

    ``rng``: the RNG states to store (``{"ranks": [...]}`` for a data-parallel run); this process's by
    default. ``state["protected"]``: checkpoint names never deleted by the ``keep`` rule.
    """
    from safetensors.torch import save_model

    target = out_dir / CKPT_DIR / f"step-{step:06d}"
    with atomic_directory(target) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))  # handles tied embeddings
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        files = {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.iterdir()) if f.name != MARKER}
        write_json(tmp / "state.json", {"step": step, **state, "files": files})  # last: marks it complete
    for old in sorted((out_dir / CKPT_DIR).glob("step-*"))[:-keep]:
        if old.name != target.name and old.name not in state.get("protected", []):
            _remove_step(old)
    return target


def _numpy_rng_globals() -> list:
    """What checkpoints written before RNG states were kept as tensors need besides tensors: numpy's array
    reconstruction (the same allowlist transformers uses for its ``rng_state.pth``), no arbitrary callable."""
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_tensors(path: Path) -> Any:
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors and plain values only. A file
    that holds anything else (a pickled object whose loading would run code) is refused with
    :class:`ResumeError`; nothing in it is executed."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled reference to {named.group(1)}" if named else "a pickled object"
        raise ResumeError(f"{path} holds {what}, not only tensors and plain values: it was not written by this "
                          "program or was changed since, and loading it could run code, so it is refused. Remove "
                          f"{path.parent} to resume from the checkpoint before it (or from the start)") from None
    except (RuntimeError, EOFError, ValueError) as exc:  # not a torch file at all
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ResumeError(f"{path} cannot be read as a checkpoint file ({first[:200]}). Remove {path.parent} to "
                          "resume from the checkpoint before it (or from the start)") from None


def load_checkpoint(ckpt: Path, policy, optimizer, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG; returns the trainer state saved with them.

    The optimizer and RNG files are read with ``weights_only=True`` (:func:`load_tensors`) before anything
    is restored, so a refused file leaves the models as they were."""
    from safetensors.torch import load_model

    optimizer_state = load_tensors(ckpt / "optimizer.pt")
    rng = load_tensors(ckpt / "rng.pt")
    ranks = rng.get("ranks", [rng])  # a data-parallel run keeps every process's state
    if len(ranks) != world:
        raise ResumeError(f"{ckpt} was written by {len(ranks)} process(es); resume it with the same number "
                          f"(this launch has {world}) so that every process continues its own sampling")
    load_model(policy, str(ckpt / "policy.safetensors"))
    optimizer.load_state_dict(optimizer_state)
    set_rng_state(ranks[rank])
    return json.loads((ckpt / "state.json").read_text())
