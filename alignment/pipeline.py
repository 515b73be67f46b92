"""The whole pipeline's configuration and where each stage writes (no Prefect here).

data [-> prompts] -> [SFT] -> reward model(s) -> RL -> scoring -> judge (``prompts``, when the config has
that section, is a second data stage: the RL stage trains on it and scoring scores it, while the reward
models keep ``data``; SFT when ``options.sft``: the RL
policy then starts from its output, which is also the "base" the tuned policy is scored against). The RL
stage is any registered online algorithm (``options.algorithm``: reinforce, ppo, grpo, ...; see
:mod:`alignment.algorithms.registry`), run with that algorithm's section of the config; the pipeline
stage is named after it, so the default (reinforce) keeps its stage name, keys and folders. An RL
section with ``rewards`` (components) is not given the trained reward model as ``reward_model``:
instead a ``reward_model`` component (or an ``ensemble`` member) whose folder is ``"@rm_scalar"`` or
``"@rm_distributional"`` is resolved to the pipeline's trained reward model of that kind. Every stage follows the contract of
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

from pydantic import ConfigDict, Field, field_validator, model_validator

from alignment.algorithms.dpo import plan_dpo
from alignment.algorithms.grpo import GRPOConfig
from alignment.algorithms.online import OnlineConfig
from alignment.algorithms.ppo import PPOConfig
from alignment.algorithms.registry import ALGORITHMS, get_algorithm
from alignment.algorithms.reinforce import ReinforceConfig, plan_reinforce
from alignment.algorithms.sft import SFTConfig, plan_sft
from alignment.config import ConfigModel, StageConfig
from alignment.data import DataConfig, plan_data
from alignment.evaluation.evaluate import ScoreConfig, plan_score
from alignment.evaluation.judge import JudgeConfig, plan_judge
from alignment.evaluation.verdict import verdict
from alignment.footprint import read_footprint
from alignment.io import read_manifest
from alignment.presets import pipeline_preset
from alignment.rewards.model import RewardModelConfig, plan_reward_model
from alignment.rounds.config import RoundsConfig
from alignment.rounds.onpolicy import plan_labels, plan_samples
from alignment.stage import StagePlan, is_complete
from alignment.tracking import TrackingConfig


class PipelineOptions(ConfigModel):
    """What the pipeline runs and where it writes."""

    model_config = ConfigDict(extra="forbid")

    runs_dir: str = Field("runs", description="Root folder of every stage's output (and of Prefect's results).")
    sft: bool = Field(False, description="Supervised fine-tuning first (on the sft section's summaries); REINFORCE "
                      "starts from its output, and scoring compares the tuned policy with it.")
    train_scalar: bool = Field(True, description="Train the scalar (Bradley-Terry) reward model.")
    train_distributional: bool = Field(True, description="Train the distributional (10-bin) reward model.")
    algorithm: str = Field("reinforce", description="The RL stage: any registered online algorithm (reinforce, "
                           "ppo, grpo, ...), run with its section of this config (reinforce / ppo / grpo); "
                           "scoring, the judge and the verdict then take that algorithm's policy.")
    reinforce_reward: Literal["scalar", "distributional"] = Field(
        "scalar", description="Which reward model the RL stage optimises (it must be trained); unused when the "
        "RL section has rewards (components: '@rm_scalar' / '@rm_distributional' name the trained ones).")
    judge: bool = Field(True, description="Run the pairwise judge after scoring.")
    num_processes: int = Field(1, ge=1, description="Data-parallel processes for the reward-model and REINFORCE "
                               "stages: > 1 runs them under `accelerate launch` from inside the task (one per "
                               "GPU; gloo on CPU).")
    judge_retries: int = Field(1, ge=0, description="Prefect retries of the judge stage on transient failures.")
    judge_retry_delay_s: float = Field(30.0, ge=0.0, le=86400.0, description="Seconds before a judge retry "
                                       "(at most a day: Prefect's retry delay overflows on huge values).")

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        get_algorithm(value)  # ValueError: unknown algorithm 'x'; known: grpo, ppo, reinforce
        return value


class PipelineConfig(StageConfig):
    """Every stage's config plus the pipeline options; the flow's parameters are its fields."""

    section: str = "pipeline"
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: DataConfig | None = Field(
        None, description="Optional second data input: the prompts the RL stage trains on and the score stage (and "
        "so the judge) scores, e.g. {source: demo-verifiable} (a prompts-only set with gold checks); its own data "
        "stage ('prompts'). None: the RL and score stages use data, as the reward models do.")
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm_scalar: RewardModelConfig = Field(default_factory=lambda: RewardModelConfig(kind="scalar"))
    rm_distributional: RewardModelConfig = Field(default_factory=lambda: RewardModelConfig(kind="distributional"))
    reinforce: ReinforceConfig = Field(default_factory=ReinforceConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(backend="local"))
    options: PipelineOptions = Field(default_factory=PipelineOptions)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking: MLflow on <runs_dir>/mlflow.db by default, "
        "uri for a server, 'none' to turn it off (see alignment.tracking). Not part of any stage key.")
    rounds: RoundsConfig = Field(default_factory=RoundsConfig, description="`align round` / `align rounds` and the "
                                 "alignment-rounds flow: on-policy re-training rounds after this pipeline (round 0).")

    @classmethod
    def preset(cls, name: str = "demo") -> dict[str, Any]:
        """The sections of preset ``name`` this pipeline runs (the table also holds other stages, e.g. ppo)."""
        return {k: v for k, v in pipeline_preset(name).items() if k in cls.model_fields}

    @model_validator(mode="after")
    def _algorithm_section(self) -> PipelineConfig:
        section = get_algorithm(self.options.algorithm).section
        if not isinstance(getattr(self, section, None), OnlineConfig):
            raise ValueError(f"options.algorithm={self.options.algorithm!r}: the pipeline has no {section!r} "
                             f"section (PipelineConfig needs a field of that name holding its config)")
        return self

    def online(self) -> OnlineConfig:
        """The RL stage's config as given: the section of ``options.algorithm``."""
        return getattr(self, get_algorithm(self.options.algorithm).section)

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's parameters (``prompts`` only when set: the flow's default is None)."""
        names = ("data", *(["prompts"] if self.prompts is not None else []), "sft", "rm_scalar", "rm_distributional",
                 *ONLINE_SECTIONS, "score", "judge", "options", "tracking")
        return {name: getattr(self, name) for name in names}


# The pipeline's sections of online algorithms (every registered algorithm's section must be one of them:
# tests/test_pipeline_algorithms.py checks it).
ONLINE_SECTIONS = ("reinforce", "ppo", "grpo")


# --------------------------------------------------------------------------------------------
# Where each stage writes, decided before it runs: each stage's own plan_* function
# --------------------------------------------------------------------------------------------
PLANNERS: dict[str, Callable[[Any, str], StagePlan]] = {
    "data": plan_data, "prompts": plan_data, "sft": plan_sft, "reward-model": plan_reward_model,
    "reinforce": plan_reinforce, "dpo": plan_dpo, "score": plan_score, "judge": plan_judge,
    "samples": plan_samples, "labels": plan_labels}


def stage_planner(name: str) -> Callable[[Any, str], StagePlan]:
    """The plan function of stage (or task) ``name``: :data:`PLANNERS`, else a registered online algorithm's
    ``plan_<name>`` (so an algorithm registered later plans without an entry here)."""
    if name in PLANNERS:
        return PLANNERS[name]
    if name in ALGORITHMS:
        return ALGORITHMS[name].plan_fn
    raise ValueError(f"no planner for stage {name!r} (known: {', '.join([*PLANNERS, *ALGORITHMS])})")


# --------------------------------------------------------------------------------------------
# The wiring between stages: one function, used by the flow and by planning ahead
# --------------------------------------------------------------------------------------------
RM_PLACEHOLDERS = {"@rm_scalar": "scalar", "@rm_distributional": "distributional"}


def _placeholder(folder: str, rms: dict[str, str], where: str) -> str:
    """``folder``, or the trained reward model's folder when it is one of :data:`RM_PLACEHOLDERS`."""
    if not folder.startswith("@rm_"):
        return folder
    kind = RM_PLACEHOLDERS.get(folder)
    if kind is None:
        raise ValueError(f"{where}: unknown placeholder {folder!r} (known: {', '.join(RM_PLACEHOLDERS)})")
    if kind not in rms:
        raise ValueError(f"{where}: folder {folder!r} names the pipeline's {kind} reward model, which it does "
                         f"not train (options.train_{kind}=false)")
    return rms[kind]


