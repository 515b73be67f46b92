"""REINFORCE with a baseline (Ahmadian et al. 2024, "Back to Basics", sec. 2.2).

    grad J = E_{x, y ~ pi}[(R(x, y) - b) * grad log pi(y | x)]

The whole completion is one action: log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the completion
tokens only (prompt and padding masked, the EOS included). Prompts go through the chat template.

Departures from the paper, stated once:
* ``moving_average`` (the paper's baseline, the mean of all rewards seen so far) has no history at
  the first step; there the batch's own mean is used.
* The KL penalty to the frozen starting policy is folded into the reward with the k1 estimator
  sum_t (log pi - log pi_ref) (Ziegler et al. 2019); the paper trains without it. beta=0 turns it off.
* Optional shaping common in practice: a penalty for completions without EOS, reward clipping,
  advantage whitening, and (distributional RM) R = E[r] - lambda Var[r] with an optional
  variance-weighted advantage A / sqrt(Var[r] + eps).
* ``int8_rollouts`` (off by default): completions are sampled by an int8 copy of the policy mu
  (re-quantised before every rollout) while log-probs, KL and the gradient come from the fp32 policy
  pi; the gradient then weights each token by the truncated importance ratio min(pi / mu, C)
  (token-level TIS, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
  training"; FlashRL): E_mu[min(pi/mu, C) A grad log pi].
* A collapse guard stops the run when the completions degenerate (distinct-2 falls or the
  repetition rate rises past limits for ``guard_patience`` steps): the known failure on this task is
  a policy emitting one symbol until the length limit while the reward model's score climbs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from alignment.algorithms.advantages import get_adv_est, rloo_advantages
from alignment.algorithms.guard import CollapseDetected
from alignment.algorithms.losses import get_policy_loss
from alignment.algorithms.online import (
    OnlineConfig,
    OnlineRecipe,
    StepTimer,
    online_stage_key,
    plan_online,
    run_online,
    shape_rewards,
)
from alignment.evaluation.alarm import OverOptimisationDetected
from alignment.generation import Int8Rollouts, Rollout, batched_logprobs, text_health, token_logprobs
from alignment.stage import StagePlan, StageResult

log = logging.getLogger(__name__)

__all__ = ["CollapseDetected", "OverOptimisationDetected", "ReinforceConfig", "ReinforceError", "ReinforceRecipe",
           "rloo_advantages", "train_reinforce"]


class ReinforceError(ValueError):
    """The REINFORCE stage cannot run as configured (the message says why)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
GROUP_BASELINES = ("rloo", "grpo", "dr_grpo")  # estimators over each prompt's k samples (the registry's)


class ReinforceConfig(OnlineConfig):
    """REINFORCE fine-tuning of the policy against a trained reward model."""

    section: str = "reinforce"
    baseline: Literal["moving_average", "ema", "rloo", "grpo", "dr_grpo", "none"] = Field(
        "moving_average", description="moving_average, ema, none, or a group estimator over the k samples of each "
        "prompt (samples_per_prompt >= 2): rloo (leave-one-out mean), grpo ((r - mean) / (std + eps), sample "
        "std), dr_grpo (r - mean); the group ones come from alignment.algorithms.advantages.")
    loss_agg: Literal["sequence", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "sequence", description="How the per-token loss -A log pi_t is aggregated: sequence (REINFORCE: "
        "-mean_i A_i sum_t log pi_it), token_mean (DAPO / GRPO: the mean over every completion token of the "
        "batch), seq_mean_token_mean (the original GRPO: mean over sequences of each one's token mean), "
        "seq_mean_token_sum_norm (Dr. GRPO: sum / (sequences x max_new_tokens)).")
    ema_decay: float = Field(0.9, gt=0.0, lt=1.0)
    variance_weighted_advantage: bool = Field(False, description="Distributional RM: A / sqrt(Var[r] + eps).")
    whiten_advantages: bool = False
    int8_rollouts: bool = Field(False, description="Sample with an int8 copy of the policy (CPU only, re-quantised "
                                "before every rollout, ~1.7x faster decoding); the gradient is corrected by "
                                "truncated importance sampling. Off until measured to leave learning unchanged.")
    tis_cap: float = Field(2.0, ge=1.0, description="int8_rollouts: the cap C of each token's weight min(pi/mu, C).")

    @model_validator(mode="after")
    def _check(self) -> ReinforceConfig:
        if self.baseline in GROUP_BASELINES and self.samples_per_prompt < 2:
            raise ValueError(f"baseline='{self.baseline}' needs samples_per_prompt >= 2 (a baseline over each "
                             "prompt's k samples)")
        if self.int8_rollouts and self.device == "cuda":
            raise ValueError("int8_rollouts runs on the CPU only (torch's fbgemm int8 kernels): set device='cpu' "
                             "or int8_rollouts=false")
        return self


