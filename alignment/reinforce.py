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
* A collapse guard stops the run when the completions degenerate (distinct-2 falls or the
  repetition rate rises past limits for ``guard_patience`` steps): the known failure on this task is
  a policy emitting one symbol until the length limit while the reward model's score climbs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from alignment.config import StageConfig
from alignment.data import PairData
from alignment.evaluate import PolicyEval, evaluate_policy
from alignment.generation import (
    Rollout,
    SamplingConfig,
    batched_logprobs,
    completion_logprobs,
    rollout,
    text_health,
)
from alignment.hardware import bf16_enabled, resolve_device
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, load_causal_lm
from alignment.parallel import DataParallel
from alignment.reward import RewardScorer
from alignment.rl import (
    HELDOUT,
    METRICS,
    CollapseDetected,
    CollapseGuard,
    OverOptimisationDetected,
    PromptSampler,
    append_metrics,
    best_score,
    latest_checkpoint,
    load_checkpoint,
    overoptimisation_alarm,
    plot_curves,
    plot_overoptimisation,
    rng_state,
    save_checkpoint,
    truncate_metrics,
)
from alignment.stage import StagePlan, StageResult, claim_output, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)

__all__ = ["CollapseDetected", "OverOptimisationDetected", "ReinforceConfig", "ReinforceError", "ReinforceRecipe", "train_reinforce"]


class ReinforceError(ValueError):
    """The REINFORCE stage cannot run as configured (the message says why)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
class ReinforceConfig(StageConfig):
    """REINFORCE fine-tuning of the policy against a trained reward model."""

    section: str = "reinforce"
    policy: str = Field(DEFAULT_MODEL, description="Starting policy: hub id, local folder or .gguf file.")
    reward_model: str | None = Field(None, description="Folder written by `align rm` (scalar or distributional); "
                                     "filled in by the pipeline.")
    data: str | None = Field(None, description="Folder written by `align data`: prompts from train, held-out from "
                             "validation; filled in by the pipeline.")
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Prompts per step, over all processes: with N data-parallel "
                            "processes each takes batch_size / N of them (must divide evenly).")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per prompt (k; rloo needs >= 2).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward (gradient accumulation). "
                                  "Below the batch size, activations of one micro-batch live at a time, for "
                                  "one extra no-grad forward of the batch.")
    max_prompt_length: int = Field(256, ge=8, description="Prompt tokens; longer prompts are cut from the left.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    learning_rate: float = Field(5e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    baseline: Literal["moving_average", "ema", "rloo", "none"] = "moving_average"
    ema_decay: float = Field(0.9, gt=0.0, lt=1.0)
    reward_var_lambda: float = Field(0.1, ge=0.0, description="Distributional RM: R = E[r] - lambda Var[r].")
    variance_weighted_advantage: bool = Field(False, description="Distributional RM: A / sqrt(Var[r] + eps).")
    kl_beta: float = Field(0.02, ge=0.0, description="KL penalty to the starting policy (k1, in the reward).")
    missing_eos_penalty: float = Field(1.0, ge=0.0, description="Subtracted from R when a completion has no EOS.")
    reward_clip: float | None = Field(10.0, gt=0.0, description="Clip R to [-c, c] (after shaping).")
    whiten_advantages: bool = False
    guard_min_distinct2: float = Field(0.2, ge=0.0, le=1.0, description="Collapse if distinct-2 stays below.")
    guard_max_repetition: float = Field(0.6, ge=0.0, le=1.0, description="Collapse if repetition stays above.")
    guard_patience: int = Field(3, ge=1, description="Consecutive unhealthy steps that stop the run.")
    checkpoint_every: int = Field(10, ge=1)
    eval_prompts: int = Field(32, ge=0, description="Held-out validation prompts scored before, every eval_every "
                              "steps and after (greedy).")
    eval_every: int = Field(10, ge=0, description="Held-out evaluation every N steps (0: before and after only): "
                            "proxy reward, independent reward models, gold accuracy, KL to the start.")
    independent_reward_models: dict[str, str] = Field(
        default_factory=dict, description="name -> folder written by `align rm`: reward models evaluated on the "
        "held-out answers but never trained against (filled in by the pipeline).")
    alarm_window: int = Field(3, ge=2, description="Over-optimisation alarm: held-out evaluations compared.")
    alarm_gold_margin: float = Field(0.05, ge=0.0, description="Alarm when the proxy rose over the window while "
                                     "gold accuracy fell by more than this.")
    alarm_rm_margin_sd: float = Field(0.25, ge=0.0, description="... or an independent RM fell by more than this "
                                      "many of its standard deviations (over prompts, at the first evaluation).")
    alarm_action: Literal["warn", "stop"] = Field("warn", description="What the alarm does: log a warning, or stop "
                                                  "the run (best/ and the checkpoints are kept).")
    seed: int = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    lora: bool = Field(False, description="Train LoRA adapters (peft); the KL reference is the adapter-free model.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ReinforceConfig:
        if self.baseline == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("baseline='rloo' needs samples_per_prompt >= 2 (leave-one-out over k samples)")
        return self

    def sampling(self, greedy: bool = False) -> SamplingConfig:
        """The rollout settings (greedy for the held-out evaluation)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=greedy, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


