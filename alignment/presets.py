"""The one preset table: preset name -> pipeline section -> field overrides over the stage defaults.

``align run --preset NAME`` takes a whole row; ``align <stage> --preset NAME`` takes that stage's
section of the same row (:func:`stage_preset`), so a stage run alone and the same stage inside the
pipeline cannot drift apart (same preset, same config, same stage key, same folder).
"""

from __future__ import annotations

import copy
from typing import Any

# The demo reward models: small subsets so both train on a CPU in minutes, in ~3 GB: gradient
# checkpointing (activations of 16 x 256 tokens: 6.2 -> 2.9 GB peak, ~20% slower) and a frozen
# embedding (no gradient or Adam moments for 28M of the 135M parameters, ~0.35 GB); bench/demo_footprint.py.
# (2 x 4 pairs with gradient accumulation measured no lower in the pipeline: 2.98 / 3.18 GB.)
_DEMO_RM = {"max_length": 256, "max_train_pairs": 64, "max_eval_pairs": 32, "epochs": 1.0, "batch_size": 8,
            "learning_rate": 5e-5, "gradient_checkpointing": True, "freeze_embeddings": True}
_HS2_RM = {"max_length": 1024, "epochs": 1.0, "batch_size": 16, "learning_rate": 2e-5, "gradient_checkpointing": True,
           "device": "cuda"}

