"""Advantage estimators: pure functions in one registry (verl's ``register_adv_est`` style).

Every estimator is called as ``fn(scores, k, mask, **extras) -> advantages``:

* ``scores`` (B,): one scalar reward per completion, grouped prompt-major (the k samples of prompt 0
  first, as ``generation.rollout`` returns them); B must divide by ``k``;
* ``k``: completions per prompt (the group size);
* ``mask`` (B, T): 1 on the completion tokens (through the first EOS), 0 after;
* extras: estimator-specific keyword arguments (``kl``, ``beta`` for ``reinforce_pp``; ``eps`` ...).

It returns (B, T) advantages, 0 off the mask; outcome estimators (``grpo``, ``dr_grpo``, ``rloo``) give
every token of a completion the same value. Group estimators need the whole groups: call them on the
batch gathered over processes (the k samples of a prompt are on one process, but the batch statistics
must match on every process).

Registered here:

``grpo``
    A_i = (r_i - mean_group) / (std_group + eps) (Shao et al. 2024, DeepSeekMath eq. 3 outcome
    supervision), std the sample standard deviation (ddof 1) as in verl's and TRL's GRPO, eps 1e-6;
    ``unbiased=False`` gives the population std of :func:`group_normalised_scores`.
``dr_grpo``
    A_i = r_i - mean_group (Liu et al. 2025, "Understanding R1-Zero-Like Training": no std division).
``rloo``
    A_i = r_i - mean_{j != i} r_j (Kool et al. 2019; Ahmadian et al. 2024).
``reinforce_pp``
    REINFORCE++ (Hu 2025): A_t = sum_{s >= t} r_s with r_t = -beta KL_t plus the score at the last
    token, whitened over every completion token of the batch; ``group_norm=True`` first normalises the
    score within each group (PPO's ``estimator=reinforce++-group``).
``gae``
    GAE (Schulman et al. 2016) on the same per-token rewards with the critic's values ``values`` (B, T):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, V after the last token 0
    (``gamma``, ``lam``); ``k`` is not used. PPO's critic targets, the returns R_t = A_t + V_t, are
    :func:`gae_returns` of these advantages (:func:`gae` gives both from per-token rewards).

Not registered, with the reason:

* ``moving_average`` and ``ema`` (``alignment.algorithms.reinforce``): stateful baselines (a running
  mean carried across steps and checkpointed), not a function of one batch; the loop keeps them as
  objects and computes A = r - b itself.

The training modules take their estimators from here (REINFORCE and GRPO by name through
:func:`get_adv_est`, PPO its ``gae`` and ``reinforce_pp``), and this module imports none of them
(``tests/test_layout.py`` forbids other core modules from importing ``alignment.algorithms.reinforce``,
and no import circle may close). ``tests/test_advantages.py`` checks the estimators against hand-computed
values and against the PPO pieces they replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]

ADV_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_adv_est(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an advantage estimator under ``name`` (a second, different function under the
    same name is an error)."""

    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADV_ESTIMATORS and ADV_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ADV_ESTIMATORS[name].__name__})")
        ADV_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_adv_est(name: str) -> AdvantageFn:
    """The estimator registered under ``name``; a ValueError naming the known ones otherwise."""
    try:
        return ADV_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADV_ESTIMATORS))}") from None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def grouped(scores: torch.Tensor, k: int, estimator: str, min_k: int = 2) -> torch.Tensor:
    """``scores`` (B,) viewed as (B / k, k); a ValueError naming ``estimator`` when the shapes do not fit."""
    if scores.dim() != 1:
        raise ValueError(f"{estimator}: scores must be 1-D (one per completion), got shape {tuple(scores.shape)}")
    if k < min_k:
        raise ValueError(f"{estimator} needs k >= {min_k} samples per prompt, got k={k}")
    if scores.numel() % k:
        raise ValueError(f"{estimator}: {scores.numel()} scores do not split into groups of k={k}")
    return scores.view(-1, k)


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages broadcast to the completion tokens: (B, T), 0 off the mask."""
    if mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"mask must be (B, T) with B={advantages.shape[0]}, got shape {tuple(mask.shape)}")
    return advantages[:, None] * mask.to(advantages.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance, as trlx and PPO's); 0 off it."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------
@register_adv_est("grpo")
def grpo_advantages(scores: torch.Tensor, k: int, mask: torch.Tensor, *, eps: float = 1e-6,
                    unbiased: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps) on every token of completion i. (B,) -> (B, T).

    A group whose k scores are equal gets A = 0 (0 / eps). ``unbiased``: sample std (ddof 1, verl and
    TRL) or population std (ddof 0).
    """
    groups = grouped(scores, k, "grpo")
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, unbiased=unbiased, keepdim=True)
    return per_token(((groups - mean) / (std + eps)).reshape(-1), mask)


