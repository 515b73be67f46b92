"""PPO and REINFORCE++ pieces (PPO's own and the estimators it takes from ``alignment.algorithms.advantages``)
against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.algorithms.advantages import (
    gae,
    group_normalised_scores,
    per_token_rewards,
    reinforce_pp_advantages,
)
from alignment.algorithms.ppo import (
    AdaptiveKLController,
    discounted_returns,
    explained_variance,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

T = torch.tensor


def flat(nested):
    return [x for row in nested for x in row]


def test_per_token_rewards_put_the_score_on_the_last_token():
    r = per_token_rewards(T([2.0, -1.0]), T([[0.1, 0.2, 9.0], [0.4, 0.0, 0.0]]), T([[1.0, 1, 0], [1, 0, 0]]), 0.5)
    assert r.flatten().tolist() == pytest.approx(flat([[-0.05, -0.1 + 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0]]))


def test_gae_hand_values():
    # gamma 1, lambda 0.5, V = 0.5 everywhere, reward 1 at the end:
    # A2 = 1 - 0.5 = 0.5; A1 = 0 + 0.5 * 0.5 = 0.25; A0 = 0.5 * 0.25 = 0.125; R = A + V.
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx(flat([[0.125, 0.25, 0.5]])) and ret.flatten().tolist() == pytest.approx(flat([[0.625, 0.75, 1.0]]))
    # A masked last token: its value is ignored (V after the end is 0), gamma 0.9, lambda 1:
    # A1 = 1.9 + 0 - 2 = -0.1; A0 = (-0.05 + 0.9 * 2 - 1) + 0.9 * (-0.1) = 0.66.
    rewards = per_token_rewards(T([2.0]), T([[0.1, 0.2, 9.0]]), T([[1.0, 1, 0]]), 0.5)
    adv, ret = gae(rewards, T([[1.0, 2.0, 7.0]]), T([[1.0, 1, 0]]), gamma=0.9, lam=1.0)
    assert adv.flatten().tolist() == pytest.approx(flat([[0.66, -0.1, 0.0]])) and ret.flatten().tolist() == pytest.approx(flat([[1.66, 1.9, 0.0]]))


def test_discounted_returns_and_reinforce_pp():
    assert discounted_returns(T([[1.0, 2.0, 3.0]]), T([[1.0, 1, 0]]), 0.5).tolist() == [[2.0, 2.0, 0.0]]
    # Returns [[1, 1], [0, -]] over 3 tokens: mean 2/3, unbiased std sqrt(1/3).
    adv = reinforce_pp_advantages(T([1.0, 0.0]), 1, T([[1.0, 1], [1, 0]]), kl=torch.zeros(2, 2), beta=0.0)
    s = math.sqrt(1 / 3)
    assert adv.flatten().tolist() == pytest.approx(flat([[(1 / 3) / s, (1 / 3) / s], [(-2 / 3) / s, 0.0]]), abs=1e-5)
    # The group option normalises the score within each prompt's k samples first.
    assert group_normalised_scores(T([1.0, 3.0, 2.0, 2.0]), 2).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0], abs=1e-5)
    grouped = reinforce_pp_advantages(T([1.0, 3.0, 2.0, 2.0]), 2, torch.ones(4, 1), kl=torch.zeros(4, 1), beta=0.0,
                                      group_norm=True)
    # then whitened over the 4 tokens: mean 0, unbiased variance (1 + 1) / 3.
    assert grouped[:, 0].tolist() == pytest.approx([-math.sqrt(1.5), math.sqrt(1.5), 0.0, 0.0], abs=1e-4)


def test_masked_whiten_hand_values():
    out = masked_whiten(T([[1.0, 3.0, 100.0]]), T([[1.0, 1.0, 0.0]]))
    assert out.flatten().tolist() == pytest.approx(flat([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), abs=1e-6)


def test_clipped_policy_loss_clip_fraction_and_approx_kl():
    logp = torch.log(T([[1.5, 0.5]])).requires_grad_(True)
    out = ppo_policy_loss(logp, torch.zeros(1, 2), T([[1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    # rho = 1.5 (clipped to 1.2, the max of -1.5 and -1.2) and 0.5 (unclipped -0.5 beats -0.8).
    assert out.loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert out.clip_fraction == pytest.approx(0.5)
    assert out.approx_kl == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)
    out.loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx(flat([[0.0, -0.5 / 2]]))  # no gradient through the clipped token
    neg = ppo_policy_loss(torch.log(T([[0.5]])), torch.zeros(1, 1), T([[-2.0]]), torch.ones(1, 1), clip=0.2)
    assert neg.loss.item() == pytest.approx(2.0 * 0.8)  # A < 0: the ratio is clipped from below


def test_clipped_value_loss_hand_values():
    assert ppo_value_loss(T([[1.0, 3.0]]), T([[1.0, 1.0]]), T([[2.0, 2.0]]), torch.ones(1, 2), 0.5).item() == 0.5
    assert ppo_value_loss(T([[2.5]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), 0.5).item() == pytest.approx(1.125)


def test_explained_variance():
    m = torch.ones(1, 3)
    assert explained_variance(T([[1.0, 2.0, 3.0]]), T([[1.0, 2.0, 3.0]]), m) == pytest.approx(1.0)
    assert explained_variance(T([[2.0, 2.0, 2.0]]), T([[1.0, 2.0, 3.0]]), m) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.01))  # error clipped at +0.2
    assert c.update(4.5, 100) == pytest.approx(0.1 * 1.002 * (1 - 0.25 * 0.01 * 0.8))  # error -0.25 -> -0.2


# ---------------------------------------------------------------------------------------------
# The PPO loop on the tiny model
# ---------------------------------------------------------------------------------------------
def _ppo_config(stack, **kw):
    from alignment.algorithms.ppo import PPOConfig

    policy, rm, data = stack
    base = dict(policy=str(policy), reward_model=str(rm), data=str(data), steps=4, batch_size=4, max_new_tokens=10,
                learning_rate=1e-3, checkpoint_every=2, eval_prompts=2, eval_every=0, seed=0, ppo_epochs=2,
                minibatch_size=2, guard_min_distinct2=0.0, guard_max_repetition=1.0, bf16=False)
    base.update(kw)
    return PPOConfig(**base)


def test_ppo_trains_policy_and_value_head(tmp_path, tiny_stack):
    import json

    from safetensors.torch import load_file

    from alignment.algorithms.ppo import train_ppo

    result = train_ppo(_ppo_config(tiny_stack, adaptive_kl=True, kl_target=0.01), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "value_explained_variance",
                "entropy", "kl"):
        assert all(math.isfinite(r[key]) for r in rows if not (key == "value_explained_variance"
                                                                and math.isnan(r[key]))), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and any(abs(r["kl"]) > 1e-4 for r in rows[1:])
    assert any(r["clip_fraction"] > 0 for r in rows) and len({round(r["loss"], 6) for r in rows}) > 1
    assert rows[-1]["kl_beta"] != pytest.approx(0.02)  # the adaptive controller moved beta
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert not any("value_head" in k for k in after)  # the final folder is a plain policy
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "policy.safetensors")
    assert ckpt["value_head.weight"].abs().sum() > 0  # the value head learned (it starts at zero)
    assert result.summary["eval_after"]["n"] == 2 and train_ppo(_ppo_config(
        tiny_stack, adaptive_kl=True, kl_target=0.01), tmp_path / "run").reused


def test_ppo_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_stack):
    import json

    from alignment.algorithms.ppo import train_ppo

    config = _ppo_config(tiny_stack, eval_prompts=0)
    train_ppo(config, tmp_path / "straight")
    assert train_ppo(config, tmp_path / "resumed", stop_after=3).summary == {"stopped_at": 3}
    train_ppo(config, tmp_path / "resumed")  # restarts from the step-2 checkpoint
    a = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["sample"] == y["sample"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]


@pytest.mark.parametrize("estimator, k", [("reinforce++", 1), ("reinforce++-group", 2)])
def test_reinforce_pp_estimators_train_without_a_critic(tmp_path, tiny_stack, estimator, k):
    import json

    from safetensors.torch import load_file

    from alignment.algorithms.ppo import PPOConfig, train_ppo

    config = _ppo_config(tiny_stack, steps=2, estimator=estimator, samples_per_prompt=k, batch_size=2, eval_prompts=0)
    train_ppo(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["value_loss"] == 0.0 and math.isnan(r["value_explained_variance"]) for r in rows)
    assert all(math.isfinite(r["policy_loss"]) for r in rows)
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PPOConfig(estimator="reinforce++-group", samples_per_prompt=1)


def test_ppo_with_lora_saves_a_plain_policy(tmp_path, tiny_stack):
    import json

    from safetensors.torch import load_file

    from alignment.algorithms.ppo import train_ppo

    result = train_ppo(_ppo_config(tiny_stack, steps=2, lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-3,
                                   eval_prompts=2), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the adapter-free reference equals the start
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert not any("lora" in k or "value_head" in k for k in weights)
    before = load_file(tiny_stack[0] / "model.safetensors")
    assert any(not torch.equal(before[k], weights[k]) for k in before if k in weights)
    assert result.summary["eval_after"]["n"] == 2


def test_ppo_critic_from_the_reward_model(tmp_path, tiny_stack):
    import json

    from safetensors.torch import load_file

    from alignment.algorithms.ppo import train_ppo

    _, rm, _ = tiny_stack
    train_ppo(_ppo_config(tiny_stack, steps=2, critic="reward_model", checkpoint_every=1, eval_prompts=0),
              tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["value_loss"]) and r["value_loss"] > 0 for r in rows)
    start = load_file(rm / "model.safetensors")
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "policy.safetensors")
    critic = {k.removeprefix("critic.model."): v for k, v in ckpt.items() if k.startswith("critic.model.")}
    assert set(critic) <= set(start) and "score.weight" in critic and not any("value_head" in k for k in ckpt)
    assert not torch.equal(critic["score.weight"], start["score.weight"])  # the critic trains from the RM
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert not any(k.startswith("critic") for k in final)
