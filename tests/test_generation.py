"""Rollout pieces: prompt-prefix sharing for k samples per prompt, chunked log-probs."""

from __future__ import annotations

import pytest
import torch

from alignment.generation import (
    SamplingConfig,
    batched_logprobs,
    completion_logprobs,
    encode_prompts,
    generate,
    rollout,
)
from alignment.models import load_causal_lm

PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}],
           [{"role": "user", "content": "Write a long poem about the sea and the wind, please."}],
           [{"role": "user", "content": "Hi"}]]


def test_expanded_cache_gives_the_same_samples_as_separate_prefills(tiny_model):
    """k samples per prompt from one prefill whose KV cache is expanded k times = the same prompts
    repeated k times and prefilled separately, under the same seed (left padding included)."""
    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    k = 4
    batch = encode_prompts(tok, PROMPTS, 64)
    assert (batch["attention_mask"] == 0).any(), "the test needs left padding"
    torch.manual_seed(7)
    shared = generate(policy, tok, batch, sampling, samples_per_prompt=k)
    repeated = {name: t.repeat_interleave(k, dim=0) for name, t in batch.items()}
    torch.manual_seed(7)
    separate = generate(policy, tok, repeated, sampling)
    assert shared.shape == (len(PROMPTS) * k, separate.shape[1])
    assert torch.equal(shared, separate)
    # the k samples of a prompt differ (sampling, not copies), and greedy decoding agrees too
    assert len({tuple(r.tolist()) for r in shared[:k]}) > 1
    greedy = SamplingConfig(max_new_tokens=12, greedy=True)
    assert torch.equal(generate(policy, tok, batch, greedy, samples_per_prompt=k), generate(policy, tok, repeated, greedy))


def test_rollout_with_k_samples_is_prompt_major(tiny_model):
    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    ro = rollout(policy, tok, PROMPTS, SamplingConfig(max_new_tokens=6), 64, samples_per_prompt=2)
    assert [p[0]["content"] for p in ro.prompts] == [p[0]["content"] for p in PROMPTS for _ in range(2)]
    assert ro.prompt_ids.shape[0] == ro.completion.shape[0] == 6
    assert torch.equal(ro.prompt_ids[0], ro.prompt_ids[1]) and not torch.equal(ro.prompt_ids[1], ro.prompt_ids[2])


def test_chunked_logprobs_equal_the_full_pass(tiny_model):
    """batched_logprobs in chunks of 2 = one pass over the whole batch (log-probs and entropies)."""
    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    ro = rollout(policy, tok, PROMPTS * 2, SamplingConfig(max_new_tokens=8), 64)
    with torch.no_grad():
        full_lp, full_ent = completion_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask)
    lp, ent = batched_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask, chunk=2)
    torch.testing.assert_close(lp, full_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent, atol=1e-5, rtol=1e-5)
    # a reference pass skips the entropies (no full-vocabulary softmax), same log-probs
    lp_only, none = batched_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask, chunk=4,
                                     entropy=False)
    assert none is None
    torch.testing.assert_close(lp_only, full_lp, atol=1e-5, rtol=1e-5)