def resolve_rewards(rewards: list[Any], rms: dict[str, str], section: str = "reinforce"
                    ) -> tuple[list[Any], list[str]]:
    """(the components with every ``@rm_<kind>`` folder -- a ``reward_model``'s ``folder``, an ``ensemble``'s
    ``members`` -- replaced by the trained reward model of that kind, the kinds of ``rms`` the components use).
    A component with a real folder is left as given (and counts as using a trained RM if it is that folder)."""
    resolved, used_folders = [], []
    for i, component in enumerate(rewards):
        where = f"{section}.rewards[{i}] ({component.name})"
        update: dict[str, Any] = {}
        if getattr(component, "folder", None) is not None:
            update["folder"] = _placeholder(component.folder, rms, where)
            used_folders.append(update["folder"])
        if getattr(component, "members", None) is not None:
            update["members"] = [_placeholder(m, rms, where) for m in component.members]
            used_folders.extend(update["members"])
        resolved.append(component.model_copy(update=update) if update else component)
    used = {str(Path(f).resolve()) for f in used_folders}
    return resolved, [kind for kind, folder in rms.items() if str(Path(folder).resolve()) in used]


def _rl_wiring(config: PipelineConfig, rms: dict[str, str]) -> tuple[list[Any] | None, list[str]]:
    """(the RL section's resolved rewards or None, the trained reward models it trains against)."""
    online = config.online()
    if online.rewards is None:
        proxy = config.options.reinforce_reward
        if proxy not in rms:
            raise ValueError(f"options.reinforce_reward={proxy!r} but that reward model is not trained "
                             f"(options.train_{proxy}=false)")
        return None, [proxy]
    return resolve_rewards(online.rewards, rms, online.section)


