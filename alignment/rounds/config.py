"""The ``rounds`` section of the pipeline config: how each round of on-policy re-training collects, pairs and
labels its own outputs (no Prefect here; :mod:`alignment.rounds.plan` wires the stages)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from alignment.config import ConfigModel

Labeller = Literal["gold", "gemini", "reward_models", "local"]
Pairing = Literal["random", "best_worst", "closest_length"]
LABELLERS: tuple[str, ...] = ("gold", "gemini", "reward_models", "local")


class RoundsConfig(ConfigModel):
    """Iterated RLHF: round 0 is the pipeline; each later round samples k answers of the current policy on
    train-split prompts, pairs and labels them, appends them to the preference store, retrains the reward
    model(s) the RL stage trains against on old + new pairs and runs RL again from the previous policy."""

    model_config = ConfigDict(extra="forbid")

    max_rounds: int = Field(3, ge=0, description="Rounds after round 0 (the pipeline); a tick past it runs "
                            "nothing new and completes from cache.")
    store: str | None = Field(None, description="The preference store's folder (default <runs_dir>/preference-store). "
                              "Pairs dropped into its inbox/ (.jsonl/.json/.parquet/.csv: prompt, chosen, rejected) are "
                              "picked up by the next round.")
    n_prompts: int = Field(32, ge=1, description="Train-split prompts sampled per round (a seeded subset, new each round).")
    samples_per_prompt: int = Field(4, ge=2, description="Answers per prompt (k) from the current policy.")
    pairing: Pairing = Field("random", description="Which two of a prompt's k answers form its pair: 'random' (an "
                             "unbiased test of every RM), 'best_worst' by the current reward model (its extremes: "
                             "where it is most confidently wrong), 'closest_length' (the two of most similar length, "
                             "so the label says little about length).")
    labellers: list[Labeller] = Field(
        default_factory=lambda: list(LABELLERS), description="The labeller chain, first applicable per pair: "
        "'gold' (prompts with a gold check; both right or both wrong is a tie), 'gemini' (only when a key is "
        "configured), 'reward_models' (the reward models not trained against: their mean standardised margin), "
        "'local' (the local judge). Ties are dropped.")
    rm_tie_margin: float = Field(0.1, ge=0.0, description="'reward_models' labeller: a mean standardised margin "
                                 "below this is a tie.")
    temperature: float | None = Field(None, gt=0.0, description="Sampling temperature (default: the RL section's).")
    batch_size: int = Field(16, ge=1, description="Sequences per generation batch.")
    seed: int = Field(0, ge=0, description="Round n samples prompts and answers with seed + n.")

    @field_validator("labellers")
    @classmethod
    def _chain(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("labellers is empty: give at least one of gold, gemini, reward_models, local")
        if len(set(value)) != len(value):
            raise ValueError(f"labellers lists one twice: {value}")
        return value

    # Not part of what a round computes: changing them continues the same experiment.
    OPERATIONAL: ClassVar[tuple[str, ...]] = ("max_rounds", "store", "batch_size")
