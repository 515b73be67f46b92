"""How a round's stages are wired (no Prefect here): the stage list, each stage's config from the outputs
before it, the experiment a configuration belongs to, and the round's record.

Round 0 is the pipeline (:mod:`alignment.pipeline`: data -> reward models -> RL -> scoring -> judge). Round
n >= 1, from round n-1's policy and reward model(s):

    samples -> labels -> (store: append the pairs, claim the inbox) -> data (+ the store's pairs, train only)
    -> the reward model(s) the RL stage trains against, retrained from the base model on old + new pairs
    -> RL from round n-1's policy -> scoring (against round 0's starting policy) -> judge

The reward models RL does not train against stay round 0's: the independent check every round is scored by
(unless the labeller chain used them: the record then says they are no longer independent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignment.io import sha256_text
from alignment.pipeline import PipelineConfig, _rl_wiring, rl_stage, stage_config
from alignment.rounds.config import RoundsConfig
from alignment.rounds.onpolicy import LabelsConfig, SamplesConfig, gemini_configured

STORE_STEP = "store"  # not a stage: the labelled pairs appended to the store, the inbox claimed


def experiment_id(config: PipelineConfig) -> str:
    """``rounds-<digest>`` of what the rounds compute with: every pipeline section but options.runs_dir and
    tracking, and the rounds section without its operational fields."""
    dump = config.model_dump(mode="json", exclude={"tracking", "rounds", "section"})
    dump["options"].pop("runs_dir", None)
    rounds = config.rounds.model_dump(mode="json", exclude=set(RoundsConfig.OPERATIONAL))
    return "rounds-" + sha256_text(json.dumps([dump, rounds], sort_keys=True))[:12]


def store_root(config: PipelineConfig) -> Path:
    return Path(config.rounds.store or Path(config.options.runs_dir) / "preference-store")


def trained_kinds(config: PipelineConfig, base: dict[str, str]) -> list[str]:
    """The reward-model kinds the RL stage trains against (retrained each round)."""
    rms = {k: base[f"rm_{k}"] for k in ("scalar", "distributional") if f"rm_{k}" in base}
    return _rl_wiring(config, rms)[1]


def round_stages(config: PipelineConfig, base: dict[str, str]) -> list[str]:
    """Round n's steps in order (``base``: round 0's outputs, to know which reward models are retrained)."""
    return ["samples", "labels", STORE_STEP, "data", *(f"rm_{k}" for k in trained_kinds(config, base)),
            rl_stage(config.options), "score", *(["judge"] if config.options.judge else [])]


def round_stage_config(config: PipelineConfig, n: int, name: str, base: dict[str, str], previous: dict[str, str],
                       current: dict[str, str], store_files: list[str] | None = None) -> Any:
    """Round ``n``'s stage ``name`` config. ``base``: round 0's outputs (stage -> folder); ``previous``: round
    n-1's (round 0's for n = 1); ``current``: this round's so far; ``store_files``: the data stage's
    ``extra_train`` (the store's pairs of rounds 1..n and the inbox files claimed)."""
    rounds, rl = config.rounds, rl_stage(config.options)
    kinds = trained_kinds(config, base)
    prompts = base.get("prompts", base["data"])
    online = config.online()
    if name == "samples":
        return SamplesConfig(policy=previous[rl], reward_model=previous.get(f"rm_{kinds[0]}") if kinds else None,
                             data=prompts, round=n, n_prompts=rounds.n_prompts,
                             samples_per_prompt=rounds.samples_per_prompt, pairing=rounds.pairing,
                             max_prompt_length=online.max_prompt_length, max_new_tokens=online.max_new_tokens,
                             temperature=rounds.temperature or online.temperature, top_p=online.top_p,
                             top_k=online.top_k, batch_size=rounds.batch_size, seed=rounds.seed + n,
                             bf16=online.bf16, device=online.device)
    if name == "labels":
        independent = {k: base[f"rm_{k}"] for k in ("scalar", "distributional")
                       if f"rm_{k}" in base and k not in kinds}
        evaluate = {f"round{n - 1}": previous[f"rm_{kinds[0]}"]} if kinds else {}
        if kinds and n > 1:
            evaluate["round0"] = base[f"rm_{kinds[0]}"]
        return LabelsConfig(samples=current["samples"], labellers=rounds.labellers,
                            gemini=gemini_configured(config.judge), reward_models=independent,
                            rm_tie_margin=rounds.rm_tie_margin, evaluate=evaluate, judge=config.judge)
    if name == "data":
        return config.data.model_copy(update={"extra_train": list(store_files or [])})
    # The pipeline's own wiring with this round's folders: RL starts from round n-1's policy ("sft" is where
    # stage_config takes the starting policy from), scoring compares with round 0's starting policy.
    start = base.get("sft", online.policy)
    rms = {f"rm_{k}": current.get(f"rm_{k}", base[f"rm_{k}"]) for k in ("scalar", "distributional")
           if f"rm_{k}" in base}
    if name.startswith("rm_"):
        kind = name.removeprefix("rm_")
        return getattr(config, name).model_copy(update={"kind": kind, "data": current["data"]})
    outputs = {"data": base["data"], **({"prompts": base["prompts"]} if "prompts" in base else {}), **rms}
    if name == rl:
        return stage_config(config, rl, {**outputs, "sft": previous[rl]})
    if name == "score":
        return stage_config(config, "score", {**outputs, "sft": start, rl: current[rl]})
    if name == "judge":
        return stage_config(config, "judge", {**outputs, "score": current["score"]})
    raise ValueError(f"unknown round stage {name!r}")
