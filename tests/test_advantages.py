"""Advantage estimators and policy losses (alignment.algorithms): hand-computed values, and equality with
the training modules' own functions (or the pieces they were computed from) where both exist."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.algorithms import (
    ADV_ESTIMATORS,
    POLICY_LOSSES,
    agg_loss,
    get_adv_est,
    get_policy_loss,
    register_adv_est,
    register_policy_loss,
)

EPS = 1e-6


def ones(b: int, t: int) -> torch.Tensor:
    return torch.ones(b, t)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------
def test_registry_holds_the_estimators_and_names_unknown_ones():
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"} <= set(ADV_ESTIMATORS)
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'.*grpo"):
        get_adv_est("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_adv_est("grpo")(lambda scores, k, mask: scores)
    fn = ADV_ESTIMATORS["grpo"]
    assert register_adv_est("grpo")(fn) is fn  # the same function again is fine


def test_grpo_k2_hand_values():
    # groups (1, 3): mean 2, sample std sqrt(2); (2, 2): equal scores -> 0
    adv = get_adv_est("grpo")(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2, ones(4, 3))
    s = math.sqrt(2.0)
    expected = torch.tensor([-1 / (s + EPS), 1 / (s + EPS), 0.0, 0.0])
    assert adv.shape == (4, 3)
    assert torch.allclose(adv, expected[:, None].expand(4, 3), atol=1e-7)


def test_grpo_k3_hand_values_and_mask():
    # (0, 1, 2): mean 1, sample std 1; (5, 5, 8): mean 6, sample var (1 + 1 + 4) / 2 = 3
    scores = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 8.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    adv = get_adv_est("grpo")(scores, 3, mask)
    r3 = math.sqrt(3.0)
    seq = torch.tensor([-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -1 / (r3 + EPS), -1 / (r3 + EPS), 2 / (r3 + EPS)])
    assert torch.allclose(adv, seq[:, None] * mask, atol=1e-6)
    assert (adv[mask == 0] == 0).all()


def test_grpo_population_std_equals_the_group_normalisation():
    from alignment.algorithms.advantages import group_normalised_scores

    torch.manual_seed(0)
    scores = torch.randn(12)
    adv = get_adv_est("grpo")(scores, 4, ones(12, 1), unbiased=False)
    assert torch.equal(adv[:, 0], group_normalised_scores(scores, 4))


def test_dr_grpo_hand_values():
    est = get_adv_est("dr_grpo")
    assert torch.allclose(est(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2, ones(4, 2))[:, 0],
                          torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(est(torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 8.0]), 3, ones(6, 1))[:, 0],
                          torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_rloo_hand_values_and_equality_with_reinforce():
    from alignment.algorithms.reinforce import rloo_advantages

    # (0, 1, 2): leave-one-out means 1.5, 1, 0.5
    adv = get_adv_est("rloo")(torch.tensor([0.0, 1.0, 2.0]), 3, ones(3, 2))
    assert torch.allclose(adv, torch.tensor([[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5]]))
    torch.manual_seed(1)
    scores = torch.randn(8)
    assert torch.equal(get_adv_est("rloo")(scores, 4, ones(8, 1))[:, 0], rloo_advantages(scores, 4))


@pytest.mark.parametrize("group_norm", [False, True])
def test_reinforce_pp_equals_the_ppo_pieces(group_norm):
    """The registry's REINFORCE++ is exactly what PPO computed with its own pieces before it took it from here:
    whitened discounted returns (gamma 1) of the per-token rewards, the score group-normalised first."""
    from alignment.algorithms.advantages import group_normalised_scores, per_token_rewards
    from alignment.algorithms.ppo import discounted_returns, masked_whiten

    torch.manual_seed(2)
    scores, kl = torch.randn(6), torch.randn(6, 5) * 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                         [1, 1, 0, 0, 0]], dtype=torch.float32)
    ours = get_adv_est("reinforce_pp")(scores, 2, mask, kl=kl, beta=0.05, group_norm=group_norm)
    score = group_normalised_scores(scores, 2) if group_norm else scores
    theirs = masked_whiten(discounted_returns(per_token_rewards(score, kl, mask, 0.05), mask, 1.0), mask)
    assert torch.equal(ours, theirs)


def test_reinforce_pp_without_kl_is_the_whitened_score_on_every_token():
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float32)
    adv = get_adv_est("reinforce_pp")(torch.tensor([1.0, -1.0]), 1, mask)
    # returns: row 0 (1, 1), row 1 (-1, 0 masked); masked tokens 1, 1, -1: mean 1/3, unbiased var 4/3
    x = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    expected = (x - 1 / 3) / math.sqrt(4 / 3 + 1e-8) * mask
    assert torch.allclose(adv, expected, atol=1e-6)


def test_gae_hand_values():
    from alignment.algorithms.advantages import gae_returns

    # Two completions, gamma 0.9, lambda 0.5, beta 0.5; r_t = -beta KL_t, + the score at the last token.
    # Row 0 (score 1, KL 0.2, 0.4, V 0.5, 0.5): r = (-0.1, 0.8); delta_1 = 0.8 - 0.5 = 0.3 = A_1;
    #   delta_0 = -0.1 + 0.9 * 0.5 - 0.5 = -0.15, A_0 = -0.15 + 0.9 * 0.5 * 0.3 = -0.015.
    # Row 1 (score -1, one token, KL 0.6; its second value 9 is past the end, V there counts as 0):
    #   r_0 = -0.3 - 1 = -1.3, A_0 = -1.3 + 0.9 * 0 - 0.25 = -1.55; A_1 = 0 (masked).
    scores = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5], [0.25, 9.0]])
    kl = torch.tensor([[0.2, 0.4], [0.6, 5.0]])
    adv = get_adv_est("gae")(scores, 2, mask, values=values, kl=kl, beta=0.5, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.015, 0.3], [-1.55, 0.0]]), atol=1e-6)
    # k is not used (no groups); returns are A + V on the completion tokens, 0 after.
    assert torch.equal(adv, get_adv_est("gae")(scores, 1, mask, values=values, kl=kl, beta=0.5, gamma=0.9, lam=0.5))
    assert torch.allclose(gae_returns(adv, values, mask), torch.tensor([[0.485, 0.8], [-1.3, 0.0]]), atol=1e-6)


def test_gae_without_kl_gamma_1_lambda_1_is_return_minus_value():
    # lambda = gamma = 1: A_t = G_t - V_t; the score 2 at the last of three tokens, V = (0.5, 1, 1.5).
    adv = get_adv_est("gae")(torch.tensor([2.0]), 1, ones(1, 3), values=torch.tensor([[0.5, 1.0, 1.5]]), lam=1.0)
    assert torch.allclose(adv, torch.tensor([[1.5, 1.0, 0.5]]))


def test_gae_equals_the_ppo_loop_form():
    """The registered entry is gae() of PPO's per-token rewards: the advantages and returns PPO trains on."""
    from alignment.algorithms.advantages import gae, gae_returns, per_token_rewards

    torch.manual_seed(5)
    scores, kl, values = torch.randn(4), torch.randn(4, 6) * 0.1, torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]],
                        dtype=torch.float32)
    adv, ret = gae(per_token_rewards(scores, kl, mask, 0.05), values, mask, 0.99, 0.95)
    ours = get_adv_est("gae")(scores, 2, mask, values=values, kl=kl, beta=0.05, gamma=0.99, lam=0.95)
    assert torch.equal(ours, adv) and torch.equal(gae_returns(ours, values, mask), ret)
    assert (ours[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_refuse_bad_groups(name):
    est = get_adv_est(name)
    with pytest.raises(ValueError, match=f"{name} needs k >= 2"):
        est(torch.zeros(4), 1, ones(4, 1))
    with pytest.raises(ValueError, match="do not split into groups of k=3"):
        est(torch.zeros(4), 3, ones(4, 1))


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode, options, expected", [
    ("token_mean", {}, (1 + 2 + 3) / 3),
    ("seq_mean_token_sum", {}, (3 + 3) / 2),
    ("seq_mean_token_mean", {}, (1.5 + 3) / 2),
    ("seq_mean_token_sum_norm", {"max_length": 4}, (3 + 3) / (2 * 4)),
    ("seq_mean_token_sum_norm", {}, (3 + 3) / (2 * 3)),  # default: the batch's width T = 3
])
def test_aggregation_hand_values(mode, options, expected):
    assert agg_loss(LOSS, MASK, mode, **options).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_shares_sum_to_the_full_batch(mode):
    torch.manual_seed(3)
    loss, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    mask[:, 0] = 1
    full = agg_loss(loss, mask, mode, max_length=8)
    shares = sum(agg_loss(loss[s], mask[s], mode, max_length=8, batch_tokens=mask.sum(), batch_sequences=6)
                 for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    assert shares.item() == pytest.approx(full.item(), abs=1e-6)


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="unknown loss aggregation 'nope'"):
        agg_loss(LOSS, MASK, "nope")


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------
def test_loss_registry():
    assert {"sequence", "clipped_token"} <= set(POLICY_LOSSES)
    with pytest.raises(ValueError, match="unknown policy loss 'nope'"):
        get_policy_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("sequence")(lambda *a, **k: None)


