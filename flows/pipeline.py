"""The ``alignment-pipeline`` flow and one flow per stage.

Parameters are the pydantic stage configs, so the Prefect UI shows each stage as a form; the
defaults are the ``demo`` preset (the embedded data, CPU, minutes). The pipeline fills in the paths
between stages (data -> reward models -> RL -> scoring -> judge; with a ``prompts`` section, RL and scoring
take its folder instead of data's); whatever a form says for
those paths is replaced. The RL stage is ``options.algorithm`` (reinforce, ppo, grpo, ...: any
registered online algorithm), with its section (``reinforce`` / ``ppo`` / ``grpo``).

The stage flows: ``stage-data``, ``stage-sft``, ``stage-reward-model``, ``stage-dpo``, ``stage-score``,
``stage-judge`` and ``stage-<algorithm>`` for every registered online algorithm (:func:`online_flows`,
built from the registry).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from alignment import tracking as tracker
from alignment.algorithms.dpo import DPOStageConfig
from alignment.algorithms.grpo import GRPOConfig
from alignment.algorithms.online import OnlineConfig
from alignment.algorithms.ppo import PPOConfig
from alignment.algorithms.registry import ALGORITHMS, get_algorithm
from alignment.algorithms.reinforce import ReinforceConfig
from alignment.algorithms.sft import SFTConfig
from alignment.console import is_verbose, quiet_libraries
from alignment.data import DataConfig
from alignment.evaluation.evaluate import ScoreConfig
from alignment.evaluation.judge import JudgeConfig
from alignment.evaluation.verdict import verdict_markdown
from alignment.io import read_manifest
from alignment.pipeline import (
    PipelineConfig,
    PipelineOptions,
    check_pipeline,
    pipeline_stages,
    pipeline_verdict,
    rl_stage,
    stage_config,
    stage_record,
)
from alignment.presets import stage_preset
from alignment.rewards.model import RewardModelConfig
from alignment.tracking import TrackingConfig
from tasks.stages import (
    data_task,
    dpo_task,
    judge_task,
    online_task,
    plan_stage,
    prompts_task,
    reward_model_task,
    score_task,
    sft_task,
    summary_markdown,
)

DEMO = PipelineConfig(**PipelineConfig.preset("demo"))
DEMO_DPO = DPOStageConfig(**stage_preset("demo", "dpo"))


def _run(task, config, options: PipelineOptions, stages: dict[str, dict[str, str]], name: str, *,
         task_kwargs: dict[str, Any] | None = None, **task_options) -> str:
    """Run one stage task; record whether it ran or came from the cache; raise if it failed."""
    plan, run_options = plan_stage(task, config, options.runs_dir)
    logger = get_run_logger()
    logger.info("stage %s: started%s", name, f" -> {plan.out}" if plan is not None else "")
    with tracker.tagged(stage_name=name):  # the stage's MLflow run (a child of the pipeline's) says which stage
        state = task.with_options(**run_options, **task_options)(
            config, options.runs_dir, plan, **(task_kwargs or {}), return_state=True)
        path = state.result()  # raises the stage's own error when it failed
        if state.name == "Cached":  # Prefect's cache: no stage function ran, so no run was opened; record it anyway
            with tracker.stage_run(name, tags={"reused": "true", "cached": "prefect"}) as run:
                tracker.record_result(run, SimpleNamespace(out_dir=Path(path).parent if Path(path).name == "final"
                                                            else Path(path), summary={}, reused=True))
    stages[name] = stage_record(state.name, path)
    record = stages[name]
    cost = f"{record['seconds']:.0f} s, peak {record['peak_rss_mb'] / 1024:.2f} GB" \
        if record.get("seconds") is not None and record.get("peak_rss_mb") is not None else "cost not recorded"
    logger.info("stage %s: %s in %s -> %s%s", name, state.name, cost, path,
                f" ({record['headline']})" if record.get("headline") else "")
    return path


def mlflow_artifact(run: tracker.Run, key: str, description: str) -> None:
    """The flow run's way to its MLflow run: a link to the tracking server's page, or (a SQLite store, no server)
    the command that serves the store and the run's page in it."""
    if run.url is not None:
        create_link_artifact(link=run.url, link_text="MLflow run", key=key, description=description)
    else:
        create_markdown_artifact(markdown=f"MLflow run (no tracking server): {run.where}", key=key,
                                 description=description)


