"""The training algorithms: the online policy-optimisation loop (``online``, with its collapse ``guard``,
prompt ``sampler`` and ``metrics`` log), the algorithms on it (``reinforce``, ``grpo``, ``ppo``), the
offline ones (``dpo``, ``sft``), the algorithm registry (``registry``) and the loop's pure pieces,
exported here: advantage estimators and policy losses, each in a registry keyed by name
(``get_adv_est("grpo")``, ``get_policy_loss("clipped_token")``)."""

from alignment.algorithms.advantages import ADV_ESTIMATORS, get_adv_est, register_adv_est
from alignment.algorithms.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    PolicyLossOutput,
    agg_loss,
    get_policy_loss,
    register_policy_loss,
)

__all__ = ["ADV_ESTIMATORS", "AGG_MODES", "POLICY_LOSSES", "PolicyLossOutput", "agg_loss", "get_adv_est",
           "get_policy_loss", "register_adv_est", "register_policy_loss"]
