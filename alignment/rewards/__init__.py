"""Rewards: reward-model training and scoring (``alignment.rewards.model``), reward-model ensembles
(``alignment.rewards.ensemble``) and the reward components (``alignment.rewards.components``): reward
models, gold checks, a length penalty, user Python functions and ensembles behind one interface,
combined into the reward an online run trains on."""

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
