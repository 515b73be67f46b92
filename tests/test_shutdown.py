"""`align run` and `align serve` without PREFECT_API_URL, as real processes in a temporary folder: they stop on
Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and on SIGTERM (to the command alone, as a
process manager sends it) within a bounded time, with every process they started -- the temporary Prefect
server included -- one "stopped" line, exit 130 / 143 and no traceback; a temporary server that does not
come up is one line naming the setting to raise (exit 2)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, tiny_pipeline_config

pytestmark = pytest.mark.slow

STARTUP_S = 180  # generous: a busy machine (the bug this guards against) starts the server slowly
STOP_S = 60  # what "within seconds" is allowed to take on a loaded CPU


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no API URL: a temporary server
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT),
            "ALIGNMENT_TRACKING": "none", **extra}


def _start(tmp_path: Path, args: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "console.log"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=tmp_path, env=_env(tmp_path, **env),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for(proc: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    _kill(proc)
    raise AssertionError(f"no {text!r} within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    """Clean-up after a failed test: the command and whatever it started."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


def _stop_and_check(proc: subprocess.Popen, log: Path, sig: int, to_group: bool, command: str) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no temporary Prefect server to stop"
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    try:
        code = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise AssertionError(f"still running {STOP_S} s after {signal.Signals(sig).name}:\n"
                             f"{log.read_text()[-3000:]}") from None
    survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for c in survivors:
        c.kill()
    assert not survivors, [" ".join(c.cmdline())[:120] for c in survivors]
    text = log.read_text()
    assert code == 128 + sig, (code, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == f"align {command}: stopped by {signal.Signals(sig).name}", text[-3000:]


def test_serve_stops_on_ctrl_c_with_its_temporary_server(tmp_path):
    """Ctrl-C reaches the whole group; the server runs in its own session, so the runner's shutdown (pausing
    the schedules) still reaches it, then the command stops it: no minutes of retries against a dead server."""
    proc, log = _start(tmp_path, ["serve", "--runs-dir", str(tmp_path / "runs")])
    _wait_for(proc, log, "serving ")  # the deployments are registered; the runner starts
    time.sleep(3)  # most often inside the runner's loop by now; the checks hold either way
    _stop_and_check(proc, log, signal.SIGINT, to_group=True, command="serve")


def test_run_stops_on_sigterm_with_its_temporary_server(tmp_path, tiny_model):
    import yaml

    config = tiny_pipeline_config(tiny_model, tmp_path / "runs")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"section"})))
    proc, log = _start(tmp_path, ["run", "--config", str(tmp_path / "pipeline.yaml")])
    _wait_for(proc, log, "stage rm_scalar: started")  # inside the flow, a stage running
    _stop_and_check(proc, log, signal.SIGTERM, to_group=False, command="run")
    assert "Crashed" in log.read_text()  # the flow run was told, while its server was still up


def test_a_temporary_server_that_does_not_come_up_is_one_line(tmp_path):
    """Prefect's raw 'Timed out while attempting to connect' traceback becomes one line naming the setting;
    the server process it started does not outlive the command."""
    proc, log = _start(tmp_path, ["run", "--runs-dir", str(tmp_path / "runs")],
                       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    try:
        code = proc.wait(timeout=STARTUP_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise
    text = log.read_text()
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and errors[0].startswith("align run: error: the temporary Prefect server did not come up "
                                                     "within 0 s"), text[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert not list((tmp_path / "runs").glob("*/*/manifest.json"))  # nothing ran


def test_the_start_up_timeout_is_generous_unless_set(tmp_path):
    probe = ("import flows.server\nfrom prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s\n"
             "print(s.value())")
    for extra, expected in (({}, "180"), ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"}, "45")):
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(tmp_path, **extra),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_the_temporary_server_has_its_own_session_and_dies_with_a_killed_command(tmp_path):
    """Its own session: a terminal's Ctrl-C does not reach it before the command has finished with it. And a
    command killed outright (SIGKILL: no clean-up runs) does not leave it behind (Linux)."""
    code = ("from flows.server import start_temporary_server\nimport time\n"
            "server = start_temporary_server()\nprint('server', server.server_process.pid, flush=True)\n"
            "time.sleep(600)")
    log = tmp_path / "console.log"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(proc, log, "server ")
    server = psutil.Process(int(log.read_text().split("server ")[1].split()[0]))
    try:
        assert os.getsid(server.pid) == server.pid != os.getsid(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        if sys.platform.startswith("linux"):
            server.wait(timeout=STOP_S)  # psutil.TimeoutExpired if it outlived the command
    finally:
        if server.is_running():
            server.kill()
