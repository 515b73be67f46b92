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

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from alignment.algorithms.registry import ALGORITHMS, get_algorithm
from alignment.data import DataConfig
from alignment.dpo import DPOStageConfig
from alignment.evaluate import ScoreConfig
from alignment.grpo import GRPOConfig
from alignment.judge import JudgeConfig
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
from alignment.ppo import PPOConfig
from alignment.presets import stage_preset
from alignment.reinforce import ReinforceConfig
from alignment.reward import RewardModelConfig
from alignment.rl import OnlineConfig
from alignment.sft import SFTConfig
from alignment.verdict import verdict_markdown
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
    state = task.with_options(**run_options, **task_options)(
        config, options.runs_dir, plan, **(task_kwargs or {}), return_state=True)
    path = state.result()  # raises the stage's own error when it failed
    stages[name] = stage_record(state.name, path)
    get_run_logger().info("stage %s: %s -> %s (peak %s MB)", name, state.name, path, stages[name]["peak_rss_mb"])
    return path


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
) -> dict[str, Any]:
    """Data [-> prompts] -> [SFT] -> reward model(s) -> RL (options.algorithm) -> validation scoring -> pairwise
    judge, each stage cached (prompts, when given: what RL trains on and scoring scores; the RMs keep data)."""
    config = PipelineConfig(data=data, prompts=prompts, sft=sft, rm_scalar=rm_scalar, rm_distributional=rm_distributional,
                            reinforce=reinforce, ppo=ppo, grpo=grpo, score=score, judge=judge, options=options)
    check_pipeline(config)  # a reward model the RL stage needs but the pipeline does not train: before any stage
    Path(options.runs_dir).mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict[str, str]] = {}
    outputs: dict[str, str] = {}  # stage -> output folder; stage_config fills the paths between stages from it
    parallel = {"task_kwargs": {"num_processes": options.num_processes}}
    rl = rl_stage(options)
    tasks = {"data": (data_task, {}), "prompts": (prompts_task, {}), "sft": (sft_task, {}), "rm_scalar": (reward_model_task, parallel),
             "rm_distributional": (reward_model_task, parallel), rl: (online_task(rl), parallel),
             "score": (score_task, {}),
             "judge": (judge_task, {"retries": options.judge_retries,
                                    "retry_delay_seconds": options.judge_retry_delay_s})}
    # data -> reward model(s) -> RL against the proxy -> scoring by every RM -> pairwise judge
    for name in pipeline_stages(options, prompts=prompts is not None):
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


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the pipeline flow with a full config (``align run``)."""
    return alignment_pipeline(**config.flow_parameters())