def test_shared_prompt_pass_equals_the_full_pass_values_and_gradients(tiny_model):
    """k completions per prompt with the prompt run once (KV cache expanded, gradient through it) give
    the full pass's per-token log-probs, entropies and parameter gradients."""
    from alignment.generation import token_logprobs

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    k = 3
    ro = rollout(policy, tok, PROMPTS, SamplingConfig(max_new_tokens=10), 64, samples_per_prompt=k)
    # completions of different lengths: cut row i after 10 - i % 4 tokens (EOS there, padding after)
    for i in range(ro.completion.shape[0]):
        cut = 10 - i % 4
        ro.completion[i, cut - 1] = tok.eos_token_id
        ro.completion[i, cut:] = tok.pad_token_id
        ro.mask[i, cut:] = 0
    assert ro.mask.sum(-1).unique().numel() > 1
    results = {}
    for group in (1, k):
        policy.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, group=group)
        ((logp * ro.mask).sum() / ro.mask.sum()).backward()
        results[group] = (logp.detach(), ent, {n: p.grad.clone() for n, p in policy.named_parameters()})
    (lp1, ent1, g1), (lpk, entk, gk) = results[1], results[k]
    torch.testing.assert_close(lpk * ro.mask, lp1 * ro.mask, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(entk * ro.mask, ent1 * ro.mask, atol=1e-5, rtol=1e-4)
    for name in g1:  # to summation order, in norm: per coordinate, a near-zero entry differs by kernel choice
        assert torch.linalg.vector_norm(gk[name] - g1[name]) <= 1e-4 * torch.linalg.vector_norm(g1[name]) + 1e-7, name
    assert any(g.abs().sum() > 0 for g in gk.values())
    # without gradient, in chunks of whole groups
    lp, _ = batched_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask, chunk=2 * k, group=k)
    torch.testing.assert_close(lp, (lp1 * ro.mask).sum(-1), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Int8 rollouts: the sampler's recorded log-probs, the int8 copy and its refresh
# ---------------------------------------------------------------------------------------------
def test_recorded_sampler_logprobs_are_the_samplers_token_logprobs(tiny_model):
    """The log-probs recorded while sampling (SamplerLogprobs) = a teacher-forced pass of the same model
    over the sampled completion, on every completion token (k = 1 and k = 2, left padding, EOS cut)."""
    from alignment.generation import token_logprobs

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    for k in (1, 2):
        torch.manual_seed(3)
        ro = rollout(policy, tok, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.7), 64,
                     samples_per_prompt=k, record_logprobs=True)
        assert ro.sampler_logp.shape == ro.completion.shape
        with torch.no_grad():
            expected, _ = token_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, entropy=False)
        torch.testing.assert_close(ro.sampler_logp, expected * ro.mask, atol=1e-5, rtol=1e-5)
        assert (ro.sampler_logp[ro.mask.bool()] < 0).all()
    assert rollout(policy, tok, PROMPTS, SamplingConfig(max_new_tokens=4), 64).sampler_logp is None


def _logsoftmax_gap(a, b, ids):
    with torch.no_grad():
        la, lb = (torch.log_softmax(m(input_ids=ids).logits.float(), -1) for m in (a, b))
    return float((la - lb).abs().max())


@pytest.mark.parametrize("lora", [False, True])
def test_int8_copy_shares_what_it_does_not_quantise_and_follows_the_policy(tiny_model, lora):
    """Int8Rollouts: int8 Linear layers (the skipped down_proj stays float), embedding and norms shared
    with the policy (no copy); its next-token distribution is close to the policy's, and after the
    policy's weights change a refresh makes it follow them (LoRA: base + adapter delta)."""
    from peft import LoraConfig, get_peft_model
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    from alignment.generation import Int8Rollouts

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    plain = policy.get_base_model() if lora else policy
    sampler = Int8Rollouts(policy)
    sampler.refresh()
    layer = sampler.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and isinstance(sampler.model.lm_head, Int8Linear)
    assert not isinstance(layer.mlp.down_proj, Int8Linear)
    assert sampler.model.model.embed_tokens.weight is plain.model.embed_tokens.weight
    assert sampler.model.model.norm.weight is plain.model.norm.weight
    ids = encode_prompts(tok, PROMPTS, 64)["input_ids"]
    assert _logsoftmax_gap(policy, sampler.model, ids) < 0.1

    # move the policy: full weights, or the adapters (lora_B starts at zero, so the delta is new)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ("lora_B" in name) if lora else name.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    stale = _logsoftmax_gap(policy, sampler.model, ids)
    sampler.refresh()
    fresh = _logsoftmax_gap(policy, sampler.model, ids)
    assert fresh < 0.25 and stale > 4 * fresh, (fresh, stale)


