"""PPO in the InstructGPT / trlx form, and REINFORCE++ -- the per-token pieces, as small pure functions.

Shapes: B completions, T completion tokens (right-padded after the first EOS); ``mask`` (B, T) is 1 on
the completion tokens through the first EOS. All functions work on the completion positions only.

* Per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022): r_t = -beta * KL_t at every completion
  token, KL_t = log pi(y_t) - log pi_ref(y_t) (k1), and the reward model's score added at the last one.
* GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lambda)^l delta_{t+l},
  returns R_t = A_t + V_t; V after the last token is 0.
* The clipped surrogate and the clipped value loss (Schulman et al. 2017; trlx's ``loss``), approx-KL
  and the clip fraction that PPO logs.
* The adaptive KL controller (Ziegler et al. 2019, sec. 2.2).
* REINFORCE++ (Hu 2025, OpenRLHF): no critic; A_t = sum_{s >= t} r_s with the same per-token rewards,
  normalised over every token of the batch; optionally the score normalised within each prompt's group
  of k samples first (GRPO-style).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignment.algorithms.advantages import gae_returns, get_adv_est, per_token_rewards
from alignment.algorithms.online import (
    OnlineConfig,
    OnlineRecipe,
    StepTimer,
    online_stage_key,
    plan_online,
    run_online,
    shape_rewards,
)
from alignment.generation import Rollout, position_ids_from_mask, text_health, token_logprobs
from alignment.rewards.model import distribution_moments, tokenizer_fingerprint
from alignment.stage import StagePlan, StageResult


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of x's elements, any shape)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (the unbiased variance, as trlx); 0 where mask is 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the masked tokens (B, T) -> (B, T)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar
    clip_fraction: float  # share of tokens where the clipped term was the smaller one
    approx_kl: float  # mean over tokens of (ratio - 1) - log ratio (Schulman's k3, >= 0)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> PolicyLoss:
    """L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(log pi - log pi_old).

    All inputs (B, T); the mean is over the masked tokens. The advantages carry no gradient.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = float(masked_mean((clipped > unclipped).float(), mask))
        approx_kl = float(masked_mean((ratio - 1.0) - log_ratio, mask))
    return PolicyLoss(loss, clip_fraction, approx_kl)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """L_V = 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2). All (B, T)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (1: the critic explains the returns; <= 0: no better
    than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1.0 - var_e / var_r) if float(var_r) > 0 else float("nan")


@dataclass
class AdaptiveKLController:
    """beta <- beta * (1 + e * n / horizon), e = clip(KL / target - 1, -0.2, 0.2) (Ziegler et al. 2019).

    ``update(kl, n)``: ``kl`` the batch's mean sequence KL to the reference, ``n`` the samples seen.
    """

    beta: float
    target: float
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon
        return self.beta


# --------------------------------------------------------------------------------------------
# Config, value head and the recipe
# --------------------------------------------------------------------------------------------
class PPOError(ValueError):
    """The PPO stage cannot run as configured (the message says why)."""


class PPOConfig(OnlineConfig):
    """PPO (InstructGPT / trlx form) against a trained reward model: a value head on the policy's last
    hidden state, per-token KL rewards, GAE, clipped policy and value losses, several epochs per batch."""

    section: str = "ppo"
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int = Field(4, ge=1, description="Sequences per PPO minibatch (per process).")
    clip_range: float = Field(0.2, gt=0.0, description="epsilon of the clipped surrogate.")
    value_clip: float = Field(0.2, gt=0.0, description="Clip of the value update around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0.0, description="Entropy bonus (0: off).")
    gamma: float = Field(1.0, gt=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = True
    adaptive_kl: bool = Field(False, description="Adapt kl_beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0.0, description="Target sequence KL (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1)
    critic: Literal["value_head", "reward_model"] = Field(
        "value_head", description="The critic: a scalar head on the policy's last hidden state (starts at 0), or a "
        "separate model initialised from the reward model, its score head read at every token (trlx's option).")
    estimator: Literal["gae", "reinforce++", "reinforce++-group"] = Field(
        "gae", description="Advantages: 'gae' (PPO with the value head as critic); 'reinforce++' (no critic: "
        "returns of the per-token rewards, whitened over the batch's tokens); 'reinforce++-group' (the score "
        "first normalised within each prompt's samples_per_prompt samples, GRPO-style).")

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.estimator == "reinforce++-group" and self.samples_per_prompt < 2:
            raise ValueError("estimator='reinforce++-group' needs samples_per_prompt >= 2 (a group per prompt)")
        return self


class RewardModelCritic(torch.nn.Module):
    """A critic initialised from the reward model: its backbone and score head read at every completion
    position; a distributional head gives E[r] over ratings 1..10 there. Trained beside the policy."""

    def __init__(self, folder: str | Path, device: torch.device):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device)
        self.kind = self.model.config.alignment_reward_kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        logits = self.model.score(hidden[:, prompt_width - 1:-1]).float()  # (B, T, labels)
        return logits.squeeze(-1) if self.kind == "scalar" else distribution_moments(logits)[0]


class PolicyWithValueHead(torch.nn.Module):
    """The policy and its critic; ``forward`` gives (B, T) per-token log-probs, entropies and values at the
    completion positions. Without a separate critic the value head is a scalar head on the policy's
    last hidden state, starting at zero (V = 0)."""

    def __init__(self, policy: torch.nn.Module, hidden_size: int, critic: torch.nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            self.value_head = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden: list[torch.Tensor] | None = [] if self.critic is None else None
        logp, entropy = token_logprobs(self.policy, input_ids, attention_mask, prompt_width, hidden=hidden)
        if self.critic is None:
            values = self.value_head(hidden[0].float()).squeeze(-1)
        else:
            values = self.critic(input_ids, attention_mask, prompt_width)
        return logp, entropy, values


class PPORecipe(OnlineRecipe):
    """PPO: the shared house (``OnlineRecipe``) and this loop."""

    stage = "ppo"
    error = PPOError

    def check_inputs(self, rm_kind: str) -> None:
        super().check_inputs(rm_kind)
        if self.config.critic == "reward_model" and self.config.reward_model is None:
            raise PPOError("critic='reward_model' initialises the critic from one reward model: give "
                           "reward_model=FOLDER (not rewards), or critic='value_head'")

    def build_trainable(self) -> torch.nn.Module:
        critic = None
        if self.config.critic == "reward_model":
            rm_sha = json.loads((Path(self.config.reward_model) / "config.json").read_text()).get("alignment_tokenizer_sha")
            if rm_sha and rm_sha != tokenizer_fingerprint(self.tokenizer):
                raise PPOError("critic='reward_model' needs the reward model to share the policy's tokenizer "
                               f"({self.config.reward_model} was trained with another one)")
            critic = RewardModelCritic(self.config.reward_model, self.device)
        return PolicyWithValueHead(self.policy, self.policy.config.hidden_size, critic).to(self.device)

    def setup_algorithm(self) -> None:
        cfg = self.config
        self.kl_ctl = AdaptiveKLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon)

    def algorithm_state(self) -> dict[str, Any]:
        return {"kl_beta": self.kl_ctl.beta}

    def restore_algorithm(self, state: dict[str, Any]) -> None:
        self.kl_ctl.beta = state["kl_beta"]

    @torch.no_grad()
    def score_tokens(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi_old, values, log pi_ref), each (B, T): the rollout's per-token terms, no gradient."""
        ids, attn, width = ro.input_ids.to(self.device), ro.attention_mask.to(self.device), ro.prompt_width
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            old_logp, _, values = self.trainable(ids, attn, width)
            with self.reference_model() as reference:  # None: kl_beta = 0 and no reference, KL counted as 0
                ref_logp = old_logp if reference is None else token_logprobs(reference, ids, attn, width, entropy=False)[0]
        return old_logp.float().cpu(), values.float().cpu(), ref_logp.float().cpu()

    def train(self, stop_after: int | None = None) -> StageResult:
        """The loop: rollout -> rewards -> per-token shaping -> GAE -> PPO epochs -> metrics and guard -> checkpoint."""
        cfg, dist = self.config, self.dist
        self.heldout_before()
        self.policy.train()
        for step in range(self.start_step, cfg.steps):
            timer = StepTimer()
            # 1. Rollout: this process's share of the batch, k samples per prompt, prompt-major.
            ro = self.next_rollout()
            mask = ro.mask  # (B, T)
            timer.mark("generate")

            # 2. The reward model's score, shaped (E[r] - lambda Var[r] - eos penalty, clipped). (B,)
            #    (With reward components: their combined total, each reward model's -lambda Var[r] in it.)
            scores, per_component = self.score_rollout(ro)
            score = shape_rewards(scores.mean, scores.var, torch.zeros(len(ro.prompts)), ro.has_eos,
                                  var_lambda=self.reward_var_lambda, kl_beta=0.0,
                                  missing_eos_penalty=cfg.missing_eos_penalty, clip=cfg.reward_clip)
            timer.mark("reward")

            # 3. Per-token log pi_old, V and log pi_ref (B, T); r_t = -beta KL_t, + score at the last token.
            old_logp, old_values, ref_logp = self.score_tokens(ro)
            kl_t = (old_logp - ref_logp) * mask
            rewards = per_token_rewards(score, kl_t, mask, self.kl_ctl.beta)
            timer.mark("reference")

            # 4. Advantages (B, T), from the registry (alignment.algorithms.advantages): GAE with the critic
            #    (the returns R = A + V are its targets), whitened over the batch's tokens; or REINFORCE++'s
            #    whitened returns of the same per-token rewards (no critic).
            k, beta = cfg.samples_per_prompt, self.kl_ctl.beta
            if cfg.estimator == "gae":
                advantages = get_adv_est("gae")(score, k, mask, values=old_values, kl=kl_t, beta=beta, gamma=cfg.gamma,
                                                lam=cfg.lam)
                returns = gae_returns(advantages, old_values, mask)
                if cfg.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)
            else:
                advantages = get_adv_est("reinforce_pp")(score, k, mask, kl=kl_t, beta=beta,
                                                         group_norm=cfg.estimator == "reinforce++-group")
                returns = discounted_returns(rewards, mask)

            # 5. PPO epochs over shuffled minibatches: clipped surrogate + vf_coef * clipped value loss.
            stats = self.update(ro, old_logp, old_values, advantages, returns)
            timer.mark("forward_backward")
            timer.mark("optimizer")  # inside the epochs; kept for the same metric keys as REINFORCE

            # 6. The adaptive KL coefficient follows the batch's mean sequence KL.
            seq_kl = dist.gather(kl_t.sum(-1))
            if cfg.adaptive_kl:
                self.kl_ctl.update(float(seq_kl.mean()), len(seq_kl))

            # 7. Metrics and the collapse guard, over the whole batch.
            health = text_health(dist.gather_objects(ro.tokens))
            healthy = self.guard.update(health)
            lengths, has_eos = dist.gather(ro.lengths), dist.gather(ro.has_eos)
            record = {
                "step": step + 1, "reward": float(dist.gather(score).mean()),
                "rm_reward": float(dist.gather(scores.mean - self.reward_var_lambda * scores.var).mean()),
                "kl": float(seq_kl.mean()), "kl_beta": self.kl_ctl.beta, **stats,
                "value_explained_variance": (explained_variance(old_values, returns, mask) if cfg.estimator == "gae"
                                             else float("nan")),
                "length": float(lengths.mean()), "eos_rate": float(has_eos.float().mean()), **health,
                "seconds": dict(timer.seconds), "sample": ro.texts[0][:200], "healthy": healthy,
                **self.component_metrics(per_component),
            }
            self.write_record(record, f"loss {stats['loss']:.4f} reward {record['reward']:.3f} kl {record['kl']:.3f} "
                                      f"clipfrac {stats['clip_fraction']:.2f} approx_kl {stats['approx_kl']:.4f} "
                                      f"ev {record['value_explained_variance']:.2f} len {record['length']:.1f}")
            self.guard.check(health, step + 1, self.last_healthy, ro.texts[0])

            # 8. Held-out evaluation every N steps (and the over-optimisation alarm); checkpoint every N steps.
            if self.end_step(step + 1, healthy, stop_after):
                return StageResult(self.out, {"stopped_at": step + 1})
        return self.finish()

    def update(self, ro: Rollout, old_logp: torch.Tensor, old_values: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches, one optimizer step each; the means of their stats."""
        cfg, dist, device = self.config, self.dist, self.device
        ids, attn, mask = ro.input_ids, ro.attention_mask, ro.mask
        logs: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "value_loss", "entropy",
                                                        "clip_fraction", "approx_kl", "grad_norm")}
        n = ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, cfg.minibatch_size):
                mb = order[start:start + cfg.minibatch_size]
                m = mask[mb].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logp, entropy, values = self.model(ids[mb].to(device), attn[mb].to(device), ro.prompt_width)
                pl = ppo_policy_loss(logp, old_logp[mb].to(device), advantages[mb].to(device), m, cfg.clip_range)
                vl = (ppo_value_loss(values, old_values[mb].to(device), returns[mb].to(device), m, cfg.value_clip)
                      if cfg.estimator == "gae" else torch.zeros((), device=device))
                ent = masked_mean(entropy, m)
                loss = pl.loss + cfg.vf_coef * vl - cfg.entropy_coef * ent
                self.optimizer.zero_grad(set_to_none=True)
                dist.backward(loss)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in (("loss", loss), ("policy_loss", pl.loss), ("value_loss", vl), ("entropy", ent),
                             ("clip_fraction", pl.clip_fraction), ("approx_kl", pl.approx_kl),
                             ("grad_norm", grad_norm)):
                    logs[k].append(float(v.detach()) if torch.is_tensor(v) else float(v))
        return {k: dist.mean(sum(v) / len(v)) for k, v in logs.items()}


def ppo_stage_key(config: PPOConfig) -> str:
    return online_stage_key(config, "ppo-schema=1")


def plan_ppo(config: PPOConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/ppo/<key[:12]>``; ``final/`` marks completion."""
    return plan_online(config, ppo_stage_key(config), runs_dir)


def train_ppo(config: PPOConfig, out_dir: str | Path | None = None, *, runs_root: str | Path = "runs",
              stop_after: int | None = None,
              progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> StageResult:
    """Run (or resume) PPO; writes the final policy folder (without the value head), metrics, curves and
    summary, like ``train_reinforce``."""
    return run_online(PPORecipe, config, plan_ppo(config, runs_root), out_dir, stop_after, progress)