# The demo row's reward models at 144 tokens: the demo pairs are ~57 tokens (90% under 80) but three of
# the 178 train pairs run to 195-242, and a batch holding one is padded to it (a ~3x slower step, and the
# stage's peak). 144 holds every demo prompt (<= 69 tokens with the chat template) with a 64-token answer,
# so what the policy's answers are scored on later is never cut (docs/performance.md, the demo pipeline).
_DEMO_RM_SHORT = {**_DEMO_RM, "max_length": 144}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The embedded demo set on a CPU in minutes: small subsets, short generations, the local judge.
    "demo": {
        "data": {"source": "demo"},
        "rm_scalar": {"kind": "scalar", **_DEMO_RM_SHORT},
        "rm_distributional": {"kind": "distributional", **_DEMO_RM_SHORT},
        # LoRA: the KL reference is the adapter-free policy (no second copy), no full-size gradients or Adam
        # moments, the frozen base in bf16 where autocast runs (5.4 GB peak with full fine-tuning).
        "reinforce": {"steps": 8, "batch_size": 4, "max_new_tokens": 32, "max_prompt_length": 256, "lora": True,
                      "learning_rate": 2e-4, "checkpoint_every": 4, "eval_prompts": 8, "eval_every": 4},
        "ppo": {"steps": 8, "batch_size": 4, "max_new_tokens": 32, "max_prompt_length": 256, "learning_rate": 1e-5,
                "checkpoint_every": 4, "eval_prompts": 8, "eval_every": 4, "ppo_epochs": 2, "minibatch_size": 2},
        # `align run options.algorithm=grpo`: batch_size prompts x samples_per_prompt completions a step.
        "grpo": {"steps": 8, "batch_size": 2, "samples_per_prompt": 4, "max_new_tokens": 32, "max_prompt_length": 256,
                 "lora": True, "learning_rate": 2e-4, "checkpoint_every": 4, "eval_prompts": 8, "eval_every": 4},
        "dpo": {"max_length": 256, "max_train_pairs": 64, "epochs": 1.0, "batch_size": 8, "learning_rate": 1e-6},
        "score": {"n_prompts": 16, "max_new_tokens": 64},
        "judge": {"backend": "local", "max_pairs": 16},
    },
    # RL on verifiable tasks, where the truth is checkable: the demo pairs train the scalar RM (a small-weight
    # shaping term) and the distributional RM (never trained against: the independent check); GRPO trains on
    # the embedded demo-verifiable prompts (IFEval-style constraints, arithmetic, capitals) with the gold check
    # as its main reward; scoring measures gold accuracy on the 30 held-out verifiable prompts. Sized for a
    # 2-core CPU (~15 s a step at 4 prompts x 4 samples, 48 new tokens, LoRA r 16).
    "demo-verifiable": {
        "data": {"source": "demo"},
        "prompts": {"source": "demo-verifiable"},
        "rm_scalar": {"kind": "scalar", **_DEMO_RM},
        "rm_distributional": {"kind": "distributional", **_DEMO_RM},
        "grpo": {"steps": 30, "batch_size": 4, "samples_per_prompt": 4, "max_new_tokens": 48, "max_prompt_length": 256,
                 "lora": True, "lora_r": 16, "learning_rate": 2e-4, "kl_beta": 0.0, "guard_min_distinct2": 0.0,
                 "checkpoint_every": 10, "eval_prompts": 30, "eval_every": 10,
                 "rewards": [{"kind": "gold", "weight": 1.0},
                             {"kind": "reward_model", "folder": "@rm_scalar", "weight": 0.1},
                             {"kind": "length", "max_tokens": 48, "buffer": 16, "weight": 0.5}]},
        "score": {"n_prompts": 30, "max_new_tokens": 48},
        "judge": {"backend": "local", "max_pairs": 8},
        "options": {"algorithm": "grpo"},
    },
    # RLVR on reasoning-gym tasks (`align seeds` runs it on seeds 0, 1, 2; docs/rlvr.md): GRPO with the gold
    # check (lenient: a number stated in words counts, the question's expressions masked) and a small format
    # term (one <answer> tag) on tasks where the base model's samples disagree (`align signal`); 328 held-out
    # items from seeds disjoint from the training items. The distributional RM, trained on the demo pairs and
    # never trained against, is the independent check. The scalar RM is not trained (nothing uses it).
    # ~17 min a seed on a 2-core CPU.
    "demo-rlvr": {
        "data": {"source": "demo"},
        "prompts": {"source": "gym:chain_sum:720,basic_arithmetic:720", "validation_fraction": 0.25,
                    "gym_settings": {"chain_sum": {"min_terms": 2, "max_terms": 2, "max_digits": 2},
                                     "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 2,
                                                          "operators": ["+", "-"], "allow_parentheses": False,
                                                          "allow_negation": False}}},
        "rm_distributional": {"kind": "distributional", **_DEMO_RM},
        "grpo": {"steps": 60, "batch_size": 4, "samples_per_prompt": 8, "max_new_tokens": 48, "max_prompt_length": 256,
                 "lora": True, "lora_r": 16, "learning_rate": 2e-4, "kl_beta": 0.0, "guard_min_distinct2": 0.0,
                 "checkpoint_every": 20, "eval_prompts": 32, "eval_every": 20,
                 "rewards": [{"kind": "gold", "lenient": True, "weight": 1.0},
                             {"kind": "format", "weight": 0.2}]},
        "score": {"n_prompts": 360, "max_new_tokens": 48, "batch_size": 32},
        "judge": {"backend": "local", "max_pairs": 8},
        "options": {"algorithm": "grpo", "train_scalar": False},
    },
    # Rounds (`align rounds --preset demo-rounds --n 3`): REINFORCE against the scalar RM alone on the verifiable
    # prompts; each round samples 4 answers to 64 train prompts, the gold check labels the pairs it separates,
    # and the scalar RM is retrained on the demo pairs + every round's. The distributional RM (round 0's, never
    # trained against or labelled with) and gold on the 30 held-out prompts are the independent checks.
    "demo-rounds": {
        "data": {"source": "demo", "max_pairs": 80},
        "prompts": {"source": "demo-verifiable"},
        "rm_scalar": {"kind": "scalar", **_DEMO_RM, "max_train_pairs": None},
        "rm_distributional": {"kind": "distributional", **_DEMO_RM},
        "reinforce": {"steps": 8, "batch_size": 4, "max_new_tokens": 48, "max_prompt_length": 256, "lora": True,
                      "learning_rate": 2e-4, "checkpoint_every": 4, "eval_prompts": 16, "eval_every": 8},
        "score": {"n_prompts": 30, "max_new_tokens": 48},
        "judge": {"backend": "local", "max_pairs": 8},
        "rounds": {"max_rounds": 3, "n_prompts": 64, "samples_per_prompt": 4, "pairing": "random"},
    },
    # The TL;DR pipeline of the seed documents on the shared files (../shared/data/tldr-rlaif, read from the
    # repository root): SFT on reference summaries (chat form, so RL's chat rollouts match it) -> a scalar
    # RM on the 800 AI-judged summary pairs -> REINFORCE from the SFT policy -> scoring (with ROUGE) -> judge.
    # Sized for a 2-core CPU: ~13 min end to end (README); full fine-tuning SFT at 256-token prompts runs
    # ~25 s a step of 8 (micro-batches of 4: 6.4 GB peak against 8.3 GB for one batch of 8; LoRA: 7.8 GB).
    "tldr": {
        "data": {"source": "../shared/data/tldr-rlaif/pairs.jsonl"},
        "sft": {"source": "../shared/data/tldr-rlaif/summaries.jsonl", "prompt_format": "chat",
                "max_train_posts": 64, "eval_posts": 32, "max_prompt_length": 256, "max_completion_length": 48,
                "max_new_tokens": 48, "epochs": 1.0, "batch_size": 4, "gradient_accumulation_steps": 2,
                "learning_rate": 5e-5, "checkpoint_every": 8},
        "rm_scalar": {"kind": "scalar", "max_length": 320, "max_train_pairs": 64, "max_eval_pairs": 48,
                      "epochs": 1.0, "batch_size": 8, "learning_rate": 3e-5, "gradient_checkpointing": True,
                      "freeze_embeddings": True, "checkpoint_every": 8},
        "reinforce": {"steps": 8, "batch_size": 4, "max_new_tokens": 48, "max_prompt_length": 256, "lora": True,
                      "learning_rate": 2e-4, "checkpoint_every": 4, "eval_prompts": 8, "eval_every": 4},
        "score": {"n_prompts": 16, "max_new_tokens": 48, "max_prompt_length": 256,
                  "rouge_references": "../shared/data/tldr-rlaif/summaries.jsonl"},
        "judge": {"backend": "local", "max_pairs": 16, "task": "summary"},
        "options": {"sft": True, "train_distributional": False},
    },
    # HelpSteer2 from the hub at full size: needs a GPU and a Gemini key.
    "helpsteer2": {
        "data": {"source": "esfrankel17/HelpSteer2_binarized", "split": "average_rating_split"},
        "rm_scalar": {"kind": "scalar", **_HS2_RM},
        "rm_distributional": {"kind": "distributional", **_HS2_RM},
        "reinforce": {"steps": 500, "batch_size": 32, "micro_batch_size": 16, "max_new_tokens": 256,
                      "max_prompt_length": 1024, "learning_rate": 1e-6, "checkpoint_every": 50, "eval_prompts": 128,
                      "device": "cuda"},
        "ppo": {"steps": 500, "batch_size": 32, "minibatch_size": 8, "max_new_tokens": 256, "max_prompt_length": 1024,
                "learning_rate": 1e-6, "checkpoint_every": 50, "eval_prompts": 128, "device": "cuda"},
        "dpo": {"max_length": 1024, "epochs": 1.0, "batch_size": 16, "learning_rate": 5e-7, "gradient_checkpointing": True,
                "device": "cuda"},
        "score": {"n_prompts": 256, "max_new_tokens": 256, "batch_size": 32, "device": "cuda"},
        "judge": {"backend": "gemini", "max_pairs": 256},
    },
}