# --------------------------------------------------------------------------------------------
# Shaping, advantages and the loss: small pure functions (shapes in the docstrings)
# --------------------------------------------------------------------------------------------
def shape_rewards(rm_mean: torch.Tensor, rm_var: torch.Tensor, kl: torch.Tensor, has_eos: torch.Tensor, *,
                  var_lambda: float, kl_beta: float, missing_eos_penalty: float, clip: float | None
                  ) -> torch.Tensor:
    """R = clip(E[r] - lambda Var[r] - beta KL - p * 1[no EOS], -c, c).

    rm_mean, rm_var: (B,) the reward model's E[r] and Var[r] (Var = 0 for a scalar RM); kl: (B,) the
    k1 estimate sum_t (log pi - log pi_ref) of each completion (Ziegler et al. 2019); has_eos: (B,)
    bool. Returns (B,). ``clip=None`` leaves R unclipped.
    """
    reward = rm_mean - var_lambda * rm_var - kl_beta * kl - missing_eos_penalty * (~has_eos).float()
    return reward if clip is None else reward.clamp(-clip, clip)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """L = -mean_i(A_i * log pi(y_i | x_i)); A is a constant (no gradient). Both (B,)."""
    return -(advantages.detach() * logprobs).mean()


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over the k samples of the same prompt (Kool et al. 2019).

    rewards: (B * k,) grouped prompt-major (the k samples of prompt 0 first) -> (B * k,).
    """
    grouped = rewards.view(-1, k)
    loo_mean = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - loo_mean).reshape(-1)


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

    A = R - b (b: moving average, EMA, leave-one-out or 0), then optionally A / sqrt(Var[r] + eps)
    (distributional RM) and whitening (A - mean) / std over the batch.
    """
    if config.baseline == "rloo":
        adv, b = rloo_advantages(rewards, config.samples_per_prompt), float(rewards.mean())
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
    rm = (read_manifest(config.reward_model) if config.reward_model else None) or {}
    data = (read_manifest(config.data) if config.data else None) or {}
    others = {name: (read_manifest(folder) or {}).get("stage_key", folder)
              for name, folder in config.independent_reward_models.items()}
    cfg = config.model_dump(mode="json", exclude={"reward_model", "data", "independent_reward_models"})
    return sha256_text(json.dumps([cfg, rm.get("stage_key"), data.get("stage_key"), others, "reinforce-schema=3"],
                                  sort_keys=True))