@contextlib.contextmanager
def flow_parent_run(config: PipelineConfig, name: str, kind: str, link_key: str, description: str):
    """A flow's set-up and its MLflow parent run (yielded; None untracked): the wiring checked before any stage,
    the runs folder, tracking, library noise, the run's link artifact, the Prefect flow run's id on every stage's run."""
    check_pipeline(config)  # a reward model the RL stage needs but the pipeline does not train: before any stage
    Path(config.options.runs_dir).mkdir(parents=True, exist_ok=True)
    tracker.configure_flow(config.tracking, config.options.runs_dir)
    quiet_libraries(is_verbose())  # again: Prefect's logging set-up at the flow's start resets library levels
    with tracker.stage_run(name, process_wide=True, params=config.model_dump(mode="json", exclude={"tracking"}),
                           tags={"kind": kind, "prefect.flow_run_id": flow_run.get_id(),
                                 "prefect.flow_run_name": flow_run.get_name()}) as run:
        if run is not None:
            get_run_logger().info("MLflow run: %s", run.where)
            mlflow_artifact(run, link_key, description)
        with tracker.tagged(**{"prefect.flow_run_id": flow_run.get_id()}):  # on every stage's run too
            yield run


@flow(name="alignment-pipeline")
def alignment_pipeline(
    data: DataConfig = DEMO.data,
    prompts: DataConfig | None = DEMO.prompts,
    sft: SFTConfig = DEMO.sft,
    rm_scalar: RewardModelConfig = DEMO.rm_scalar,
    rm_distributional: RewardModelConfig = DEMO.rm_distributional,
    reinforce: ReinforceConfig = DEMO.reinforce,
    ppo: PPOConfig = DEMO.ppo,
    grpo: GRPOConfig = DEMO.grpo,
    score: ScoreConfig = DEMO.score,
    judge: JudgeConfig = DEMO.judge,
    options: PipelineOptions = DEMO.options,
    tracking: TrackingConfig = DEMO.tracking,
) -> dict[str, Any]:
    """Data [-> prompts] -> [SFT] -> reward model(s) -> RL (options.algorithm) -> validation scoring -> pairwise
    judge, each stage cached (prompts, when given: what RL trains on and scoring scores; the RMs keep data)."""
    config = PipelineConfig(data=data, prompts=prompts, sft=sft, rm_scalar=rm_scalar, rm_distributional=rm_distributional,
                            reinforce=reinforce, ppo=ppo, grpo=grpo, score=score, judge=judge, options=options,
                            tracking=tracking)
    with flow_parent_run(config, f"pipeline {options.algorithm}", "pipeline", "mlflow-run",
                         "This pipeline run in MLflow: params, per-step metrics, one child run per stage, the "
                         "verdict.") as run:
        result = _pipeline_stages(config, run)
    return result


