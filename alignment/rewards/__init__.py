"""Reward components (``alignment.rewards.components``): reward models, gold checks, a length penalty,
user Python functions and reward-model ensembles behind one interface, combined into the reward an
online run trains on."""

from alignment.rewards.components import (
    REWARD_KINDS,
    ComponentConfig,
    ComponentScores,
    EnsembleComponent,
    GoldComponent,
    LengthComponent,
    PythonComponent,
    RewardComponent,
    RewardComponentConfig,
    RewardComponentError,
    RewardModelComponent,
    build_components,
    combine,
    combined_variance,
    components_from,
    parse_reward_configs,
    register_reward_kind,
    rewards_key,
    score_components,
)

__all__ = ["REWARD_KINDS", "ComponentConfig", "ComponentScores", "EnsembleComponent", "GoldComponent",
           "LengthComponent", "PythonComponent", "RewardComponent", "RewardComponentConfig", "RewardComponentError",
           "RewardModelComponent", "build_components", "combine", "combined_variance", "components_from",
           "parse_reward_configs", "register_reward_kind", "rewards_key", "score_components"]
