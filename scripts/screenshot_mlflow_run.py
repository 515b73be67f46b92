"""Take a headless-Chromium screenshot of a pipeline run in the MLflow UI.

    python scripts/screenshot_mlflow_run.py                          # runs/mlflow.db, the latest pipeline run
    python scripts/screenshot_mlflow_run.py --store sqlite:///path/mlflow.db [--run RUN_ID] [--tab metrics]

Starts `mlflow server` on the store (loopback, a free port), finds the newest run tagged kind=pipeline
(or the given run), and screenshots its page. Needs Chromium (Debian: `apt-get install chromium`).
Writes docs/mlflow-run.png by default.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}")
    parser.add_argument("--run", help="run id (default: the newest run tagged kind=pipeline)")
    parser.add_argument("--tab", default="", help="'' (overview) or model-metrics, artifacts, ...")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-run.png"))
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from scripts.screenshot_flow_run import _wait_healthy, screenshot  # /health on either server
    from tests.conftest import free_port

    client = MlflowClient(args.store)
    run_id = args.run
    if run_id is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string="tags.kind = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"no pipeline run in {args.store}")
        run_id = runs[0].info.run_id
    experiment_id = client.get_run(run_id).info.experiment_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--backend-store-uri", args.store],
                                  cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"})
        try:
            _wait_healthy(url)
            page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{args.tab}" if args.tab else "")
            screenshot(page, Path(args.out), width=1600, height=1100, wait_ms=25000)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
