"""Against a real `prefect server` on 127.0.0.1: serve the deployments, trigger a run through the API,
let the judge stage fail (the Gemini endpoint is down), retry the flow run as the UI's Retry button
does, and check that the earlier stages come back from the cache and the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT, free_port, tiny_pipeline_config
from tests.fake_gemini import FakeGemini

pytestmark = pytest.mark.slow


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    # `python -m prefect`: this interpreter's Prefect, whether or not its venv is on PATH (CI).
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait(lambda: _healthy(api), 120, "prefect server", server)
        yield api, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_ui_retry_reruns_only_the_failed_stage(prefect_server, tiny_model, tmp_path, monkeypatch):
    api, env = prefect_server
    gemini_port = free_port()  # nothing listens here until the retry
    runs = tmp_path / "runs"
    env = {**env, "GEMINI_API_KEY": "test-key", "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{gemini_port}"}
    monkeypatch.setenv("PREFECT_API_URL", api)
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import State

    from alignment.evaluation.judge import JudgeConfig
    from alignment.pipeline import PipelineOptions

    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    serve = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--runs-dir", str(runs)], cwd=ROOT, env=env,
                             stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)
    # temporary_settings, not only the environment: an active test harness (earlier tests in the
    # session) would otherwise point the client at its own temporary API.
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            _wait(lambda: _deployment_exists(client, "alignment-pipeline/demo"), 120, "served deployments", serve)
            config = tiny_pipeline_config(
                tiny_model, runs,
                judge=JudgeConfig(backend="gemini", gemini_model="gemini-test-flash", max_pairs=4, max_retries=1,
                                  initial_backoff_s=0.01, timeout_s=2),
                options=PipelineOptions(runs_dir=str(runs), judge_retries=0))
            params = {k: v.model_dump(mode="json") for k, v in config.flow_parameters().items()}
            run = run_deployment("alignment-pipeline/demo", parameters=params, timeout=0)

            def final_state():
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            failed = _wait(final_state, 400, "the first attempt", serve)
            assert failed.type == StateType.FAILED, (failed, (tmp_path / "serve.log").read_text()[-3000:])
            assert "judge" in (tmp_path / "serve.log").read_text()
            done_before = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/*/manifest.json")}
            done_before.update({p.parent.parent.name: p.stat().st_mtime_ns
                                for p in runs.glob("reinforce/*/final/manifest.json")})
            assert len(done_before) == 5  # data, two reward models, reinforce, score (the judge failed)

            # The UI's Retry: force the failed run back to Scheduled/AwaitingRetry; the runner picks it up.
            with FakeGemini(port=gemini_port) as fake:
                client.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                        message="Retry from the UI"), force=True)
                _wait(lambda: (s := final_state()) is not None and s.type != StateType.FAILED and s, 400,
                      "the retried run", serve)
                assert client.read_flow_run(run.id).state.type == StateType.COMPLETED
                assert len(fake.requests) == 8  # 4 pairs x 2 orders, all in the retry
            done_after = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/*/manifest.json")}
            done_after.update({p.parent.parent.name: p.stat().st_mtime_ns
                               for p in runs.glob("reinforce/*/final/manifest.json")})
            # Earlier stages were not recomputed: their outputs are untouched; the judge finished.
            assert {k: done_after[k] for k in done_before} == done_before
            judge_dirs = list(runs.glob("judge/gemini-*"))
            assert len(judge_dirs) == 1 and json.loads((judge_dirs[0] / "summary.json").read_text())["n"] == 4
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)
        serve_log.close()


def _deployment_exists(client, name: str) -> bool:
    try:
        client.read_deployment_by_name(name)
        return True
    except Exception:
        return False