def test_int8_copy_of_a_bf16_held_lora_base_runs_in_fp32(tiny_model):
    """LoRA over a base whose Linear weights are held in bf16 (bf16 autocast runs): the int8 copy's
    float layers are merged fp32 copies, so sampling runs without autocast and matches the policy."""
    from peft import LoraConfig, get_peft_model

    from alignment.generation import Int8Rollouts
    from alignment.models import bf16_frozen_linears

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    bf16_frozen_linears(policy)
    policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    sampler = Int8Rollouts(policy)
    sampler.refresh()
    assert sampler.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    ro = rollout(sampler.model, tok, PROMPTS, SamplingConfig(max_new_tokens=6), 64, record_logprobs=True)
    assert ro.completion.shape[0] == len(PROMPTS) and torch.isfinite(ro.sampler_logp).all()


# ---------------------------------------------------------------------------------------------
# bf16 rollouts: a bf16 copy of the Linear weights, refreshed every step
# ---------------------------------------------------------------------------------------------
def test_bf16_copy_samples_the_same_tokens_as_the_autocast_policy(tiny_model):
    """The bf16 copy under autocast = the fp32 policy under autocast: the same tokens under the same
    seed (k = 1 and k = 3), with embedding and norms shared and the LM head its own bf16 tensor; after the
    policy's weights change, a refresh makes it sample the new policy's tokens again."""
    from alignment.generation import Bf16Rollouts

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    copy = Bf16Rollouts(policy)
    layer = copy.model.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16 and copy.model.lm_head.weight.dtype == torch.bfloat16
    assert copy.model.model.embed_tokens.weight is policy.model.embed_tokens.weight
    assert copy.model.model.norm.weight is policy.model.norm.weight
    assert policy.lm_head.weight.dtype == torch.float32  # the policy is untouched
    batch = encode_prompts(tok, PROMPTS, 64)
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0)

    def same_tokens(k: int) -> bool:
        torch.manual_seed(11)
        a = generate(policy, tok, batch, sampling, bf16=True, samples_per_prompt=k)
        torch.manual_seed(11)
        b = generate(copy.model, tok, batch, sampling, bf16=True, samples_per_prompt=k)
        return torch.equal(a, b)

    assert same_tokens(1) and same_tokens(3)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    assert not same_tokens(1)  # stale: the copy still holds the old weights
    copy.refresh()
    assert same_tokens(1) and same_tokens(3)


def test_bf16_copy_merges_lora_adapters(tiny_model):
    """With LoRA the copy holds base + adapter delta in plain bf16 Linear layers (no adapter modules run
    while decoding), and follows the adapters after a refresh: its log-probs match the policy's under
    autocast to bf16 rounding (merged, then rounded once), and the stale copy's do not."""
    from peft import LoraConfig, get_peft_model

    from alignment.generation import Bf16Rollouts
    from alignment.models import bf16_frozen_linears

    policy, tok = load_causal_lm(str(tiny_model), padding_side="left")
    bf16_frozen_linears(policy)
    policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    copy = Bf16Rollouts(policy)
    assert type(copy.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    ids = encode_prompts(tok, PROMPTS, 64)["input_ids"]

    def gap() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return _logsoftmax_gap(policy, copy.model, ids)

    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    stale = gap()
    copy.refresh()
    fresh = gap()
    assert fresh < 0.2 and stale > 5 * fresh, (fresh, stale)  # max |gap| over a 49k vocabulary: bf16 rounding


def test_fused_adamw_takes_the_plain_step():
    """adamw(fused=True) = torch's plain AdamW after a few steps, to a relative tolerance (one kernel,
    another summation order); fused=None picks the fused kernel on the CPU."""
    from alignment.algorithms.online import adamw

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = adamw(params, 1e-2, 0.01, fused=fused)
        assert opt.defaults["fused"] is fused
        for step in range(5):
            torch.manual_seed(step)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append(params)
    for plain, fused in zip(*results, strict=True):
        assert not torch.equal(plain, start[0]) if plain.shape == start[0].shape else True
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert adamw([torch.nn.Parameter(torch.zeros(3))], 1e-3, 0.0).defaults["fused"] is True
