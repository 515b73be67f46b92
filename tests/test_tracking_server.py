"""`align run` on the tiny models against a real MLflow tracking server (loopback) and a Prefect API, as a
user runs it (a subprocess, its console captured to a file: not a terminal).

The server's REST API must return the pipeline's parent run, one child per stage, the online loop's
per-step reward (one value per step), the reward-model stage's Trainer metrics and the verdict artifact;
the Prefect flow run carries a link artifact to the MLflow run; the console has none of the library
noise; ``tracking=none`` logs nothing even with ``MLFLOW_TRACKING_URI`` pointing at the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "rm_scalar", "rm_distributional", "reinforce", "score", "judge"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its job consumers
        proc.wait(timeout=30)
        log.close()


def _api(url: str, path: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{query}", timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _all_runs(url: str) -> list[dict]:
    experiment = _api(url, "experiments/get-by-name", experiment_name="alignment")["experiment"]
    return _post(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]


def _align(args: list[str], env_extra: dict[str, str], log: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNMENT_TRACKING", "MLFLOW_TRACKING_URI")}
    env.update(env_extra)
    with log.open("w") as out:  # a file: not a terminal
        return subprocess.run([sys.executable, "-m", "cli", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=log.parent, timeout=1200).returncode


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, prefect_harness, tiny_model, tmp_path_factory):
    import prefect.settings

    tmp = tmp_path_factory.mktemp("tracked")
    config = tiny_pipeline_config(tiny_model, tmp / "runs")
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {"PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    code = _align(["--config", str(cfg), f"tracking.uri={mlflow_server}"], env, tmp / "console.log")
    assert code == 0, (tmp / "console.log").read_text()[-4000:]
    return {"url": mlflow_server, "tmp": tmp, "cfg": cfg, "env": env, "console": (tmp / "console.log").read_text()}


def test_parent_run_with_one_child_per_stage(tracked_run):
    runs = _all_runs(tracked_run["url"])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("kind") == "pipeline"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    kids = [(r, t) for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == parent_id]
    assert sorted(t.get("stage_name", r["info"]["run_name"]) for r, t in kids) == sorted(STAGES), \
        [(r["info"]["run_name"], t) for r, t in kids]
    children = {t["stage_name"]: (r, t) for r, t in kids}
    assert all(r["info"]["status"] == "FINISHED" for r, _ in children.values())
    assert parents[0]["info"]["status"] == "FINISHED"
    # the RL stage's per-step reward: one value per step (the tiny config trains 2 steps)
    rl_id = children["reinforce"][0]["info"]["run_id"]
    history = _api(tracked_run["url"], "metrics/get-history", run_id=rl_id, metric_key="reward")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    params = {p["key"]: p["value"] for p in children["reinforce"][0]["data"]["params"]}
    assert params["steps"] == "2" and params["batch_size"] == "4"
    # the reward-model stages report the Trainer's losses
    rm_metrics = {m["key"] for m in children["rm_scalar"][0]["data"]["metrics"]}
    assert "train/loss" in rm_metrics and "summary/accuracy" in rm_metrics
    # the verdict is an artifact of the parent, and its reading a tag
    files = {f["path"] for f in _api(tracked_run["url"], "artifacts/list", run_id=parent_id).get("files", [])}
    assert {"verdict.json", "report.md"} <= files
    assert tags[runs.index(parents[0])]["verdict"]
    # the tuned policy is a registered model version pointing at the stage folder, not a copy
    versions = _api(tracked_run["url"], "model-versions/search", filter="name='alignment-policy'")
    (version,) = versions["model_versions"]
    assert version["run_id"] == rl_id and version["source"].endswith("policy-ref.json")
    rl_files = {f["path"] for f in _api(tracked_run["url"], "artifacts/list", run_id=rl_id).get("files", [])}
    assert "policy-ref.json" in rl_files and not any(p.endswith(".safetensors") for p in rl_files)


def test_the_prefect_flow_run_links_to_the_mlflow_run(tracked_run):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def links():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-run"])))

    artifacts = [a for a in asyncio.run(links()) if a.key == "mlflow-run"]
    assert artifacts, "no link artifact"
    parent = next(r for r in _all_runs(tracked_run["url"])
                  if any(t["key"] == "kind" and t["value"] == "pipeline" for t in r["data"]["tags"]))
    # Prefect 3 stores a link artifact as markdown: "[MLflow run](<url>)"
    link = artifacts[-1].data
    assert f"({tracked_run['url']}/#/experiments/" in link and parent["info"]["run_id"] in link


def test_the_console_is_ours(tracked_run):
    text = tracked_run["console"]
    for noise in ("LOAD REPORT", "FutureWarning", "{'loss'", "'train_runtime'", "\r", "Loading weights",
                  "prefect.task_runs: Finished in state", "View run", "Traceback"):
        assert noise not in text, f"{noise!r} in the console:\n{text}"
    lines = text.splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    for stage in STAGES:
        assert any(line.startswith(f"stage {stage}") or f" stage {stage}:" in line for line in lines), stage
    assert any("MLflow run" in line and tracked_run["url"] in line for line in lines)
    assert any(line.startswith("verdict") for line in lines)


def test_tracking_none_logs_nothing(tracked_run):
    before = len(_all_runs(tracked_run["url"]))
    env = {**tracked_run["env"], "MLFLOW_TRACKING_URI": tracked_run["url"]}
    code = _align(["--config", str(tracked_run["cfg"]), "--force-flow", "tracking=none"], env,
                  tracked_run["tmp"] / "console-none.log")
    assert code == 0, (tracked_run["tmp"] / "console-none.log").read_text()[-3000:]
    assert len(_all_runs(tracked_run["url"])) == before
