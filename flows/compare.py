"""The ``algorithm-comparison`` flow: several algorithms on equal budgets, then one table.

Each algorithm is a task that trains it in its own process (cached on its stage key: a finished one
comes back ``Cached``, a failed one re-runs alone on a retry); the last task scores every policy once
and publishes the comparison table and the reward-vs-KL frontier as an artifact. The parameters are
one :class:`alignment.compare.CompareConfig`, a form in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from alignment import tracking as tracker
from alignment.compare import CompareConfig, algorithm_configs, algorithm_done
from alignment.tracking import TrackingConfig
from flows.pipeline import mlflow_artifact
from tasks.stages import algorithm_task, comparison_task, result_storage


@flow(name="algorithm-comparison")
def algorithm_comparison(config: CompareConfig, runs_dir: str = "runs",
                         tracking: TrackingConfig = TrackingConfig()) -> dict[str, Any]:  # noqa: B008 - a flow form
    """Train each algorithm (cached), then score all policies and write compare.md / frontier.png; one MLflow
    parent run with every algorithm's stage run and the comparison's as children (``tracking``)."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    tracker.configure_flow(tracking, runs_dir)
    with tracker.stage_run("comparison", params=config.model_dump(mode="json"), process_wide=True,
                           tags={"kind": "comparison", "prefect.flow_run_id": flow_run.get_id()}) as run:
        if run is not None:
            mlflow_artifact(run, "mlflow-run", "This comparison in MLflow: one child run per algorithm.")
        return _compare(config, runs_dir)


def _compare(config: CompareConfig, runs_dir: str) -> dict[str, Any]:
    storage = result_storage(runs_dir)
    states: dict[str, str] = {}
    for name, (command, cfg) in algorithm_configs(config).items():
        task = algorithm_task.with_options(result_storage=storage,
                                           refresh_cache=not algorithm_done(command, cfg, runs_dir))
        state = task(name, command, cfg, runs_dir, return_state=True)
        state.result()  # raises the algorithm's own error when it failed
        states[name] = state.name
        get_run_logger().info("algorithm %s: %s", name, state.name)
    report = comparison_task.with_options(result_storage=storage)(config, runs_dir)
    return {"algorithms": states, "report": report}
