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
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from alignment.config import StageConfig
from alignment.data import Message
from alignment.hardware import bf16_enabled, resolve_device
from alignment.io import MANIFEST, StageResult, atomic_directory, read_manifest, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, load_causal_lm
from alignment.parallel import DataParallel
from alignment.reward import PairData, RewardScorer

log = logging.getLogger(__name__)


class ReinforceError(ValueError):
    """The REINFORCE stage cannot run as configured (the message says why)."""


class CollapseDetected(RuntimeError):
    """The collapse guard stopped the run; the last healthy checkpoint is kept."""


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
    eval_prompts: int = Field(32, ge=0, description="Held-out validation prompts scored before and after (greedy).")
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


# --------------------------------------------------------------------------------------------
# Pieces with equations (shapes in the docstrings)
# --------------------------------------------------------------------------------------------
def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS, 0 after it.

    completion_ids: (B, T) generated tokens (everything after the prompt) -> (B, T) float.
    A row without EOS keeps all T tokens.
    """
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, as generate() uses them with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t log pi(y_t | x, y_<t), mean token entropy) over the masked completion tokens.

    input_ids, attention_mask: (B, P + T) with the prompt left-padded to width P; mask: (B, T).
    Returns (B,) summed log-probs and (B,) mean entropy of the masked positions.
    """
    # Logits only where they are read (the last prompt position predicts the first completion token):
    # the LM head over a 49k vocabulary at prompt positions would be ~12% of this pass, wasted.
    n_completion = input_ids.shape[1] - prompt_width
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=n_completion + 1)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    targets = input_ids[:, prompt_width:]
    log_norm = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = log_norm - (probs * logits).sum(-1)
        mean_entropy = (entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return (token_logp * mask).sum(-1), mean_entropy


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
    """(advantages (N,), baseline value) for rewards (N,); updates a running baseline afterwards."""
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
# Collapse metrics
# --------------------------------------------------------------------------------------------
def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def text_health(completions: Sequence[Sequence[int]]) -> dict[str, float]:
    """distinct-1/2 over the batch (unique n-grams / all n-grams) and the repetition rate:
    the mean, over completions, of the share of 3-grams that already occurred earlier in the same one."""
    stats = {}
    for n in (1, 2):
        grams = [g for c in completions for g in ngrams(c, n)]
        stats[f"distinct{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    reps = []
    for c in completions:
        grams = ngrams(c, 3)
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    stats["repetition"] = float(np.mean(reps)) if reps else 0.0
    return stats


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def unique_prompts(pairs: PairData) -> list[list[Message]]:
    seen, prompts = set(), []
    for p in pairs.prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(p)
    return prompts


def encode_prompts(tokenizer, prompts: Sequence[Sequence[Message]], max_length: int) -> dict[str, torch.Tensor]:
    """Chat-templated prompts, cut from the left to ``max_length``, left-padded. (B, P) tensors."""
    ids = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=False)
           for p in prompts]
    ids = [x[-max_length:] for x in ids]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def generate(policy, tokenizer, prompt_batch: dict[str, torch.Tensor], config: ReinforceConfig, *,
             greedy: bool = False, bf16: bool = False) -> torch.Tensor:
    """Completions (B, T) after the prompt; the KV cache is on (generate's default)."""
    device = next(policy.parameters()).device
    kwargs: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    if greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
    was_training = policy.training
    policy.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = policy.generate(input_ids=prompt_batch["input_ids"].to(device),
                              attention_mask=prompt_batch["attention_mask"].to(device), **kwargs)
    policy.train(was_training)
    completion = out[:, prompt_batch["input_ids"].shape[1]:].cpu()
    if completion.shape[1] == 0:
        completion = torch.full((out.shape[0], 1), tokenizer.eos_token_id)
    return completion