# What a preset's run shows, in one sentence: `align run` prints it last (the demo is too small for RL to
# move a held-out check beyond noise, so its last line says so and names the preset that does).
PRESET_NOTES: dict[str, str] = {
    "demo": "The demo runs every stage at toy size (8 RL steps, 16 scored prompts): it shows the pipeline working "
            "end to end, not the RL making the model better; for that, `align seeds --preset demo-rlvr` (GRPO on "
            "reasoning-gym arithmetic, 328 held-out prompts, three seeds of ~17 min on a 2-core CPU: held-out "
            "accuracy +0.11 to +0.24, McNemar p < 1e-4 in each; docs/rlvr.md).",
}

SECTIONS = ("data", "prompts", "sft", "rm_scalar", "rm_distributional", "reinforce", "ppo", "grpo", "dpo", "score", "judge",
            "options", "rounds")
# Every section name a config file may hold (a file for one stage may carry a section per stage): the preset
# sections, tracking, and the sections of stages outside the preset table (``align rm``'s own ``rm``, compare,
# the rounds' samples and labels). A top-level key of such a file that is none of them is refused, with the
# nearest of these names (alignment.config.read_config_file).
FILE_SECTIONS = (*SECTIONS, "tracking", "rm", "compare", "samples", "labels", "signal")


def pipeline_preset(name: str = "demo") -> dict[str, dict[str, Any]]:
    """A copy of one preset row (every section)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def stage_preset(name: str, section: str) -> dict[str, Any]:
    """One stage's overrides in preset ``name`` (empty when the row leaves that stage at its defaults)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown pipeline section {section!r} (known: {', '.join(SECTIONS)})")
    return pipeline_preset(name).get(section, {})
