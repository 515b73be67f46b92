"""Rollouts: what every stage that makes a model answer prompts shares.

Prompts go through the chat template and are left-padded (so every row's last prompt token sits in
the same column and generation appends to all rows alike); completions are sampled with the KV
cache (optionally by an int8 copy of the policy, :class:`Int8Rollouts`, which records the sampler's
per-token log-probs for an importance-sampling correction); a completion counts up to and including its first EOS; log-probs and entropies are read on
completion tokens only, in chunks. REINFORCE, scoring, the local judge and (later) PPO use these
pieces; PPO adds per-token values on the same masks (``token_logprobs`` gives the per-token terms).

Shapes: B sequences, P prompt width (left-padded), T completion width (right-padded after EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field

from alignment.config import ConfigModel
from alignment.data import Message


class SamplingConfig(ConfigModel):
    """How completions are drawn: greedy, or sampled with temperature / top-p / top-k."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(64, ge=1)
    greedy: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None}


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def encode_prompts(tokenizer, prompts: Sequence[Sequence[Message]], max_length: int) -> dict[str, torch.Tensor]:
    """Chat-templated prompts, cut from the left to ``max_length``, left-padded. (B, P) tensors."""
    ids = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=False)
           for p in prompts]
    return left_padded([x[-max_length:] for x in ids], tokenizer.pad_token_id)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Plain-text prompts (no chat template, e.g. "... TL;DR:"), cut from the left to ``max_length``
    tokens, left-padded: (B, P) tensors, as :func:`encode_prompts` gives for chat prompts."""
    return left_padded([tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts],
                       tokenizer.pad_token_id)


def left_padded(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token lists -> (B, P) ``input_ids`` left-padded with ``pad_id`` and the (B, P) ``attention_mask``."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(list(x))
        mask[i, width - len(x):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, as generate() uses them with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(policy, tokenizer, prompt_batch: dict[str, torch.Tensor], sampling: SamplingConfig, *,
             bf16: bool = False, samples_per_prompt: int = 1, logits_processor: list | None = None) -> torch.Tensor:
    """Completions (B * k, T) after the (B, P) prompt batch, prompt-major (the k samples of prompt 0
    first), on CPU; the KV cache is on (generate's default).

    With k = ``samples_per_prompt`` > 1 each prompt is prefilled once and its KV cache expanded k
    times (:func:`prefill_expanded`) instead of prefilling k copies: the k samples cost one prefill.
    ``logits_processor``: extra processors for ``generate`` (e.g. :class:`SamplerLogprobs`).
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    ids, attn = prompt_batch["input_ids"].to(device), prompt_batch["attention_mask"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        extra: dict[str, Any] = {}
        if samples_per_prompt > 1:
            ids, attn, extra["past_key_values"] = prefill_expanded(policy, ids, attn, samples_per_prompt)
        if logits_processor:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList(logits_processor)
        out = policy.generate(input_ids=ids, attention_mask=attn, max_new_tokens=sampling.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              **sampling.generate_kwargs(), **extra)
    policy.train(was_training)
    completion = out[:, ids.shape[1]:].cpu()
    if completion.shape[1] == 0:
        completion = torch.full((out.shape[0], 1), tokenizer.eos_token_id)
    return completion


def prefill_expanded(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int):
    """Prefill all but the last prompt token once per prompt and expand the KV cache to k rows each.

    input_ids, attention_mask: (B, P). Returns the (B * k, P) ids and mask, repeated prompt-major, and
    a ``DynamicCache`` holding P - 1 positions for B * k rows: ``generate`` then runs only the last
    prompt token (which yields the first completion token's distribution) and decodes from there, so
    its sampling is the same as for k separately prefilled copies of each prompt.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    if input_ids.shape[1] > 1:
        _, cache = expanded_prompt_cache(model, input_ids[:, :-1], attention_mask[:, :-1], k)
    return input_ids.repeat_interleave(k, dim=0), attention_mask.repeat_interleave(k, dim=0), cache


def expanded_prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, **kwargs):
    """Run the (N, P) prompts once and expand their KV cache to N * k rows, prompt-major: (the prompt
    pass's output, with logits at the last position only; the ``DynamicCache``). The expansion is a
    differentiable repeat, so a gradient through the cache reaches the prompt pass."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    cache.batch_repeat_interleave(k)
    return out, cache


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for completion tokens up to and including the first EOS, 0 after it.

    completion_ids: (B, T) generated tokens (everything after the prompt) -> (B, T) float.
    A row without EOS keeps all T tokens.
    """
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).float()


def completion_tokens(completion: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each completion's tokens up to and including its first EOS. completion, mask: (B, T)."""
    return [row[: int(m.sum())].tolist() for row, m in zip(completion, mask, strict=True)]


def pad_completions(tokens: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded (B, T) ids and (B, T) float mask (T >= 1)."""
    width = max(1, max((len(t) for t in tokens), default=1))
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(tokens), width))
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
        mask[i, :len(t)] = 1
    return ids, mask


def decode_completions(tokenizer, tokens: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


@dataclass
class Rollout:
    """One batch of prompts and their sampled completions, everything later steps read.

    ``prompts`` (B messages lists), ``prompt_ids``/``prompt_mask`` (B, P) left-padded,
    ``completion`` (B, T), ``mask`` (B, T) through the first EOS, ``has_eos`` (B,) bool,
    ``tokens`` and ``texts``: each completion's tokens through its first EOS, and their text;
    ``sampler_logp`` (B, T): log mu(y_t | x, y_<t) under the model that sampled, when it was not the
    policy itself (int8 rollouts), 0 after the mask; else None.
    """

    prompts: list[list[Message]]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor
    tokens: list[list[int]]
    texts: list[str]
    sampler_logp: torch.Tensor | None = None

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt and completion."""
        return torch.cat([self.prompt_ids, self.completion], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T): real prompt tokens and completion tokens through the first EOS."""
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def rollout(policy, tokenizer, prompts: Sequence[Sequence[Message]], sampling: SamplingConfig,
            max_prompt_length: int, *, bf16: bool = False, samples_per_prompt: int = 1,
            record_logprobs: bool = False) -> Rollout:
    """Encode, sample and cut the completions of one batch of prompts: B prompts -> B * k rows,
    prompt-major (each prompt prefilled once, see :func:`generate`). ``record_logprobs``: keep the
    sampling model's per-token log-probs (``Rollout.sampler_logp``)."""
    batch = encode_prompts(tokenizer, prompts, max_prompt_length)
    k = samples_per_prompt
    recorder = SamplerLogprobs() if record_logprobs else None
    completion = generate(policy, tokenizer, batch, sampling, bf16=bf16, samples_per_prompt=k,
                          logits_processor=[recorder] if recorder else None)
    mask = completion_mask(completion, tokenizer.eos_token_id)
    tokens = completion_tokens(completion, mask)
    return Rollout([list(p) for p in prompts for _ in range(k)], batch["input_ids"].repeat_interleave(k, dim=0),
                   batch["attention_mask"].repeat_interleave(k, dim=0), completion, mask,
                   (completion == tokenizer.eos_token_id).any(-1), tokens, decode_completions(tokenizer, tokens),
                   recorder.logprobs(completion) * mask if recorder else None)


class SamplerLogprobs:
    """A ``generate`` logits processor that records log mu(y_t | x, y_<t) of each sampled token under the
    sampling model's own (untempered) distribution: the log-softmax of the logits ``generate`` hands to
    its processors (custom processors run before the temperature / top-k / top-p warpers), gathered
    at the token chosen, which the next call sees as the last input id. One (B, V) step is held at a
    time; :meth:`logprobs` gathers the last step at the final tokens.
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # (B, V) log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # (B,) per completed step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:].to(self.previous.device)).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs(self, completion: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of the completion tokens (T = the steps ``generate`` ran), on CPU."""
        steps = list(self.steps)
        if self.previous is not None:
            steps.append(self.previous.gather(-1, completion[:, len(steps):len(steps) + 1].to(self.previous.device))
                         .squeeze(-1))
        out = torch.zeros(completion.shape)
        if steps:
            out[:, :len(steps)] = torch.stack(steps, dim=1).cpu()[:, :completion.shape[1]]
        return out


# --------------------------------------------------------------------------------------------
# Int8 rollout weights
# --------------------------------------------------------------------------------------------
class Int8Rollouts:
    """An int8 copy of the policy for sampling: the Linear layers (the LM head included) quantised per
    output channel (symmetric int8 weights, activations quantised per tensor on the fly: torch's dynamic
    quantisation, fbgemm/x86 kernels, CPU only), everything else (embedding, norms, rotary tables)
    shared with the policy, not copied. Decoding reads about a quarter of the fp32 bytes per step.

    ``skip``: layers kept in full precision (shared with the policy), by name part. The MLP output
    projections (``down_proj``) read the SwiGLU product, whose outlier activations per-tensor int8 cannot
    hold: with them quantised, SmolLM2-135M's samples had a mean log(pi_fp32 / pi_int8) of -1.03 per
    token (incoherent text); without, -0.18 to -0.28 (measured on 16 chat prompts, 48 tokens).

    :meth:`refresh` re-quantises the Linear layers from the policy's current weights (with LoRA: the
    base weight plus each adapter's delta, merged in fp32) and is called before every rollout, so the
    sampler is the policy of this step up to int8 rounding. The gap between the two is what the
    truncated importance-sampling correction of the gradient accounts for (``reinforce.tis_weights``).

    ``torch.ao.quantization`` is deprecated in favour of torchao; torchao's eager int8 (0.18, no
    ``torch.compile``) decodes slower than fp32 on this CPU (bench/reinforce_step.py), so this uses
    the fbgemm modules while torch ships them, and says so clearly when it no longer does.
    """

    def __init__(self, policy, skip: tuple[str, ...] = ("down_proj",)) -> None:
        try:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # noqa: F401
        except ImportError as e:  # a torch without the eager quantised modules
            raise RuntimeError("int8 rollouts need torch.ao.nn.quantized.dynamic (torch's fbgemm int8 Linear), "
                               f"absent from torch {torch.__version__}: set int8_rollouts=false") from e
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        if next(base.parameters()).device.type != "cpu":
            raise RuntimeError("int8 rollouts run on the CPU only (fbgemm kernels); the policy is on "
                               f"{next(base.parameters()).device}: set int8_rollouts=false")
        self.model = _shared_skeleton(base)
        # name -> (layer, int8?): quantised layers, and skipped ones that are not a plain fp32 Linear the
        # copy can share (LoRA-wrapped, or bf16-held frozen weights): those become merged fp32 Linears.
        self.sources: dict[str, tuple[torch.nn.Module, bool]] = {}
        for name, module in _outer_linears(base):
            quantise = not any(part in name.split(".") for part in skip)
            if quantise or type(module) is not torch.nn.Linear or module.weight.dtype != torch.float32:
                self.sources[name] = (module, quantise)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-quantise the Linear layers from the policy's current (merged) weights (~2 s for SmolLM2-135M)."""
        import warnings

        with warnings.catch_warnings():  # torch's deprecation notice for quantised tensors, once per layer
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)")
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            for name, (source, quantise) in self.sources.items():
                parent, _, child = name.rpartition(".")
                weight, bias = _merged_weight(source)
                layer = _int8_linear(weight, bias) if quantise else _fp32_linear(weight, bias)
                setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)


class Bf16Rollouts:
    """A bf16 copy of the policy's Linear weights for sampling under bf16 autocast, LoRA adapters merged
    in, refreshed from the policy's current weights before every rollout (:meth:`refresh`).

    What it saves: with LoRA, peft runs its adapter modules (210 for SmolLM2) at every decoding step, about
    half of a LoRA decoding step on a CPU; the copy decodes with plain merged Linear layers. Without LoRA it
    saves little: autocast caches the bf16 cast of a weight that requires grad for the whole autocast
    block, so within one ``generate`` the policy's weights are cast once, not at every step (a frozen fp32
    weight is re-cast at every step). The copy is built like :class:`Int8Rollouts`: a structural copy of
    the model sharing embedding, norms and buffers with the policy, its Linear layers (the LM head
    included, untied from the embedding) replaced by bf16 ones. Its matmuls see the bf16-rounded weights
    autocast would give them and the residual stream stays fp32 as under autocast, so it samples what the
    policy samples under autocast (without LoRA the same tokens under the same seed; with LoRA the merged
    weight is rounded once, where peft adds the adapter's output to the base's). It costs 2 bytes per
    Linear weight (0.27 GB for SmolLM2-135M) and one cast per step.
    """

    def __init__(self, policy) -> None:
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.model = _shared_skeleton(base)
        self.sources = dict(_outer_linears(base))  # name -> the policy's layer (LoRA-wrapped or plain)
        self.layers: dict[str, torch.nn.Linear] = {}
        device = next(base.parameters()).device
        for name, source in self.sources.items():
            layer = source.get_base_layer() if hasattr(source, "get_base_layer") else source
            copy_layer = torch.nn.utils.skip_init(torch.nn.Linear, layer.in_features, layer.out_features,
                                                  bias=layer.bias is not None, device=device, dtype=torch.bfloat16)
            copy_layer.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, copy_layer)
            self.layers[name] = copy_layer
        self.model.config.tie_word_embeddings = False  # the LM head is its own bf16 tensor now
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current (merged) Linear weights into the bf16 layers, in place."""
        for name, source in self.sources.items():
            weight, bias = _merged_weight(source)
            self.layers[name].weight.copy_(weight)
            if bias is not None:
                self.layers[name].bias.copy_(bias)


def _shared_skeleton(base):
    """A structural copy of ``base`` sharing every parameter and buffer with it (the memo maps each tensor
    to itself), in eval mode, whose Linear layers the rollout copies then replace. (No requires_grad_(False):
    the tensors are the policy's.)"""
    import copy

    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo).eval()


def _outer_linears(base):
    """(name, layer) of every plain Linear or LoRA layer of ``base``, not those inside a LoRA layer (its
    base_layer, lora_A, lora_B)."""
    outer: list[str] = []
    for name, module in base.named_modules():
        if _is_linear(module) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
            yield name, module


def _is_linear(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) or (type(module) is torch.nn.Linear)


def _merged_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) fp32 weight and bias of an nn.Linear, or of a LoRA layer: base + each active adapter's delta."""
    from peft.tuners.lora import LoraLayer

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight = base.weight.detach().float()
    if isinstance(module, LoraLayer) and not module.disable_adapters:
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter).detach().float()
    return weight, None if base.bias is None else base.bias.detach().float()


