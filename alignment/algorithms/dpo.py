"""DPO, the offline baseline: TRL's ``DPOTrainer`` on the data stage's pairs (Rafailov et al. 2023).

    L = -log sigma(beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

with the starting model as the frozen reference (with LoRA: the same model with its adapters off).
The pairs are given to TRL in its conversational form, so it applies the model's chat template; the
output is a plain transformers policy folder like the online algorithms' ``final/``, so the scoring
stage and the judge read it the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

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
from alignment.data import PairData
from alignment.finite import check_output
from alignment.footprint import records_footprint
from alignment.hardware import bf16_enabled, resolve_device
from alignment.inputs import require_model_source, require_stage_output
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, load_causal_lm
from alignment.ownership import local_paths
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)


class DPOError(ValueError):
    """The DPO stage cannot run as configured (the message says why)."""


class DPOStageConfig(StageConfig):
    """DPO of the policy on preference pairs, the starting model as reference."""

    section: str = "dpo"
    policy: str = Field(DEFAULT_MODEL, description="Starting policy (and reference): hub id, local folder or .gguf.")
    data: str | None = Field(None, description="Folder written by `align data` (its train pairs; filled in by the "
                             "pipeline).")
    beta: float = Field(0.1, gt=0.0, description="Strength of the implicit KL to the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="sigmoid = DPO.")
    max_length: int = Field(512, ge=32, description="Tokens per prompt + answer.")
    max_train_pairs: int | None = Field(None, ge=1, description="Train on a seeded subset of this many pairs.")
    epochs: Epochs = 1.0
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-6, gt=0.0)
    logging_steps: int = Field(5, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every N optimizer steps; "
                                  "re-running the same command continues from the newest intact one. 0: none. "
                                  "Not part of the stage key.")
    checkpoint_every_s: float = Field(600.0, ge=0.0, description="Also checkpoint once this many seconds have passed "
                                      "since the last checkpoint (whichever comes first); 0: by steps only. "
                                      "Not part of the stage key.")
    seed: Seed = 0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def dpo_stage_key(config: DPOStageConfig) -> str:
    data = (read_manifest(config.data) if config.data else None) or {}
    cfg = config.model_dump(mode="json", exclude={"data", "checkpoint_every", "checkpoint_every_s"})
    return sha256_text(json.dumps([cfg, data.get("stage_key"), "dpo-schema=1"], sort_keys=True))


def plan_dpo(config: DPOStageConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/dpo/<key[:12]>`` (a policy folder)."""
    key = dpo_stage_key(config)
    out = stage_folder(runs_dir, "dpo", key)
    return StagePlan(key, out, out)


def preference_dataset(pairs: PairData):
    """The pairs in TRL's conversational preference form: prompt messages, one assistant turn each."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": pairs.prompts,
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs.chosen],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs.rejected],
    })


@exclusive_stage
@records_footprint
def run_dpo_stage(config: DPOStageConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                  runs_root: str | Path = "runs", progress: Callable[[int, int], None] | None = None) -> StageResult:
    """Train with DPO on the data stage's train pairs; write a policy folder with metrics and manifest.
    Checkpoints every ``checkpoint_every`` steps; a re-run resumes. ``progress(step, steps)`` after each step."""
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    require_stage_output(config.data, "data", DPOError, "dpo: data (--data)")  # complete and intact
    plan = plan_dpo(config, runs_root)
    out = Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, plan.key, DPOError, stage="dpo", overwrite=overwrite,
                      inputs=local_paths(config.model_dump(mode="json")), runs_root=runs_root) is not None:
        return StageResult(out, json.loads((out / "metrics.json").read_text()), reused=True)
    require_model_source(config.policy, DPOError, "dpo: policy (--policy)")  # before any model is loaded
    set_seed(config.seed)
    device = resolve_device(config.device)
    pairs = PairData.load(Path(config.data) / "train.parquet", config.max_train_pairs, config.seed)
    if len(pairs) == 0:
        raise DPOError(f"{config.data}/train.parquet holds no pairs")
    model, tokenizer = load_causal_lm(config.policy, device=device)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                                 target_modules="all-linear")
    bf16 = bf16_enabled(config.bf16, device)
    checkpoints = checkpoint_folder(out)  # beside the output, outliving a kill (alignment.checkpoints)
    resume_from = resume_point(checkpoints, plan.key) if config.checkpoint_every else None
    timed = config.checkpoint_every_s if config.checkpoint_every else 0.0  # by time too (none without checkpoints)
    with atomic_directory(out) as tmp:
        args = DPOConfig(
            **trainer_checkpoint_args(checkpoints, config.checkpoint_every), beta=config.beta, loss_type=[config.loss_type],
            max_length=config.max_length, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
            logging_steps=config.logging_steps, report_to=tracking.report_to(), seed=config.seed,
            data_seed=config.seed, bf16=bf16, use_cpu=device.type == "cpu",
            activation_checkpointing=config.gradient_checkpointing, dataloader_num_workers=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=preference_dataset(pairs),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=trainer_callbacks(progress, timed, "DPO: optimizer steps"))
        quiet_trainer(trainer)  # its own bar and printed log dicts off the console
        start = time.perf_counter()
        with refusing_pickles(resume_from, DPOError):  # a checkpoint file that would run code: one line
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        seconds = time.perf_counter() - start
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = trainer.model.merge_and_unload() if config.lora else trainer.model
        final.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        metrics = {
            "pairs": len(pairs), "epochs": config.epochs, "steps": result.global_step, "seconds": round(seconds, 1),
            "pairs_per_second": round(len(pairs) * config.epochs / seconds, 3), "train_loss": result.training_loss,
            "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
            "final_reward_accuracy": history[-1].get("rewards/accuracies") if history else None,
            "final_reward_margin": history[-1].get("rewards/margins") if history else None, "bf16": bf16,
        }
        write_json(tmp / "metrics.json", metrics)
        with open(tmp / "train_log.jsonl", "w") as fh:
            for h in trainer.state.log_history:
                fh.write(json.dumps(h) + "\n")
        check_output(tmp, "dpo", out, {"metrics.json": metrics})  # diverged: no manifest, one line
        write_json(tmp / MANIFEST, {
            "stage": "dpo", "stage_key": plan.key, "config": config.model_dump(mode="json"),
            "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.glob("*.safetensors"))}})
    remove_checkpoints(checkpoints)  # the output is complete: its checkpoints are spent
    log.info("dpo: %d pairs, loss %s -> %s in %.0f s; policy in %s", len(pairs), metrics["first_loss"],
             metrics["final_loss"], seconds, out)
    return StageResult(out, metrics)
