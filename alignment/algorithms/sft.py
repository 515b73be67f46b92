"""Supervised fine-tuning on reference summaries (the first step of the TL;DR pipeline), with ROUGE.

The policy learns to continue a post with its human summary: TRL's ``SFTTrainer`` on prompt /
completion pairs with the loss on the completion tokens only (``completion_only_loss``; TRL masks the
prompt's labels to -100 and appends EOS to a plain-text completion). Two prompt forms:

* ``plain`` (the seed documents'): the post text as it is, ending in "TL;DR:", continued by " " + summary;
* ``chat``: the post as a user message through the chat template, the summary as the assistant's turn.

Prompts are cut from the left to ``max_prompt_length`` tokens (the end, "TL;DR:", stays), references
to ``max_completion_length``. Evaluation, before and after training, on ``eval_posts`` held-out posts
(a seeded split by post): greedy summaries scored with ROUGE-1/2/L F (``rouge-score``, stemmed)
against the references, each mean with a 95% bootstrap interval, the paired gain after - before with
its interval, and length statistics; where the source has another model's summaries (the shared
file's 1.3B PPO ones) they are scored by the same ROUGE as a reference point. Checkpoints and resume
as every Trainer-based stage (``alignment.checkpoints``); the output is a plain policy folder (LoRA
merged) that the reward-model and RL stages can start from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

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
from alignment.data import SummaryData, read_summaries
from alignment.evaluation.evaluate import paired_rouge_gain, rouge_scores, rouge_summary
from alignment.finite import check_output
from alignment.footprint import records_footprint
from alignment.generation import (
    SamplingConfig,
    completion_mask,
    completion_tokens,
    decode_completions,
    encode_prompts,
    encode_texts,
    generate,
)
from alignment.hardware import bf16_enabled, resolve_device
from alignment.inputs import require_model_source
from alignment.io import MANIFEST, atomic_directory, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, load_causal_lm
from alignment.ownership import local_paths
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)


class SFTError(ValueError):
    """The SFT stage cannot run as configured (the message says why)."""


class SFTConfig(StageConfig):
    """Supervised fine-tuning of the policy on posts and their reference summaries."""

    section: str = "sft"
    policy: str = Field(DEFAULT_MODEL, description="Starting policy: hub id, local folder or .gguf file.")
    source: str = Field("CarperAI/openai_summarize_tldr", description="Posts with reference summaries: a .jsonl/"
                        ".json/.parquet/.csv file (prompt, reference[, policy_summary, id]) or a hub dataset "
                        "(prompt, label), e.g. ../shared/data/tldr-rlaif/summaries.jsonl.")
    split: str | None = Field(None, description="Hub split (default: the dataset's train split).")
    on_bad_rows: Literal["error", "skip"] = "error"
    prompt_format: Literal["plain", "chat"] = Field("plain", description="plain: the post text continued after "
                                                    "'TL;DR:'; chat: the post as a user message (chat template).")
    eval_posts: int = Field(64, ge=1, description="Held-out posts (a seeded split) for ROUGE before and after.")
    max_train_posts: int | None = Field(None, ge=1, description="Train on a seeded subset of this many posts.")
    max_prompt_length: int = Field(512, ge=16, description="Prompt tokens; longer posts are cut from the left.")
    max_completion_length: int = Field(64, ge=4, description="Reference tokens trained on (longer ones are cut).")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per summary in the evaluation (greedy).")
    epochs: Epochs = 1.0
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lora: bool = Field(False, description="Train LoRA adapters (merged into the saved model).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every N optimizer steps; "
                                  "re-running the same command continues from the newest intact one. 0: none. "
                                  "Not part of the stage key.")
    checkpoint_every_s: float = Field(600.0, ge=0.0, description="Also checkpoint once this many seconds have passed "
                                      "since the last checkpoint (whichever comes first); 0: by steps only. "
                                      "Not part of the stage key.")
    eval_batch_size: int = Field(16, ge=1)
    seed: Seed = 0
    bf16: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


# --------------------------------------------------------------------------------------------
# Stage key and folder
# --------------------------------------------------------------------------------------------
def sft_stage_key(config: SFTConfig, data: SummaryData) -> str:
    cfg = config.model_dump(mode="json", exclude={"checkpoint_every", "checkpoint_every_s", "on_bad_rows"})
    return sha256_text(json.dumps([cfg, data.sha256, "sft-schema=1"], sort_keys=True))


def plan_sft(config: SFTConfig, runs_dir: str | Path = "runs", data: SummaryData | None = None) -> StagePlan:
    """Key and default folder ``<runs_dir>/sft/<format>-<key[:12]>`` (a policy folder)."""
    data = data if data is not None else read_summaries(config.source, config.split, config.on_bad_rows)
    key = sft_stage_key(config, data)
    out = stage_folder(runs_dir, "sft", key, config.prompt_format)
    return StagePlan(key, out, out)


# --------------------------------------------------------------------------------------------
# Prompts and the training set
# --------------------------------------------------------------------------------------------
def cut_left(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` keeping only its last ``max_tokens`` tokens (the post's start goes, its "TL;DR:" stays)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def cut_right(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def training_records(data: SummaryData, tokenizer, config: SFTConfig) -> list[dict[str, Any]]:
    """TRL prompt / completion records: plain text (" " + summary, TRL appends EOS) or chat messages."""
    records = []
    for prompt, reference in zip(data.prompts, data.references, strict=True):
        prompt = cut_left(tokenizer, prompt, config.max_prompt_length)
        reference = cut_right(tokenizer, reference, config.max_completion_length)
        if config.prompt_format == "plain":
            records.append({"prompt": prompt, "completion": " " + reference})
        else:
            records.append({"prompt": [{"role": "user", "content": prompt}],
                            "completion": [{"role": "assistant", "content": reference}]})
    return records


# --------------------------------------------------------------------------------------------
# Evaluation: greedy summaries of held-out posts, ROUGE against the references
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def summarise(model, tokenizer, prompts: Sequence[str], config: SFTConfig, *, bf16: bool = False) -> list[str]:
    """Greedy summaries of ``prompts`` in batches (plain text or chat form, as the config says)."""
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, greedy=True)
    out: list[str] = []
    for s in range(0, len(prompts), config.eval_batch_size):
        chunk = list(prompts[s:s + config.eval_batch_size])
        if config.prompt_format == "plain":
            batch = encode_texts(tokenizer, chunk, config.max_prompt_length)
        else:
            batch = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in chunk],
                                   config.max_prompt_length)
        completion = generate(model, tokenizer, batch, sampling, bf16=bf16)
        tokens = completion_tokens(completion, completion_mask(completion, tokenizer.eos_token_id))
        out += [t.strip() for t in decode_completions(tokenizer, tokens)]
    return out


def length_stats(texts: Sequence[str | None]) -> dict[str, float] | None:
    words = [len(t.split()) for t in texts if t is not None]
    if not words:
        return None
    return {"mean_words": float(np.mean(words)), "median_words": float(np.median(words)),
            "empty": int(sum(w == 0 for w in words))}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
@exclusive_stage
@records_footprint
def run_sft_stage(config: SFTConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                  runs_root: str | Path = "runs", progress: Callable[[int, int], None] | None = None) -> StageResult:
    """Fine-tune on reference summaries, evaluate with ROUGE before and after, write a policy folder
    (metrics.json, samples.jsonl, train_log.jsonl, manifest). Resumes from its checkpoints."""
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    data = read_summaries(config.source, config.split, config.on_bad_rows)
    plan = plan_sft(config, runs_root, data)
    out = Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, plan.key, SFTError, stage="sft", overwrite=overwrite,
                      inputs=local_paths(config.model_dump(mode="json")), runs_root=runs_root) is not None:
        return StageResult(out, json.loads((out / "metrics.json").read_text()), reused=True)

    # 1. Data: held-out posts for the evaluation, the rest (optionally a seeded subset) for training.
    require_model_source(config.policy, SFTError, "sft: policy (--policy)")  # before any model is loaded
    set_seed(config.seed)
    train, held = data.split(config.eval_posts, config.seed)
    if config.max_train_posts is not None and config.max_train_posts < len(train):
        train = train.subset(np.random.default_rng(config.seed).permutation(len(train))[:config.max_train_posts])
    device = resolve_device(config.device)
    bf16 = bf16_enabled(config.bf16, device)
    model, tokenizer = load_causal_lm(config.policy, device=device, padding_side="left")

    # 2. Before: the starting policy's summaries of the held-out posts.
    start = time.perf_counter()
    before_texts = summarise(model, tokenizer, held.prompts, config, bf16=bf16)
    before = rouge_scores(before_texts, held.references)
    eval_seconds = time.perf_counter() - start
    log.info("sft: ROUGE-L before %.4f on %d held-out posts", before["rougeL"].mean(), len(held))

    # 3. Train (TRL SFTTrainer, loss on the completion only), resuming from the newest intact checkpoint.
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                                 lora_dropout=config.lora_dropout, target_modules="all-linear")
    checkpoints = checkpoint_folder(out)
    resume_from = resume_point(checkpoints, plan.key) if config.checkpoint_every else None
    timed = config.checkpoint_every_s if config.checkpoint_every else 0.0  # by time too (none without checkpoints)
    from datasets import Dataset

    with atomic_directory(out) as tmp:
        args = TRLSFTConfig(
            **trainer_checkpoint_args(checkpoints, config.checkpoint_every), num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio, lr_scheduler_type="linear",
            max_length=config.max_prompt_length + config.max_completion_length + 32, completion_only_loss=True,
            logging_steps=config.logging_steps, logging_first_step=True, report_to=tracking.report_to(), seed=config.seed,
            data_seed=config.seed, bf16=bf16, use_cpu=device.type == "cpu",
            activation_checkpointing=config.gradient_checkpointing, dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(training_records(train, tokenizer, config)),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=trainer_callbacks(progress, timed, "SFT: optimizer steps"))
        quiet_trainer(trainer)  # its own bar and printed log dicts off the console
        start = time.perf_counter()
        with refusing_pickles(resume_from, SFTError):  # a checkpoint file that would run code: one line
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.perf_counter() - start
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = trainer.model.merge_and_unload() if config.lora else trainer.model
        final.eval()

        # 4. After: the tuned policy on the same posts; the source's other summaries as a reference point.
        after_texts = summarise(final, tokenizer, held.prompts, config, bf16=bf16)
        after = rouge_scores(after_texts, held.references)
        others = [(o, r) for o, r in zip(held.policy_summaries, held.references, strict=True) if o is not None]
        reference_policy = rouge_summary(rouge_scores(*zip(*others, strict=True))) if others else None
        metrics = {
            "posts": {"train": len(train), "held_out": len(held)}, "prompt_format": config.prompt_format,
            "train": {"epochs": config.epochs, "steps": result.global_step, "seconds": round(train_seconds, 1),
                      "examples_per_second": round(len(train) * config.epochs / train_seconds, 3),
                      "first_loss": history[0]["loss"] if history else None,
                      "final_loss": history[-1]["loss"] if history else None, "train_loss": result.training_loss,
                      "bf16": bf16, "lora": config.lora, "device": str(device)},
            "rouge_before": rouge_summary(before), "rouge_after": rouge_summary(after),
            "rouge_gain": paired_rouge_gain(after, before),
            "rouge_source_summaries": reference_policy,  # e.g. the 1.3B PPO model's summaries of the same posts
            "lengths": {"reference": length_stats(held.references), "before": length_stats(before_texts),
                        "after": length_stats(after_texts), "source_summaries": length_stats(held.policy_summaries)},
            "eval_seconds_before": round(eval_seconds, 1),
        }
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "metrics.json", metrics)
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
            for i in range(len(held)):
                fh.write(json.dumps({"id": held.ids[i], "post_end": held.prompts[i][-300:],
                                     "reference": held.references[i], "before": before_texts[i],
                                     "after": after_texts[i], "source_summary": held.policy_summaries[i],
                                     "rougeL_before": float(before["rougeL"][i]),
                                     "rougeL_after": float(after["rougeL"][i])}, ensure_ascii=False) + "\n")
        with open(tmp / "train_log.jsonl", "w", encoding="utf-8") as fh:
            for h in trainer.state.log_history:
                fh.write(json.dumps(h) + "\n")
        check_output(tmp, "sft", out, {"metrics.json": metrics})  # diverged: no manifest, one line
        write_json(tmp / MANIFEST, {
            "stage": "sft", "stage_key": plan.key, "config": config.model_dump(mode="json"), "source": data.source,
            "source_sha256": data.sha256,
            "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))}})
    remove_checkpoints(checkpoints)  # the output is complete: its checkpoints are spent
    r_before, r_after = metrics["rouge_before"]["rougeL"], metrics["rouge_after"]["rougeL"]
    log.info("sft: %d posts x %s epochs in %.0f s; ROUGE-L %.4f -> %.4f; policy in %s", len(train), config.epochs,
             train_seconds, r_before["mean"], r_after["mean"], out)
    return StageResult(out, metrics)