def _fp32_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    linear = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    """A dynamic int8 Linear with per-output-channel symmetric weights (torch's dynamic quantisation)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_linear = _fp32_linear(weight, None)
    float_linear.qconfig = per_channel_dynamic_qconfig
    quantised = DynamicLinear.from_float(float_linear)
    if bias is not None:
        quantised.set_weight_bias(quantised.weight(), bias)
    return quantised


# --------------------------------------------------------------------------------------------
# Log-probs on completion tokens
# --------------------------------------------------------------------------------------------
def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, *,
                   hidden: list | None = None, group: int = 1, entropy: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log pi(y_t | x, y_<t) and entropy H_t at the completion positions.

    input_ids, attention_mask: (B, P + T) with the prompt left-padded to width P.
    Returns (B, T) log-probs (with gradient when the model has one) and (B, T) entropies (no gradient).
    ``hidden``: a list to receive the (B, T, H) last hidden states at the positions that predict the
    completion tokens (what a value head reads: V_t is the value of the state before token t).
    ``group`` = k: rows come in groups of k sharing one prompt (k samples per prompt, prompt-major);
    each prompt then runs once and its KV cache is expanded k times (:func:`shared_prompt_logits`).
    ``entropy=False``: None instead of the entropies (a reference pass: no full-vocabulary softmax).
    """
    n_completion = input_ids.shape[1] - prompt_width
    if group > 1:
        logits, last_hidden = shared_prompt_logits(model, input_ids, attention_mask, prompt_width, group,
                                                   want_hidden=hidden is not None)
    else:
        # Logits only where they are read (the last prompt position predicts the first completion token):
        # the LM head over a 49k vocabulary at prompt positions would be ~12% of this pass, wasted.
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                    logits_to_keep=n_completion + 1, output_hidden_states=hidden is not None)
        logits = out.logits[:, :-1]  # position t predicts token t + 1
        last_hidden = out.hidden_states[-1][:, prompt_width - 1:-1] if hidden is not None else None
    if hidden is not None:
        hidden.append(last_hidden)
    logits = logits.float()
    targets = input_ids[:, prompt_width:]
    log_norm = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not entropy:
        return token_logp, None
    with torch.no_grad():  # H = log Z - sum_v p_v l_v, a row at a time: (T, V) temporaries, not (B, T, V)
        entropies = torch.stack([norm - torch.softmax(row, dim=-1).mul_(row).sum(-1)
                                 for row, norm in zip(logits, log_norm, strict=True)])
    return token_logp, entropies


