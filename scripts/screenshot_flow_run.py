"""Take a headless-Chromium screenshot of a finished `alignment-pipeline` flow run in the Prefect UI.

    python scripts/screenshot_flow_run.py                      # start a temporary server, run the pipeline
                                                               # on a tiny model, screenshot the run
    python scripts/screenshot_flow_run.py --api http://127.0.0.1:4200/api [--flow-run ID]
                                                               # an existing server: the given or latest run

Needs Chromium (Debian: `apt-get install chromium`). Writes docs/flow-run.png by default.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _wait_healthy(api: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no Prefect server answered at {api}")


def _run_tiny_pipeline(workdir: Path) -> str:
    from flows.pipeline import alignment_pipeline
    from tests.conftest import tiny_pipeline_config
    from tests.tiny import tiny_model_dir

    model = tiny_model_dir(workdir / "tiny-model")
    config = tiny_pipeline_config(model, workdir / "runs")
    state = alignment_pipeline(**config.flow_parameters(), return_state=True)
    return str(state.state_details.flow_run_id)


def _latest_run(api: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["alignment-pipeline"])),
                                     flow_run_filter=FlowRunFilter(state=FlowRunFilterStateType(
                                         any_=[StateType.COMPLETED])), sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs:
        raise SystemExit("no completed alignment-pipeline flow run on this server")
    return str(runs[0].id)


def screenshot(url: str, out: Path, width: int = 1600, height: int = 1000, wait_ms: int = 20000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("Chromium not found (Debian: apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    print(f"screenshot of {url} -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api", help="PREFECT_API_URL of a running server (default: start a temporary one)")
    parser.add_argument("--flow-run", help="flow run id (default: the latest completed alignment-pipeline run)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "flow-run.png"))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from tests.conftest import free_port

    server = None
    with tempfile.TemporaryDirectory() as tmp:
        api = args.api
        if api is None:
            port = free_port()
            api = f"http://127.0.0.1:{port}/api"
            env = {**os.environ, "PREFECT_HOME": f"{tmp}/home", "PREFECT_API_URL": api}
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        os.environ["PREFECT_API_URL"] = api
        try:
            _wait_healthy(api)
            run_id = args.flow_run or (_run_tiny_pipeline(Path(tmp)) if server else _latest_run(api))
            screenshot(f"{api.removesuffix('/api')}/runs/flow-run/{run_id}", Path(args.out))
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
