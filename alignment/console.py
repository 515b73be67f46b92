"""What a person sees on the console: our lines, one progress bar per long stage, and no library noise.

:func:`quiet_libraries` silences, at their source, the messages this project expects and that say
nothing to its user: transformers' per-load report tables and "Loading weights" bars, datasets' and
the hub's progress bars, Prefect's "Finished in state Completed()" per task, matplotlib's font-cache
line, MLflow's database set-up lines. ``align -v`` keeps all of them (library logs included).

:class:`StageProgress` is the one progress display of a long stage: a tqdm bar on a terminal, and on
anything else (a log file, CI, the Prefect worker's captured output) a plain line at the first unit, at
about every quarter of the work and at the end, so a log never fills with carriage-return bars.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("alignment")

NOISY_LOGGERS = {  # logger -> the level below which its messages are expected noise
    "prefect.task_runs": logging.WARNING,  # "Finished in state Completed()" once per task: our stage line says it
    "matplotlib": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
}

_verbose = False


def is_verbose() -> bool:
    return _verbose


def quiet_libraries(verbose: bool = False) -> None:
    """Silence expected library output (see the module docstring); with ``verbose`` change nothing."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    quiet_loggers(NOISY_LOGGERS)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()  # load reports; real errors still show
        transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import datasets

        datasets.disable_progress_bars()  # "Filtering train >256 tokens"
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    # Deprecations raised inside libraries by their own calls (not by ours: those are fixed at the call).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)\b")


def quiet_loggers(names: Iterable[str]) -> None:
    """Raise these loggers to WARNING (their level in ``NOISY_LOGGERS`` where it has one), unless ``-v``.
    Called again after a library that sets its own logger's level on import (MLflow) is first imported."""
    if _verbose:
        return
    for name in names:
        logging.getLogger(name).setLevel(NOISY_LOGGERS.get(name, logging.WARNING))


def on_terminal(stream: Any = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class StageProgress:
    """One progress display for a stage of ``total`` units: a bar on a terminal, plain lines elsewhere.

    ``update(done, **figures)`` reports ``done`` of ``total``; plain lines come at the first unit, at
    about every tenth and at the end (``every`` units), each with the figures given.
    """

    def __init__(self, label: str, total: int, *, logger: logging.Logger | None = None, bar: bool | None = None,
                 every: int | None = None):
        self.label, self.total = label, max(int(total), 1)
        self.logger = logger or log
        self.every = every or -(-self.total // 4)  # plain lines: the first, about every quarter, the last
        self.start = time.perf_counter()
        self.bar = None
        if (on_terminal() if bar is None else bar) and not _verbose:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=label, leave=False, dynamic_ncols=True)
        self._done = 0

    def update(self, done: int, **figures: Any) -> None:
        done = min(int(done), self.total)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        if self.bar is not None:
            self.bar.update(done - self._done)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        elif done in (1, self.total) or done % self.every == 0 or _verbose:
            elapsed = time.perf_counter() - self.start
            self.logger.info("%s: %d/%d %s[%.0f s]", self.label, done, self.total, f"{text} " if text else "", elapsed)
        self._done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def trainer_console_callback(label: str):
    """A ``transformers`` callback showing a Trainer stage's steps through one :class:`StageProgress`, with its
    latest logged loss (instead of the Trainer's own bar and printed log dicts: see :func:`quiet_trainer`)."""
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.progress: StageProgress | None = None
            self.figures: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "eval_loss", "eval_accuracy"):
                if logs and isinstance(logs.get(key), int | float):
                    self.figures[key] = float(logs[key])

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.progress is None:
                self.progress = StageProgress(label, state.max_steps)
            self.progress.update(state.global_step, **self.figures)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    return ConsoleCallback()


def quiet_trainer(trainer: Any) -> Any:
    """Take the Trainer's own tqdm bar and its printed log dicts (``{'loss': '3.19', ...}``) off the console;
    :func:`trainer_console_callback` shows the steps instead. With ``-v`` the Trainer keeps its own."""
    if _verbose:
        return trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer
