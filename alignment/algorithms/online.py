"""The online loop every policy-optimisation algorithm shares (REINFORCE, GRPO, PPO and REINFORCE++):
rollout -> rewards -> shaping -> advantages -> update -> metrics and guard -> held-out evaluation and
checkpoint.

* ``OnlineConfig`` (the fields every algorithm's config has) and ``OnlineRecipe``: ``setup()``
  (models, reward models, data, optimizer, resume), the held-out evaluations with the
  over-optimisation alarm (``alignment.evaluation.alarm``) and ``best/``, checkpoints
  (``alignment.checkpoints``), ``finish()`` (the final folder); an algorithm subclasses it with its
  ``train()`` loop. ``run_online`` is every algorithm's entry point (reuse a finished run, refuse
  another config's folder, else train or resume).
* Reward shaping (``shape_rewards``): R = clip(E[r] - lambda Var[r] - beta KL - eos penalty).
* The pieces it is built from, each in its own module: the collapse guard (``alignment.algorithms.guard``),
  the prompt order (``alignment.algorithms.sampler``), the metrics log and curves
  (``alignment.algorithms.metrics``), the checkpoints with exact resume (``alignment.checkpoints``) and
  the over-optimisation alarm (``alignment.evaluation.alarm``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, model_validator

from alignment import tasks_gym, tracking
from alignment.algorithms.guard import CollapseGuard
from alignment.algorithms.metrics import append_metrics, plot_curves, truncate_metrics
from alignment.algorithms.sampler import PromptSampler
from alignment.checkpoints import CKPT_DIR, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from alignment.config import Seed, StageConfig
from alignment.console import StageProgress, is_verbose
from alignment.data import PairData
from alignment.evaluation.alarm import (
    OverOptimisationDetected,
    best_score,
    overoptimisation_alarm,
    plot_overoptimisation,
)
from alignment.evaluation.evaluate import PolicyEval, evaluate_policy
from alignment.finite import NonFiniteError, check_output, check_tensors
from alignment.footprint import records_footprint, release_memory
from alignment.generation import Bf16Rollouts, Rollout, SamplingConfig, batched_logprobs, rollout
from alignment.hardware import bf16_enabled, bf16_rollouts_pay, resolve_device
from alignment.inputs import require_model_source, require_stage_output
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, bf16_frozen_linears, load_causal_lm
from alignment.ownership import local_paths
from alignment.parallel import DataParallel
from alignment.rewards.components import (
    ComponentScores,
    EnsembleComponent,
    RewardComponentConfig,
    RewardComponentError,
    RewardModelComponent,
    check_unique_names,
    combine,
    combined_variance,
    components_from,
    rewards_key,
    score_components,
)
from alignment.rewards.model import RewardScorer, reward_model_kind
from alignment.stage import (
    StagePlan,
    StageResult,
    claim_output,
    exclusive_stage,
    reuse_or_guard,
    stage_folder,
)

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
HELDOUT = "heldout.jsonl"  # one line per held-out evaluation (the over-optimisation curves)


# --------------------------------------------------------------------------------------------
# The config and the recipe every online algorithm shares
# --------------------------------------------------------------------------------------------
class OnlineConfig(StageConfig):
    """What every online algorithm's config holds: the policy, the reward model and data, sampling,
    optimisation, reward shaping, the collapse guard, held-out evaluations and the alarm, checkpoints,
    LoRA and the device. Each algorithm adds its own fields (and its ``section``)."""

    policy: str = Field(DEFAULT_MODEL, description="Starting policy: hub id, local folder or .gguf file.")
    reward_model: str | None = Field(None, description="Folder written by `align rm` (scalar or distributional); "
                                     "filled in by the pipeline. Shorthand for rewards=[{kind: reward_model, "
                                     "folder: FOLDER}] (give one or the other).")
    rewards: list[RewardComponentConfig] | None = Field(
        None, description="Reward components (alignment.rewards.components): kinds reward_model, gold, length, "
        "python, ensemble, each {name, kind, weight, ...}; the reward is sum_c weight_c * value_c. Replaces "
        "reward_model (None: the reward_model shorthand).")
    data: str | None = Field(None, description="Folder written by `align data`: prompts from train, held-out from "
                             "validation; filled in by the pipeline.")
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Prompts per step, over all processes: with N data-parallel "
                            "processes each takes batch_size / N of them (must divide evenly).")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per prompt (k; rloo and group baselines need >= 2).")
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
    reward_var_lambda: float = Field(0.1, ge=0.0, description="Distributional RM: R = E[r] - lambda Var[r].")
    kl_beta: float = Field(0.02, ge=0.0, description="KL penalty to the starting policy (k1, in the reward).")
    missing_eos_penalty: float = Field(1.0, ge=0.0, description="Subtracted from R when a completion has no EOS.")
    reward_clip: float | None = Field(10.0, gt=0.0, description="Clip R to [-c, c] (after shaping).")
    guard_min_distinct2: float = Field(0.2, ge=0.0, le=1.0, description="Collapse if distinct-2 stays below.")
    guard_max_repetition: float = Field(0.6, ge=0.0, le=1.0, description="Collapse if repetition stays above.")
    guard_patience: int = Field(3, ge=1, description="Consecutive unhealthy steps that stop the run.")
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every N steps (and at the end).")
    checkpoint_every_s: float = Field(600.0, ge=0.0, description="Also checkpoint once this many seconds have passed "
                                      "since the last checkpoint (whichever comes first); 0: by steps only. Not "
                                      "part of the stage key.")
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
    seed: Seed = 0
    bf16: bool | None = None
    bf16_rollouts: bool | None = Field(None, description="Under bf16: sample with a bf16 copy of the policy's "
                                       "Linear weights, LoRA merged in, refreshed before every rollout (no adapter "
                                       "modules while decoding). None: on with LoRA where bf16 is measured faster "
                                       "at the decode shape (always on CUDA); without LoRA autocast already casts "
                                       "the weights once per rollout.")
    fused_optimizer: bool | None = Field(None, description="torch's fused AdamW (one kernel over all parameters; "
                                         "the same update to rounding). None: on where torch has it for the device.")
    gradient_checkpointing: bool = False
    lora: bool = Field(False, description="Train LoRA adapters (peft); the KL reference is the adapter-free model.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check_rewards(self) -> OnlineConfig:
        if self.rewards is not None:
            if self.reward_model is not None:
                raise ValueError("give either reward_model (one folder written by `align rm`) or rewards (a list of "
                                 "components), not both: add the folder as a {kind: reward_model, folder: ...} "
                                 "component instead")
            if not self.rewards:
                raise ValueError("rewards is empty: give at least one component (or reward_model=FOLDER)")
            check_unique_names(self.rewards)
        return self

    def sampling(self, greedy: bool = False) -> SamplingConfig:
        """The rollout settings (greedy for the held-out evaluation)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=greedy, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)


def adamw(params, lr: float, weight_decay: float, *, fused: bool | None = None) -> torch.optim.AdamW:
    """torch's AdamW; ``fused`` (None: where torch has a fused kernel for the parameters' device, CPU
    included since torch 2.4) runs one kernel over all parameters instead of a loop of small ops."""
    params = list(params)
    use = fused if fused is not None else bool(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=use)
    except (RuntimeError, ValueError) as exc:  # a device or dtype without the fused kernel
        if fused:
            log.warning("fused AdamW unavailable here (%s); using the plain one", exc)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


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


class StepTimer:
    """Seconds between named marks: ``mark("generate")`` closes the phase that began at the last mark."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


class ProxyScores(NamedTuple):
    """What a reward model's scorer returns, for scores that come from reward components."""

    mean: torch.Tensor  # (N,)
    var: torch.Tensor  # (N,)


class ComponentProxy:
    """A scorer (``score(prompts, texts) -> (mean, var)``) over reward components, for the held-out proxy.

    One component: its own (unweighted) values. Several: their weighted total. ``items``: prompt items
    (``alignment.data.PromptItem``) whose gold answers a gold component looks up by the prompt's messages."""

    def __init__(self, components, items=()):
        self.components = list(components)
        self.items = {json.dumps(item.messages, sort_keys=True): item for item in items}

    def score(self, prompts, texts) -> ProxyScores:
        if not self.components:  # only a length penalty: no proxy on the held-out answers
            return ProxyScores(torch.zeros(len(texts)), torch.zeros(len(texts)))
        rows = [self.items.get(json.dumps(list(p), sort_keys=True)) or {"prompt": list(p)} for p in prompts]
        per = score_components(self.components, rows, texts)
        if len(self.components) == 1:
            total = torch.tensor([0.0 if v is None else v for v in per[self.components[0].name].values])
        else:
            total = combine(self.components, per)[0]
        return ProxyScores(total, torch.zeros_like(total))


def proxy_scorer(components, items=()) -> ComponentProxy:
    """The held-out proxy of a run rewarded by ``components``: the first reward_model or ensemble
    component (its value E[r] - lambda Var[r], or the ensemble's aggregate), else the weighted total of
    the components that need no token counts (the length penalty is left out: the evaluation's answers
    come without them), gold looked up in ``items``."""
    for c in components:
        if isinstance(c, (RewardModelComponent, EnsembleComponent)):
            return ComponentProxy([c])
    return ComponentProxy([c for c in components if c.kind != "length"], items)


class OnlineRecipe:
    """The house every online algorithm lives in: ``setup()`` (models, data, optimizer, resume), the
    held-out evaluations with the over-optimisation alarm and ``best/``, checkpoints with exact resume,
    and ``finish()`` (the final folder). An algorithm subclasses it with its ``train()`` loop and hooks:
    ``build_trainable`` (what the optimizer updates and checkpoints save: the policy, or the policy with
    a value head), ``setup_algorithm``, ``algorithm_state`` / ``restore_algorithm`` (its own state in
    checkpoints, e.g. a baseline or an adaptive KL coefficient).

    Under a multi-process launcher (see ``alignment.parallel``) every process samples and scores its
    shard of the batch, gradients are all-reduced, and the algorithm's batch statistics, the metrics and
    the collapse guard see the whole batch, so all processes hold the same weights and take the same
    decisions; only the first one writes metrics, checkpoints and the final folder.
    """

    stage = "online"
    error: type[Exception] = ValueError

    def __init__(self, config: OnlineConfig, out_dir: str | Path, key: str,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None):
        self.config, self.out, self.key, self.progress = config, Path(out_dir), key, progress
        self.console: StageProgress | None = None  # the step display (a bar on a terminal), made at the first step

    def setup(self) -> None:
        """Models, data, optimizer, algorithm state, guard; then resume from the newest checkpoint if any."""
        self.scorer_errors_before = Counter(tasks_gym.scorer_errors)  # reasoning-gym scorers that raised
        cfg = self.config
        self.dist = dist = DataParallel(resolve_device(cfg.device))
        if cfg.batch_size % dist.world:
            raise self.error(f"batch_size={cfg.batch_size} prompts do not split evenly over {dist.world} processes")
        # The reward components: built and checked (small files only) before any model is loaded.
        try:
            self.components = components_from(cfg.reward_model, cfg.rewards, var_lambda=cfg.reward_var_lambda)
            for component in self.components:
                component.check()
        except RewardComponentError as exc:
            raise self.error(str(exc)) from None
        rm_folder = next((c.config.folder for c in self.components if isinstance(c, RewardModelComponent)), None)
        self.check_inputs(reward_model_kind(rm_folder) if rm_folder else "none")
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
            if self.bf16:  # frozen: held in bf16, not re-cast by autocast at every pass (the same matmuls)
                bf16_frozen_linears(self.reference)
        if cfg.rewards is None:  # the shorthand: today's scorer, loaded as before
            self.scorer = RewardScorer.from_pretrained(cfg.reward_model, device=str(self.device), bf16=self.bf16)
            self.components[0].scorer = self.scorer
        try:
            for component in self.components:
                component.setup(str(self.device), self.bf16)
        except RewardComponentError as exc:
            raise self.error(str(exc)) from None
        # Reward models the policy never trains against, for the held-out evaluations (first process only):
        # checked here, loaded by each evaluation and let go after it (not held through the training steps).
        if dist.is_main:
            for folder in cfg.independent_reward_models.values():
                RewardScorer.from_pretrained(folder, device="cpu")

        data_dir = Path(cfg.data)
        # The prompt items keep their gold answers and checkers (for the reward components); the messages go
        # to the rollout. A prompts-only folder (format 'prompts') is fine: only the prompts are needed.
        self.train_items = PairData.load(data_dir / "train.parquet", prompts_ok=True).prompt_items()
        self.train_prompts = [item.messages for item in self.train_items]
        self.eval_prompts = PairData.load(data_dir / "validation.parquet", prompts_ok=True).prompt_items()[
            : cfg.eval_prompts]
        if cfg.rewards is not None:  # the held-out proxy
            self.scorer = proxy_scorer(self.components, self.eval_prompts)
        if len(self.train_prompts) < cfg.batch_size:
            raise self.error(f"{data_dir}: {len(self.train_prompts)} train prompts, fewer than "
                                 f"batch_size={cfg.batch_size}")
        self.sampler = PromptSampler(len(self.train_prompts), cfg.seed)
        self.trainable = self.build_trainable()
        self.optimizer = adamw([p for p in self.trainable.parameters() if p.requires_grad], cfg.learning_rate,
                               cfg.weight_decay, fused=cfg.fused_optimizer)
        self.setup_algorithm()
        self.rollout_copy = Bf16Rollouts(self.policy) if self.wants_bf16_rollouts() else None
        self.guard = CollapseGuard(cfg.guard_min_distinct2, cfg.guard_max_repetition, cfg.guard_patience)
        self.last_healthy: str | None = None
        self.eval_before: dict[str, Any] | None = None
        self.heldout: list[dict[str, Any]] = []  # one entry per held-out evaluation: the over-optimisation curves
        self.alarms: list[str] = []
        self.best: dict[str, Any] | None = None  # {"step", "score"} of the policy saved in best/
        self.start_step = 0
        self.last_checkpoint_at = time.monotonic()  # checkpoint_every_s counts from here
        ckpt = latest_checkpoint(self.out)
        if ckpt is not None:
            self._restore(load_checkpoint(ckpt, self.trainable, self.optimizer, dist.rank, dist.world))
            log.info("resuming from %s (step %d)", ckpt, self.start_step)
        # ``model`` (DDP-wrapped when data-parallel) runs the gradient forward passes; ``policy`` stays the
        # plain model for generate, the adapter-free reference and saving.
        self.model, self.optimizer = dist.prepare(self.trainable, self.optimizer)
        self.metrics_path = self.out / METRICS
        if dist.is_main:
            truncate_metrics(self.metrics_path, self.start_step)
            truncate_metrics(self.out / HELDOUT, self.start_step)

    def _load_policy(self):
        cfg = self.config
        policy, tokenizer = load_causal_lm(cfg.policy, device=self.device, padding_side="left")
        if cfg.lora and self.bf16:
            bf16_frozen_linears(policy)
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
                "last_healthy": self.last_healthy, "eval_before": self.eval_before, "heldout": self.heldout,
                "alarms": self.alarms, "best": self.best, "algorithm": self.algorithm_state()}

    def _restore(self, state: dict[str, Any]) -> None:
        self.start_step = state["step"]
        self.sampler.epoch, self.sampler.position = state["epoch"], state["position"]
        self.guard.streak, self.last_healthy = state["unhealthy_streak"], state["last_healthy"]
        self.eval_before = state.get("eval_before")
        self.heldout, self.alarms, self.best = state.get("heldout", []), state.get("alarms", []), state.get("best")
        self.restore_algorithm(state["algorithm"])

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen start: the reference copy, or with LoRA the policy with its adapters off; None when
        neither was loaded (no KL term without LoRA)."""
        if self.reference is not None:
            yield self.reference
        elif self.config.lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield None

    def reference_logprobs(self, ro: Rollout) -> torch.Tensor | None:
        """(B,) log pi_ref(y | x) under the frozen start (LoRA: the adapter-free model); None without KL."""
        if self.config.kl_beta <= 0:
            return None
        with self.reference_model() as reference:
            return batched_logprobs(reference, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask,
                                    self.config.micro_batch_size, bf16=self.bf16, group=self.prompt_group,
                                    entropy=False)[0]

    @property
    def prompt_group(self) -> int:
        """k when the log-prob passes run each prompt once for its k samples (the KV cache expanded, see
        ``generation.shared_prompt_logits``), else 1: not under data parallel (one forward per backward
        there), nor with gradient checkpointing (no KV cache in a checkpointed forward), nor when a
        micro-batch would split a prompt's k samples."""
        cfg = self.config
        k = cfg.samples_per_prompt
        if k > 1 and cfg.micro_batch_size % k == 0 and not cfg.gradient_checkpointing and self.dist.world == 1:
            return k
        return 1

    @property
    def reward_var_lambda(self) -> float:
        """The lambda of E[r] - lambda Var[r] applied to ``score_rollout``'s scores: the config's with the
        reward_model shorthand; 0 with ``rewards`` (each reward_model component subtracts its own)."""
        return self.config.reward_var_lambda if self.config.rewards is None else 0.0

    def score_rollout(self, ro: Rollout) -> tuple[Any, dict[str, ComponentScores]]:
        """(scores with ``mean`` and ``var``, (B,) each; every component's scores by name) of this process's
        rollout. The shorthand: the reward model's own E[r] and Var[r], exactly as before components (no
        component scores). With ``rewards``: mean = the combined total sum_c w_c value_c, var = sum_c w_c^2
        Var_c over the components that have variances (0 elsewhere; only the variance-weighted advantage
        and the rm_var metric read it)."""
        if self.config.rewards is None:
            return self.scorer.score(ro.prompts, ro.texts), {}
        try:
            per = score_components(self.components, self.batch_items, ro.texts, token_ids=ro.tokens,
                                   lengths=ro.lengths)
        except RewardComponentError as exc:
            raise self.error(str(exc)) from None
        total, _ = combine(self.components, per)
        var = combined_variance(self.components, per)
        return ProxyScores(total, torch.zeros_like(total) if var is None else var), per

    def component_metrics(self, per: dict[str, ComponentScores]) -> dict[str, float | None]:
        """``rewards/<name>/mean`` and ``rewards/<name>/none_share`` over the whole batch (every process's)."""
        if not per:
            return {}
        gathered = {name: ComponentScores(self.dist.gather_objects(list(s.values))) for name, s in per.items()}
        return combine(self.components, gathered)[1]

    def checkpoint(self, step: int, healthy: bool) -> None:
        """Atomic checkpoint with every process's RNG; the last healthy one is protected from deletion."""
        if healthy:
            self.last_healthy = f"step-{step:06d}"
        state = {**self._state(), "protected": [self.last_healthy] if self.last_healthy else []}
        # Every process's RNG state, so a resumed run continues each one's sampling exactly.
        rng = {"ranks": self.dist.gather_objects([rng_state()])} if self.dist.world > 1 else None
        if self.dist.is_main:  # a diverged policy is never checkpointed: the last good checkpoint stays
            check_tensors(self.trainable.state_dict().items(), self.stage,
                          self.out / CKPT_DIR / f"step-{step:06d}" / "policy.safetensors",
                          "it was not written (the last checkpoint stays)")
            save_checkpoint(self.out, step, self.trainable, self.optimizer, state, rng=rng)
        self.dist.barrier()
        self.last_checkpoint_at = time.monotonic()

    def evaluate(self) -> PolicyEval:
        """Greedy answers to the held-out prompts: the proxy scored as in training (E[r] - lambda Var[r]),
        the independent reward models, gold accuracy and the KL to the start."""
        cfg = self.config
        independent = {name: RewardScorer.from_pretrained(folder, device=str(self.device), bf16=self.bf16)
                       for name, folder in cfg.independent_reward_models.items()}
        try:
            return evaluate_policy(self.policy, self.tokenizer, self.scorer, self.eval_prompts,
                                   cfg.sampling(greedy=True), cfg.max_prompt_length, var_lambda=self.reward_var_lambda,
                                   bf16=self.bf16, independent=independent, reference_logprobs=self.reference_logprobs)
        finally:
            del independent
            release_memory()

    def heldout_evaluation(self, step: int) -> dict[str, Any]:
        """Evaluate (first process), append to the held-out history and ``heldout.jsonl``, keep ``best/``."""
        result = asdict(self.evaluate())
        entry = {"step": step, "proxy": result["mean_reward"], "proxy_std": result["reward_std"],
                 "independent": result["independent"], "independent_std": result["independent_std"],
                 "gold": result["gold_accuracy"], "gold_n": result["gold_n"], "gold_lenient": result["gold_lenient"],
                 "kl": result["kl"],
                 **{k: result[k] for k in ("eos_rate", "mean_length", "distinct2", "repetition")}}
        self.heldout.append(entry)
        append_metrics(self.out / HELDOUT, entry)
        tracking.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=step, prefix="heldout/")
        score = best_score(entry)
        if score is not None and (self.best is None or score > self.best["score"]):
            self.save_best(step, score)
        log.info("held-out at step %d: proxy %.3f%s%s kl %s", step, entry["proxy"],
                 "".join(f", {k} {v:.3f}" for k, v in entry["independent"].items()),
                 "" if entry["gold"] is None else f", gold {entry['gold']:.3f}" + (
                     "" if entry["gold_lenient"] is None else f" (lenient {entry['gold_lenient']:.3f})")
                 + f" (n={entry['gold_n']})",
                 "-" if entry["kl"] is None else f"{entry['kl']:.3f}")
        cfg = self.config
        message = overoptimisation_alarm(self.heldout, cfg.alarm_window, cfg.alarm_gold_margin, cfg.alarm_rm_margin_sd,
                                         watch_gold=not any(c.kind == "gold" for c in self.components))
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

    def plain_policy(self):
        """The policy as a plain fp32 transformers model: itself, or with LoRA the original fp32 weights
        plus each adapter's delta (B A * scaling, computed in fp32): the same as ``merge_and_unload`` on an
        fp32 base, without copying the training model, and exact when the base is held in bf16."""
        if not self.config.lora:
            return self.policy
        from peft.tuners.lora import LoraLayer

        plain, _ = load_causal_lm(self.config.policy, device="cpu", padding_side="left")
        targets = dict(plain.named_modules())
        with torch.no_grad():
            for name, module in self.policy.named_modules():
                if isinstance(module, LoraLayer):
                    weight = targets[name.removeprefix("base_model.model.")].weight
                    weight += module.get_delta_weight(module.active_adapters[0]).to(weight.device, torch.float32)
        return plain

    def save_best(self, step: int, score: float) -> None:
        """The policy with the best gold / independent score so far, as a plain transformers folder."""
        policy = self.plain_policy()
        with atomic_directory(self.out / "best") as tmp:
            policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "best.json", {"step": step, "score": score, "heldout": self.heldout[-1],
                                           "config": self.config.model_dump(mode="json")})  # what it was trained on
        self.best = {"step": step, "score": score}

    def finish(self) -> StageResult:
        """Held-out evaluation, then the final folder (first process; the others wait and read its summary)."""
        final = self.out / "final"
        if self.console is not None:
            self.console.close()
        if not self.dist.is_main:
            self.dist.barrier()
            return StageResult(self.out, json.loads((final / "summary.json").read_text()))
        before = self.eval_before
        after = self.heldout_evaluation(self.config.steps) if self.eval_prompts else None
        summary = {"steps": self.config.steps, "processes": self.dist.world, "eval_before": before, "eval_after": after,
                   "reward_gain": (after["mean_reward"] - before["mean_reward"]) if after and before else None,
                   "heldout": self.heldout, "alarms": self.alarms, "best": self.best,
                   "scorer_errors": dict(tasks_gym.scorer_errors - self.scorer_errors_before)}
        policy = self.plain_policy()  # a plain fp32 transformers model
        with atomic_directory(final) as tmp:
            policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            shutil.copy(self.metrics_path, tmp / METRICS)
            write_json(tmp / "summary.json", summary)
            plot_curves(tmp / METRICS, tmp / "curves.png")
            if self.heldout:
                shutil.copy(self.out / HELDOUT, tmp / HELDOUT)
                plot_overoptimisation(self.heldout, tmp / "overoptimisation.png")
            check_output(tmp, self.stage, final, {"summary.json": summary})  # diverged: no manifest, one line
            write_json(tmp / MANIFEST, {
                "stage": self.stage, "stage_key": self.key, "config": self.config.model_dump(mode="json"),
                "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))}})
        self.dist.barrier()
        return StageResult(self.out, summary)


    # ---------------------------------------------------------------------------------------
    # Hooks an algorithm overrides
    # ---------------------------------------------------------------------------------------
    def check_inputs(self, rm_kind: str) -> None:
        """Refuse settings the inputs cannot serve, before any work (e.g. a loss that needs a
        distributional reward model given a scalar one). ``rm_kind``: the reward model's kind."""
        for folder in self.config.independent_reward_models.values():
            reward_model_kind(folder)

    def build_trainable(self) -> torch.nn.Module:
        return self.policy

    def setup_algorithm(self) -> None:
        pass

    def algorithm_state(self) -> dict[str, Any]:
        return {}

    def restore_algorithm(self, state: dict[str, Any]) -> None:
        pass

    def next_rollout(self) -> Rollout:
        """This process's share of the next batch of prompts, ``samples_per_prompt`` completions each
        (prompt-major: the k samples of a prompt are neighbours)."""
        cfg = self.config
        idx = self.dist.shard(self.sampler.next(cfg.batch_size))
        # The rows the reward components score: each prompt's item k times, prompt-major like ``ro.prompts``.
        self.batch_items = [self.train_items[i] for i in idx for _ in range(cfg.samples_per_prompt)]
        sampler, bf16, off_policy = self.sampling_model()
        try:
            return rollout(sampler, self.tokenizer, [self.train_prompts[i] for i in idx], cfg.sampling(),
                           cfg.max_prompt_length, bf16=bf16, samples_per_prompt=cfg.samples_per_prompt,
                           record_logprobs=off_policy)
        except RuntimeError as exc:  # torch.multinomial on NaN/inf probabilities: the last update diverged
            if "probability tensor contains" not in str(exc):
                raise
            raise NonFiniteError(f"{self.stage}: the policy's next-token probabilities hold NaN or inf: training "
                                 f"diverged (learning_rate {cfg.learning_rate:g} too high?); nothing of this step "
                                 "was saved, the last checkpoint stays") from None

    def wants_bf16_rollouts(self) -> bool:
        """Whether the bf16 rollout copy samples (``bf16_rollouts``; by default with LoRA where bf16 is
        measured faster at the decode shape, under bf16 only); an algorithm with its own sampler says no
        (REINFORCE's int8 rollouts)."""
        cfg = self.config
        if not self.bf16 or cfg.bf16_rollouts is not None:
            return self.bf16 and bool(cfg.bf16_rollouts)
        return cfg.lora and bf16_rollouts_pay(self.device)  # measured at the decode shape on a CPU

    def sampling_model(self) -> tuple[Any, bool, bool]:
        """(the model that samples this step's rollout, bf16 autocast for it, whether it is a different
        distribution from the policy's): the policy, or its bf16 copy refreshed from this step's weights
        (the policy's own computation under autocast); an algorithm may sample with a cheaper, different
        copy (REINFORCE's int8 rollouts), whose per-token log-probs then come with the rollout."""
        if self.rollout_copy is not None:
            self.rollout_copy.refresh()
            return self.rollout_copy.model, True, False
        return self.policy, self.bf16, False

    def end_step(self, step: int, healthy: bool, stop_after: int | None) -> bool:
        """After step ``step``: the held-out evaluation every ``eval_every`` steps (with the alarm), the
        checkpoint every ``checkpoint_every`` steps or ``checkpoint_every_s`` seconds, whichever comes first,
        and at the end; True when ``stop_after`` steps of this call are done (a controlled interruption, for
        tests)."""
        cfg = self.config
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and self.eval_prompts:
            self.watch_overoptimisation(step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or self.checkpoint_due():
            self.checkpoint(step, healthy)
        return stop_after is not None and step - self.start_step >= stop_after

    def checkpoint_due(self) -> bool:
        """``checkpoint_every_s`` seconds have passed since the last checkpoint (or the start of this run);
        under data parallel the first process's clock decides for all, so they checkpoint together."""
        every = self.config.checkpoint_every_s
        if not every:
            return False
        due = time.monotonic() - self.last_checkpoint_at >= every
        if self.dist.world > 1:
            due = bool(self.dist.gather_objects([due])[0])
        return due

    def heldout_before(self) -> None:
        """The held-out evaluation at step 0 (first process; the others wait at their first collective)."""
        if self.eval_before is None and self.eval_prompts and self.dist.is_main:
            self.eval_before = self.heldout_evaluation(0)
            log.debug("held-out mean reward before training: %.4f", self.eval_before["mean_reward"])

    def write_record(self, record: dict[str, Any], line: str) -> None:
        """One metrics line (first process), the progress callback and a log line."""
        if self.dist.is_main:
            append_metrics(self.metrics_path, record)
            step, steps = record["step"], self.config.steps
            tracking.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
            if self.progress is not None:
                self.progress(step, steps, record)
            if self.console is None:
                self.console = StageProgress(f"{self.stage}: optimizer steps", steps, logger=log)
            if self.console.bar is not None:  # a terminal: one bar, the step's figures beside it
                self.console.update(step, reward=float(record.get("reward", float("nan"))),
                                    kl=float(record.get("kl") or 0.0))
            elif step in (1, steps) or step % self.console.every == 0 or is_verbose():
                log.info("step %d/%d %s", step, steps, line)  # about five lines a run; every step with -v
            else:
                log.debug("step %d/%d %s", step, steps, line)


# --------------------------------------------------------------------------------------------
# Stage key, folder and entry point of every online algorithm
# --------------------------------------------------------------------------------------------
def online_stage_key(config: OnlineConfig, schema: str) -> str:
    """The config (less its input folders) and the stage keys of the reward models and data it reads."""
    rm = (read_manifest(config.reward_model) if config.reward_model else None) or {}
    data = (read_manifest(config.data) if config.data else None) or {}
    others = {name: (read_manifest(folder) or {}).get("stage_key", folder)
              for name, folder in config.independent_reward_models.items()}
    cfg = config.model_dump(mode="json", exclude={"reward_model", "data", "independent_reward_models",
                                                  "checkpoint_every_s", "rewards"})  # (changes no result)
    parts = [cfg, rm.get("stage_key"), data.get("stage_key"), others, schema]
    if config.rewards is not None:  # the reward_model shorthand keeps the key it had before components existed
        parts.append(rewards_key(config.reward_model, config.rewards, var_lambda=config.reward_var_lambda))
    return sha256_text(json.dumps(parts, sort_keys=True))


def plan_online(config: OnlineConfig, key: str, runs_dir: str | Path) -> StagePlan:
    """Key and default folder ``<runs_dir>/<section>/<key[:12]>``; ``final/`` marks completion."""
    out = stage_folder(runs_dir, config.section, key)
    return StagePlan(key, out, out / "final")


def check_input_folders(config: OnlineConfig, error: type[Exception]) -> None:
    """The data and reward-model folders are complete, intact outputs of their stages and the policy is a
    loadable model (``alignment.inputs``); else ``error``, one line naming the folder."""
    require_stage_output(config.data, "data", error, "data (--data)")
    if config.rewards is None:
        require_stage_output(config.reward_model, "reward_model", error, "reward_model (--rm)")
    else:
        for i, component in enumerate(config.rewards):
            folders = [component.folder] if component.kind == "reward_model" else getattr(component, "members", [])
            for folder in folders:
                require_stage_output(folder, "reward_model", error, f"rewards[{i}] ({component.name})")
    for name, folder in config.independent_reward_models.items():
        require_stage_output(folder, "reward_model", error, f"independent reward model {name!r}")
    require_model_source(config.policy, error, "policy (--policy)")


@exclusive_stage
@records_footprint
def run_online(recipe_cls: type[OnlineRecipe], config: OnlineConfig, plan: StagePlan, out_dir: str | Path | None,
               stop_after: int | None, progress: Callable[[int, int, dict[str, Any]], None] | None) -> StageResult:
    """Reuse a finished run of the same key, refuse another config's folder, else set up and train (or resume)."""
    if (config.reward_model is None and config.rewards is None) or config.data is None:
        raise recipe_cls.error(f"{config.section} needs a reward (reward_model, a folder written by `align rm`, or "
                               "rewards, a list of reward components) and data (a folder written by `align data`)")

    out = Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, plan.key, recipe_cls.error, stage=recipe_cls.stage, done=out / "final",
                      resumable=True, inputs=local_paths(config.model_dump(mode="json")),
                      runs_root=plan.out.parents[1]) is not None:
        return StageResult(out, json.loads((out / "final" / "summary.json").read_text()), reused=True)
    check_input_folders(config, recipe_cls.error)  # before any model is loaded
    recipe = recipe_cls(config, out, plan.key, progress)
    recipe.setup()
    if recipe.dist.is_main:
        claim_output(out, plan.key, config.model_dump(mode="json"), stage=recipe_cls.stage)
    return recipe.train(stop_after)
