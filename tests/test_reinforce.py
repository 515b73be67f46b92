"""REINFORCE: masks, log-probs, baselines and losses against hand values; the loop on a tiny model."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignment.algorithms.reinforce import (
    CollapseDetected,
    EMABaseline,
    MovingAverageBaseline,
    ReinforceConfig,
    action_logprobs,
    compute_advantages,
    reinforce_loss,
    rloo_advantages,
    shape_rewards,
    tis_weights,
    train_reinforce,
)
from alignment.generation import completion_logprobs, completion_mask, text_health


@contextlib.contextmanager
def step_gradients():
    """Record the flattened gradient every optimizer step is about to apply (one (P,) tensor per step)."""
    grads: list[torch.Tensor] = []

    def hook(optimizer, args, kwargs):
        grads.append(torch.cat([p.grad.detach().flatten().clone() for group in optimizer.param_groups
                                for p in group["params"] if p.grad is not None]))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield grads
    finally:
        handle.remove()


def assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-4) -> None:
    """The same gradients, step by step, up to summation order: |ga - gb| <= rel * |gb| (in norm). Not the
    weights after Adam, which divides by sqrt(v) and so turns a 1e-9 difference in a near-zero gradient
    coordinate into a step of up to the learning rate (different kernels on different CPUs do that)."""
    assert len(a) == len(b) and a
    for step, (ga, gb) in enumerate(zip(a, b, strict=True), 1):
        assert ga.shape == gb.shape
        assert torch.linalg.vector_norm(ga - gb) <= rel * torch.linalg.vector_norm(gb), step

def test_completion_mask_includes_first_eos_only():
    eos = 2
    comp = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    assert completion_mask(comp, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_completion_logprobs_cover_completion_tokens_only(tiny_model):
    from alignment.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_model))
    prompt, comp = [7, 8, 9], [10, 11, tok.eos_token_id]
    pad = tok.pad_token_id
    # Row 0: prompt left-padded by 2, completion then 2 junk tokens after EOS. Row 1: no padding.
    input_ids = torch.tensor([[pad, pad, *prompt, *comp, 12, 13], [5, 6, *prompt, *comp, 14, 15]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 8 + [0, 0]])
    mask = completion_mask(input_ids[:, 5:], tok.eos_token_id)
    assert mask.tolist() == [[1, 1, 1, 0, 0]] * 2
    logp, entropy = completion_logprobs(model, input_ids, attn, 5, mask)
    # By hand for row 0: the unpadded sequence prompt + completion, summing log p of the 3 completion tokens.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + comp])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    manual = sum(lp[2 + i, comp[i]] for i in range(3))
    assert logp[0].item() == pytest.approx(manual.item(), abs=1e-4)
    assert entropy.shape == (2,) and (entropy > 0).all()


def test_reinforce_loss_hand_value():
    logp = torch.tensor([-2.0, -1.0, -4.0], requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 0.25])
    loss = reinforce_loss(logp, adv)
    assert loss.item() == pytest.approx(-(1.0 * -2 + -0.5 * -1 + 0.25 * -4) / 3)  # = 2.5 / 3
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1 / 3, 0.5 / 3, -0.25 / 3])


def test_truncated_importance_weights_hand_values():
    """w_t = min(pi / mu, C) on completion tokens, 0 on padding, no gradient; the weighted log-prob
    sum_t w_t log pi_t carries the weights into the REINFORCE gradient."""
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]])).requires_grad_(True)
    mu = torch.log(torch.tensor([[0.1, 0.4, 0.9], [0.3, 0.1, 0.6]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = tis_weights(logp, mu, mask, cap=2.0)
    # ratios 5 -> capped at 2, 0.5, 1 | 1, 3 -> 2, (0.5, padding) -> 0
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [1.0, 2.0, 0.0]]))
    assert not w.requires_grad
    weighted = action_logprobs(logp, mask, w)
    torch.testing.assert_close(weighted.detach(), torch.tensor([2 * math.log(0.5) + 0.5 * math.log(0.2) + math.log(0.9),
                                                                math.log(0.3) + 2 * math.log(0.3)]))
    plain = action_logprobs(logp, mask)
    torch.testing.assert_close(plain.detach(), torch.tensor([math.log(0.5 * 0.2 * 0.9), 2 * math.log(0.3)]))
    reinforce_loss(weighted, torch.tensor([1.0, -1.0])).backward()
    torch.testing.assert_close(logp.grad, -w * torch.tensor([[1.0], [-1.0]]) / 2)


def test_baselines_hand_values():
    ma = MovingAverageBaseline()
    cfg = ReinforceConfig(reward_model="x", data="y", baseline="moving_average")
    adv, b = compute_advantages(torch.tensor([1.0, 3.0]), cfg, ma)  # no history: the batch mean
    assert b == 2.0 and adv.tolist() == [-1.0, 1.0]
    adv, b = compute_advantages(torch.tensor([5.0, 7.0]), cfg, ma)  # mean of all earlier rewards = 2
    assert b == 2.0 and adv.tolist() == [3.0, 5.0]
    _, b = compute_advantages(torch.tensor([0.0, 0.0]), cfg, ma)  # (1 + 3 + 5 + 7) / 4
    assert b == 4.0

    ema = EMABaseline(decay=0.5)
    cfg = ReinforceConfig(reward_model="x", data="y", baseline="ema", ema_decay=0.5)
    _, b = compute_advantages(torch.tensor([2.0]), cfg, ema)
    _, b2 = compute_advantages(torch.tensor([4.0]), cfg, ema)
    _, b3 = compute_advantages(torch.tensor([0.0]), cfg, ema)
    assert (b, b2, b3) == (2.0, 2.0, 3.0)  # 0.5 * 2 + 0.5 * 4

    # RLOO, k = 3: A_i = r_i - mean of the other two
    assert rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    cfg = ReinforceConfig(reward_model="x", data="y", baseline="none")
    assert compute_advantages(torch.tensor([1.0, -1.0]), cfg, None)[0].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="rloo"):
        ReinforceConfig(reward_model="x", data="y", baseline="rloo", samples_per_prompt=1)


def test_shape_rewards_hand_values():
    # R = E[r] - lambda Var[r] - beta KL - p * 1[no EOS], clipped to [-c, c]
    mean, var = torch.tensor([2.0, 1.0, 30.0, -1.0]), torch.tensor([1.0, 4.0, 0.0, 0.0])
    kl, eos = torch.tensor([0.5, -1.0, 0.0, 10.0]), torch.tensor([True, False, True, True])
    r = shape_rewards(mean, var, kl, eos, var_lambda=0.5, kl_beta=0.2, missing_eos_penalty=1.0, clip=10.0)
    assert r.tolist() == pytest.approx([2 - 0.5 - 0.1, 1 - 2 + 0.2 - 1, 10.0, -1 - 2.0])
    r = shape_rewards(mean, var, kl, eos, var_lambda=0.0, kl_beta=0.0, missing_eos_penalty=0.0, clip=None)
    assert r.tolist() == pytest.approx(mean.tolist())


def test_variance_weighted_and_whitened_advantages():
    cfg = ReinforceConfig(reward_model="x", data="y", baseline="none", variance_weighted_advantage=True)
    adv, _ = compute_advantages(torch.tensor([1.0, 2.0]), cfg, None, reward_var=torch.tensor([4.0 - 1e-4, 1.0 - 1e-4]))
    assert adv.tolist() == pytest.approx([0.5, 2.0])
    cfg = ReinforceConfig(reward_model="x", data="y", baseline="none", whiten_advantages=True)
    adv, _ = compute_advantages(torch.tensor([1.0, 2.0, 3.0]), cfg, None)
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-6) and adv.std().item() == pytest.approx(1.0, abs=1e-4)


def test_text_health_hand_values():
    healthy = text_health([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert healthy == {"distinct1": 1.0, "distinct2": 1.0, "repetition": 0.0}
    collapsed = text_health([[9] * 10, [9] * 10])
    # 20 tokens, 1 unique -> 0.05; 18 bigrams, 1 unique; 8 trigrams per text, 1 unique -> 7/8 repeated
    assert collapsed["distinct1"] == pytest.approx(0.05)
    assert collapsed["distinct2"] == pytest.approx(1 / 18)
    assert collapsed["repetition"] == pytest.approx(7 / 8)


# ---------------------------------------------------------------------------------------------
# The loop on the tiny model
# ---------------------------------------------------------------------------------------------
def _config(stack, **kw):
    policy, rm, data = stack
    # fp32 unless a test asks otherwise: "auto" turns bf16 autocast on where the CPU has bf16 instructions,
    # and the equivalence tests below compare two fp32 computations to tight tolerances.
    base = dict(policy=str(policy), reward_model=str(rm), data=str(data), steps=4, batch_size=4, max_new_tokens=12,
                learning_rate=1e-3, checkpoint_every=2, eval_prompts=4, seed=0, guard_min_distinct2=0.0,
                guard_max_repetition=1.0, bf16=False)
    base.update(kw)
    return ReinforceConfig(**base)


def test_training_updates_parameters_and_writes_everything(tmp_path, tiny_stack):
    config = _config(tiny_stack)
    result = train_reinforce(config, tmp_path / "run")
    final = tmp_path / "run" / "final"
    rows = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "baseline", "advantage", "kl", "entropy", "length", "eos_rate", "distinct1", "distinct2",
                "repetition", "loss"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert set(rows[0]["seconds"]) == {"generate", "reward", "policy", "reference", "forward_backward", "optimizer"}
    assert rows[0]["tokens"]["prompt"] > 4 and rows[0]["tokens"]["completion"] == 4 * rows[0]["length"]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts equal to the reference
    assert any(abs(r["kl"]) > 1e-4 for r in rows[1:])  # and moves away from it
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert (final / "curves.png").stat().st_size > 1000 and (final / "config.json").is_file()
    assert result.summary["eval_before"]["n"] == 4 and result.summary["eval_after"] is not None
    assert train_reinforce(config, tmp_path / "run").reused


@pytest.mark.parametrize("lora", [False, True])
def test_resume_after_interruption_gives_the_same_next_step(tmp_path, tiny_stack, lora):
    config = _config(tiny_stack, lora=lora, lora_r=4, lora_alpha=8)
    train_reinforce(config, tmp_path / "straight")
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]

    first = train_reinforce(config, tmp_path / "resumed", stop_after=3)  # checkpoint at 2, crash after 3
    assert first.summary == {"stopped_at": 3}
    train_reinforce(config, tmp_path / "resumed")  # restarts from step 2, redoes 3 and 4
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["sample"] == b["sample"]


def test_collapse_guard_stops_and_keeps_healthy_checkpoint(tmp_path, tiny_stack, monkeypatch):
    import alignment.algorithms.reinforce as R

    real = R.text_health
    calls = []

    def degrade(completions):  # healthy for 2 steps, then one repeated symbol
        calls.append(1)
        stats = real(completions)
        return stats if len(calls) <= 2 else {"distinct1": 0.05, "distinct2": 0.05, "repetition": 0.9}

    monkeypatch.setattr(R, "text_health", degrade)
    config = _config(tiny_stack, guard_min_distinct2=0.2, guard_max_repetition=0.6, guard_patience=2, steps=8,
                     eval_prompts=0)
    with pytest.raises(CollapseDetected, match=r"unhealthy for 2 steps at step 4; last healthy checkpoint: step-000002"):
        train_reinforce(config, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").is_file()
    assert not (tmp_path / "run" / "final").exists()


def test_rloo_runs_with_k_samples(tmp_path, tiny_stack):
    config = _config(tiny_stack, baseline="rloo", samples_per_prompt=2, batch_size=2, steps=2, kl_beta=0.0,
                     eval_prompts=0)
    train_reinforce(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["advantage"] == pytest.approx(0.0, abs=1e-5) for r in rows)


def test_cli_reinforce_runs_and_resumes(tmp_path, tiny_stack, capsys):
    from cli.main import main

    policy, rm, data = tiny_stack
    argv = ["-q", "reinforce", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out",
            str(tmp_path / "run"), "steps=2", "batch_size=2", "max_new_tokens=8", "eval_prompts=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "policy trained" in out and "held-out mean reward" in out
    assert main(argv) == 0 and "policy reused" in capsys.readouterr().out
    assert main([*argv[:-1], "eval_prompts=3"]) == 2  # same folder, different config: refused
    assert "different config" in capsys.readouterr().err


def test_lora_policy_uses_adapter_free_reference_and_saves_a_plain_model(tmp_path, tiny_stack):
    config = _config(tiny_stack, lora=True, lora_r=4, lora_alpha=8, steps=3, eval_prompts=2, learning_rate=5e-3)
    train_reinforce(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and any(abs(r["kl"]) > 1e-5 for r in rows[1:])
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    before = load_file(tiny_stack[0] / "model.safetensors")
    assert any(not torch.equal(before[k], weights[k]) for k in before if k in weights)


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_saved_model_is_the_fp32_base_plus_the_adapters(tmp_path, tiny_stack, bf16):
    """The saved policy = original fp32 weights + each adapter's delta, whether the training base was held
    in fp32 or (bf16 autocast) in bf16; fp32: the same as peft's merge_and_unload."""
    import copy

    from alignment.algorithms.online import plan_online
    from alignment.algorithms.reinforce import ReinforceRecipe

    config = _config(tiny_stack, lora=True, lora_r=4, lora_alpha=8, steps=2, eval_prompts=0, learning_rate=5e-3,
                     bf16=bf16)
    (tmp_path / "run").mkdir()
    recipe = ReinforceRecipe(config, tmp_path / "run", plan_online(config, "k", tmp_path).key, None)
    recipe.setup()
    base_dtype = recipe.policy.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype
    assert base_dtype == (torch.bfloat16 if bf16 else torch.float32)
    recipe.train()
    plain = recipe.plain_policy().state_dict()
    original = load_file(tiny_stack[0] / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in plain.values())
    changed = [k for k in original if not torch.equal(original[k], plain[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved
    if not bf16:
        merged = copy.deepcopy(recipe.policy).merge_and_unload().state_dict()
        assert all(torch.allclose(plain[k], merged[k], atol=1e-6) for k in merged)
    else:  # merged onto the original fp32 weights, not onto their bf16 rounding held in training
        layer = recipe.policy.get_base_model().model.layers[0].mlp.up_proj
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = original["model.layers.0.mlp.up_proj.weight"] + (b @ a).detach().float() * layer.scaling["default"]
        torch.testing.assert_close(plain["model.layers.0.mlp.up_proj.weight"], expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(layer.base_layer.weight.float(), original["model.layers.0.mlp.up_proj.weight"])


def test_bf16_frozen_linears_compute_what_the_fp32_base_computes_under_autocast(tiny_stack):
    """Under bf16 autocast, Linear weights stored in bf16 give the fp32 model's log-probs (autocast casts
    them to the same bf16 values); embedding and norms stay fp32."""
    from alignment.generation import SamplingConfig, rollout, token_logprobs
    from alignment.models import bf16_frozen_linears, load_causal_lm

    fp32, tok = load_causal_lm(str(tiny_stack[0]))
    half, _ = load_causal_lm(str(tiny_stack[0]))
    assert bf16_frozen_linears(half) == 2 * 7  # q, k, v, o, gate, up, down per layer; the tied LM head stays
    assert half.get_input_embeddings().weight.dtype == torch.float32
    ro = rollout(fp32, tok, [[{"role": "user", "content": "What is 3 + 4?"}]] * 2, SamplingConfig(max_new_tokens=8), 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = token_logprobs(fp32, ro.input_ids, ro.attention_mask, ro.prompt_width)
        b, _ = token_logprobs(half, ro.input_ids, ro.attention_mask, ro.prompt_width)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu_trains(tmp_path, tiny_stack):
    result = train_reinforce(_config(tiny_stack, steps=2, eval_prompts=2, bf16=True), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert after[next(iter(after))].dtype == torch.float32  # autocast: the weights stay fp32
    assert result.summary["eval_after"]["n"] == 2


def test_bf16_rollout_copy_samples_what_the_autocast_policy_samples(tmp_path, tiny_stack, monkeypatch):
    """bf16 on: rollouts come from the bf16 copy, refreshed before every rollout, and the run samples the
    same completions and rewards at every step as sampling with the autocast policy itself
    (bf16_rollouts=false). By default the copy is used with LoRA (where it pays) and not without."""
    from alignment.generation import Bf16Rollouts

    monkeypatch.setattr("alignment.algorithms.online.bf16_rollouts_pay", lambda device: True)  # any CPU: as measured fast
    refreshes = []
    original = Bf16Rollouts.refresh
    monkeypatch.setattr(Bf16Rollouts, "refresh", lambda self: (refreshes.append(1), original(self))[1])
    rows = {}
    for copy in (True, False):
        train_reinforce(_config(tiny_stack, steps=3, eval_prompts=0, bf16=True, bf16_rollouts=copy),
                        tmp_path / str(copy))
        rows[copy] = [json.loads(line) for line in (tmp_path / str(copy) / "metrics.jsonl").read_text().splitlines()]
    assert len(refreshes) == 1 + 3  # once when built, then before each of the 3 rollouts
    assert [r["sample"] for r in rows[True]] == [r["sample"] for r in rows[False]]
    assert [r["length"] for r in rows[True]] == [r["length"] for r in rows[False]]
    assert [r["reward"] for r in rows[True]] == pytest.approx([r["reward"] for r in rows[False]], rel=1e-3, abs=1e-3)
    refreshes.clear()
    train_reinforce(_config(tiny_stack, steps=1, eval_prompts=0, bf16=True), tmp_path / "full")
    assert refreshes == []
    train_reinforce(_config(tiny_stack, steps=1, eval_prompts=0, bf16=True, lora=True), tmp_path / "lora")
    assert len(refreshes) == 2


def test_gradient_checkpointing_gives_the_same_first_step(tmp_path, tiny_stack):
    plain = _config(tiny_stack, steps=1, eval_prompts=0)
    checkpointed = _config(tiny_stack, steps=1, eval_prompts=0, gradient_checkpointing=True)
    train_reinforce(plain, tmp_path / "a")
    train_reinforce(checkpointed, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
    b = json.loads((tmp_path / "b" / "metrics.jsonl").read_text())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["sample"] == b["sample"]
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_micro_batches_give_the_same_step_and_free_each_graph(tmp_path, tiny_stack, monkeypatch):
    """Gradient accumulation in micro-batches of 1 gives the full batch's losses, KL and updates, and
    each micro-batch's backward runs before the next graph is built (memory of one micro-batch)."""
    import alignment.algorithms.reinforce as R

    full = _config(tiny_stack, steps=2, eval_prompts=0, micro_batch_size=4)
    with step_gradients() as whole:
        train_reinforce(full, tmp_path / "full")

    real, pending = R.token_logprobs, []

    def tracked(*args, **kwargs):
        lp, ent = real(*args, **kwargs)
        if lp.requires_grad:
            assert not pending, "a micro-batch graph was built before the previous one's backward"
            pending.append(lp)
            lp.register_hook(lambda grad: pending.clear())
        return lp, ent

    monkeypatch.setattr(R, "token_logprobs", tracked)
    with step_gradients() as micro:
        train_reinforce(full.model_copy(update={"micro_batch_size": 1}), tmp_path / "micro")
    a = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b, strict=True):
        assert x["sample"] == y["sample"]
        for key in ("loss", "kl", "reward", "advantage", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (x["step"], key)
    assert_same_gradients(whole, micro)


def test_k_samples_share_their_prompt_pass_with_the_same_steps(tmp_path, tiny_stack, monkeypatch):
    """k = 2 samples per prompt: the reference, no-grad and gradient passes run each prompt once (KV cache
    expanded) and give the same steps as the full passes (losses, KL, gradient norm, weights)."""
    import alignment.algorithms.reinforce as R

    config = _config(tiny_stack, steps=2, eval_prompts=0, batch_size=2, samples_per_prompt=2, micro_batch_size=4)
    groups = []
    real = R.token_logprobs
    monkeypatch.setattr(R, "token_logprobs", lambda *a, **kw: groups.append(kw["group"]) or real(*a, **kw))
    with step_gradients() as shared:
        train_reinforce(config, tmp_path / "shared")
    assert groups and set(groups) == {2}
    monkeypatch.setattr(R.ReinforceRecipe, "prompt_group", property(lambda self: 1))
    with step_gradients() as full:
        train_reinforce(config, tmp_path / "full")
    a = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b, strict=True):
        assert x["sample"] == y["sample"]
        for key in ("loss", "kl", "reward", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (x["step"], key)
    assert_same_gradients(shared, full)


@pytest.mark.parametrize("lora", [False, True])
def test_int8_rollouts_train_with_the_importance_correction_and_resume(tmp_path, tiny_stack, lora):
    """int8_rollouts: an int8 copy samples (re-quantised before every rollout), the fp32 policy's gradient
    carries the truncated importance weights (their statistics in the metrics), the weights move, and
    an interrupted run resumes to the same steps."""
    config = _config(tiny_stack, int8_rollouts=True, lora=lora, lora_r=4, lora_alpha=8, eval_prompts=2,
                     learning_rate=5e-3 if lora else 1e-3)
    train_reinforce(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        stats = r["int8"]
        assert 0 < stats["is_weight"] <= config.tis_cap and 0 <= stats["capped"] <= 1
        assert math.isfinite(stats["log_ratio"]) and stats["log_ratio"] != 0.0  # int8 != fp32: a real gap
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    train_reinforce(config, tmp_path / "resumed", stop_after=3)
    train_reinforce(config, tmp_path / "resumed")
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, resumed, strict=True):
        assert a["sample"] == b["sample"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="int8_rollouts runs on the CPU only"):
        _config(tiny_stack, int8_rollouts=True, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_stack, capsys):
    from alignment.hardware import DeviceError
    from cli.main import main

    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        train_reinforce(_config(tiny_stack, device="cuda"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    policy, rm, data = tiny_stack
    assert main(["-q", "reinforce", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out",
                 str(tmp_path / "cli"), "device=cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_few_steps_on_cuda(tmp_path, tiny_stack):
    config = _config(tiny_stack, device="cuda", steps=2, checkpoint_every=1, eval_prompts=2)
    result = train_reinforce(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    before = load_file(tiny_stack[0] / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before if k in after)
    assert result.summary["eval_after"]["n"] == 2


def test_heldout_evaluations_curves_and_best(tmp_path, tiny_stack):
    """Every eval_every steps: proxy, independent RM, gold accuracy and KL on the held-out prompts; best/ keeps
    the best gold (the demo validation prompts have gold answers)."""
    _, rm, _ = tiny_stack
    config = _config(tiny_stack, steps=4, eval_every=2, eval_prompts=6, independent_reward_models={"other": str(rm)})
    result = train_reinforce(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(set(r["independent"]) == {"other"} and r["gold_n"] > 0 and 0 <= r["gold"] <= 1 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] is not None
    # The same RM as proxy and as "independent" scores the same answers the same (no var for a scalar RM).
    assert all(r["independent"]["other"] == pytest.approx(r["proxy"], abs=1e-4) for r in rows)
    s = result.summary
    assert [h["step"] for h in s["heldout"]] == [0, 2, 4] and s["eval_after"]["gold_n"] == rows[-1]["gold_n"]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == s["best"]["step"] and best["score"] == max(r["gold"] for r in rows)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "overoptimisation.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "heldout.jsonl").is_file()


def test_overoptimisation_alarm_stops_when_asked(tmp_path, tiny_stack, monkeypatch):
    import alignment.algorithms.online
    import alignment.algorithms.reinforce as R

    monkeypatch.setattr(alignment.algorithms.online, "overoptimisation_alarm", lambda history, *a, **k: "over-optimisation: test" if len(history) > 1
                        else None)
    config = _config(tiny_stack, steps=6, eval_every=2, eval_prompts=2, alarm_action="stop", checkpoint_every=10)
    with pytest.raises(R.OverOptimisationDetected, match="over-optimisation: test; stopped"):
        train_reinforce(config, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").is_file()  # kept for inspection
    assert (tmp_path / "run" / "best" / "best.json").is_file() and not (tmp_path / "run" / "final").exists()
    warned = _config(tiny_stack, steps=4, eval_every=2, eval_prompts=2)
    assert train_reinforce(warned, tmp_path / "warn").summary["alarms"] == ["step 2: over-optimisation: test",
                                                                           "step 4: over-optimisation: test"]
