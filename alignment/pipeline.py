"""The whole pipeline's configuration and where each stage writes (no Prefect here).

data -> reward model(s) -> REINFORCE -> scoring -> judge. Every stage follows the contract of
:mod:`alignment.stage`: a deterministic folder under ``runs_dir`` named after its stage key, completion
marked by a ``manifest.json`` written last. Each stage's own ``plan_*`` function (collected in
:data:`PLANNERS`) computes (key, folder) before it runs -- the same function the stage itself uses for
its default folder -- so an orchestrator can skip a stage whose folder is complete and re-run one whose
folder vanished or is incomplete. Presets come from the one table in :mod:`alignment.presets`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignment.config import StageConfig
from alignment.data import DataConfig, plan_data
from alignment.evaluate import ScoreConfig, plan_score
from alignment.footprint import read_footprint
from alignment.judge import JudgeConfig, plan_judge
from alignment.presets import pipeline_preset
from alignment.reinforce import ReinforceConfig, plan_reinforce
from alignment.reward import RewardModelConfig, plan_reward_model
from alignment.stage import StagePlan, is_complete
from alignment.verdict import verdict


class PipelineOptions(BaseModel):
    """What the pipeline runs and where it writes."""

    model_config = ConfigDict(extra="forbid")

    runs_dir: str = Field("runs", description="Root folder of every stage's output (and of Prefect's results).")
    train_scalar: bool = Field(True, description="Train the scalar (Bradley-Terry) reward model.")
    train_distributional: bool = Field(True, description="Train the distributional (10-bin) reward model.")
    reinforce_reward: Literal["scalar", "distributional"] = Field(
        "scalar", description="Which reward model REINFORCE optimises (it must be trained).")
    judge: bool = Field(True, description="Run the pairwise judge after scoring.")
    num_processes: int = Field(1, ge=1, description="Data-parallel processes for the reward-model and REINFORCE "
                               "stages: > 1 runs them under `accelerate launch` from inside the task (one per "
                               "GPU; gloo on CPU).")
    judge_retries: int = Field(1, ge=0, description="Prefect retries of the judge stage on transient failures.")
    judge_retry_delay_s: float = Field(30.0, ge=0.0)


class PipelineConfig(StageConfig):
    """Every stage's config plus the pipeline options; the flow's parameters are its fields."""

    section: str = "pipeline"
    data: DataConfig = Field(default_factory=DataConfig)
    rm_scalar: RewardModelConfig = Field(default_factory=lambda: RewardModelConfig(kind="scalar"))
    rm_distributional: RewardModelConfig = Field(default_factory=lambda: RewardModelConfig(kind="distributional"))
    reinforce: ReinforceConfig = Field(default_factory=ReinforceConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(backend="local"))
    options: PipelineOptions = Field(default_factory=PipelineOptions)

    @classmethod
    def preset(cls, name: str = "demo") -> dict[str, Any]:
        """The sections of preset ``name`` this pipeline runs (the table also holds other stages, e.g. ppo)."""
        return {k: v for k, v in pipeline_preset(name).items() if k in cls.model_fields}

    def flow_parameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("data", "rm_scalar", "rm_distributional", "reinforce", "score", "judge", "options")}


# --------------------------------------------------------------------------------------------
# Where each stage writes, decided before it runs: each stage's own plan_* function
# --------------------------------------------------------------------------------------------
PLANNERS: dict[str, Callable[[Any, str], StagePlan]] = {
    "data": plan_data, "reward-model": plan_reward_model, "reinforce": plan_reinforce, "score": plan_score,
    "judge": plan_judge}


# --------------------------------------------------------------------------------------------
# The whole pipeline planned ahead (the same wiring as flows/pipeline.py, checked by a test)
# --------------------------------------------------------------------------------------------
def plan_pipeline(config: PipelineConfig) -> dict[str, tuple[Any, StagePlan]]:
    """Every stage's (config, plan) in order, the paths between stages filled in from the upstream plans
    as the flow fills them from the upstream outputs. Raises when a stage cannot be planned (e.g. the
    data source is missing): the flow then runs and reports it."""
    o, runs = config.options, config.options.runs_dir
    stages: dict[str, tuple[Any, StagePlan]] = {}

    def add(name: str, stage_config: Any, planner: Callable[[Any, str], StagePlan]) -> str:
        plan = planner(stage_config, runs)
        stages[name] = (stage_config, plan)
        return str(plan.done)

    data_dir = add("data", config.data, plan_data)
    rms: dict[str, str] = {}
    if o.train_scalar:
        rms["scalar"] = add("rm_scalar", config.rm_scalar.model_copy(update={"kind": "scalar", "data": data_dir}),
                            plan_reward_model)
    if o.train_distributional:
        rms["distributional"] = add("rm_distributional", config.rm_distributional.model_copy(
            update={"kind": "distributional", "data": data_dir}), plan_reward_model)
    proxy = o.reinforce_reward
    independent = {name: folder for name, folder in rms.items() if name != proxy}
    policy = add("reinforce", config.reinforce.model_copy(update={
        "reward_model": rms[proxy], "data": data_dir, "independent_reward_models": independent}), plan_reinforce)
    score_dir = add("score", config.score.model_copy(update={
        "data": data_dir, "models": {"base": config.reinforce.policy, "tuned": policy}, "reward_models": rms,
        "proxy_reward_model": proxy}), plan_score)
    if o.judge:
        add("judge", config.judge.model_copy(update={"scores": score_dir, "model_a": "tuned", "model_b": "base"}),
            plan_judge)
    return stages


def completed_pipeline(config: PipelineConfig) -> dict[str, StagePlan] | None:
    """The plans of every stage when all of them are complete (nothing to run), else None."""
    try:
        stages = plan_pipeline(config)
    except Exception:  # noqa: BLE001 -- the flow runs and reports what is wrong
        return None
    if not all(is_complete(plan) for _, plan in stages.values()):
        return None
    return {name: plan for name, (_, plan) in stages.items()}



# --------------------------------------------------------------------------------------------
# What a run reports: each stage's state, folder and cost, and the verdict
# --------------------------------------------------------------------------------------------
def stage_record(state: str, path: str | Path) -> dict[str, Any]:
    """One stage's line in the pipeline's result: its state, folder, seconds and peak memory (the cost of
    the run that made the output, from its ``footprint.json``)."""
    cost = read_footprint(path) or {}
    return {"state": state, "path": str(path), "seconds": cost.get("seconds"), "peak_rss_mb": cost.get("peak_rss_mb")}


def pipeline_verdict(score_dir: str | Path, judge_dir: str | Path | None) -> dict[str, Any]:
    """The verdict on the tuned policy from the scoring stage's and (optionally) the judge's outputs."""
    scores = json.loads((Path(score_dir) / "scores.json").read_text())
    judged = json.loads((Path(judge_dir) / "summary.json").read_text()) if judge_dir is not None else None
    return verdict(scores, judged, "tuned")


def completed_result(plans: dict[str, StagePlan]) -> dict[str, Any]:
    """What the flow returns (stages, report, verdict), read from complete stage folders without running it."""
    judge_dir = plans["judge"].done if "judge" in plans else None
    return {"stages": {name: stage_record("Complete", plan.done) for name, plan in plans.items()},
            "report": str(judge_dir / "report.md") if judge_dir is not None else None,
            "verdict": pipeline_verdict(plans["score"].done, judge_dir)}


__all__ = ["PLANNERS", "PipelineConfig", "PipelineOptions", "StagePlan", "completed_pipeline", "completed_result",
           "is_complete", "pipeline_preset", "pipeline_verdict", "plan_pipeline", "stage_record"]