def plan_reinforce(config: ReinforceConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/reinforce/<key[:12]>``; ``final/`` marks completion."""
    key = reinforce_stage_key(config)
    out = stage_folder(runs_dir, "reinforce", key)
    return StagePlan(key, out, out / "final")


# --------------------------------------------------------------------------------------------
# The recipe: setup() builds everything (and resumes), train() is only the loop
# --------------------------------------------------------------------------------------------
class StepTimer:
    """Seconds between named marks: ``mark("generate")`` closes the phase that began at the last mark."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


class ReinforceRecipe:
    """REINFORCE against a trained reward model, one process of a (possibly) data-parallel run.

    Under a multi-process launcher (see ``alignment.parallel``) every process samples and scores its
    shard of the batch, gradients are all-reduced, and the baseline, whitening, metrics and collapse
    guard see the whole batch, so all processes hold the same weights and take the same decisions;
    only the first one writes metrics, checkpoints and the final folder.
    """

    def __init__(self, config: ReinforceConfig, out_dir: str | Path, key: str,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None):
        self.config, self.out, self.key, self.progress = config, Path(out_dir), key, progress

    # ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Models, data, optimizer, baseline, guard; then resume from the newest checkpoint if any."""
        cfg = self.config
        self.dist = dist = DataParallel(resolve_device(cfg.device))
        if cfg.batch_size % dist.world:
            raise ReinforceError(f"batch_size={cfg.batch_size} prompts do not split evenly over {dist.world} processes")
        self.device, self.bf16 = dist.device, bf16_enabled(cfg.bf16, dist.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # Each process draws its own completions; process 0 keeps the single-process seed. (LoRA's random
        # init differs per process too, but DDP copies process 0's weights to all when it wraps the model.)
        torch.manual_seed(cfg.seed + dist.rank)

        self.policy, self.tokenizer = self._load_policy()
        # The KL reference: with LoRA the same model with its adapters switched off, else a frozen copy.
        self.reference = None
        if cfg.kl_beta > 0 and not cfg.lora:
            self.reference, _ = load_causal_lm(cfg.policy, device=self.device, padding_side="left")
            self.reference.eval().requires_grad_(False)
        self.scorer = RewardScorer.from_pretrained(cfg.reward_model, device=str(self.device), bf16=self.bf16)
        # Reward models the policy never trains against, for the held-out evaluations (first process only).
        self.independent = {name: RewardScorer.from_pretrained(folder, device=str(self.device), bf16=self.bf16)
                            for name, folder in cfg.independent_reward_models.items()} if dist.is_main else {}

        data_dir = Path(cfg.data)
        self.train_prompts = PairData.load(data_dir / "train.parquet").unique_prompts()
        self.eval_prompts = PairData.load(data_dir / "validation.parquet").prompt_items()[: cfg.eval_prompts]
        if len(self.train_prompts) < cfg.batch_size:
            raise ReinforceError(f"{data_dir}: {len(self.train_prompts)} train prompts, fewer than "
                                 f"batch_size={cfg.batch_size}")
        self.sampler = PromptSampler(len(self.train_prompts), cfg.seed)
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                           lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.baseline: Any = EMABaseline(cfg.ema_decay) if cfg.baseline == "ema" else MovingAverageBaseline()
        self.guard = CollapseGuard(cfg.guard_min_distinct2, cfg.guard_max_repetition, cfg.guard_patience)
        self.last_healthy: str | None = None
        self.eval_before: dict[str, Any] | None = None
        self.heldout: list[dict[str, Any]] = []  # one entry per held-out evaluation: the over-optimisation curves
        self.alarms: list[str] = []
        self.best: dict[str, Any] | None = None  # {"step", "score"} of the policy saved in best/
        self.start_step = 0
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None:
            self._restore(load_checkpoint(ckpt, self.policy, self.optimizer, dist.rank, dist.world))
            log.info("resuming from %s (step %d)", ckpt, self.start_step)
        # ``model`` (DDP-wrapped when data-parallel) runs the gradient forward passes; ``policy`` stays the
        # plain model for generate, the adapter-free reference and saving.
        self.model, self.optimizer = dist.prepare(self.policy, self.optimizer)
        self.metrics_path = self.out / METRICS
        if dist.is_main:
            truncate_metrics(self.metrics_path, self.start_step)
            truncate_metrics(self.out / HELDOUT, self.start_step)

    def _load_policy(self):
        cfg = self.config
        policy, tokenizer = load_causal_lm(cfg.policy, device=self.device, padding_side="left")
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.enable_input_require_grads()  # so checkpointed blocks see a grad-requiring input (LoRA too)
        policy.config.use_cache = True
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                       lora_dropout=cfg.lora_dropout, target_modules="all-linear"))
        return policy, tokenizer

    def _state(self) -> dict[str, Any]:
        """The trainer state a checkpoint carries beside weights, optimizer and RNG."""
        return {"epoch": self.sampler.epoch, "position": self.sampler.position, "unhealthy_streak": self.guard.streak,
                "last_healthy": self.last_healthy, "eval_before": self.eval_before, "baseline": asdict(self.baseline),
                "heldout": self.heldout, "alarms": self.alarms, "best": self.best}

    def _restore(self, state: dict[str, Any]) -> None:
        self.start_step = state["step"]
        self.sampler.epoch, self.sampler.position = state["epoch"], state["position"]
        self.guard.streak, self.last_healthy = state["unhealthy_streak"], state["last_healthy"]
        self.eval_before = state.get("eval_before")
        self.heldout, self.alarms, self.best = state.get("heldout", []), state.get("alarms", []), state.get("best")
        for k, v in state["baseline"].items():
            setattr(self.baseline, k, v)

    # ---------------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> StageResult:
        """The loop: rollout -> rewards -> shaping -> advantages -> update -> metrics and guard -> checkpoint."""
        cfg, dist = self.config, self.dist
        if self.eval_before is None and self.eval_prompts and dist.is_main:  # the others wait at their first collective
            self.eval_before = self.heldout_evaluation(0)
            log.info("held-out mean reward before training: %.4f", self.eval_before["mean_reward"])
        self.policy.train()
        for step in range(self.start_step, cfg.steps):
            timer = StepTimer()
            # 1. Rollout: this process's share of the batch, k samples per prompt, prompt-major.
            idx = dist.shard(self.sampler.next(cfg.batch_size))
            prompts = [self.train_prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]
            ro = rollout(self.policy, self.tokenizer, prompts, cfg.sampling(), cfg.max_prompt_length, bf16=self.bf16)
            timer.mark("generate")

            # 2. Rewards from the reward-model stage's scorer: E[r] and Var[r], (B,) each.
            scores = self.scorer.score(ro.prompts, ro.texts)
            timer.mark("reward")

            # 3. log pi_ref(y | x) and log pi(y | x), (B,) each: the KL and the advantages need both before
            #    the backward. ``graph`` keeps the gradient's graph when one micro-batch covers the batch.
            ref_logp = self.reference_logprobs(ro)
            timer.mark("reference")
            self.optimizer.zero_grad(set_to_none=True)
            graph, logp, entropy = self.policy_logprobs(ro)

            # 4. Shaping: R = E[r] - lambda Var[r] - beta KL - eos penalty, clipped. (B,)
            kl = logp - ref_logp if ref_logp is not None else torch.zeros(len(prompts))
            reward = shape_rewards(scores.mean, scores.var, kl, ro.has_eos, var_lambda=cfg.reward_var_lambda,
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
                         timer)
            self.guard.check(health, step + 1, self.last_healthy, ro.texts[0])

            # 8. Held-out evaluation every N steps: proxy, independent RMs, gold, KL; the over-optimisation alarm.
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and self.eval_prompts:
                self.watch_overoptimisation(step + 1)

            # 9. Checkpoint (atomic) every N steps and at the end.
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                self.checkpoint(step + 1, healthy)
            if stop_after is not None and step + 1 - self.start_step >= stop_after:
                return StageResult(self.out, {"stopped_at": step + 1})
        return self.finish()

    # ---------------------------------------------------------------------------------------
    # The loop's named steps
    # ---------------------------------------------------------------------------------------
    def reference_logprobs(self, ro: Rollout) -> torch.Tensor | None:
        """(B,) log pi_ref(y | x) under the frozen start (LoRA: the adapter-free model); None without KL."""
        if self.config.kl_beta <= 0:
            return None
        args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask, self.config.micro_batch_size)
        if self.reference is not None:
            return batched_logprobs(self.reference, *args, bf16=self.bf16)[0]
        with self.policy.disable_adapter():
            return batched_logprobs(self.policy, *args, bf16=self.bf16)[0]

    def policy_logprobs(self, ro: Rollout) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(graph or None, (B,) log pi(y | x), (B,) mean entropy) under the current policy.

        One micro-batch: the gradient's own forward gives the log-probs (pi does not change until the
        optimizer step), so no extra pass; its graph is kept for the backward. Several: a no-grad pass
        first, so that each micro-batch's graph is freed by its own backward -- activation memory of
        one micro-batch, for one extra forward (gradient accumulation that actually saves memory).
        """
        if len(ro.prompts) <= self.config.micro_batch_size:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                graph, entropy = completion_logprobs(self.model, ro.input_ids.to(self.device),
                                                     ro.attention_mask.to(self.device), ro.prompt_width,
                                                     ro.mask.to(self.device))
            return graph, graph.detach().float().cpu(), entropy.float().cpu()
        logp, entropy = batched_logprobs(self.policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask,
                                         self.config.micro_batch_size, bf16=self.bf16)
        return None, logp, entropy

    def update(self, ro: Rollout, graph: torch.Tensor | None, advantages: torch.Tensor) -> float:
        """Backward of the REINFORCE loss, micro-batch by micro-batch; returns the loss averaged over processes.

        Each micro-batch adds its share of the batch mean. DDP averages over processes, which is the mean
        over the global batch (equal shards); only the last micro-batch's backward runs the all-reduce.
        """
        dist, device, n = self.dist, self.device, len(ro.prompts)
        if graph is not None:
            loss = reinforce_loss(graph, advantages.to(graph.device))
            dist.backward(loss)
            return dist.mean(float(loss.detach()))
        ids, attn, mask = ro.input_ids, ro.attention_mask, ro.mask
        micro = [slice(s, s + self.config.micro_batch_size) for s in range(0, n, self.config.micro_batch_size)]
        total = 0.0
        for i, sl in enumerate(micro):
            with dist.no_sync(self.model) if i < len(micro) - 1 else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    lp, _ = completion_logprobs(self.model, ids[sl].to(device), attn[sl].to(device), ro.prompt_width,
                                                mask[sl].to(device))
                loss = reinforce_loss(lp, advantages[sl].to(lp.device)) * (lp.shape[0] / n)
                dist.backward(loss)
            total += float(loss.detach())
        return dist.mean(total)

    def metrics(self, step: int, ro: Rollout, scores, kl, entropy, all_reward, all_adv, baseline: float, loss: float,
                grad_norm: float, health: dict[str, float], healthy: bool, timer: StepTimer) -> dict[str, Any]:
        """One metrics line over the whole batch (written by the first process), and the progress callback."""
        dist, cfg = self.dist, self.config
        rm_reward = dist.gather(scores.mean - cfg.reward_var_lambda * scores.var)
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
            "tokens": {"prompt": int(dist.gather(ro.prompt_mask.sum(-1)).sum()), "completion": int(lengths.sum())},
            "sample": ro.texts[0][:200], "healthy": healthy,
        }
        if dist.is_main:
            append_metrics(self.metrics_path, record)
            if self.progress is not None:
                self.progress(step, cfg.steps, record)
            log.info("step %d/%d loss %.4f reward %.3f kl %.3f len %.1f eos %.2f distinct2 %.2f rep %.2f",
                     step, cfg.steps, loss, record["reward"], record["kl"], record["length"], record["eos_rate"],
                     health["distinct2"], health["repetition"])
        return record

    def checkpoint(self, step: int, healthy: bool) -> None:
        """Atomic checkpoint with every process's RNG; the last healthy one is protected from deletion."""
        if healthy:
            self.last_healthy = f"step-{step:06d}"
        state = {**self._state(), "protected": [self.last_healthy] if self.last_healthy else []}
        # Every process's RNG state, so a resumed run continues each one's sampling exactly.
        rng = {"ranks": self.dist.gather_objects([rng_state()])} if self.dist.world > 1 else None
        if self.dist.is_main:
            save_checkpoint(self.out, step, self.policy, self.optimizer, state, rng=rng)
        self.dist.barrier()

    def evaluate(self) -> PolicyEval:
        """Greedy answers to the held-out prompts: the proxy scored as in training (E[r] - lambda Var[r]),
        the independent reward models, gold accuracy and the KL to the start."""
        cfg = self.config
        return evaluate_policy(self.policy, self.tokenizer, self.scorer, self.eval_prompts, cfg.sampling(greedy=True),
                               cfg.max_prompt_length, var_lambda=cfg.reward_var_lambda, bf16=self.bf16,
                               independent=self.independent, reference_logprobs=self.reference_logprobs)

    def heldout_evaluation(self, step: int) -> dict[str, Any]:
        """Evaluate (first process), append to the held-out history and ``heldout.jsonl``, keep ``best/``."""
        result = asdict(self.evaluate())
        entry = {"step": step, "proxy": result["mean_reward"], "proxy_std": result["reward_std"],
                 "independent": result["independent"], "independent_std": result["independent_std"],
                 "gold": result["gold_accuracy"], "gold_n": result["gold_n"], "kl": result["kl"],
                 **{k: result[k] for k in ("eos_rate", "mean_length", "distinct2", "repetition")}}
        self.heldout.append(entry)
        append_metrics(self.out / HELDOUT, entry)
        score = best_score(entry)
        if score is not None and (self.best is None or score > self.best["score"]):
            self.save_best(step, score)
        log.info("held-out at step %d: proxy %.3f%s%s kl %s", step, entry["proxy"],
                 "".join(f", {k} {v:.3f}" for k, v in entry["independent"].items()),
                 "" if entry["gold"] is None else f", gold {entry['gold']:.3f} (n={entry['gold_n']})",
                 "-" if entry["kl"] is None else f"{entry['kl']:.3f}")
        cfg = self.config
        message = overoptimisation_alarm(self.heldout, cfg.alarm_window, cfg.alarm_gold_margin, cfg.alarm_rm_margin_sd)
        if message:
            self.alarms.append(f"step {step}: {message}")
            log.warning("%s (best/ holds step %s)", message, self.best["step"] if self.best else "none")
        result["alarm"] = message
        return result

    def watch_overoptimisation(self, step: int) -> None:
        """A held-out evaluation and the alarm; with alarm_action='stop' every process stops together."""
        message = self.heldout_evaluation(step)["alarm"] if self.dist.is_main else None
        if self.dist.world > 1:
            message = self.dist.gather_objects([message])[0]
        if message and self.config.alarm_action == "stop":
            self.checkpoint(step, healthy=True)
            raise OverOptimisationDetected(f"{message}; stopped (alarm_action='stop'). Best held-out policy: "
                                           f"{self.out / 'best' if self.best else 'none saved'}")

    def save_best(self, step: int, score: float) -> None:
        """The policy with the best gold / independent score so far, as a plain transformers folder."""
        policy = copy.deepcopy(self.policy).merge_and_unload() if self.config.lora else self.policy
        with atomic_directory(self.out / "best") as tmp:
            policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "best.json", {"step": step, "score": score, "heldout": self.heldout[-1]})
        self.best = {"step": step, "score": score}

    def finish(self) -> StageResult:
        """Held-out evaluation, then the final folder (first process; the others wait and read its summary)."""
        final = self.out / "final"
        if not self.dist.is_main:
            self.dist.barrier()
            return StageResult(self.out, json.loads((final / "summary.json").read_text()))
        before = self.eval_before
        after = self.heldout_evaluation(self.config.steps) if self.eval_prompts else None
        summary = {"steps": self.config.steps, "processes": self.dist.world, "eval_before": before, "eval_after": after,
                   "reward_gain": (after["mean_reward"] - before["mean_reward"]) if after and before else None,
                   "heldout": self.heldout, "alarms": self.alarms, "best": self.best}
        policy = self.policy.merge_and_unload() if self.config.lora else self.policy  # a plain transformers model
        with atomic_directory(final) as tmp:
            policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            shutil.copy(self.metrics_path, tmp / METRICS)
            write_json(tmp / "summary.json", summary)
            plot_curves(tmp / METRICS, tmp / "curves.png")
            if self.heldout:
                shutil.copy(self.out / HELDOUT, tmp / HELDOUT)
                plot_overoptimisation(self.heldout, tmp / "overoptimisation.png")
            write_json(tmp / MANIFEST, {
                "stage": "reinforce", "stage_key": self.key, "config": self.config.model_dump(mode="json"),
                "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))}})
        self.dist.barrier()
        return StageResult(self.out, summary)


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
    if config.reward_model is None or config.data is None:
        raise ReinforceError("reinforce needs both reward_model (a folder written by `align rm`) and data "
                             "(a folder written by `align data`)")
    plan = plan_reinforce(config, runs_root)
    out = Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, plan.key, ReinforceError, done=out / "final", resumable=True) is not None:
        return StageResult(out, json.loads((out / "final" / "summary.json").read_text()), reused=True)
    recipe = ReinforceRecipe(config, out, plan.key, progress)
    recipe.setup()
    if recipe.dist.is_main:
        claim_output(out, plan.key, config.model_dump(mode="json"))
    return recipe.train(stop_after)