def clip_case():
    """Row 0 (A = +1): ratios 1.1 (inside), 1.5 (above: clipped), 0.5 (below: unclipped is larger), pad.
    Row 1 (A = -1): ratios 1.5 (above: unclipped is larger), 0.5 (below: clipped), two pads.
    Per-token losses: row 0 -1.1, -1.2, -0.5 (sum -2.8); row 1 1.5, 0.8 (sum 2.3). eps = 0.2."""
    ratios = torch.tensor([[1.1, 1.5, 0.5, 3.0], [1.5, 0.5, 3.0, 0.2]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.2, -2.0, -3.0]])
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return logp, old, torch.tensor([1.0, -1.0]), mask


@pytest.mark.parametrize("agg, options, expected", [
    ("token_mean", {}, (-2.8 + 2.3) / 5),
    ("seq_mean_token_mean", {}, (-2.8 / 3 + 2.3 / 2) / 2),
    ("seq_mean_token_sum_norm", {"max_length": 4}, (-2.8 + 2.3) / (2 * 4)),
    ("seq_mean_token_sum", {}, (-2.8 + 2.3) / 2),
])
def test_clipped_loss_hand_values(agg, options, expected):
    logp, old, adv, mask = clip_case()
    out = get_policy_loss("clipped_token")(logp, old, adv, mask, agg=agg, clip_low=0.2, **options)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_fraction == pytest.approx(2 / 5)  # (1.5, A > 0) and (0.5, A < 0)
    assert out.clip_fraction_lower == 0.0