# --------------------------------------------------------------------------------------------
# Shaping, advantages and the loss: small pure functions (shapes in the docstrings)
# --------------------------------------------------------------------------------------------
def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """L = -mean_i(A_i * log pi(y_i | x_i)); A is a constant (no gradient). Both (B,)."""
    return -(advantages.detach() * logprobs).mean()


def tis_weights(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(pi(y_t) / mu(y_t), C) on completion tokens, 0 elsewhere; no gradient (token-level TIS,
    Yao et al. 2025). logp: (B, T) log pi under the trained policy; sampler_logp: (B, T) log mu under the
    model that sampled; mask: (B, T) -> (B, T)."""
    return torch.exp(logp.detach() - sampler_logp).clamp(max=cap) * mask


def action_logprobs(token_logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t log pi(y_t | x, y_<t) over the completion tokens, (B,): with w = mask (no weights) the
    sequence log-prob, whose gradient the REINFORCE loss scales by the advantage. token_logp, mask,
    weights: (B, T)."""
    return (token_logp * (mask if weights is None else weights)).sum(-1)


@dataclass
class MovingAverageBaseline:
    """b = mean of every reward seen in earlier steps (the paper's moving average)."""

    total: float = 0.0
    count: int = 0

    def value(self, rewards: torch.Tensor) -> float:
        return self.total / self.count if self.count else float(rewards.mean())

    def update(self, rewards: torch.Tensor) -> None:
        self.total += float(rewards.sum())
        self.count += rewards.numel()


@dataclass
class EMABaseline:
    """b_t = d * b_{t-1} + (1 - d) * mean(r_{t-1}); the first step uses the batch mean."""

    decay: float = 0.9
    mean: float | None = None

    def value(self, rewards: torch.Tensor) -> float:
        return float(rewards.mean()) if self.mean is None else self.mean

    def update(self, rewards: torch.Tensor) -> None:
        batch = float(rewards.mean())
        self.mean = batch if self.mean is None else self.decay * self.mean + (1 - self.decay) * batch


def compute_advantages(rewards: torch.Tensor, config: ReinforceConfig, baseline_state: Any,
                       reward_var: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(advantages (N,), baseline value) for rewards (N,); updates a running baseline afterwards.

    A = R - b (b: moving average, EMA, or 0), or a group estimator of ``alignment.algorithms.advantages``
    over each prompt's k samples (rloo, grpo, dr_grpo; ``b`` is then the batch mean, for the metrics), then optionally A / sqrt(Var[r] + eps)
    (distributional RM) and whitening (A - mean) / std over the batch.
    """
    if config.baseline in GROUP_BASELINES:  # the registry's estimator, one value per completion
        ones = torch.ones(rewards.shape[0], 1, dtype=rewards.dtype)
        adv = get_adv_est(config.baseline)(rewards, config.samples_per_prompt, ones)[:, 0]
        b = float(rewards.mean())
    elif config.baseline == "none":
        adv, b = rewards.clone(), 0.0
    else:
        b = baseline_state.value(rewards)
        adv = rewards - b
        baseline_state.update(rewards)
    if config.variance_weighted_advantage and reward_var is not None:
        adv = adv / torch.sqrt(reward_var + 1e-4)
    if config.whiten_advantages and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv, b


# --------------------------------------------------------------------------------------------
# Stage key and folder
# --------------------------------------------------------------------------------------------
def reinforce_stage_key(config: ReinforceConfig) -> str:
    return online_stage_key(config, "reinforce-schema=3")


def plan_reinforce(config: ReinforceConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/reinforce/<key[:12]>``; ``final/`` marks completion."""
    return plan_online(config, reinforce_stage_key(config), runs_dir)


# --------------------------------------------------------------------------------------------
# The recipe: setup() builds everything (and resumes), train() is only the loop
# --------------------------------------------------------------------------------------------
class ReinforceRecipe(OnlineRecipe):
    """REINFORCE against a trained reward model: the shared house (``OnlineRecipe``) and this loop."""

    stage = "reinforce"
    error = ReinforceError

    def check_inputs(self, rm_kind: str) -> None:
        super().check_inputs(rm_kind)
        if self.config.variance_weighted_advantage and rm_kind != "distributional":
            raise ReinforceError(f"variance_weighted_advantage=true needs a distributional reward model (it divides "
                                 f"by Var[r]); the (first) reward model is {rm_kind}")

    def setup_algorithm(self) -> None:
        cfg = self.config
        self.baseline: Any = EMABaseline(cfg.ema_decay) if cfg.baseline == "ema" else MovingAverageBaseline()
        self.int8 = None
        if cfg.int8_rollouts:
            if self.device.type != "cpu":
                raise ReinforceError(f"int8_rollouts runs on the CPU only; this run is on {self.device}")
            self.int8 = Int8Rollouts(self.policy)

    def wants_bf16_rollouts(self) -> bool:
        return self.int8 is None and super().wants_bf16_rollouts()

    def sampling_model(self) -> tuple[Any, bool, bool]:
        """The int8 copy re-quantised from this step's weights (no autocast: fp32 activations; its log-probs
        recorded for the importance weights), or the base recipe's sampler."""
        if self.int8 is None:
            return super().sampling_model()
        self.int8.refresh()
        return self.int8.model, False, True

    def algorithm_state(self) -> dict[str, Any]:
        return {"baseline": asdict(self.baseline)}

    def restore_algorithm(self, state: dict[str, Any]) -> None:
        for k, v in state["baseline"].items():
            setattr(self.baseline, k, v)

    # ---------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> StageResult:
        """The loop: rollout -> rewards -> shaping -> advantages -> update -> metrics and guard -> checkpoint."""
        cfg, dist = self.config, self.dist
        self.heldout_before()
        self.policy.train()
        for step in range(self.start_step, cfg.steps):
            timer = StepTimer()
            # 1. Rollout: this process's share of the batch, k samples per prompt, prompt-major.
            ro = self.next_rollout()
            timer.mark("generate")

            # 2. Rewards: the reward model's E[r] and Var[r] (the reward_model shorthand), or the reward
            #    components' combined total (mean) and variance, (B,) each, and every component's scores.
            scores, per_component = self.score_rollout(ro)
            timer.mark("reward")

            # 3. log pi_ref(y | x) and log pi(y | x), (B,) each: the KL and the advantages need both before
            #    the backward. ``graph`` keeps the gradient's graph when one micro-batch covers the batch.
            ref_logp = self.reference_logprobs(ro)
            timer.mark("reference")
            self.optimizer.zero_grad(set_to_none=True)
            graph, logp, entropy = self.policy_logprobs(ro)

            # 4. Shaping: R = E[r] - lambda Var[r] - beta KL - eos penalty, clipped. (B,)
            kl = logp - ref_logp if ref_logp is not None else torch.zeros(len(ro.prompts))
            #    With components the total already holds each reward model's -lambda Var[r]: lambda 0 here.
            reward = shape_rewards(scores.mean, scores.var, kl, ro.has_eos, var_lambda=self.reward_var_lambda,
                                   kl_beta=cfg.kl_beta, missing_eos_penalty=cfg.missing_eos_penalty,
                                   clip=cfg.reward_clip)

            # 5. Advantages over the whole batch, gathered in rank order (still prompt-major, RLOO groups
            #    intact), so every process computes the same baseline state. (N,) -> this process's (B,).
            all_reward, all_var = dist.gather(reward), dist.gather(scores.var)
            all_adv, b = compute_advantages(all_reward, cfg, self.baseline, all_var)

            # 6. Update: -mean(A * log pi) over the global batch; clip the gradient norm; step.
            loss = self.update(ro, graph, dist.local(all_adv))
            timer.mark("forward_backward")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm))
            self.optimizer.step()
            timer.mark("optimizer")

            # 7. Metrics and the collapse guard, over the whole batch so every process stops together.
            health = text_health(dist.gather_objects(ro.tokens))
            healthy = self.guard.update(health)
            self.metrics(step + 1, ro, scores, kl, entropy, all_reward, all_adv, b, loss, grad_norm, health, healthy,
                         timer, self.component_metrics(per_component))
            self.guard.check(health, step + 1, self.last_healthy, ro.texts[0])

            # 8. Held-out evaluation every N steps (and the over-optimisation alarm); checkpoint every N steps.
            if self.end_step(step + 1, healthy, stop_after):
                return StageResult(self.out, {"stopped_at": step + 1})
        return self.finish()

    def policy_logprobs(self, ro: Rollout) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(graph or None, (B,) log pi(y | x), (B,) mean entropy) under the current policy; the graph is
        the (B, T) per-token log-probs.

        One micro-batch: the gradient's own forward gives the log-probs (pi does not change until the
        optimizer step), so no extra pass; its graph is kept for the backward. Several: a no-grad pass
        first, so that each micro-batch's graph is freed by its own backward -- activation memory of
        one micro-batch, for one extra forward (gradient accumulation that actually saves memory).
        """
        if len(ro.prompts) <= self.config.micro_batch_size:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                graph, entropy = token_logprobs(self.model, ro.input_ids.to(self.device),
                                                ro.attention_mask.to(self.device), ro.prompt_width,
                                                group=self.prompt_group)  # (B, T) each
            mask = ro.mask.to(self.device)
            entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1)
            return graph, action_logprobs(graph.detach(), mask).float().cpu(), entropy.float().cpu()
        logp, entropy = batched_logprobs(self.policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask,
                                         self.config.micro_batch_size, bf16=self.bf16, group=self.prompt_group)
        return None, logp, entropy

    def update(self, ro: Rollout, graph: torch.Tensor | None, advantages: torch.Tensor) -> float:
        """Backward of the REINFORCE loss, micro-batch by micro-batch; returns the loss averaged over processes.

        Each micro-batch adds its share of the batch mean. DDP averages over processes, which is the mean
        over the global batch (equal shards); only the last micro-batch's backward runs the all-reduce.
        """
        n = len(ro.prompts)
        self.is_stats = []
        if self.token_level:
            return self.token_update(ro, graph, advantages)

        def micro_loss(token_logp: torch.Tensor, rows: slice) -> torch.Tensor:
            lp = self.weighted_logprobs(token_logp, ro, rows)
            return reinforce_loss(lp, advantages[rows].to(lp.device)) * (lp.shape[0] / n)  # its share of the mean

        return self.backward_micro_batches(ro, graph, micro_loss)

    def backward_micro_batches(self, ro: Rollout, graph: torch.Tensor | None,
                               micro_loss: Callable[[torch.Tensor, slice], torch.Tensor]) -> float:
        """Backward of ``micro_loss(token_logp (b, T), rows)`` over the rollout: on ``graph`` (the whole batch's
        per-token log-probs, kept from the one forward) or micro-batch by micro-batch, each forward freed by
        its own backward (only the last one all-reduces under DDP). Returns the loss averaged over processes."""
        dist, device, n = self.dist, self.device, len(ro.prompts)
        if graph is not None:
            loss = micro_loss(graph, slice(None))
            dist.backward(loss)
            return dist.mean(float(loss.detach()))
        ids, attn, size = ro.input_ids, ro.attention_mask, self.config.micro_batch_size
        micro = [slice(s, s + size) for s in range(0, n, size)]
        total = 0.0
        for i, sl in enumerate(micro):
            with dist.no_sync(self.model) if i < len(micro) - 1 else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    token_logp, _ = token_logprobs(self.model, ids[sl].to(device), attn[sl].to(device),
                                                   ro.prompt_width, group=self.prompt_group, entropy=False)
                loss = micro_loss(token_logp, sl)
                dist.backward(loss)
            total += float(loss.detach())
        return dist.mean(total)

    # The policy loss of ``alignment.algorithms.losses`` (REINFORCE's own path above is the default).
    policy_loss = "sequence"

    @property
    def token_level(self) -> bool:
        """The loss goes through the losses registry: another aggregation than REINFORCE's sequence loss, or
        another loss (GRPO's clipped surrogate)."""
        return self.config.loss_agg != "sequence" or self.policy_loss != "sequence"

    def loss_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the policy loss (e.g. the clip range of ``clipped_token``)."""
        return {}

    def token_update(self, ro: Rollout, graph: torch.Tensor | None, advantages: torch.Tensor) -> float:
        """Backward of the registry's policy loss (``policy_loss``, aggregated by ``loss_agg``), micro-batch by
        micro-batch; returns the loss averaged over processes.

        Each micro-batch's loss is its share of the whole batch's (the loss functions' ``batch_tokens`` /
        ``batch_sequences``): token modes divide by the batch's completion tokens over every process (each
        process by its share of them, as DDP averages the processes' gradients), sequence modes by this
        process's sequences. ``old_logp`` is the policy's own log-probs, detached: one optimizer step per
        batch, so the importance ratio is 1 (with int8 rollouts the truncated importance weights of the
        sequence loss correct for the sampler instead)."""
        dist, n, cfg = self.dist, len(ro.prompts), self.config
        tokens = float(dist.gather(ro.mask.sum().reshape(1).float()).sum()) / dist.world
        agg = "seq_mean_token_sum" if cfg.loss_agg == "sequence" else cfg.loss_agg
        loss_fn = get_policy_loss(self.policy_loss)

        def micro_loss(token_logp: torch.Tensor, rows: slice) -> torch.Tensor:
            token_logp = token_logp.float()
            mask = ro.mask[rows].to(token_logp.device)
            options: dict[str, Any] = dict(agg=agg, max_length=cfg.max_new_tokens, batch_tokens=tokens,
                                           batch_sequences=n, **self.loss_options())
            if self.policy_loss == "sequence" and ro.sampler_logp is not None:
                sampler_logp = ro.sampler_logp[rows].to(token_logp.device)
                options["weights"] = tis_weights(token_logp, sampler_logp, mask, cfg.tis_cap)
                log_ratio = (token_logp.detach() - sampler_logp) * mask
                self.is_stats.append(torch.stack([options["weights"].sum(),
                                                  (log_ratio.exp() * mask > cfg.tis_cap).sum(),
                                                  log_ratio.sum(), mask.sum()]).cpu())
            return loss_fn(token_logp, token_logp.detach(), advantages[rows].to(token_logp.device), mask,
                           **options).loss

        return self.backward_micro_batches(ro, graph, micro_loss)

    def weighted_logprobs(self, token_logp: torch.Tensor, ro: Rollout, rows: slice) -> torch.Tensor:
        """(b,) sum_t w_t log pi(y_t) for the rows ``rows`` of the rollout: w = the mask, or with int8
        rollouts the truncated importance weights (their statistics kept for the metrics)."""
        mask = ro.mask[rows].to(token_logp.device)
        if ro.sampler_logp is None:
            return action_logprobs(token_logp, mask)
        sampler_logp = ro.sampler_logp[rows].to(token_logp.device)
        weights = tis_weights(token_logp.float(), sampler_logp, mask, self.config.tis_cap)
        log_ratio = (token_logp.detach().float() - sampler_logp) * mask
        self.is_stats.append(torch.stack([weights.sum(), (log_ratio.exp() * mask > self.config.tis_cap).sum(),
                                          log_ratio.sum(), mask.sum()]).cpu())
        return action_logprobs(token_logp, mask, weights)

    def metrics(self, step: int, ro: Rollout, scores, kl, entropy, all_reward, all_adv, baseline: float, loss: float,
                grad_norm: float, health: dict[str, float], healthy: bool, timer: StepTimer,
                components: dict[str, float | None] | None = None) -> dict[str, Any]:
        """One metrics line over the whole batch (written by the first process), and the progress callback."""
        dist = self.dist
        rm_reward = dist.gather(scores.mean - self.reward_var_lambda * scores.var)
        kl, entropy = dist.gather(kl), dist.gather(entropy)
        lengths, has_eos = dist.gather(ro.lengths), dist.gather(ro.has_eos)
        sec = timer.seconds
        record = {
            "step": step, "loss": loss, "reward": float(all_reward.mean()), "reward_std": float(all_reward.std()),
            "rm_reward": float(rm_reward.mean()), "rm_var": float(dist.gather(scores.var).mean()),
            "baseline": baseline, "advantage": float(all_adv.mean()), "advantage_abs": float(all_adv.abs().mean()),
            "kl": float(kl.mean()), "entropy": float(entropy.mean()), "length": float(lengths.mean()),
            "eos_rate": float(has_eos.float().mean()), **health, "grad_norm": grad_norm,
            # policy = reference (the KL pass) + forward_backward + optimizer (with clipping)
            "seconds": {"generate": sec["generate"], "reward": sec["reward"],
                        "policy": sec["reference"] + sec["forward_backward"] + sec["optimizer"],
                        "reference": sec["reference"], "forward_backward": sec["forward_backward"],
                        "optimizer": sec["optimizer"]},
            # real prompt and completion tokens, and the padded width the passes compute on (B x (P + T))
            "tokens": {"prompt": int(dist.gather(ro.prompt_mask.sum(-1)).sum()), "completion": int(lengths.sum()),
                       "padded": int(ro.input_ids.numel()) * dist.world},
            "sample": ro.texts[0][:200], "healthy": healthy, **(components or {}),
        }
        if self.is_stats:  # int8 rollouts: mean token weight, share of tokens capped, mean log(pi / mu)
            w, capped, log_ratio, tokens = dist.gather(torch.stack(self.is_stats).sum(0)[None]).sum(0).tolist()
            record["int8"] = {"is_weight": w / max(tokens, 1), "capped": capped / max(tokens, 1),
                              "log_ratio": log_ratio / max(tokens, 1)}
        self.write_record(record, f"loss {loss:.4f} reward {record['reward']:.3f} kl {record['kl']:.3f} len "
                                  f"{record['length']:.1f} eos {record['eos_rate']:.2f} distinct2 {health['distinct2']:.2f} "
                                  f"rep {health['repetition']:.2f}")
        return record


def train_reinforce(config: ReinforceConfig, out_dir: str | Path | None = None, *, runs_root: str | Path = "runs",
                    stop_after: int | None = None,
                    progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> StageResult:
    """Run (or resume) REINFORCE; writes the final policy folder, metrics.jsonl, curves and summary.

    ``out_dir`` defaults to the stage's folder under ``runs_root``. Re-running the same call continues
    from the last complete checkpoint; a folder with a finished run of the same config is reused.
    ``stop_after`` ends the call after that many steps of this call (a controlled interruption, for
    tests). ``progress`` is called after every step with (step, steps, metrics record), on the first
    process only.
    """
    return run_online(ReinforceRecipe, config, plan_reinforce(config, runs_root), out_dir, stop_after, progress)