def shared_prompt_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, k: int,
                         want_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (B, T, V) logits predicting each completion token, with every prompt run once for its k rows.

    input_ids, attention_mask: (B, P + T), B = N * k rows in groups of k with identical prompts. The N
    prompts run once (KV cache kept, gradient included), the cache is expanded to B rows, then the B
    completions run on top of it: the cost of N * P + B * T tokens instead of B * (P + T), and the same
    values and gradients as the full pass (the cache expansion is a differentiable repeat). With the
    last hidden states (B, T, H) at the same positions when ``want_hidden``.
    """
    if input_ids.shape[0] % k:
        raise ValueError(f"{input_ids.shape[0]} rows do not form groups of {k}")
    first, cache = expanded_prompt_cache(model, input_ids[::k, :prompt_width], attention_mask[::k, :prompt_width], k,
                                         output_hidden_states=want_hidden)
    rest = model(input_ids=input_ids[:, prompt_width:], attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask)[:, prompt_width:], past_key_values=cache,
                 use_cache=True, output_hidden_states=want_hidden)
    # (N, 1, V) for completion token 0, expanded to its k rows; then positions 0..T-2 predict tokens 1..T-1
    logits = torch.cat([first.logits[:, -1:].repeat_interleave(k, dim=0), rest.logits[:, :-1]], dim=1)
    hidden = None
    if want_hidden:
        hidden = torch.cat([first.hidden_states[-1][:, -1:].repeat_interleave(k, dim=0),
                            rest.hidden_states[-1][:, :-1]], dim=1)
    return logits, hidden


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                        mask: torch.Tensor, *, group: int = 1, entropy: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_t log pi(y_t | x, y_<t), mean token entropy) over the masked completion tokens.

    input_ids, attention_mask: (B, P + T); mask: (B, T). Returns (B,) summed log-probs and (B,) mean
    entropy of the masked positions (None with ``entropy=False``). ``group``: see :func:`token_logprobs`.
    """
    token_logp, ent = token_logprobs(model, input_ids, attention_mask, prompt_width, group=group, entropy=entropy)
    mean_entropy = None if ent is None else (ent * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return (token_logp * mask).sum(-1), mean_entropy


@torch.no_grad()
def batched_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                     mask: torch.Tensor, chunk: int, *, bf16: bool = False, group: int = 1, entropy: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``completion_logprobs`` without gradient, ``chunk`` sequences at a time: (B,) log-probs and (B,)
    mean entropies, on CPU. Inputs may live on the CPU; each chunk moves to the model's device.
    ``group``: rows in groups sharing a prompt (used when ``chunk`` holds whole groups); ``entropy=False``:
    log-probs only (None for the entropies)."""
    device = next(model.parameters()).device
    group = group if group > 1 and chunk % group == 0 else 1
    logps, entropies = [], []
    for s in range(0, input_ids.shape[0], chunk):
        sl = slice(s, s + chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            lp, ent = completion_logprobs(model, input_ids[sl].to(device), attention_mask[sl].to(device),
                                          prompt_width, mask[sl].to(device), group=group, entropy=entropy)
        logps.append(lp.float().cpu())
        if ent is not None:
            entropies.append(ent.float().cpu())
    return torch.cat(logps), torch.cat(entropies) if entropies else None


# --------------------------------------------------------------------------------------------
# Text health (collapse metrics)
# --------------------------------------------------------------------------------------------
def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def text_health(completions: Sequence[Sequence[int]]) -> dict[str, float]:
    """distinct-1/2 over the batch (unique n-grams / all n-grams) and the repetition rate:
    the mean, over completions, of the share of 3-grams that already occurred earlier in the same one."""
    stats = {}
    for n in (1, 2):
        grams = [g for c in completions for g in ngrams(c, n)]
        stats[f"distinct{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    reps = []
    for c in completions:
        grams = ngrams(c, 3)
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    stats["repetition"] = float(np.mean(reps)) if reps else 0.0
    return stats
