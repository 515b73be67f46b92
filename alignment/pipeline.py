"""The whole pipeline's configuration, its presets, and where each stage writes (no Prefect here).

data -> reward model(s) -> REINFORCE -> scoring -> judge. Every stage writes to a deterministic folder
under ``runs_dir`` named after its stage key (a hash of its config and of its inputs' manifests), and
marks completion with a ``manifest.json`` written last. :func:`plan_*` compute (key, folder) before a
stage runs, so an orchestrator can skip a stage whose folder is complete, and re-run one whose folder
vanished or is incomplete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from alignment.config import StageConfig
from alignment.data import DataConfig
from alignment.evaluate import ScoreConfig, score_stage_key
from alignment.io import files_intact, read_manifest
from alignment.judge import JudgeConfig, judge_stage_key
from alignment.reinforce import ReinforceConfig, reinforce_stage_key
from alignment.reward import RewardModelConfig, reward_stage_key


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

    def flow_parameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("data", "rm_scalar", "rm_distributional", "reinforce", "score", "judge", "options")}


# Presets: section -> field overrides, layered over the stage defaults.
_DEMO_RM = {"max_length": 256, "max_train_pairs": 64, "max_eval_pairs": 32, "epochs": 1.0, "batch_size": 8,
            "learning_rate": 5e-5}
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo set on a CPU in minutes: small subsets, short generations, the local judge.
    "demo": {
        "data": {"source": "demo"},
        "rm_scalar": {"kind": "scalar", **_DEMO_RM},
        "rm_distributional": {"kind": "distributional", **_DEMO_RM},
        "reinforce": {"steps": 8, "batch_size": 4, "max_new_tokens": 32, "max_prompt_length": 256,
                      "learning_rate": 1e-5, "checkpoint_every": 4, "eval_prompts": 8},
        "score": {"n_prompts": 16, "max_new_tokens": 64},
        "judge": {"backend": "local", "max_pairs": 16},
    },
    # HelpSteer2 from the hub at full size: needs a GPU and a Gemini key.
    "helpsteer2": {
        "data": {"source": "esfrankel17/HelpSteer2_binarized", "split": "average_rating_split"},
        "rm_scalar": {"kind": "scalar", "max_length": 1024, "epochs": 1.0, "batch_size": 16, "learning_rate": 2e-5,
                      "gradient_checkpointing": True, "device": "cuda"},
        "rm_distributional": {"kind": "distributional", "max_length": 1024, "epochs": 1.0, "batch_size": 16,
                              "learning_rate": 2e-5, "gradient_checkpointing": True, "device": "cuda"},
        "reinforce": {"steps": 500, "batch_size": 32, "micro_batch_size": 16, "max_new_tokens": 256,
                      "max_prompt_length": 1024, "learning_rate": 1e-6, "checkpoint_every": 50, "eval_prompts": 128,
                      "device": "cuda"},
        "score": {"n_prompts": 256, "max_new_tokens": 256, "batch_size": 32, "device": "cuda"},
        "judge": {"backend": "gemini", "max_pairs": 256},
    },
}


def pipeline_preset(name: str = "demo") -> dict[str, Any]:
    if name not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {name!r} (known: {', '.join(PIPELINE_PRESETS)})")
    return {k: dict(v) for k, v in PIPELINE_PRESETS[name].items()}


# --------------------------------------------------------------------------------------------
# Where each stage writes, decided before it runs
# --------------------------------------------------------------------------------------------
class StagePlan(NamedTuple):
    key: str  # the stage key: config + input manifests + schema
    out: Path  # the folder the stage writes
    done: Path  # the folder whose manifest marks completion (``out`` except for REINFORCE)


def is_complete(plan: StagePlan) -> bool:
    """The stage's folder is finished for this key: manifest written last, listed files intact."""
    manifest = read_manifest(plan.done)
    if manifest is None or manifest.get("stage_key") != plan.key:
        return False
    if manifest.get("files"):
        return files_intact(plan.done, manifest)
    return any(plan.done.glob("*.safetensors"))  # REINFORCE's final policy folder


def plan_data(config: DataConfig, runs_dir: str | Path) -> StagePlan:
    from alignment.data import default_out_dir, read_source, stage_key

    source = read_source(config)
    out = default_out_dir(config, source, runs_dir)
    return StagePlan(stage_key(config, source), out, out)


def plan_reward_model(config: RewardModelConfig, runs_dir: str | Path) -> StagePlan:
    key = reward_stage_key(config, Path(config.data))
    out = Path(runs_dir) / "rm" / f"{config.kind}-{key[:12]}"
    return StagePlan(key, out, out)


def plan_reinforce(config: ReinforceConfig, runs_dir: str | Path) -> StagePlan:
    key = reinforce_stage_key(config)
    out = Path(runs_dir) / "reinforce" / key[:12]
    return StagePlan(key, out, out / "final")


def plan_score(config: ScoreConfig, runs_dir: str | Path) -> StagePlan:
    key = score_stage_key(config)
    out = Path(runs_dir) / "score" / key[:12]
    return StagePlan(key, out, out)


def plan_judge(config: JudgeConfig, runs_dir: str | Path) -> StagePlan:
    key = judge_stage_key(config)
    out = Path(runs_dir) / "judge" / f"{config.backend}-{key[:12]}"
    return StagePlan(key, out, out)
