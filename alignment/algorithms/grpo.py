"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): REINFORCE's loop with a group baseline.

Per prompt, k completions (``samples_per_prompt``, default 4) are sampled and scored; each one's
advantage is its reward normalised within its group, A_i = (r_i - mean_group) / (std_group + eps)
(``alignment.algorithms.advantages``'s ``grpo``: sample std, eps 1e-6; ``baseline=dr_grpo`` drops the
std division), given to every token of the completion. The loss is the clipped surrogate per token
(``alignment.algorithms.losses``'s ``clipped_token``), averaged over every completion token of the
batch (``loss_agg=token_mean``, DAPO's and TRL's default; ``seq_mean_token_mean`` is the original
paper's, ``seq_mean_token_sum_norm`` Dr. GRPO's).

With one optimizer step per batch, as here (and TRL's default ``num_iterations=1``), the policy that
sampled the batch is the policy being updated: the ratio pi / pi_old is 1 and the clip never acts
(``clip_ratio`` only matters for several updates per batch, which this loop does not do); the gradient
is then -mean_t A_t grad log pi_t. The loss is still the clipped one, so the same code serves when
several updates per batch are added.

KL: ``kl_beta`` defaults to 0.0, as TRL's GRPOConfig (``beta=0.0``; Dr. GRPO and DAPO drop the KL term
as well): no reference model is loaded. A beta > 0
subtracts beta * KL (k1, per sequence) from the reward as in REINFORCE, not the paper's k3 term in the
loss. Everything else -- the reward components, shaping, guard, held-out evaluations, checkpoints and
exact resume -- is REINFORCE's (``alignment.algorithms.reinforce``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignment.algorithms.online import online_stage_key, plan_online, run_online
from alignment.algorithms.reinforce import ReinforceConfig, ReinforceError, ReinforceRecipe
from alignment.stage import StagePlan, StageResult

__all__ = ["GRPOConfig", "GRPOError", "GRPORecipe", "plan_grpo", "train_grpo"]


class GRPOError(ReinforceError):
    """The GRPO stage cannot run as configured (the message says why)."""


class GRPOConfig(ReinforceConfig):
    """GRPO: k samples per prompt, group-normalised advantages, the token-level clipped loss."""

    section: str = "grpo"
    baseline: Literal["moving_average", "ema", "rloo", "grpo", "dr_grpo", "none"] = Field(
        "grpo", description="grpo ((r - mean) / (std + eps) within each prompt's k samples) or dr_grpo "
        "(r - mean); the other REINFORCE baselines are accepted too.")
    samples_per_prompt: int = Field(4, ge=2, description="Completions per prompt (the group size k).")
    loss_agg: Literal["sequence", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="token_mean (DAPO / TRL), seq_mean_token_mean (the original GRPO), "
        "seq_mean_token_sum_norm (Dr. GRPO) or sequence (sum over tokens, mean over sequences).")
    kl_beta: float = Field(0.0, ge=0.0, description="KL penalty to the starting policy, folded into the reward "
                           "(k1); 0 as TRL's GRPO default: no reference model is loaded.")
    clip_ratio: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range of the surrogate; with one update "
                              "per batch the ratio is 1 and the clip never acts.")

    @model_validator(mode="after")
    def _check_grpo(self) -> GRPOConfig:
        if self.int8_rollouts:
            raise ValueError("int8_rollouts is a REINFORCE option (truncated importance weights on the sequence "
                             "loss); GRPO samples with the policy itself: set int8_rollouts=false")
        return self


def grpo_stage_key(config: GRPOConfig) -> str:
    return online_stage_key(config, "grpo-schema=1")


def plan_grpo(config: GRPOConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/grpo/<key[:12]>``; ``final/`` marks completion."""
    return plan_online(config, grpo_stage_key(config), runs_dir)


class GRPORecipe(ReinforceRecipe):
    """REINFORCE's loop with the group baseline and the clipped token-level loss (see the module docstring)."""

    stage = "grpo"
    error = GRPOError
    policy_loss = "clipped_token"

    def loss_options(self) -> dict[str, Any]:
        return {"clip_low": self.config.clip_ratio}


def train_grpo(config: GRPOConfig, out_dir: str | Path | None = None, *, runs_root: str | Path = "runs",
               stop_after: int | None = None,
               progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> StageResult:
    """Run (or resume) GRPO; the same outputs and resume as
    :func:`alignment.algorithms.reinforce.train_reinforce`."""
    return run_online(GRPORecipe, config, plan_grpo(config, runs_root), out_dir, stop_after, progress)
