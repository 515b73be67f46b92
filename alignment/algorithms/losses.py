"""Policy losses and their token aggregation: pure functions in one registry (verl's ``core_algos`` style).

Every loss is called as ``fn(logp, old_logp, advantages, mask, **options) -> PolicyLossOutput``:

* ``logp`` (B, T): log pi(y_t | x, y_<t) under the policy being trained (with its graph);
* ``old_logp`` (B, T) or None: the same under the policy that sampled the batch (no gradient);
* ``advantages`` (B, T) or (B,) (a (B,) one is broadcast over the tokens); they carry no gradient;
* ``mask`` (B, T): 1 on the completion tokens.

Registered here:

``sequence``
    REINFORCE: the per-token loss -A_t w_t log pi_t, aggregated ``seq_mean_token_sum`` by default, i.e.
    L = -mean_i(A_i sum_t log pi(y_it)) with a per-sequence A
    (``alignment.algorithms.reinforce.reinforce_loss`` of ``action_logprobs``). ``weights`` (B, T):
    per-token weights in place of the mask (the truncated importance ratios of int8 rollouts).
    ``old_logp`` is not used.
``clipped_token``
    PPO / GRPO's clipped surrogate per token (Schulman et al. 2017), max(-A rho, -A clip(rho, 1 - eps_low,
    1 + eps_high)) with rho = exp(log pi - log pi_old); ``clip_high`` above ``clip_low`` is DAPO's
    clip-higher; ``dual_clip`` (c > 1) bounds the loss of a negative advantage by -A c (Ye et al. 2020,
    verl's ``clip_ratio_c``). Aggregated ``token_mean`` by default
    (= ``alignment.algorithms.ppo.ppo_policy_loss``).

Aggregation modes (:func:`agg_loss`, mirroring verl's ``agg_loss``; l_it the per-token loss, m_it the mask):

``token_mean``               sum_it m l / sum_it m                       (DAPO; PPO in this project)
``seq_mean_token_sum``       mean_i sum_t m l                            (REINFORCE's sequence loss)
``seq_mean_token_mean``      mean_i (sum_t m l / sum_t m)                (the original GRPO)
``seq_mean_token_sum_norm``  mean_i sum_t m l / L_max                    (Dr. GRPO; TRL's ``dr_grpo``)

``seq_mean_token_sum_norm`` divides by a constant ``max_length`` (pass the config's ``max_new_tokens``:
the rollout's width T changes from batch to batch, so the default T is a constant only within one
batch) and by the number of sequences, as TRL's ``loss_type="dr_grpo"`` (sum / (B * L_max)); verl's
mode of the same name omits the 1/B.

Micro-batches: pass ``batch_tokens`` (token modes) or ``batch_sequences`` (sequence modes), the counts of
the whole batch, and each micro-batch's loss is its share of the whole batch's aggregate, so that the
accumulated gradient equals the full batch's (the sum of the shares is the full value, tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, *, max_length: int | None = None,
             batch_tokens: float | None = None, batch_sequences: int | None = None) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss over the masked tokens into a scalar (see the module docstring).

    ``max_length``: the constant L_max of ``seq_mean_token_sum_norm`` (default T). ``batch_tokens`` /
    ``batch_sequences``: the whole batch's token / sequence counts when this is one micro-batch of it.
    """
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    n_seq = batch_sequences if batch_sequences is not None else loss_mat.shape[0]
    if mode == "token_mean":
        tokens = mask.sum().clamp_min(1) if batch_tokens is None else batch_tokens
        return masked.sum() / tokens
    if mode == "seq_mean_token_sum":
        return masked.sum() / n_seq
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp_min(1)).sum() / n_seq
    if mode == "seq_mean_token_sum_norm":
        length = max_length if max_length is not None else loss_mat.shape[-1]
        if length < 1:
            raise ValueError(f"max_length must be >= 1, got {length}")
        return masked.sum() / (n_seq * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGG_MODES)}")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, with the graph
    clip_fraction: float = 0.0  # share of tokens where the clipped term was the larger (the gradient is cut)
    clip_fraction_lower: float = 0.0  # share of tokens bounded by the dual clip (negative advantages)
    approx_kl: float = 0.0  # mean over tokens of (rho - 1) - log rho (Schulman's k3, >= 0)


PolicyLossFn = Callable[..., PolicyLossOutput]

POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss under ``name`` (a second, different function under it is an error)."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered ({POLICY_LOSSES[name].__name__})")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLossFn:
    """The loss registered under ``name``; a ValueError naming the known ones otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(sorted(POLICY_LOSSES))}") from None


def _token_advantages(advantages: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None]
    if adv.shape[0] != logp.shape[0] or adv.dim() != 2:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} do not fit log-probs {tuple(logp.shape)}")
    return adv.to(logp.dtype)


@register_policy_loss("sequence")
def sequence_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                  *, agg: str = "seq_mean_token_sum", weights: torch.Tensor | None = None,
                  max_length: int | None = None, batch_tokens: float | None = None,
                  batch_sequences: int | None = None) -> PolicyLossOutput:
    """REINFORCE: per-token -A_t w_t log pi_t (w = 1, or ``weights`` (B, T), no gradient), aggregated by ``agg``."""
    adv = _token_advantages(advantages, logp)
    weighted = logp if weights is None else logp * weights.detach().to(logp.dtype)
    loss = agg_loss(-adv * weighted, mask, agg, max_length=max_length, batch_tokens=batch_tokens,
                    batch_sequences=batch_sequences)
    return PolicyLossOutput(loss)


@register_policy_loss("clipped_token")
def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       *, agg: str = "token_mean", clip_low: float = 0.2, clip_high: float | None = None,
                       dual_clip: float | None = None, max_length: int | None = None,
                       batch_tokens: float | None = None, batch_sequences: int | None = None) -> PolicyLossOutput:
    """l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high)), rho_t = exp(log pi_t - log pi_old_t);
    with ``dual_clip`` = c, l_t = min(l_t, -A_t c) where A_t < 0. Aggregated by ``agg``.

    ``clip_high`` defaults to ``clip_low`` (symmetric PPO clip). The metrics (clip fractions, approx-KL)
    are means over the masked tokens of this call.
    """
    if old_logp is None:
        raise ValueError("clipped_token needs old_logp, the log-probs of the policy that sampled the batch")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    high = clip_low if clip_high is None else clip_high
    mask_f = mask.to(logp.dtype)
    adv = _token_advantages(advantages, logp)
    log_ratio = (logp - old_logp.detach()) * mask_f
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + high)
    per_tok = torch.maximum(unclipped, clipped)
    lower = torch.zeros_like(per_tok, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip
        lower = (adv < 0) & (per_tok > bound)
        per_tok = torch.where(adv < 0, torch.minimum(per_tok, bound), per_tok)
    loss = agg_loss(per_tok, mask_f, agg, max_length=max_length, batch_tokens=batch_tokens,
                    batch_sequences=batch_sequences)
    with torch.no_grad():
        n = mask_f.sum().clamp_min(1)
        clip_fraction = float(((clipped > unclipped).to(mask_f.dtype) * mask_f).sum() / n)
        clip_fraction_lower = float((lower.to(mask_f.dtype) * mask_f).sum() / n)
        approx_kl = float((((ratio - 1.0) - log_ratio) * mask_f).sum() / n)
    return PolicyLossOutput(loss, clip_fraction, clip_fraction_lower, approx_kl)