def pipeline_tasks(options: PipelineOptions) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each pipeline stage's task and its options (data-parallel processes, the judge's retries)."""
    parallel = {"task_kwargs": {"num_processes": options.num_processes}}
    rl = rl_stage(options)
    return {"data": (data_task, {}), "prompts": (prompts_task, {}), "sft": (sft_task, {}),
            "rm_scalar": (reward_model_task, parallel), "rm_distributional": (reward_model_task, parallel),
            rl: (online_task(rl), parallel), "score": (score_task, {}),
            "judge": (judge_task, {"retries": options.judge_retries, "retry_delay_seconds": options.judge_retry_delay_s})}


def run_pipeline_stages(config: PipelineConfig, stages: dict[str, dict[str, str]], prefix: str = "") -> dict[str, str]:
    """Run (or take from cache) every pipeline stage in order; stage name -> output folder. ``prefix`` names
    them in the log and in ``stages`` (the rounds flow's round 0: ``r0.``)."""
    tasks = pipeline_tasks(config.options)
    outputs: dict[str, str] = {}  # stage -> output folder; stage_config fills the paths between stages from it
    # data -> reward model(s) -> RL against the proxy -> scoring by every RM -> pairwise judge
    for name in pipeline_stages(config.options, prompts=config.prompts is not None):
        task, task_options = tasks[name]
        outputs[name] = _run(task, stage_config(config, name, outputs), config.options, stages, f"{prefix}{name}",
                             **task_options)
    return outputs


def _pipeline_stages(config: PipelineConfig, run: tracker.Run | None) -> dict[str, Any]:
    options = config.options
    stages: dict[str, dict[str, str]] = {}
    outputs = run_pipeline_stages(config, stages)
    score_dir, judge_dir = outputs["score"], outputs.get("judge")
    report = str(Path(judge_dir) / "report.md") if judge_dir else None

    # The verdict: proxy, independent reward model, gold and judge, each with its interval.
    result = pipeline_verdict(score_dir, judge_dir)
    get_run_logger().info("verdict: %s", result["reading"])
    create_markdown_artifact(markdown=summary_markdown(stages, report, verdict_markdown(result)),
                             key="alignment-pipeline-summary",
                             description=f"verdict: {result['reading']}")
    tracked = None
    if run is not None:
        run.log_dict(result, "verdict.json")
        if report:
            run.log_artifact(report)
        run.set_tags({"verdict": result["reading"]})
        run.log_metrics({c["name"]: c["value"] for c in result["checks"]}, prefix="verdict/")
        policy = Path(outputs[rl_stage(options)])
        key = (read_manifest(policy) or {}).get("stage_key")
        version = tracker.register_policy(policy, key, {"verdict": result["reading"], **{
            f"verdict.{c['name']}": f"{c['value']:+.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
            for c in result["checks"]}}) if key else None
        tracked = {"run_id": run.run_id, "url": run.url, "where": run.where, "model_version": version}
    return {"stages": stages, "report": report, "verdict": result, "tracking": tracked}


# --------------------------------------------------------------------------------------------
# One flow per stage, for running a stage alone
# --------------------------------------------------------------------------------------------
def _single(task, config, runs_dir: str, name: str) -> str:
    options = PipelineOptions(runs_dir=runs_dir)
    return _run(task, config, options, {}, name)


@flow(name="stage-data")
def data_flow(config: DataConfig = DEMO.data, runs_dir: str = "runs") -> str:
    return _single(data_task, config, runs_dir, "data")


@flow(name="stage-sft")
def sft_flow(config: SFTConfig = DEMO.sft, runs_dir: str = "runs") -> str:
    return _single(sft_task, config, runs_dir, "sft")


@flow(name="stage-reward-model")
def reward_model_flow(config: RewardModelConfig = DEMO.rm_scalar, runs_dir: str = "runs") -> str:
    return _single(reward_model_task, config, runs_dir, f"rm_{config.kind}")


@flow(name="stage-dpo")
def dpo_flow(config: DPOStageConfig = DEMO_DPO, runs_dir: str = "runs") -> str:
    return _single(dpo_task, config, runs_dir, "dpo")


_ONLINE_FLOWS: dict[str, Any] = {}


def online_flow(name: str):
    """The flow ``stage-<name>`` running online algorithm ``name`` alone (any registry entry), made once;
    its ``config`` parameter is the algorithm's config class (a form in the UI)."""
    if name not in _ONLINE_FLOWS:
        spec = get_algorithm(name)

        def run(config: OnlineConfig, runs_dir: str = "runs") -> str:
            return _single(online_task(name), config, runs_dir, name)

        run.__name__ = run.__qualname__ = f"{name.replace('-', '_')}_flow"
        run.__doc__ = f"Train the policy with {name} alone (its config's data and reward_model or rewards given)."
        run.__annotations__ = {**run.__annotations__, "config": spec.config_cls}
        _ONLINE_FLOWS[name] = flow(name=f"stage-{name}")(run)
        # A module attribute of its function's name: the entrypoint (flows/pipeline.py:<name>_flow) that a
        # served deployment's runs and prefect.yaml load.
        globals()[run.__name__] = _ONLINE_FLOWS[name]
    return _ONLINE_FLOWS[name]


def online_flows() -> dict[str, Any]:
    """One stage flow per registered online algorithm (reinforce, ppo, grpo, ...)."""
    return {name: online_flow(name) for name in ALGORITHMS}


reinforce_flow = online_flow("reinforce")
online_flows()  # stage-ppo, stage-grpo, ...: module attributes ppo_flow, grpo_flow, ... from the registry


@flow(name="stage-score")
def score_flow(config: ScoreConfig, runs_dir: str = "runs") -> str:
    return _single(score_task, config, runs_dir, "score")


@flow(name="stage-judge")
def judge_flow(config: JudgeConfig, runs_dir: str = "runs") -> str:
    return _single(judge_task, config, runs_dir, "judge")


class _OneLineErrors(logging.Filter):
    """Drop the traceback Prefect logs with a failed task or flow run when the error is one of the project's own
    (a class defined in ``alignment``: a refusal or bad input, said in one line by the caller), unless -v."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__module__.startswith("alignment.") and not is_verbose():
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def one_line_errors():
    """Within: Prefect's run loggers print the project's own errors without their traceback."""
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    only = _OneLineErrors()
    for logger in loggers:
        logger.addFilter(only)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only)


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline flow with a full config (``align run``)."""
    with one_line_errors():
        return alignment_pipeline(**config.flow_parameters())
