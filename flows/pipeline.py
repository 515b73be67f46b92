"""The ``alignment-pipeline`` flow and one flow per stage.

Parameters are the pydantic stage configs, so the Prefect UI shows each stage as a form; the
defaults are the ``demo`` preset (the embedded data, CPU, minutes). The pipeline fills in the paths
between stages (data -> reward models -> REINFORCE -> scoring -> judge); whatever a form says for
those paths is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from alignment.data import DataConfig
from alignment.evaluate import ScoreConfig
from alignment.judge import JudgeConfig
from alignment.pipeline import (
    PipelineConfig,
    PipelineOptions,
    pipeline_stages,
    pipeline_verdict,
    stage_config,
    stage_record,
)
from alignment.reinforce import ReinforceConfig
from alignment.reward import RewardModelConfig
from alignment.sft import SFTConfig
from alignment.verdict import verdict_markdown
from tasks.stages import (
    data_task,
    judge_task,
    plan_stage,
    reinforce_task,
    reward_model_task,
    score_task,
    sft_task,
    summary_markdown,
)

DEMO = PipelineConfig(**PipelineConfig.preset("demo"))


def _run(task, config, options: PipelineOptions, stages: dict[str, dict[str, str]], name: str, *,
         task_kwargs: dict[str, Any] | None = None, **task_options) -> str:
    """Run one stage task; record whether it ran or came from the cache; raise if it failed."""
    plan, run_options = plan_stage(task, config, options.runs_dir)
    state = task.with_options(**run_options, **task_options)(
        config, options.runs_dir, plan, **(task_kwargs or {}), return_state=True)
    path = state.result()  # raises the stage's own error when it failed
    stages[name] = stage_record(state.name, path)
    get_run_logger().info("stage %s: %s -> %s (peak %s MB)", name, state.name, path, stages[name]["peak_rss_mb"])
    return path


@flow(name="alignment-pipeline")
def alignment_pipeline(
    data: DataConfig = DEMO.data,
    sft: SFTConfig = DEMO.sft,
    rm_scalar: RewardModelConfig = DEMO.rm_scalar,
    rm_distributional: RewardModelConfig = DEMO.rm_distributional,
    reinforce: ReinforceConfig = DEMO.reinforce,
    score: ScoreConfig = DEMO.score,
    judge: JudgeConfig = DEMO.judge,
    options: PipelineOptions = DEMO.options,
) -> dict[str, Any]:
    """Data -> [SFT] -> reward model(s) -> REINFORCE -> validation scoring -> pairwise judge, each stage cached."""
    if options.reinforce_reward == "scalar" and not options.train_scalar or (
            options.reinforce_reward == "distributional" and not options.train_distributional):
        raise ValueError(f"options.reinforce_reward={options.reinforce_reward!r} but that reward model is not "
                         f"trained (options.train_{options.reinforce_reward}=false)")
    Path(options.runs_dir).mkdir(parents=True, exist_ok=True)
    config = PipelineConfig(data=data, sft=sft, rm_scalar=rm_scalar, rm_distributional=rm_distributional, reinforce=reinforce,
                            score=score, judge=judge, options=options)
    stages: dict[str, dict[str, str]] = {}
    outputs: dict[str, str] = {}  # stage -> output folder; stage_config fills the paths between stages from it
    parallel = {"task_kwargs": {"num_processes": options.num_processes}}
    tasks = {"data": (data_task, {}), "sft": (sft_task, {}), "rm_scalar": (reward_model_task, parallel),
             "rm_distributional": (reward_model_task, parallel), "reinforce": (reinforce_task, parallel),
             "score": (score_task, {}),
             "judge": (judge_task, {"retries": options.judge_retries,
                                    "retry_delay_seconds": options.judge_retry_delay_s})}
    # data -> reward model(s) -> REINFORCE against the proxy -> scoring by every RM -> pairwise judge
    for name in pipeline_stages(options):
        task, task_options = tasks[name]
        outputs[name] = _run(task, stage_config(config, name, outputs), options, stages, name, **task_options)
    score_dir, judge_dir = outputs["score"], outputs.get("judge")
    report = str(Path(judge_dir) / "report.md") if judge_dir else None

    # The verdict: proxy, independent reward model, gold and judge, each with its interval.
    result = pipeline_verdict(score_dir, judge_dir)
    get_run_logger().info("verdict: %s", result["reading"])
    create_markdown_artifact(markdown=summary_markdown(stages, report, verdict_markdown(result)),
                             key="alignment-pipeline-summary",
                             description=f"verdict: {result['reading']}")
    return {"stages": stages, "report": report, "verdict": result}


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


@flow(name="stage-reinforce")
def reinforce_flow(config: ReinforceConfig, runs_dir: str = "runs") -> str:
    return _single(reinforce_task, config, runs_dir, "reinforce")


@flow(name="stage-score")
def score_flow(config: ScoreConfig, runs_dir: str = "runs") -> str:
    return _single(score_task, config, runs_dir, "score")


@flow(name="stage-judge")
def judge_flow(config: JudgeConfig, runs_dir: str = "runs") -> str:
    return _single(judge_task, config, runs_dir, "judge")


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline flow with a full config (``align run``)."""
    return alignment_pipeline(**config.flow_parameters())