def check_pipeline(config: PipelineConfig) -> None:
    """Raise a ValueError before anything runs when the RL stage's reward cannot be wired: the proxy
    (``options.reinforce_reward``) or an ``@rm_<kind>`` component names a reward model the pipeline does
    not train, or a placeholder is unknown."""
    o = config.options
    trained = [k for k, on in (("scalar", o.train_scalar), ("distributional", o.train_distributional)) if on]
    _rl_wiring(config, {kind: f"{o.runs_dir}/rm/{kind}" for kind in trained})


def rl_stage(options: PipelineOptions) -> str:
    """The RL stage's name in the pipeline: the online algorithm's (``reinforce`` by default)."""
    return options.algorithm


def stage_config(config: PipelineConfig, name: str, outputs: dict[str, str]) -> Any:
    """Stage ``name``'s config with the paths between stages filled in from ``outputs`` (stage name ->
    output folder of the stages before it): what the flow hands each task, whatever the form said."""
    rms = {kind: outputs[f"rm_{kind}"] for kind in ("scalar", "distributional") if f"rm_{kind}" in outputs}
    rl = rl_stage(config.options)
    start = outputs.get("sft", config.online().policy)  # the policy RL starts from: the SFT output, if any
    prompts = outputs.get("prompts", outputs.get("data"))  # what RL trains on and scoring scores: prompts, else data
    if name == "data":
        return config.data
    if name == "prompts":
        if config.prompts is None:
            raise ValueError("stage 'prompts': the pipeline config has no prompts section")
        return config.prompts
    if name == "sft":
        return config.sft
    if name in ("rm_scalar", "rm_distributional"):
        kind = name.removeprefix("rm_")
        return getattr(config, name).model_copy(update={"kind": kind, "data": outputs["data"]})
    if name == rl:  # against the proxy; the other reward models watch as independent judges
        rewards, used = _rl_wiring(config, rms)
        update = {"policy": start, "data": prompts,
                  "independent_reward_models": {k: v for k, v in rms.items() if k not in used}}
        if rewards is None:
            update["reward_model"] = rms[used[0]]
        else:  # the components train it; '@rm_<kind>' folders are the trained reward models
            update["rewards"] = rewards
        return config.online().model_copy(update=update)
    if name == "score":  # both models on the same validation prompts, scored by every reward model
        _, used = _rl_wiring(config, rms)
        return config.score.model_copy(update={
            "data": prompts, "models": {"base": start, "tuned": outputs[rl]},
            "reward_models": rms, "proxy_reward_model": used[0] if used else None})
    if name == "judge":
        return config.judge.model_copy(update={"scores": outputs["score"], "model_a": "tuned", "model_b": "base"})
    raise ValueError(f"unknown pipeline stage {name!r}")