@register_adv_est("dr_grpo")
def dr_grpo_advantages(scores: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_group (Dr. GRPO: no division by the group's std). (B,) -> (B, T)."""
    groups = grouped(scores, k, "dr_grpo")
    return per_token((groups - groups.mean(-1, keepdim=True)).reshape(-1), mask)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j over the k samples of the same prompt (Kool et al. 2019). (B,) -> (B,)."""
    groups = grouped(scores, k, "rloo")
    loo_mean = (groups.sum(-1, keepdim=True) - groups) / (k - 1)
    return (groups - loo_mean).reshape(-1)


@register_adv_est("rloo")
def rloo_token_advantages(scores: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    """:func:`rloo_advantages` on every token of each completion. (B,) -> (B, T)."""
    return per_token(rloo_advantages(scores, k), mask)


def group_normalised_scores(scores: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) with the population std (ddof 0), (B,) -> (B,): the score
    normalisation of REINFORCE++'s group variant (PPO's ``estimator=reinforce++-group``)."""
    groups = grouped(scores, k, "group normalisation")
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every completion token, plus the score at the last one. (B,), (B, T) -> (B, T)."""
    rewards = -beta * kl * mask
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    rewards[torch.arange(scores.shape[0]), last] += scores
    return rewards


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s over the masked tokens (gamma = 1). (B, T) -> (B, T)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + running) * mask[:, t]
        out[:, t] = running
    return out


@register_adv_est("reinforce_pp")
def reinforce_pp_advantages(scores: torch.Tensor, k: int, mask: torch.Tensor, *, kl: torch.Tensor | None = None,
                            beta: float = 0.0, group_norm: bool = False) -> torch.Tensor:
    """REINFORCE++: the returns of r_t = -beta KL_t (+ score at the last token), whitened over every
    completion token of the batch; ``group_norm``: the score first normalised within each prompt's k
    samples. ``kl`` (B, T): per-token log pi - log pi_ref (None: no KL term). (B,) -> (B, T)."""
    mask = mask.to(scores.dtype)
    if group_norm:
        scores = group_normalised_scores(scores, k)
    kl = torch.zeros_like(mask) if kl is None else kl
    return masked_whiten(returns_to_go(per_token_rewards(scores, kl, mask, beta), mask), mask)


def gae_returns(advantages: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_t = A_t + V_t over the masked tokens, 0 after the last one: the critic's targets. (B, T) -> (B, T)."""
    return (advantages + values * mask) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), by generalised advantage estimation over the masked tokens.

    delta_t = r_t + gamma V_{t+1} - V_t (V_{t+1} = 0 past the last token); A_t = delta_t + gamma lambda A_{t+1};
    R_t = A_t + V_t. Positions after the last token are 0 in both.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, gae_returns(advantages, values, mask)


@register_adv_est("gae")
def gae_advantages(scores: torch.Tensor, k: int, mask: torch.Tensor, *, values: torch.Tensor,
                   kl: torch.Tensor | None = None, beta: float = 0.0, gamma: float = 1.0, lam: float = 0.95
                   ) -> torch.Tensor:
    """GAE's advantages (:func:`gae`) of the per-token rewards r_t = -beta KL_t (+ score at the last token)
    with the critic's ``values`` (B, T); ``kl`` (B, T): per-token log pi - log pi_ref (None: no KL term);
    ``k`` is not used. (B,) -> (B, T); the returns are :func:`gae_returns` of them."""
    mask = mask.to(scores.dtype)
    kl = torch.zeros_like(mask) if kl is None else kl
    return gae(per_token_rewards(scores, kl, mask, beta), values, mask, gamma, lam)[0]
