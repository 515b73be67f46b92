"""PPO in the InstructGPT / trlx form, and REINFORCE++ -- the per-token pieces, as small pure functions.

Shapes: B completions, T completion tokens (right-padded after the first EOS); ``mask`` (B, T) is 1 on
the completion tokens through the first EOS. All functions work on the completion positions only.

* Per-token rewards (Ziegler et al. 2019; Ouyang et al. 2022): r_t = -beta * KL_t at every completion
  token, KL_t = log pi(y_t) - log pi_ref(y_t) (k1), and the reward model's score added at the last one.
* GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lambda)^l delta_{t+l},
  returns R_t = A_t + V_t; V after the last token is 0.
* The clipped surrogate and the clipped value loss (Schulman et al. 2017; trlx's ``loss``), approx-KL
  and the clip fraction that PPO logs.
* The adaptive KL controller (Ziegler et al. 2019, sec. 2.2).
* REINFORCE++ (Hu 2025, OpenRLHF): no critic; A_t = sum_{s >= t} r_s with the same per-token rewards,
  normalised over every token of the batch; optionally the score normalised within each prompt's group
  of k samples first (GRPO-style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of x's elements, any shape)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (the unbiased variance, as trlx); 0 where mask is 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last completion token. mask: (B, T) with a prefix of ones."""
    return (mask.sum(-1).long() - 1).clamp_min(0)


def per_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * KL_t on every completion token, plus the reward model's score at the last one.

    score: (B,); kl: (B, T) per-token log pi - log pi_ref; mask: (B, T). Returns (B, T), 0 after the end.
    """
    rewards = -beta * kl * mask
    rewards[torch.arange(score.shape[0]), last_token_index(mask)] += score
    return rewards


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
    return advantages, (advantages + values) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the masked tokens (B, T) -> (B, T)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def group_normalised_scores(score: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) within each prompt's k samples (GRPO-style).

    score: (B * k,) prompt-major (the k samples of prompt 0 first) -> (B * k,). Population std (ddof 0).
    """
    grouped = score.view(-1, k)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def reinforce_pp_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            k: int = 1, group_norm: bool = False) -> torch.Tensor:
    """REINFORCE++: A_t = sum_{s >= t} r_s (gamma = 1) with r_t = -beta KL_t (+ score at the last token),
    whitened over every completion token of the batch. ``group_norm``: the score is first normalised
    within each prompt's k samples. Shapes as :func:`per_token_rewards`; returns (B, T)."""
    if group_norm:
        score = group_normalised_scores(score, k)
    returns = discounted_returns(per_token_rewards(score, kl, mask, beta), mask, 1.0)
    return masked_whiten(returns, mask)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar
    clip_fraction: float  # share of tokens where the clipped term was the smaller one
    approx_kl: float  # mean over tokens of (ratio - 1) - log ratio (Schulman's k3, >= 0)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> PolicyLoss:
    """L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(log pi - log pi_old).

    All inputs (B, T); the mean is over the masked tokens. The advantages carry no gradient.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = float(masked_mean((clipped > unclipped).float(), mask))
        approx_kl = float(masked_mean((ratio - 1.0) - log_ratio, mask))
    return PolicyLoss(loss, clip_fraction, approx_kl)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """L_V = 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2). All (B, T)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (1: the critic explains the returns; <= 0: no better
    than a constant)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1.0 - var_e / var_r) if float(var_r) > 0 else float("nan")


@dataclass
class AdaptiveKLController:
    """beta <- beta * (1 + e * n / horizon), e = clip(KL / target - 1, -0.2, 0.2) (Ziegler et al. 2019).

    ``update(kl, n)``: ``kl`` the batch's mean sequence KL to the reference, ``n`` the samples seen.
    """

    beta: float
    target: float
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon
        return self.beta