def pipeline_stages(options: PipelineOptions, prompts: bool = False) -> list[str]:
    """The stages this pipeline runs, in order (the RL stage named after its algorithm; ``prompts``: the
    config has a prompts section, whose data stage runs right after data)."""
    return ["data", *(["prompts"] if prompts else []), *(["sft"] if options.sft else []),
            *(["rm_scalar"] if options.train_scalar else []),
            *(["rm_distributional"] if options.train_distributional else []), rl_stage(options), "score",
            *(["judge"] if options.judge else [])]


STAGE_PLANNERS: dict[str, Callable[[Any, str], StagePlan]] = {
    "data": plan_data, "prompts": plan_data, "sft": plan_sft, "rm_scalar": plan_reward_model,
    "rm_distributional": plan_reward_model,
    "reinforce": plan_reinforce, "score": plan_score, "judge": plan_judge}


def plan_pipeline(config: PipelineConfig) -> dict[str, tuple[Any, StagePlan]]:
    """Every stage's (config, plan) in order, wired as the flow wires them (:func:`stage_config`), each
    stage's output taken from its plan. Raises when a stage cannot be planned (e.g. the data source is
    missing): the flow then runs and reports it."""
    stages: dict[str, tuple[Any, StagePlan]] = {}
    outputs: dict[str, str] = {}
    for name in pipeline_stages(config.options, prompts=config.prompts is not None):
        stage = stage_config(config, name, outputs)
        plan = (STAGE_PLANNERS.get(name) or stage_planner(name))(stage, config.options.runs_dir)
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
    return {"state": state, "path": str(path), "seconds": cost.get("seconds"), "peak_rss_mb": cost.get("peak_rss_mb"),
            "headline": stage_headline(path)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def stage_headline(path: str | Path) -> str | None:
    """A stage's headline figure, read from its folder: pairs, RM accuracy, held-out reward, win rate."""
    path = Path(path)
    manifest = read_manifest(path) or {}
    stage = manifest.get("stage")
    if stage == "data":
        unit = "prompts" if not manifest.get("n_pairs") else "pairs"
        return f"{manifest.get('n_train')} train / {manifest.get('n_validation')} validation {unit}"
    if stage in ("samples", "labels"):
        s = _read_json(path / "summary.json")
        if stage == "samples":
            return f"{s.get('n_pairs')} pairs from {s.get('n_prompts')} prompts x {s.get('samples_per_prompt')} answers"
        acc = "; ".join(f"{name} RM accuracy on them {a['accuracy']:.2f}"
                        for name, a in (s.get("reward_model_accuracy") or {}).items() if a.get("accuracy") is not None)
        return f"{s.get('n_labelled')} of {s.get('n_pairs')} pairs labelled" + (f"; {acc}" if acc else "")
    metrics = _read_json(path / "metrics.json")
    if "accuracy" in metrics:
        return f"validation accuracy {metrics['accuracy']:.3f}"
    summary = _read_json(path / "summary.json")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    if before.get("mean_reward") is not None and after.get("mean_reward") is not None:
        return f"held-out proxy reward {before['mean_reward']:+.3f} -> {after['mean_reward']:+.3f}"
    if summary.get("win_rate") is not None:
        return f"win rate {summary['win_rate']:.2f} over {summary.get('n')} pairs"
    scores = _read_json(path / "scores.json")
    if scores.get("models"):
        return f"{len(scores['models'])} models on {scores.get('n_prompts', '?')} prompts"
    return None


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


__all__ = ["ONLINE_SECTIONS", "PLANNERS", "RM_PLACEHOLDERS", "PipelineConfig", "PipelineOptions", "StagePlan",
           "check_pipeline", "completed_pipeline", "completed_result", "is_complete", "pipeline_preset", "pipeline_stages",
           "pipeline_verdict", "plan_pipeline", "resolve_rewards", "rl_stage", "stage_config", "stage_planner",
           "stage_record"]