def completion_tokens(completion: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each completion's tokens up to and including its first EOS. completion, mask: (B, T)."""
    return [row[: int(m.sum())].tolist() for row, m in zip(completion, mask, strict=True)]


def decode_completions(tokenizer, tokens: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


# --------------------------------------------------------------------------------------------
# Held-out evaluation (greedy)
# --------------------------------------------------------------------------------------------
@dataclass
class PolicyEval:
    mean_reward: float
    reward_std: float
    eos_rate: float
    mean_length: float
    distinct2: float
    repetition: float
    n: int
    samples: list[dict[str, str]] = field(default_factory=list)


def evaluate_policy(policy, tokenizer, scorer: RewardScorer, prompts: Sequence[Sequence[Message]],
                    config: ReinforceConfig, bf16: bool = False, batch_size: int = 8) -> PolicyEval:
    rewards, lengths, eos, token_lists, samples = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        batch = encode_prompts(tokenizer, chunk, config.max_prompt_length)
        comp = generate(policy, tokenizer, batch, config, greedy=True, bf16=bf16)
        mask = completion_mask(comp, tokenizer.eos_token_id)
        tokens = completion_tokens(comp, mask)
        texts = decode_completions(tokenizer, tokens)
        scores = scorer.score(chunk, texts)
        rewards += (scores.mean - config.reward_var_lambda * scores.var).tolist()
        lengths += mask.sum(-1).tolist()
        eos += (comp == tokenizer.eos_token_id).any(-1).float().tolist()
        token_lists += tokens
        samples += [{"prompt": p[-1]["content"], "completion": t} for p, t in zip(chunk, texts, strict=True)]
    health = text_health(token_lists)
    return PolicyEval(float(np.mean(rewards)), float(np.std(rewards)), float(np.mean(eos)), float(np.mean(lengths)),
                      health["distinct2"], health["repetition"], len(rewards), samples[:8])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
CKPT_DIR = "checkpoints"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (written atomically, so complete means present)."""
    folder = out_dir / CKPT_DIR
    if not folder.is_dir():
        return None
    for partial in folder.glob(".step-*.tmp-*"):  # left by a kill during a checkpoint write
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, policy, optimizer, state: dict[str, Any], keep: int = 2,
                    rng: dict[str, Any] | None = None) -> Path:
    """Policy weights, optimizer, RNG states and trainer state, in one atomic folder rename.

    ``rng``: the RNG states to store (``{"ranks": [...]}`` for a data-parallel run); this process's by default.
    """
    from safetensors.torch import save_model

    target = out_dir / CKPT_DIR / f"step-{step:06d}"
    with atomic_directory(target) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))  # handles tied embeddings
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng if rng is not None else _rng_state(), tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, **state})  # last: marks the checkpoint complete
    for old in sorted((out_dir / CKPT_DIR).glob("step-*"))[:-keep]:
        if old.name != target.name and old.name not in state.get("protected", []):
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt: Path, policy, optimizer, rank: int = 0, world: int = 1) -> dict[str, Any]:
    from safetensors.torch import load_model

    load_model(policy, str(ckpt / "policy.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    ranks = rng.get("ranks", [rng])  # a data-parallel run keeps every process's state
    if len(ranks) != world:
        raise ReinforceError(f"{ckpt} was written by {len(ranks)} process(es); resume it with the same number "
                             f"(this launch has {world}) so that every process continues its own sampling")
    _set_rng_state(ranks[rank])
    return json.loads((ckpt / "state.json").read_text())


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
ReinforceResult = StageResult


def reinforce_stage_key(config: ReinforceConfig) -> str:
    rm = (read_manifest(config.reward_model) if config.reward_model else None) or {}
    data = (read_manifest(config.data) if config.data else None) or {}
    cfg = config.model_dump(mode="json", exclude={"reward_model", "data"})
    return sha256_text(json.dumps([cfg, rm.get("stage_key"), data.get("stage_key"), "reinforce-schema=1"],
                                  sort_keys=True))


def train_reinforce(config: ReinforceConfig, out_dir: str | Path, *, stop_after: int | None = None,
                    progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> ReinforceResult:
    """Run (or resume) REINFORCE; writes the final policy folder, metrics.jsonl, curves and summary.

    Re-running the same call continues from the last complete checkpoint. ``stop_after`` ends the
    call after that many steps of this call (a controlled interruption, for tests). ``progress`` is
    called after every step with (step, steps, metrics record), on the first process only.

    Under a multi-process launcher (see ``alignment.parallel``) every process samples and scores its
    shard of the batch, gradients are all-reduced, and the baseline, whitening, metrics and collapse
    guard see the whole batch, so all processes hold the same weights and take the same decisions;
    only the first one writes metrics, checkpoints and the final folder.
    """
    if config.reward_model is None or config.data is None:
        raise ReinforceError("reinforce needs both reward_model (a folder written by `align rm`) and data "
                             "(a folder written by `align data`)")
    out = Path(out_dir)
    key = reinforce_stage_key(config)
    done = read_manifest(out / "final")
    if done is not None and done.get("stage_key") == key:
        return ReinforceResult(out, json.loads((out / "final" / "summary.json").read_text()), reused=True)
    dist = DataParallel(resolve_device(config.device))
    if config.batch_size % dist.world:
        raise ReinforceError(f"batch_size={config.batch_size} prompts do not split evenly over {dist.world} processes")
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "run.json"
    if state_file.is_file() and json.loads(state_file.read_text()).get("stage_key") != key:
        raise ReinforceError(f"{out} holds a REINFORCE run with a different config; use another --out")
    if dist.is_main:
        write_json(state_file, {"stage_key": key, "config": config.model_dump(mode="json")})

    # 0. Models, data, optimizer; resume if a checkpoint exists.
    device = dist.device
    bf16 = bf16_enabled(config.bf16, device)
    random.seed(config.seed)
    np.random.seed(config.seed)
    # Each process draws its own completions; process 0 keeps the single-process seed. (LoRA's random
    # init differs per process too, but DDP copies process 0's weights to all when it wraps the model.)
    torch.manual_seed(config.seed + dist.rank)
    policy, tokenizer = load_causal_lm(config.policy, device=device, padding_side="left")
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.enable_input_require_grads()  # so checkpointed blocks see a grad-requiring input (LoRA too)
    policy.config.use_cache = True
    if config.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                                                   lora_dropout=config.lora_dropout, target_modules="all-linear"))
    # The KL reference: with LoRA the same model with its adapters switched off, else a frozen copy.
    reference = None
    if config.kl_beta > 0 and not config.lora:
        reference, _ = load_causal_lm(config.policy, device=device, padding_side="left")
        reference.eval().requires_grad_(False)
    scorer = RewardScorer.from_pretrained(config.reward_model, device=str(device), bf16=bf16)
    data_dir = Path(config.data)
    train_prompts = unique_prompts(PairData.load(data_dir / "train.parquet"))
    eval_prompts = unique_prompts(PairData.load(data_dir / "validation.parquet"))[: config.eval_prompts]
    if len(train_prompts) < config.batch_size:
        raise ReinforceError(f"{data_dir}: {len(train_prompts)} train prompts, fewer than batch_size={config.batch_size}")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    baseline: Any = EMABaseline(config.ema_decay) if config.baseline == "ema" else MovingAverageBaseline()
    state: dict[str, Any] = {"epoch": 0, "position": 0, "unhealthy_streak": 0, "last_healthy": None}
    start_step = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, policy, optimizer, dist.rank, dist.world)
        start_step = state["step"]
        for k, v in state.pop("baseline").items():
            setattr(baseline, k, v)
        log.info("resuming from %s (step %d)", ckpt, start_step)
    # ``model`` (DDP-wrapped when data-parallel) runs the gradient forward passes; ``policy`` stays the
    # plain model (accelerator.unwrap_model) for generate, the adapter-free reference and saving.
    model, optimizer = dist.prepare(policy, optimizer)
    metrics_path = out / "metrics.jsonl"
    if dist.is_main:
        _truncate_metrics(metrics_path, start_step)
    before = state.get("eval_before")
    if before is None and eval_prompts and dist.is_main:  # the others wait at their first collective
        before = asdict(evaluate_policy(policy, tokenizer, scorer, eval_prompts, config, bf16))
        state["eval_before"] = before
        log.info("held-out mean reward before training: %.4f", before["mean_reward"])

    k = config.samples_per_prompt
    policy.train()
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        # 1. Sample a batch of prompts (a seeded permutation per epoch; position is checkpointed).
        order = np.random.default_rng(config.seed + state["epoch"]).permutation(len(train_prompts))
        if state["position"] + config.batch_size > len(order):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            order = np.random.default_rng(config.seed + state["epoch"]).permutation(len(train_prompts))
        idx = order[state["position"]:state["position"] + config.batch_size]
        state["position"] += config.batch_size
        idx = dist.shard(idx)  # this process's share (all of it for one process)
        prompts = [train_prompts[i] for i in idx for _ in range(k)]  # prompt-major: k samples each

        # 2. Chat template, left padding, batched sampling with the KV cache.
        batch = encode_prompts(tokenizer, prompts, config.max_prompt_length)
        completion = generate(policy, tokenizer, batch, config, bf16=bf16)
        t_gen = time.perf_counter()

        # 3. Completion mask: up to and including the first EOS.
        mask = completion_mask(completion, tokenizer.eos_token_id)
        has_eos = (completion == tokenizer.eos_token_id).any(-1)
        token_lists = completion_tokens(completion, mask)
        texts = decode_completions(tokenizer, token_lists)

        # 4. Rewards from the reward-model stage's scorer.
        scores = scorer.score(prompts, texts)
        t_rew = time.perf_counter()

        # 5. Shaping: R = E[r] - lambda Var[r] - beta KL - eos penalty, clipped.
        input_ids = torch.cat([batch["input_ids"], completion], dim=1)
        attn = torch.cat([batch["attention_mask"], mask.long()], dim=1)
        width = batch["input_ids"].shape[1]
        rm_reward = scores.mean - config.reward_var_lambda * scores.var
        kl = torch.zeros(len(prompts))
        use_kl = config.kl_beta > 0
        if use_kl:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if reference is not None:
                    ref_logp, _ = _batched_logprobs(reference, input_ids, attn, width, mask,
                                                    config.micro_batch_size, device)
                else:
                    with policy.disable_adapter():
                        ref_logp, _ = _batched_logprobs(policy, input_ids, attn, width, mask,
                                                        config.micro_batch_size, device)
        reward = rm_reward.clone()
        reward -= config.missing_eos_penalty * (~has_eos).float()
        t_ref = time.perf_counter()

        # 6. log pi(y | x) of the batch under the current policy: the k1 KL and the advantages need it
        # before the backward. One micro-batch: the gradient's own forward gives it (pi does not change
        # until optimizer.step), so no extra pass. Several: a no-grad pass first, so that each
        # micro-batch's graph is freed by its own backward -- activation memory of one micro-batch, for
        # one extra forward (gradient accumulation that actually saves memory).
        optimizer.zero_grad(set_to_none=True)
        micro = [slice(s, s + config.micro_batch_size) for s in range(0, len(prompts), config.micro_batch_size)]
        graph = None
        if len(micro) == 1:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                graph, entropies = completion_logprobs(model, input_ids.to(device), attn.to(device), width,
                                                       mask.to(device))
            logps, entropies = graph.detach().float().cpu(), entropies.cpu()
        else:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logps, entropies = _batched_logprobs(policy, input_ids, attn, width, mask, config.micro_batch_size,
                                                     device)

        # 7. Advantages. The baseline and whitening see the whole batch, gathered in rank order (so
        # still prompt-major, RLOO groups intact): every process computes the same baseline state.
        # Identity for one process.
        if use_kl:
            kl = logps - ref_logp
            reward -= config.kl_beta * kl
        if config.reward_clip is not None:
            reward = reward.clamp(-config.reward_clip, config.reward_clip)
        all_reward, all_var = dist.gather(reward), dist.gather(scores.var)
        all_advantages, b = compute_advantages(all_reward, config, baseline, all_var)
        advantages = dist.local(all_advantages)

        # 8. Loss = the mean over the batch (each micro-batch adds its share) and backward. DDP averages
        # over processes, which is the mean over the global batch (equal shards); only the last
        # micro-batch's backward runs the all-reduce (no_sync on the others).
        if graph is not None:
            loss = reinforce_loss(graph, advantages.to(graph.device))
            dist.backward(loss)
            total_loss = float(loss.detach())
        else:
            total_loss = 0.0
            for i, sl in enumerate(micro):
                sync = dist.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        lp, _ = completion_logprobs(model, input_ids[sl].to(device), attn[sl].to(device), width,
                                                    mask[sl].to(device))
                    loss = reinforce_loss(lp, advantages[sl].to(lp.device)) * (lp.shape[0] / len(prompts))
                    dist.backward(loss)
                total_loss += float(loss.detach())
        total_loss = dist.mean(total_loss)
        t_bwd = time.perf_counter()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm))
        optimizer.step()
        t_pol = time.perf_counter()

        # 9. Metrics and the collapse guard, over the whole batch so every process stops together.
        health = text_health(dist.gather_objects(token_lists))
        rm_reward, all_rm_var, kl = dist.gather(rm_reward), all_var, dist.gather(kl)
        entropies, lengths, all_eos = dist.gather(entropies), dist.gather(mask.sum(-1)), dist.gather(has_eos)
        record = {
            "step": step + 1, "loss": total_loss, "reward": float(all_reward.mean()),
            "reward_std": float(all_reward.std()), "rm_reward": float(rm_reward.mean()),
            "rm_var": float(all_rm_var.mean()), "baseline": b,
            "advantage": float(all_advantages.mean()), "advantage_abs": float(all_advantages.abs().mean()),
            "kl": float(kl.mean()), "entropy": float(entropies.mean()), "length": float(lengths.mean()),
            "eos_rate": float(all_eos.float().mean()), **health, "grad_norm": grad_norm,
            # policy = reference (the KL pass) + forward_backward + optimizer (with clipping)
            "seconds": {"generate": t_gen - t0, "reward": t_rew - t_gen, "policy": t_pol - t_rew,
                        "reference": t_ref - t_rew, "forward_backward": t_bwd - t_ref, "optimizer": t_pol - t_bwd},
            "tokens": {"prompt": int(dist.gather(batch["attention_mask"].sum(-1)).sum()),
                       "completion": int(lengths.sum())},
            "sample": texts[0][:200],
        }
        healthy = health["distinct2"] >= config.guard_min_distinct2 and health["repetition"] <= config.guard_max_repetition
        state["unhealthy_streak"] = 0 if healthy else state["unhealthy_streak"] + 1
        record["healthy"] = healthy
        if dist.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(step + 1, config.steps, record)
            log.info("step %d/%d loss %.4f reward %.3f kl %.3f len %.1f eos %.2f distinct2 %.2f rep %.2f",
                     step + 1, config.steps, total_loss, record["reward"], record["kl"], record["length"],
                     record["eos_rate"], health["distinct2"], health["repetition"])
        if state["unhealthy_streak"] >= config.guard_patience:
            raise CollapseDetected(
                f"collapse guard: distinct-2 {health['distinct2']:.2f} (min {config.guard_min_distinct2}) / repetition "
                f"{health['repetition']:.2f} (max {config.guard_max_repetition}) unhealthy for "
                f"{state['unhealthy_streak']} steps at step {step + 1}; last healthy checkpoint: "
                f"{state['last_healthy'] or 'none (the starting policy)'}. Sample: {texts[0][:120]!r}")

        # 10. Checkpoint (atomic) every N steps and at the end.
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            ckpt_state = {**state, "baseline": asdict(baseline)}
            if healthy:
                ckpt_state["last_healthy"] = f"step-{step + 1:06d}"
                state["last_healthy"] = ckpt_state["last_healthy"]
            ckpt_state["protected"] = [state["last_healthy"]] if state["last_healthy"] else []
            # Every process's RNG state, so a resumed run continues each one's sampling exactly.
            rng = {"ranks": dist.gather_objects([_rng_state()])} if dist.world > 1 else None
            if dist.is_main:
                save_checkpoint(out, step + 1, policy, optimizer, ckpt_state, rng=rng)
            dist.barrier()
        if stop_after is not None and step + 1 - start_step >= stop_after:
            return ReinforceResult(out, {"stopped_at": step + 1}, reused=False)

    # Final (first process only; the others wait and read its summary): held-out evaluation,
    # save_pretrained folder, curves.
    if not dist.is_main:
        dist.barrier()
        return ReinforceResult(out, json.loads((out / "final" / "summary.json").read_text()))
    after = asdict(evaluate_policy(policy, tokenizer, scorer, eval_prompts, config, bf16)) if eval_prompts else None
    summary = {"steps": config.steps, "processes": dist.world, "eval_before": before, "eval_after": after,
               "reward_gain": (after["mean_reward"] - before["mean_reward"]) if after and before else None}
    if config.lora:
        policy = policy.merge_and_unload()  # the final folder is a plain transformers model
    with atomic_directory(out / "final") as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(metrics_path, tmp / "metrics.jsonl")
        write_json(tmp / "summary.json", summary)
        plot_curves(tmp / "metrics.jsonl", tmp / "curves.png")
        write_json(tmp / MANIFEST, {"stage": "reinforce", "stage_key": key, "config": config.model_dump(mode="json")})
    dist.barrier()
    return ReinforceResult(out, summary)


def _batched_logprobs(model, input_ids, attn, width, mask, micro, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logprobs`` over the batch in chunks of ``micro`` sequences: (B,) log-probs and
    (B,) mean entropies, on CPU. Run it under ``torch.no_grad()``."""
    logps, entropies = [], []
    for s in range(0, input_ids.shape[0], micro):
        sl = slice(s, s + micro)
        lp, ent = completion_logprobs(model, input_ids[sl].to(device), attn[sl].to(device), width, mask[sl].to(device))
        logps.append(lp.float().cpu())
        entropies.append(ent.cpu())
    return torch.cat(logps), torch.cat(entropies)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def plot_curves(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    keys = ["reward", "rm_reward", "kl", "length", "eos_rate", "distinct2", "repetition", "entropy"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys, strict=True):
        ax.plot(steps, [r[key] for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

