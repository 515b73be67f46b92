"""The Prefect API of ``align run`` / ``align round(s)`` / ``align serve``: ``PREFECT_API_URL`` when set, else a
temporary local server that this process starts, owns and stops.

Prefect starts such a server by itself on first use (its "ephemeral" mode), but in the command's own
process group and with 20 s to come up. Both break: on a busy machine the start-up times out (a raw
``RuntimeError`` traceback), and a Ctrl-C in the terminal reaches the server together with the command, so
the command's last API calls (a served runner pausing its schedules, a flow run reporting its state) retry
against a dead server for minutes. :func:`prefect_api` starts it first, in its own session (only this
process stops it, after those calls; the kernel ends it if this process is killed outright), waiting ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(``tasks.EPHEMERAL_STARTUP_TIMEOUT_S`` unless set); Prefect's own clients then find it running
(one temporary server per process). A start-up that still fails is one :class:`PrefectServerError`.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
import sys
import types
from collections.abc import Iterator

import tasks  # noqa: F401  (sets Prefect's environment before Prefect is imported)
from tasks import STARTUP_TIMEOUT_ENV


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not come up; the message says which setting to raise."""


def _die_with_parent():
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, however it dies (SIGKILL
    included; Linux's PR_SET_PDEATHSIG); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1

    return preexec


def _own_session_server_class():
    from prefect.server.api import server as server_module

    class OwnSessionServer(server_module.SubprocessASGIServer):
        """Prefect's temporary server, its uvicorn process started in a session of its own (so a terminal's
        Ctrl-C reaches only the command, which stops the server itself) and ended by the kernel if the command
        dies without stopping it (SIGKILL). Prefect's command is kept: only the ``Popen`` its module calls gets
        ``start_new_session`` and the ``preexec_fn``, for that one call."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = functools.partial(subprocess.Popen, start_new_session=True, preexec_fn=_die_with_parent())
            own_session = types.SimpleNamespace(Popen=popen)
            server_module.subprocess = own_session
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess

    return OwnSessionServer


def api_configured() -> bool:
    """Whether Prefect has an API to talk to (``PREFECT_API_URL``, from the environment, a profile or a test
    harness's settings)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def start_temporary_server():
    """Start (or find running) this process's temporary Prefect server; :class:`PrefectServerError` when it
    does not answer in time (the process it started is stopped)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = _own_session_server_class()()
    try:
        server.start()
    except BaseException as exc:  # Prefect raises RuntimeError (timed out) or an HTTP status error
        server.stop()  # a Ctrl-C during the start too
        if not isinstance(exc, Exception):
            raise
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        reason = str(exc).split(". ")[0].rstrip(".")
        raise PrefectServerError(
            f"the temporary Prefect server did not come up within {timeout} s ({reason}); on a busy machine raise "
            f"{STARTUP_TIMEOUT_ENV} (e.g. {STARTUP_TIMEOUT_ENV}={max(2 * timeout, 300)}), or set PREFECT_API_URL "
            "to a running server (`prefect server start`)") from None
    return server


@contextlib.contextmanager
def prefect_api() -> Iterator[object | None]:
    """The block's Prefect API: the configured one (yields None), else a temporary server started here and
    stopped when the block ends, however it ends (yields the server)."""
    if api_configured():
        yield None
        return
    server = start_temporary_server()
    try:
        yield server
    finally:
        drain_prefect_workers()
        server.stop()


def drain_prefect_workers(timeout_s: float = 5.0) -> None:
    """Send what Prefect's background workers still hold (log lines, events) while the server can take it:
    a worker left to drain at exit, after the server is gone, retries for over a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # a worker that cannot finish must not hold up the stop
            worker.drain_all(timeout=timeout_s)
