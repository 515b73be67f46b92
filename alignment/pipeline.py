"""The whole pipeline's configuration and where each stage writes (no Prefect here).

data -> [SFT] -> reward model(s) -> REINFORCE -> scoring -> judge (SFT when ``options.sft``: the RL
policy then starts from its output, which is also the "base" the tuned policy is scored against). Every stage follows the contract of
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

from pydantic import ConfigDict, Field

from alignment.config import ConfigModel, StageConfig
from alignment.data import DataConfig, plan_data
from alignment.evaluate import ScoreConfig, plan_score
from alignment.footprint import read_footprint
from alignment.judge import JudgeConfig, plan_judge
from alignment.presets import pipeline_preset
from alignment.reinforce import ReinforceConfig, plan_reinforce
from alignment.reward import RewardModelConfig, plan_reward_model
from alignment.sft import SFTConfig, plan_sft
from alignment.stage import StagePlan, is_complete
from alignment.verdict import verdict


class PipelineOptions(ConfigModel):
    """What the pipeline runs and where it writes."""

    model_config = ConfigDict(extra="forbid")

    runs_dir: str = Field("runs", description="Root folder of every stage's output (and of Prefect's results).")
    sft: bool = Field(False, description="Supervised fine-tuning first (on the sft section's summaries); REINFORCE "
                      "starts from its output, and scoring compares the tuned policy with it.")
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
    sft: SFTConfig = Field(default_factory=SFTConfig)
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
                ("data", "sft", "rm_scalar", "rm_distributional", "reinforce", "score", "judge", "options")}


# --------------------------------------------------------------------------------------------
# Where each stage writes, decided before it runs: each stage's own plan_* function
# --------------------------------------------------------------------------------------------
PLANNERS: dict[str, Callable[[Any, str], StagePlan]] = {
    "data": plan_data, "sft": plan_sft, "reward-model": plan_reward_model, "reinforce": plan_reinforce,
    "score": plan_score, "judge": plan_judge}


# --------------------------------------------------------------------------------------------
# The wiring between stages: one function, used by the flow and by planning ahead
# --------------------------------------------------------------------------------------------
def stage_config(config: PipelineConfig, name: str, outputs: dict[str, str]) -> Any:
    """Stage ``name``'s config with the paths between stages filled in from ``outputs`` (stage name ->
    output folder of the stages before it): what the flow hands each task, whatever the form said."""
    rms = {kind: outputs[f"rm_{kind}"] for kind in ("scalar", "distributional") if f"rm_{kind}" in outputs}
    proxy = config.options.reinforce_reward
    start = outputs.get("sft", config.reinforce.policy)  # the policy RL starts from: the SFT output, if any
    if name == "data":
        return config.data
    if name == "sft":
        return config.sft
    if name in ("rm_scalar", "rm_distributional"):
        kind = name.removeprefix("rm_")
        return getattr(config, name).model_copy(update={"kind": kind, "data": outputs["data"]})
    if name == "reinforce":  # against the proxy; the other reward models watch as independent judges
        return config.reinforce.model_copy(update={
            "policy": start, "reward_model": rms[proxy], "data": outputs["data"],
            "independent_reward_models": {k: v for k, v in rms.items() if k != proxy}})
    if name == "score":  # both models on the same validation prompts, scored by every reward model
        return config.score.model_copy(update={
            "data": outputs["data"], "models": {"base": start, "tuned": outputs["reinforce"]},
            "reward_models": rms, "proxy_reward_model": proxy})
    if name == "judge":
        return config.judge.model_copy(update={"scores": outputs["score"], "model_a": "tuned", "model_b": "base"})
    raise ValueError(f"unknown pipeline stage {name!r}")


def pipeline_stages(options: PipelineOptions) -> list[str]:
    """The stages this pipeline runs, in order."""
    return ["data", *(["sft"] if options.sft else []), *(["rm_scalar"] if options.train_scalar else []),
            *(["rm_distributional"] if options.train_distributional else []), "reinforce", "score",
            *(["judge"] if options.judge else [])]


STAGE_PLANNERS: dict[str, Callable[[Any, str], StagePlan]] = {
    "data": plan_data, "sft": plan_sft, "rm_scalar": plan_reward_model, "rm_distributional": plan_reward_model,
    "reinforce": plan_reinforce, "score": plan_score, "judge": plan_judge}


def plan_pipeline(config: PipelineConfig) -> dict[str, tuple[Any, StagePlan]]:
    """Every stage's (config, plan) in order, wired as the flow wires them (:func:`stage_config`), each
    stage's output taken from its plan. Raises when a stage cannot be planned (e.g. the data source is
    missing): the flow then runs and reports it."""
    stages: dict[str, tuple[Any, StagePlan]] = {}
    outputs: dict[str, str] = {}
    for name in pipeline_stages(config.options):
        stage = stage_config(config, name, outputs)
        plan = STAGE_PLANNERS[name](stage, config.options.runs_dir)
        stages[name], outputs[name] = (stage, plan), str(plan.done)
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
           "is_complete", "pipeline_preset", "pipeline_stages", "pipeline_verdict", "plan_pipeline", "stage_config",
           "stage_record"]
