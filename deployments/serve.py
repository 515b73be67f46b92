"""Serve the pipeline's deployments to a Prefect server: ``python -m deployments.serve`` (or ``align serve``).

* ``alignment-pipeline/demo``: manual runs (UI "Run", ``prefect deployment run``) with the demo preset.
* ``alignment-rounds/retrain``: on a cron schedule (weekly by default), the next round of on-policy
  re-training (``flows/rounds.py``): sample the current policy, label the pairs, retrain the reward model on
  old + new pairs (and whatever was dropped into the store's inbox), RL again; past ``rounds.max_rounds`` a
  tick says so and completes from cache. ``alignment-rounds/manual``: the same by hand.
* ``stage-*/manual``: each stage alone -- data, SFT, reward model, DPO, scoring, judge and one per
  registered online algorithm (``stage-reinforce``, ``stage-ppo``, ``stage-grpo``, ...: built from
  ``alignment.algorithms.registry``, so registering an algorithm adds its deployment);
  ``algorithm-comparison/manual``: algorithms on equal budgets.

Runs execute in this process (Prefect's runner); a failed run retried from the UI re-runs only the
stages whose cache is not complete. On ``PREFECT_API_URL`` (``prefect server start``), else on a temporary
local server this process owns (``flows.server``); with telemetry off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from prefect.client.schemas.schedules import CronSchedule
from prefect.runner import Runner

from alignment.pipeline import PipelineConfig
from deployments.options import add_serve_arguments
from flows.compare import algorithm_comparison
from flows.pipeline import (  # importing flows sets Prefect's environment (telemetry off, stage logs forwarded)
    alignment_pipeline,
    data_flow,
    dpo_flow,
    judge_flow,
    online_flows,
    reward_model_flow,
    score_flow,
    sft_flow,
)
from flows.rounds import alignment_rounds
from flows.server import prefect_api


def _config(preset: str, runs_dir: str) -> PipelineConfig:
    config = PipelineConfig(**PipelineConfig.preset(preset))
    config.options.runs_dir = runs_dir
    return config


def _parameters(preset: str, runs_dir: str) -> dict:
    return {k: v.model_dump(mode="json") for k, v in _config(preset, runs_dir).flow_parameters().items()}


def _rounds_parameters(preset: str, runs_dir: str) -> dict:
    return {"pipeline": _config(preset, runs_dir).model_dump(mode="json"), "new_rounds": 1}


def stage_flows() -> list:
    """Every stage flow served as ``<flow>/manual``: data, SFT, reward model, one per registered online
    algorithm (in registry order), DPO, scoring, judge."""
    return [data_flow, sft_flow, reward_model_flow, *online_flows().values(), dpo_flow, score_flow, judge_flow]


def build_deployments(cron: str = "0 3 * * 1", timezone: str = "UTC", retrain_preset: str = "demo-rounds",
                      runs_dir: str = "runs") -> list:
    tags = ["alignment"]
    deployments = [
        alignment_pipeline.to_deployment(name="demo", parameters=_parameters("demo", runs_dir), tags=tags,
                                         description="The whole pipeline on the demo preset; trigger it by hand."),
        alignment_rounds.to_deployment(name="retrain", parameters=_rounds_parameters(retrain_preset, runs_dir),
                                       schedules=[CronSchedule(cron=cron, timezone=timezone)], tags=[*tags, "scheduled"],
                                       description=f"Scheduled re-training ({cron}, {timezone}): the next on-policy "
                                                   f"round of the {retrain_preset} preset each tick (rounds.max_rounds "
                                                   "in all; pairs dropped into the store's inbox are picked up)."),
        alignment_rounds.to_deployment(name="manual", parameters=_rounds_parameters(retrain_preset, runs_dir),
                                       tags=tags, description="The next on-policy round (new_rounds of them), by hand."),
    ]
    for stage_flow in stage_flows():
        deployments.append(stage_flow.to_deployment(name="manual", tags=[*tags, "stage"],
                                                    parameters={"runs_dir": runs_dir}))
    deployments.append(algorithm_comparison.to_deployment(
        name="manual", tags=[*tags, "compare"], parameters={"runs_dir": runs_dir},
        description="Several algorithms on equal budgets from one data stage and reward model, then one table."))
    return deployments


class StoppableRunner(Runner):
    """Prefect's runner, SIGTERM handled as Ctrl-C. Prefect 3.8.8's own SIGTERM handler leaves its stop coroutine
    un-awaited (a RuntimeWarning) and exits 0, so a stopped server looked like a clean exit; here SIGTERM goes to
    the process's Ctrl-C handler (``align``'s records which signal came) and the runner shuts down as on Ctrl-C:
    schedules paused, then the loop ends."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self._logger.info("SIGTERM received, shutting down...")
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):
            interrupt(signal.SIGTERM, None)  # raises KeyboardInterrupt (align's handler, or Python's default)
        raise KeyboardInterrupt("SIGTERM")


def serve_all(cron: str = "0 3 * * 1", timezone: str = "UTC", retrain_preset: str = "demo-rounds",
              runs_dir: str = "runs") -> None:
    """Serve every deployment until Ctrl-C / SIGTERM, on PREFECT_API_URL or else on a temporary server that is
    stopped after the runner has shut down (flows.server). Returns after the shutdown."""
    deployments = build_deployments(cron, timezone, retrain_preset, runs_dir)
    with prefect_api():
        runner = StoppableRunner(pause_on_shutdown=True)
        for deployment in deployments:
            runner.add_deployment(deployment)
        print(f"serving {len(deployments)} deployments (Ctrl-C stops): "
              + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments), flush=True)
        # Ctrl-C / SIGTERM: the runner shuts down (schedules paused); align's main() says which signal stopped it
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(runner.start())


def main(argv: list[str] | None = None) -> None:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m deployments.serve",
                                                         description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    serve_all(args.cron, args.timezone, args.retrain_preset, args.runs_dir)


if __name__ == "__main__":
    main()
