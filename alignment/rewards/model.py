"""Reward models: a scalar Bradley-Terry model and a distributional one (10 bins over ratings 1..10).

Both are SmolLM2-135M-Instruct (or any causal LM) with a sequence-classification head read on the
last real token of ``chat_template(prompt + [assistant: response])``, cut after the response's EOS
(``<|im_end|>``), so the reward sits on the token that ends the answer. The scalar model trains with
TRL's ``RewardTrainer``; the distributional one with a subclass whose ``compute_loss`` is ours.

Departures from the textbook: prompts longer than ``max_length`` are cut from the left (the
response is kept whole when it fits; TRL would drop such pairs), and the scalar loss carries TRL's
reward-centring term 0.01 * E[(r_w + r_l)^2] (Eisenstein et al. 2023) so rewards stay near zero.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from alignment import tracking
from alignment.checkpoints import (
    checkpoint_folder,
    refusing_pickles,
    remove_checkpoints,
    resume_point,
    trainer_callbacks,
    trainer_checkpoint_args,
)
from alignment.config import Epochs, Seed, StageConfig
from alignment.console import quiet_trainer
from alignment.data import N_BINS, DataConfig, Message, PairData, run_data_stage
from alignment.evaluation.length import length_split
from alignment.finite import check_output
from alignment.footprint import records_footprint
from alignment.generation import pad_completions
from alignment.hardware import DeviceError, bf16_enabled, resolve_device
from alignment.inputs import require_model_source, require_stage_output
from alignment.io import (
    MANIFEST,
    atomic_directory,
    read_manifest,
    sha256_file,
    sha256_text,
    write_json,
)
from alignment.models import (
    DEFAULT_MODEL,
    ModelSourceError,
    bf16_frozen_linears,
    configure_padding,
    load_sequence_classifier,
)
from alignment.ownership import local_paths
from alignment.parallel import launched_rank, launched_world_size
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)

Kind = Literal["scalar", "distributional"]
RATINGS = torch.arange(1, N_BINS + 1, dtype=torch.float32)  # the support of the distributional head


class RewardModelError(ValueError):
    """A reward model folder, kind, tokenizer or data set cannot be used (the message says why)."""


# --------------------------------------------------------------------------------------------
# Losses (each cites its equation; shapes in the docstrings)
# --------------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float | None = None) -> torch.Tensor:
    """L = -log sigmoid(r_w - r_l - m) [+ c * (r_w + r_l)^2], averaged over the batch.

    Bradley-Terry (Ouyang et al. 2022, eq. 1); margin m (Touvron et al. 2023, eq. 2); centring c
    (Eisenstein et al. 2023), as TRL's RewardTrainer computes it. r_chosen, r_rejected, margin: (B,).
    """
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def distribution_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) = sum_i t_i (log t_i - log p_i), averaged over the batch.

    logits: (B, 10); target: (B, 10), rows summing to 1 (the data stage's rating distributions).
    Zero-probability target bins contribute 0 (xlogy).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    return (torch.xlogy(target, target) - target * log_p).sum(-1).mean()


def log_preference_probability(logits_w: torch.Tensor, logits_l: torch.Tensor) -> torch.Tensor:
    """log P(w > l) with P(w > l) = sum_{i > j} p_w(i) p_l(j), computed in log space.

    logits_w, logits_l: (B, 10) -> (B,). Ties (i == j) count for neither side.
    """
    log_pw = F.log_softmax(logits_w.float(), dim=-1)
    log_pl = F.log_softmax(logits_l.float(), dim=-1)
    joint = log_pw[:, :, None] + log_pl[:, None, :]  # (B, i, j)
    n = joint.shape[-1]
    above = torch.ones(n, n, dtype=torch.bool, device=joint.device).tril(diagonal=-1)  # i > j
    return torch.logsumexp(joint.masked_fill(~above, float("-inf")), dim=(1, 2))


def pairwise_distribution_loss(logits_w: torch.Tensor, logits_l: torch.Tensor) -> torch.Tensor:
    """L = -log P(w > l), averaged over the batch. logits: (B, 10)."""
    return -log_preference_probability(logits_w, logits_l).mean()


def distribution_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E[r], Var[r], p) of the rating distribution over 1..10. logits: (B, 10) -> (B,), (B,), (B, 10)."""
    p = F.softmax(logits.float(), dim=-1)
    ratings = RATINGS.to(p.device)
    mean = (p * ratings).sum(-1)
    var = (p * ratings**2).sum(-1) - mean**2
    return mean, var.clamp_min(0.0), p


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
class RewardModelConfig(StageConfig):
    """Reward-model training: model, data, loss and the options real runs need."""

    section: str = "rm"
    kind: Kind = Field("scalar", description="'scalar' (Bradley-Terry) or 'distributional' (10 bins, ratings 1-10).")
    model: str = Field(DEFAULT_MODEL, description="Base model: hub id, local folder or .gguf file.")
    data: str | None = Field(None, description="Folder written by `align data` (default: build the demo data).")
    loss: Literal["kl", "pairwise", "both"] = Field(
        "both", description="Distributional loss: KL to the rating distributions, -log P(w > l), or both.")
    kl_weight: float = Field(1.0, ge=0.0, description="Weight of the KL term for loss='both'.")
    pairwise_weight: float = Field(1.0, ge=0.0, description="Weight of the -log P(w > l) term for loss='both'.")
    center_rewards_coefficient: float | None = Field(0.01, ge=0.0, description="Scalar: reward centring coefficient.")
    margin: Literal["none", "rating_diff"] = Field("none", description="Scalar: margin from the rating difference.")
    margin_scale: float = Field(1.0, ge=0.0, description="Margin = scale * (chosen_rating - rejected_rating).")
    max_length: int = Field(512, ge=32, description="Tokens per sequence; prompts are cut from the left.")
    max_train_pairs: int | None = Field(None, ge=1, description="Train on a seeded subset of this many pairs.")
    max_eval_pairs: int | None = Field(None, ge=1, description="Evaluate on the first N validation pairs.")
    epochs: Epochs = 1.0
    batch_size: int = Field(8, ge=1, description="Pairs per device step.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(3e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    seed: Seed = 0
    bf16: bool | None = Field(None, description="bf16 autocast (default: on GPUs and CPUs with bf16 instructions).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (off by default on CPU).")
    freeze_embeddings: bool = Field(False, description="Keep the token embedding fixed (no gradient or optimizer "
                                    "state for its 28M of SmolLM2's 135M parameters: ~0.35 GB less in fp32).")
    lora: bool = Field(False, description="Train LoRA adapters (merged into the saved model).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    eval_batch_size: int | None = Field(None, ge=1, description="Scoring batch (default: 8 on CPU, 64 on GPU).")
    logging_steps: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint (weights, optimizer, scheduler, "
                                  "RNG, data position) every N optimizer steps; re-running the same command "
                                  "continues from the newest intact one. 0: none. Not part of the stage key.")
    checkpoint_every_s: float = Field(600.0, ge=0.0, description="Also checkpoint once this many seconds have passed "
                                      "since the last checkpoint (whichever comes first); 0: by steps only. "
                                      "Not part of the stage key.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ensemble: int = Field(1, ge=1, le=64, description="Reward models to train (members of an ensemble, Coste et al. "
                          "2024): member i with seed + i and, with bootstrap, its own resample of the train pairs; "
                          "written into one ensemble folder. 1: one reward model.")
    bootstrap: bool = Field(True, description="Ensemble: each member trains on a seeded resample with replacement "
                            "of the train pairs (after max_train_pairs). Not part of the key when ensemble=1.")
    data_seed: Seed | None = Field(None, description="Seed of the max_train_pairs subset (default: seed); the "
                                  "ensemble sets it for its members so they share one subset.")
    resample: Seed | None = Field(None, description="Train on a bootstrap resample (as many pairs, with replacement) "
                                 "of the train pairs, with this seed; the ensemble sets it for its members.")

    @model_validator(mode="after")
    def _check(self) -> RewardModelConfig:
        if self.ensemble > 1 and (self.data_seed is not None or self.resample is not None):
            raise ValueError("data_seed and resample are set by the ensemble for each member; leave them unset "
                             f"with ensemble={self.ensemble}")
        if self.kind == "distributional" and self.loss == "both" and self.kl_weight + self.pairwise_weight <= 0:
            raise ValueError("loss='both' needs kl_weight + pairwise_weight > 0")
        # A setting of the other kind would be silently ignored: say so instead (values, not "was it given":
        # configs arrive as full dicts from Prefect forms and presets).
        other = {"loss": "both", "kl_weight": 1.0, "pairwise_weight": 1.0} if self.kind == "scalar" else {
            "margin": "none", "margin_scale": 1.0}
        for name, default in other.items():
            if getattr(self, name) != default:
                wanted = "distributional" if self.kind == "scalar" else "scalar"
                raise ValueError(f"{name}={getattr(self, name)!r} applies to kind='{wanted}' reward models only "
                                 f"(this one is kind='{self.kind}')")
        return self

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "scalar" else N_BINS


# --------------------------------------------------------------------------------------------
# Tokenisation: prompt (chat template) + response, ending at the response's EOS
# --------------------------------------------------------------------------------------------
def render_conversation(tokenizer, prompt: Sequence[Message], response: str) -> tuple[str, int]:
    """(text, prompt_chars): the chat-templated conversation ending at the response's EOS."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt_text):
        raise RewardModelError("the chat template does not render the prompt as a prefix of the conversation")
    eos = tokenizer.eos_token
    end = full.rfind(eos) if eos else -1
    # ChatML appends "\n" after the final <|im_end|>: cut it so the last token is the EOS itself.
    full = full[: end + len(eos)] if end >= len(prompt_text) else full.rstrip()
    return full, len(prompt_text)


def encode_conversations(tokenizer, prompts: Sequence[Sequence[Message]], responses: Sequence[str],
                         max_length: int, *, prompt_lengths: list[int] | None = None) -> list[list[int]]:
    """Token ids of each conversation, at most ``max_length``: the prompt is cut from the left.

    A response longer than ``max_length - 16`` is itself cut on the right and re-terminated with EOS,
    so the reward is always read on an end-of-turn token. ``prompt_lengths``: a list that receives how
    many of each conversation's ids are the (cut) prompt's.
    """
    if len(prompts) != len(responses):
        raise RewardModelError(f"{len(prompts)} prompts but {len(responses)} responses")
    rendered = [render_conversation(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    eos_id = tokenizer.eos_token_id
    out = []
    for ids, offsets, (_, prompt_chars) in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True):
        n_prompt = sum(1 for start, _ in offsets if start < prompt_chars)
        prompt_ids, resp_ids = ids[:n_prompt], ids[n_prompt:]
        room = max_length - 16
        if len(resp_ids) > room:
            resp_ids = resp_ids[: room - 1] + [eos_id]
        keep = max_length - len(resp_ids)
        out.append(prompt_ids[-keep:] + resp_ids if keep > 0 else resp_ids)
        if prompt_lengths is not None:
            prompt_lengths.append(min(len(prompt_ids), max(keep, 0)))
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    return sha256_text(json.dumps(sorted(tokenizer.get_vocab().items())))[:16]


# --------------------------------------------------------------------------------------------
# The scorer every later stage uses
# --------------------------------------------------------------------------------------------
class RewardScores(NamedTuple):
    mean: torch.Tensor  # (N,) the reward (scalar model) or E[r] over ratings 1..10
    var: torch.Tensor  # (N,) Var[r]; zeros for the scalar model
    dist: torch.Tensor | None = None  # (N, 10) rating distribution (distributional model only)


DEFAULT_SCORING_LENGTH = 1024  # for reward-model folders that do not record their training length


def tag_reward_model(model_config, kind: Kind, tokenizer, max_length: int) -> None:
    """What later stages need to score with a saved reward model, recorded in its ``config.json``."""
    model_config.alignment_reward_kind = kind
    model_config.alignment_tokenizer_sha = tokenizer_fingerprint(tokenizer)
    model_config.alignment_max_length = max_length


ENSEMBLE_STAGE = "reward_model_ensemble"  # the manifest stage of a folder written by `align rm ensemble=N`


def ensemble_folder_hint(path: str | Path) -> str:
    """The one-line error for an ensemble folder given where one reward model is expected."""
    return (f"{path} is a reward-model ensemble (written by `align rm ensemble=N`), not one reward model: use it "
            f"as a reward component {{kind: ensemble, folder: {path}}}, or one of its members ({Path(path) / 'member-0'}"
            ", ...) as a single reward model")


def reward_model_kind(path: str | Path) -> Kind:
    """'scalar' or 'distributional' for a folder written by the reward-model stage (read from its config,
    without loading weights); a clear RewardModelError for anything else."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        if (read_manifest(path) or {}).get("stage") == ENSEMBLE_STAGE:
            raise RewardModelError(ensemble_folder_hint(path)) from None
        raise RewardModelError(f"{path} is not a saved reward model (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise RewardModelError(f"{path}/config.json cannot be read: {exc}") from None
    kind = config.get("alignment_reward_kind")
    if kind is None and (read_manifest(path) or {}).get("stage") == ENSEMBLE_STAGE:
        raise RewardModelError(ensemble_folder_hint(path))
    if kind not in ("scalar", "distributional"):
        raise RewardModelError(f"{path} is not a reward model written by this project (no alignment_reward_kind)")
    return kind


class RewardScorer:
    """Batched, no-grad reward scoring: ``score(prompts, completions) -> RewardScores``.

    Texts are tokenised together, sorted by length so each batch pads only to its own longest
    sequence, run under bf16 autocast (CPU and GPU) and returned in the caller's order.
    """

    def __init__(self, model, tokenizer, *, kind: Kind, batch_size: int | None = None,
                 max_length: int = DEFAULT_SCORING_LENGTH,
                 bf16: bool | None = None):
        self.model = model.eval()
        self.tokenizer = configure_padding(tokenizer, "right")
        # The head reads the last non-pad token: it must know the (distinct) pad id, however the model came.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.kind = kind
        self.device = next(model.parameters()).device
        # A CPU runs a fixed number of tokens per second whatever the batch shape (measured: 430-540
        # tokens/s for SmolLM2 at batch 1 to 32), so small batches only cut padding; a GPU needs width.
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 8)
        self.max_length = max_length
        self.bf16 = bf16_enabled(bf16, self.device)
        n = model.config.num_labels
        if (kind == "scalar") != (n == 1) or (kind == "distributional" and n != N_BINS):
            raise RewardModelError(f"a {kind} reward model needs {1 if kind == 'scalar' else N_BINS} labels, "
                                   f"this model has {n}")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, expect_kind: Kind | None = None, tokenizer=None,
                        device: str = "auto", max_length: int | None = None, **kwargs) -> RewardScorer:
        """Load a folder written by the reward-model stage; checks its kind and tokenizer.

        ``max_length``: tokens per scored conversation; by default the length the model was trained
        with (recorded in its config as ``alignment_max_length``), else 1024 for older folders.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        kind = reward_model_kind(path)
        config = json.loads((path / "config.json").read_text())
        if expect_kind is not None and kind != expect_kind:
            raise RewardModelError(f"{path} holds a {kind} reward model, but a {expect_kind} one was asked for")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        if kwargs.get("bf16"):  # scoring under bf16 autocast: the same scores from half the memory
            bf16_frozen_linears(model)
        model.to(resolve_device(device))
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        expected = config.get("alignment_tokenizer_sha")
        if expected and tokenizer_fingerprint(tok) != expected:
            raise RewardModelError(f"the tokenizer does not match the one {path} was trained with "
                                   f"(vocabulary fingerprint {tokenizer_fingerprint(tok)} != {expected})")
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            raise RewardModelError(f"tokenizer has {len(tok)} tokens, the model's embedding only "
                                   f"{model.get_input_embeddings().weight.shape[0]}")
        if max_length is None:
            max_length = int(config.get("alignment_max_length") or DEFAULT_SCORING_LENGTH)
        return cls(model, tok, kind=kind, max_length=max_length, **kwargs)

    @torch.no_grad()
    def logits(self, prompts: Sequence[Sequence[Message]], completions: Sequence[str], progress: bool = False
               ) -> torch.Tensor:
        """Head outputs (N, num_labels) in the input order.

        Conversations whose prompts tokenise the same (the k samples of a prompt) run that prompt once:
        its KV cache is expanded to their rows and only the completions run on top
        (:meth:`_shared_prompt_logits`); the rest are batched by length."""
        n_prompt: list[int] = []
        ids = encode_conversations(self.tokenizer, prompts, completions, self.max_length, prompt_lengths=n_prompt)
        out = torch.empty(len(ids), self.model.config.num_labels)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (row, n) in enumerate(zip(ids, n_prompt, strict=True)):
            if 1 < n < len(row):  # a prompt and at least one completion token
                groups.setdefault(tuple(row[:n]), []).append(i)
        shared = [rows for rows in groups.values() if len(rows) > 1]
        for rows in shared:
            out[rows] = self._shared_prompt_logits([ids[i] for i in rows], n_prompt[rows[0]])
        done = {i for rows in shared for i in rows}
        self._batched_logits(ids, [i for i in range(len(ids)) if i not in done], out, progress)
        return out

    def _shared_prompt_logits(self, ids: list[list[int]], n_prompt: int) -> torch.Tensor:
        """(k, num_labels) for k conversations sharing their first ``n_prompt`` ids: the prompt runs once
        (no padding), its cache is expanded k times, the right-padded completions run on top; the head
        reads each row's last real token (the sequence classifier's own pooling over the ids it is given)."""
        from transformers import DynamicCache

        device = self.device
        prompt = torch.tensor([ids[0][:n_prompt]], device=device)
        tail_ids, tail_mask = pad_completions([row[n_prompt:] for row in ids], self.tokenizer.pad_token_id)
        mask = torch.cat([torch.ones((len(ids), n_prompt), dtype=torch.long), tail_mask.long()], dim=1)
        cache = DynamicCache()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            self.model.base_model(input_ids=prompt, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(ids))
            logits = self.model(input_ids=tail_ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                                use_cache=True).logits
        return logits.float().cpu()

    def _batched_logits(self, ids: list[list[int]], rows: list[int], out: torch.Tensor, progress: bool) -> None:
        """Fill ``out[rows]``: batches sorted by length, each padded (right) to its own longest."""
        order = sorted(rows, key=lambda i: len(ids[i]), reverse=True)
        pad = self.tokenizer.pad_token_id
        batches = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="scoring", unit="batch")
        for start in batches:
            idx = order[start:start + self.batch_size]
            width = len(ids[idx[0]])
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[idx] = logits.float().cpu()

    def score(self, prompts: Sequence[Sequence[Message]], completions: Sequence[str], progress: bool = False
              ) -> RewardScores:
        logits = self.logits(prompts, completions, progress)
        if self.kind == "scalar":
            mean = logits.squeeze(-1)
            return RewardScores(mean, torch.zeros_like(mean))
        return RewardScores(*distribution_moments(logits))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _distributional_trainer_cls():
    """Built lazily: importing trl takes seconds, and scoring does not need it."""
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class DistributionCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            if "chosen_dist" in examples[0]:
                dists = [e["chosen_dist"] for e in examples] + [e["rejected_dist"] for e in examples]
                batch["target_dist"] = torch.tensor(dists, dtype=torch.float32)
            return batch

    class DistributionalRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer with a 10-bin head: loss = KL to rating distributions and/or -log P(w > l)."""

        def __init__(self, *args, loss: str = "both", kl_weight: float = 1.0, pairwise_weight: float = 1.0, **kw):
            self.dist_loss, self.kl_weight, self.pairwise_weight = loss, kl_weight, pairwise_weight
            # RewardTrainer insists on num_labels == 1 (its loss is scalar). Ours is not: present 1 label
            # for the check only. The score layer keeps its 10 outputs either way.
            config = kw["model"].config
            id2label = config.id2label
            config.num_labels = 1
            try:
                super().__init__(*args, **kw)
            finally:
                config.id2label = id2label  # num_labels is derived from id2label

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "chosen_dist", "rejected_dist"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            target = inputs.pop("target_dist", None)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            logits_w, logits_l = torch.chunk(outputs.logits, 2)
            terms = {}
            if self.dist_loss in ("kl", "both"):
                terms["kl"] = distribution_kl_loss(outputs.logits, target.to(outputs.logits.device))
            if self.dist_loss in ("pairwise", "both"):
                terms["pairwise"] = pairwise_distribution_loss(logits_w, logits_l)
            weights = {"kl": self.kl_weight, "pairwise": self.pairwise_weight} if self.dist_loss == "both" else {}
            loss = sum(weights.get(k, 1.0) * v for k, v in terms.items())
            with torch.no_grad():
                mean_w, _, _ = distribution_moments(logits_w)
                mean_l, _, _ = distribution_moments(logits_l)
                self._metrics[mode]["accuracy"].append((mean_w > mean_l).float().mean().item())
                self._metrics[mode]["margin"].append((mean_w - mean_l).mean().item())
                for k, v in terms.items():
                    self._metrics[mode][f"loss_{k}"].append(v.item())
            return (loss, outputs) if return_outputs else loss

    return DistributionalRewardTrainer, DistributionCollator


def _training_dataset(config: RewardModelConfig, tokenizer, pairs: PairData):
    from datasets import Dataset

    columns: dict[str, Any] = {
        "chosen_ids": encode_conversations(tokenizer, pairs.prompts, pairs.chosen, config.max_length),
        "rejected_ids": encode_conversations(tokenizer, pairs.prompts, pairs.rejected, config.max_length),
    }
    if config.kind == "scalar" and config.margin == "rating_diff":
        if not pairs.has_ratings:
            raise RewardModelError("margin='rating_diff' needs ratings, and this data set has none")
        columns["margin"] = [config.margin_scale * (c - r) for c, r in
                             zip(pairs.chosen_rating, pairs.rejected_rating, strict=True)]
    if config.kind == "distributional":
        if config.loss in ("kl", "both") and not pairs.has_ratings:
            raise RewardModelError(f"loss='{config.loss}' needs rating distributions, and this data set has no "
                                   "ratings: use loss=pairwise")
        if pairs.has_ratings:
            columns["chosen_dist"], columns["rejected_dist"] = pairs.chosen_dist, pairs.rejected_dist
        else:
            columns["chosen_dist"] = columns["rejected_dist"] = [[0.0] * N_BINS] * len(pairs)
    return Dataset.from_dict(columns)


def _resolve_data(config: RewardModelConfig, runs_root: str | Path) -> Path:
    if config.data is None:
        return run_data_stage(DataConfig(), runs_root=runs_root).out_dir
    require_stage_output(config.data, "data", RewardModelError, "data (--data)")  # complete and intact
    return Path(config.data)


def reward_stage_key(config: RewardModelConfig, data_dir: str | Path) -> str:
    data_manifest = read_manifest(data_dir) or {}
    files = json.dumps(data_manifest.get("files", {}), sort_keys=True)
    exclude = {"data", "checkpoint_every", "checkpoint_every_s"}
    if config.ensemble == 1:  # one reward model: the key it had before ensembles existed
        exclude |= {"ensemble", "bootstrap"}
    exclude |= {name for name in ("data_seed", "resample") if getattr(config, name) is None}
    cfg = config.model_dump(mode="json", exclude=exclude)
    schema = "rm-schema=2" if config.ensemble == 1 else "rm-schema=2;rm-ensemble-schema=1"
    return sha256_text(json.dumps(cfg, sort_keys=True) + files + schema)


def plan_reward_model(config: RewardModelConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/rm/<kind>-<key[:12]>``, or ``<runs_dir>/rm/<kind>-ensemble<N>-<key[:12]>``
    for an ensemble (``config.data`` must be set)."""
    if config.data is None:
        raise RewardModelError("plan_reward_model: config.data is not set")
    key = reward_stage_key(config, config.data)
    name = config.kind if config.ensemble == 1 else f"{config.kind}-ensemble{config.ensemble}"
    out = stage_folder(runs_dir, "rm", key, name)
    return StagePlan(key, out, out)


def training_pairs(config: RewardModelConfig, data_dir: str | Path) -> PairData:
    """The pairs a reward model trains on: the data stage's train split, its seeded ``max_train_pairs`` subset
    (seed ``data_seed``, else ``seed``), then (``resample``) a seeded resample with replacement of as many pairs."""
    subset_seed = config.seed if config.data_seed is None else config.data_seed
    train = PairData.load(Path(data_dir) / "train.parquet", config.max_train_pairs, subset_seed)
    if config.resample is not None and len(train):
        index = np.random.default_rng(config.resample).integers(0, len(train), len(train))
        train = PairData(*([getattr(train, f)[i] for i in index] for f in PairData.__dataclass_fields__))
    return train


@contextlib.contextmanager
def _scratch_directory():
    with tempfile.TemporaryDirectory(prefix="rm-rank-") as tmp:
        yield Path(tmp)


@exclusive_stage
@records_footprint
def run_reward_stage(config: RewardModelConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                     runs_root: str | Path = "runs", progress: Callable[[int, int], None] | None = None
                     ) -> StageResult:
    """Train a reward model on a data stage's train split, evaluate it on validation, save it all.

    Writes a ``save_pretrained`` folder (model + tokenizer) with ``metrics.json``, ``train_log.jsonl``,
    plots and ``manifest.json`` (last). Reuses an existing complete output with the same key. One reward
    model: ``ensemble > 1`` is :func:`alignment.rewards.ensemble.train_reward_model`'s (N members in one folder).
    """
    if config.ensemble > 1:
        raise RewardModelError(f"ensemble={config.ensemble} trains several reward models: call "
                               "alignment.rewards.ensemble.train_reward_model (what `align rm` and the pipeline do)")
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    data_dir = _resolve_data(config, runs_root)
    plan = plan_reward_model(config.model_copy(update={"data": str(data_dir)}), runs_root)
    key, out = plan.key, Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, key, RewardModelError, stage="reward_model", overwrite=overwrite,
                      inputs=[data_dir, *local_paths(config.model_dump(mode="json"))], runs_root=runs_root) is not None:
        log.info("reward model already trained in %s (same config and data): reusing it", out)
        return StageResult(out, json.loads((out / "metrics.json").read_text()), reused=True)

    # 1. Data: the data stage's splits (optionally a seeded subset of train).
    require_model_source(config.model, RewardModelError, "model (--model)")  # before any model is loaded
    set_seed(config.seed)
    device = resolve_device(config.device)
    train = training_pairs(config, data_dir)
    val = PairData.load(data_dir / "validation.parquet")
    if config.max_eval_pairs is not None:
        val = val.head(config.max_eval_pairs)
    if len(train) == 0:
        raise RewardModelError(f"{data_dir}/train.parquet holds no pairs")

    # 2. Model: sequence classifier with 1 or 10 labels, pad token distinct from EOS.
    try:
        model, tokenizer = load_sequence_classifier(config.model, config.num_labels)
    except (ModelSourceError, DeviceError) as exc:
        raise RewardModelError(str(exc)) from exc
    tag_reward_model(model.config, config.kind, tokenizer, config.max_length)
    if config.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)

    # 3. Tokenise once (prompt cut from the left at max_length, response kept).
    train_ds = _training_dataset(config, tokenizer, train)

    # 4. Train with TRL (RewardTrainer, or its distributional subclass).
    bf16 = bf16_enabled(config.bf16, device)
    peft_config = None
    if config.lora:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha,
                                 lora_dropout=config.lora_dropout, target_modules="all-linear")
    # Log often enough that even a short run records how its loss moved (first and last logged values).
    steps = max(1, int(len(train) / (config.batch_size * config.gradient_accumulation_steps) * config.epochs))
    logging_steps = max(1, min(config.logging_steps, steps // 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Under a multi-process launcher (accelerate launch / torchrun: WORLD_SIZE > 1) the Trainer runs
    # data parallel; only the first process saves, evaluates and writes the folder, the others train
    # in a scratch folder and return once training is done.
    world, rank = launched_world_size(), launched_rank()
    # Checkpoints go to a folder of their own beside the output (it outlives a killed run); a re-run
    # resumes from the newest intact one (alignment.checkpoints).
    checkpoints = checkpoint_folder(out)
    resume_from = resume_point(checkpoints, key, clean=rank == 0) if config.checkpoint_every else None
    timed = config.checkpoint_every_s if config.checkpoint_every else 0.0  # by time too (none without checkpoints)
    writer = atomic_directory(out) if rank == 0 else _scratch_directory()
    with writer as tmp:
        args = RewardConfig(
            **trainer_checkpoint_args(checkpoints, config.checkpoint_every), num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate, weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio,  # < 1: a ratio
            lr_scheduler_type="linear", seed=config.seed, data_seed=config.seed, bf16=bf16,
            activation_checkpointing=config.gradient_checkpointing, max_length=config.max_length,
            center_rewards_coefficient=config.center_rewards_coefficient if config.kind == "scalar" else None,
            logging_steps=logging_steps, report_to=tracking.report_to(), use_cpu=device.type == "cpu",
            dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        )
        common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                      peft_config=peft_config,
                      callbacks=trainer_callbacks(progress, timed, f"reward model ({config.kind}): optimizer steps"))
        if config.kind == "scalar":
            trainer = RewardTrainer(**common)
        else:
            trainer_cls, collator_cls = _distributional_trainer_cls()
            trainer = trainer_cls(**common, loss=config.loss, kl_weight=config.kl_weight,
                                  pairwise_weight=config.pairwise_weight,
                                  data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id))
        quiet_trainer(trainer)  # its own bar and printed log dicts off the console
        start = time.perf_counter()
        with refusing_pickles(resume_from, RewardModelError):  # a checkpoint file that would run code: one line
            train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.perf_counter() - start
        history = [h for h in trainer.state.log_history if "loss" in h]
        if rank != 0:
            return StageResult(out, {}, reused=False)

        # 5. Save a plain transformers folder (LoRA merged), tagged with kind and tokenizer.
        final = trainer.model
        if config.lora:
            final = final.merge_and_unload()
        tag_reward_model(final.config, config.kind, tokenizer, config.max_length)
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        # 6. Evaluate on the validation split with the same scorer later stages use.
        scorer = RewardScorer(final.eval(), tokenizer, kind=config.kind, batch_size=config.eval_batch_size,
                              max_length=config.max_length, bf16=bf16)
        metrics = evaluate_reward_model(scorer, val, plot_dir=tmp)
        n_steps = train_out.global_step
        metrics["train"] = {
            "pairs": len(train), "epochs": config.epochs, "steps": n_steps, "seconds": round(train_seconds, 1),
            "pairs_per_second": round(len(train) * config.epochs / train_seconds, 3),
            "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
            "train_loss": train_out.training_loss, "bf16": bf16, "lora": config.lora, "device": str(device),
            "processes": world,
        }
        write_json(tmp / "metrics.json", metrics)
        with open(tmp / "train_log.jsonl", "w") as fh:
            for h in trainer.state.log_history:
                fh.write(json.dumps(h) + "\n")
        check_output(tmp, "reward_model", out, {"metrics.json": metrics})  # diverged: no manifest, one line
        write_json(tmp / MANIFEST, {
            "stage": "reward_model", "kind": config.kind, "stage_key": key, "config": config.model_dump(mode="json"),
            "data": str(data_dir), "data_manifest_sha256": sha256_file(data_dir / MANIFEST),
            "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))},
        })
    remove_checkpoints(checkpoints)  # the output is complete: its checkpoints are spent
    log.info("reward model (%s) saved to %s: validation accuracy %.3f", config.kind, out, metrics["accuracy"])
    return StageResult(out, metrics)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = 10
                               ) -> tuple[float, list[dict[str, float]]]:
    """ECE = sum_b (n_b / N) |mean(outcome_b) - mean(confidence_b)| over equal-width bins of [0, 1]."""
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    ece, table = 0.0, []
    for b in range(n_bins):
        sel = bins == b
        if not sel.any():
            continue
        conf, acc = float(confidence[sel].mean()), float(outcome[sel].mean())
        ece += sel.mean() * abs(acc - conf)
        table.append({"bin": b, "n": int(sel.sum()), "confidence": conf, "frequency": acc})
    return float(ece), table


def evaluate_reward_model(scorer: RewardScorer, pairs: PairData, plot_dir: str | Path | None = None
                          ) -> dict[str, Any]:
    """Pairwise accuracy, margin and (distributional) P(w > l) accuracy, KL/NLL and calibration.

    Also RewardBench's length view: ``length_split`` (accuracy with a 95% Wilson interval on the pairs
    whose chosen answer is longer / shorter / as long as the rejected one, lengths in characters), and
    its two headline numbers as flat floats for trackers, ``accuracy_chosen_longer`` and
    ``accuracy_chosen_shorter`` (None when no pair is in the group).
    """
    if len(pairs) == 0:
        raise RewardModelError("no validation pairs to evaluate on")
    lw = scorer.logits(pairs.prompts, pairs.chosen)
    ll = scorer.logits(pairs.prompts, pairs.rejected)
    metrics: dict[str, Any] = {"kind": scorer.kind, "n_pairs": len(pairs)}
    if scorer.kind == "scalar":
        rw, rl = lw.squeeze(-1), ll.squeeze(-1)
    else:
        rw, _, pw = distribution_moments(lw)
        rl, _, pl = distribution_moments(ll)
        p_win = log_preference_probability(lw, ll).exp()
        p_lose = log_preference_probability(ll, lw).exp()
        metrics["accuracy_prob"] = float((p_win > 0.5).float().mean())
        metrics["mean_p_win"] = float(p_win.mean())
        # Calibration over both orientations: (P(w > l), 1) and (P(l > w), 0).
        conf = torch.cat([p_win, p_lose]).numpy()
        outcome = np.concatenate([np.ones(len(pairs)), np.zeros(len(pairs))])
        metrics["ece"], metrics["reliability"] = expected_calibration_error(conf, outcome)
        if pairs.has_ratings:
            target = torch.tensor(pairs.chosen_dist + pairs.rejected_dist, dtype=torch.float32)
            logits = torch.cat([lw, ll])
            metrics["kl_to_ratings"] = float(distribution_kl_loss(logits, target))
            # NLL of the data's rating under the prediction, with the target's mass spread over bins.
            metrics["nll_ratings"] = float(-(target * F.log_softmax(logits, -1)).sum(-1).mean())
            true_mean = (target * RATINGS).sum(-1)
            metrics["mean_abs_error_rating"] = float((torch.cat([rw, rl]) - true_mean).abs().mean())
    diff = rw - rl
    metrics["accuracy"] = float((diff > 0).float().mean())
    metrics["mean_margin"] = float(diff.mean())
    metrics["mean_reward_chosen"] = float(rw.mean())
    metrics["mean_reward_rejected"] = float(rl.mean())
    split = length_split((diff > 0).tolist(), [len(c) for c in pairs.chosen], [len(r) for r in pairs.rejected])
    metrics["length_split"], metrics["length_split_unit"] = split, "characters"
    metrics["accuracy_chosen_longer"] = split["chosen_longer"]["accuracy"]
    metrics["accuracy_chosen_shorter"] = split["chosen_shorter"]["accuracy"]
    if plot_dir is not None:
        _plot(rw.numpy(), rl.numpy(), metrics, Path(plot_dir))
    return metrics


def _plot(rw: np.ndarray, rl: np.ndarray, metrics: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if metrics["kind"] == "distributional" else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    bins = np.linspace(min(rw.min(), rl.min()), max(rw.max(), rl.max()) + 1e-6, 30)
    ax.hist(rw, bins=bins, alpha=0.6, label="chosen")
    ax.hist(rl, bins=bins, alpha=0.6, label="rejected")
    ax.set_xlabel("reward" if metrics["kind"] == "scalar" else "E[rating]")
    ax.set_ylabel("pairs")
    ax.set_title(f"{metrics['kind']} RM, validation accuracy {metrics['accuracy']:.3f}")
    ax.legend()
    if panels == 2:
        ax = axes[0, 1]
        table = metrics["reliability"]
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
        ax.plot([t["confidence"] for t in table], [t["frequency"] for t in table], "o-", label="model")
        ax.set_xlabel("predicted P(first preferred)")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"reliability, ECE {metrics['ece']:.3f}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "reward_eval.png", dpi=110)
    plt.close(fig)

