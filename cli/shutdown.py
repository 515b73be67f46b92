"""Stopping ``align`` on SIGTERM or Ctrl-C (SIGINT): within seconds, with everything it started, one line.

:func:`stop_signals` makes both signals raise ``KeyboardInterrupt`` in the main thread (SIGTERM
would otherwise end the process on the spot, leaving its children -- a temporary Prefect server, stage
processes -- running) and remembers which one came, so the command can report it and exit 128 + its number
(130, 143). Libraries see the interruption they already handle: Prefect's ``serve`` shuts its runner down,
a flow run is marked crashed. :func:`stop_children` then ends whatever child processes are left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals(install: bool = True) -> Iterator[None]:
    """For the block: the handler on SIGINT and SIGTERM (with ``install``; in the main thread only), the
    previous handlers back afterwards; :func:`received` tells about this block's signals only."""
    _received.clear()
    previous = {}
    if install:
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (align's main() called from a worker thread)
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def received(exc: BaseException | None = None) -> int | None:
    """The stop signal that came (the first), else the one a library's own termination exception carries
    (Prefect's ``TerminationSignal``), else SIGINT for a plain ``KeyboardInterrupt``; None without any."""
    if _received:
        return _received[0]
    number = getattr(exc, "signal", None)
    if isinstance(number, int):
        return number
    return signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None


def ignore_stop_signals() -> None:
    """While shutting down: further Ctrl-C / SIGTERM must not interrupt the clean-up (it is bounded)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:
            return


def stop_children(grace_s: float = 5.0) -> int:
    """Terminate every process this one started (recursively), kill those still alive after ``grace_s``;
    how many there were."""
    import psutil

    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return len(children)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)
