"""Resumable checkpoints (and progress) of the stages that train with a transformers ``Trainer``
(reward models, DPO).

The Trainer writes ``checkpoint-N/`` folders (weights, optimizer, scheduler, RNG states, and
``trainer_state.json`` with the data position) into a folder of its own beside the stage's output,
``.<out>.checkpoints/``, which outlives a killed run; the stage's output folder itself is still written
atomically at the end, and the checkpoints are removed once it is complete. A checkpoint is written
every ``checkpoint_every`` optimizer steps or every ``checkpoint_every_s`` seconds, whichever comes
first (:func:`timed_checkpoint_callback`).

A checkpoint counts only when it is sealed: after the Trainer has written it, :class:`SealCheckpoints`
records every file's size and SHA-256 in ``sealed.json``. On a re-run :func:`resume_point` drops what
cannot be trusted, with a warning each: checkpoints cut short by a kill or a full disk (unsealed),
ones whose files changed or were truncated since (a hash differs), and the whole folder when it was
written for another stage key (another config or other inputs). The newest intact checkpoint is where
training continues; with none, training starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from alignment.io import files_intact, sha256_file, write_json
from alignment.ownership import NotOurs, foreign_entries, is_ours, remove_owned, write_marker

log = logging.getLogger(__name__)

SEAL = "sealed.json"
OWNER = "stage.json"


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
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder)
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
    import torch
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


def trainer_callbacks(progress: Callable[[int, int], None] | None = None, checkpoint_every_s: float = 0.0) -> list:
    """What every Trainer-based stage passes: the checkpoint seal, a checkpoint every ``checkpoint_every_s``
    seconds as well as every N steps (0: by steps only; pass 0 when the stage keeps no checkpoints), and the
    progress report when asked."""
    return [seal_callback(), *([timed_checkpoint_callback(checkpoint_every_s)] if checkpoint_every_s > 0 else []),
            *([progress_callback(progress)] if progress else [])]


def remove_checkpoints(folder: str | Path) -> None:
    """Remove a finished stage's checkpoint folder (:func:`checkpoint_folder`), only when it is ours."""
    folder = Path(folder)
    if folder.is_dir() and (folder / OWNER).is_file() and not is_ours(folder):
        write_marker(folder)  # a folder of ours from before markers (stage.json written by resume_point)
    try:
        remove_owned(folder, "the checkpoints")
    except NotOurs as exc:  # the output is complete all the same: keep the folder and say why
        log.warning("%s", exc)