def test_clipped_tokens_get_no_gradient():
    logp, old, adv, mask = clip_case()
    get_policy_loss("clipped_token")(logp, old, adv, mask, agg="token_mean").loss.backward()
    grad = logp.grad
    # d/dlogp of -A rho = -A rho, / 5 tokens; clipped tokens and pads: 0
    expected = torch.tensor([[-1.1, 0.0, -0.5, 0.0], [1.5, 0.0, 0.0, 0.0]]) / 5
    assert torch.allclose(grad, expected, atol=1e-6)


def test_clip_higher_and_dual_clip():
    old = torch.zeros(1, 2)
    # A = +1, ratio 1.25: inside with clip_high 0.28 (DAPO), clipped at 1.2 with the symmetric 0.2
    logp = torch.log(torch.tensor([[1.25, 1.0]]))
    mask = torch.tensor([[1.0, 0.0]])
    loss = get_policy_loss("clipped_token")
    assert loss(logp, old, torch.tensor([1.0]), mask, clip_high=0.28).loss.item() == pytest.approx(-1.25)
    assert loss(logp, old, torch.tensor([1.0]), mask).loss.item() == pytest.approx(-1.2)
    # A = -1, ratio 5: the PPO loss 5, bounded by -A c = 3 with dual_clip c = 3
    logp = torch.log(torch.tensor([[5.0, 1.0]]))
    out = loss(logp, old, torch.tensor([-1.0]), mask, dual_clip=3.0)
    assert out.loss.item() == pytest.approx(3.0)
    assert out.clip_fraction_lower == 1.0
    assert loss(logp, old, torch.tensor([-1.0]), mask).loss.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        loss(logp, old, torch.tensor([-1.0]), mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="needs old_logp"):
        loss(logp, None, torch.tensor([-1.0]), mask)


def test_clipped_token_mean_equals_ppo_policy_loss():
    from alignment.algorithms.ppo import ppo_policy_loss

    torch.manual_seed(4)
    old = torch.randn(5, 7)
    logp = old + 0.3 * torch.randn(5, 7)
    adv = torch.randn(5, 7)
    mask = (torch.rand(5, 7) > 0.2).float()
    ours = get_policy_loss("clipped_token")(logp, old, adv, mask, agg="token_mean", clip_low=0.2)
    theirs = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-7)
    assert ours.clip_fraction == pytest.approx(theirs.clip_fraction)
    assert ours.approx_kl == pytest.approx(theirs.approx_kl, rel=1e-5)


def test_sequence_loss_hand_value_and_equality_with_reinforce():
    from alignment.algorithms.reinforce import action_logprobs, reinforce_loss, tis_weights

    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    out = get_policy_loss("sequence")(logp, None, adv, mask)
    # -mean(A * sum logp) = -((2 * -3) + (-1 * -0.5)) / 2 = 2.75
    assert out.loss.item() == pytest.approx(2.75)
    assert torch.allclose(out.loss, reinforce_loss(action_logprobs(logp, mask), adv))
    # with truncated importance weights in place of the mask
    sampler = logp.detach() + torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, 0.0]])
    w = tis_weights(logp, sampler, mask, 2.0)
    out = get_policy_loss("sequence")(logp, None, adv, mask, weights=w)
    assert torch.allclose(out.loss, reinforce_loss(action_logprobs(logp, mask, w), adv))
    # (B, T) advantages constant along rows: the same
    per_tok = adv[:, None] * mask
    assert torch.allclose(get_policy_loss("sequence")(logp, None, per_tok, mask).loss,
                          get_policy_loss("sequence")(logp, None, adv, mask).loss)
