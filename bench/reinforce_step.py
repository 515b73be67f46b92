"""One REINFORCE training step on SmolLM2-135M: samples/s and where the time goes, for this
project's trainer, TRL 1.16's RLOOTrainer and a re-creation of the seed loop, in the same run, each
in its best precision: a bf16 table and an fp32 table.

Matched settings: 8 samples per step (ours: 8 prompts x 1 sample, moving-average baseline; TRL: 4
prompts x num_generations=2, RLOO needs >= 2; seed: 8 prompts), up to 64 new tokens sampled at
temperature 1, the same demo prompts, a SmolLM2 policy and a SmolLM2 reward model (a fresh,
untrained sequence-classification head unless --rm gives a trained one: speed does not depend on
the head's weights), KL penalty 0.02 against a frozen copy of the policy (ours and TRL; the seed
had none), AdamW, fp32 master weights in every row.

Rows, per precision (--precision both|bf16|fp32; default both where the CPU has bf16 instructions,
AVX512-BF16 or AMX, else fp32 only: AVX2-only CPUs run bf16 matmuls far slower than fp32; --bf16
forces the bf16 rows on anyway):
  bf16 table (bf16 autocast over fp32 weights): "ours bf16" (ReinforceConfig(bf16=True): rollouts
    the defaults: sampling autocasts the fp32 policy, the KL reference held in bf16, reward scoring in
    bf16), "ours bf16, rollout copy" (bf16_rollouts=True: the bf16 copy of the Linear weights samples),
    "ours bf16 k=K" (K samples per prompt), "TRL RLOOTrainer bf16" (RLOOConfig(bf16=True): the Trainer's
    autocast), "seed loop bf16" (generate, reward scoring and the forward under autocast).
  fp32 table: "ours fp32", "ours fp32 KL off", "ours fp32 k=K", "ours fp32 int8 rollouts" (int8 copy
    samples, TIS-corrected), "TRL RLOOTrainer fp32", "seed loop fp32".
--repeats N runs the whole set of rows N times interleaved (A B C A B C ...): each row reports its
mean samples/s and min-max, each ratio (ours vs TRL, vs seed, k=K vs k=1, ...) its mean and min-max
over the repeats' own ratios.

The seed loop (the naive implementation this project replaced): prompts chat-templated and padded
to the longest (never cut), one batched generate, each completion decoded, re-tokenised alone and
scored one by one padded to 256 tokens, a plain full-sequence forward/backward of the policy with a
full log-softmax, loss = -sum_i (r_i - mean r) log pi(y_i | x_i) (summed, not averaged).

FLOP/s count only the step's necessary model work, with each implementation's own token counts
(P prompt tokens, C completion tokens, attention FLOPs ignored): generation 2 N (P + C), reward
2 N_rm (P + C), KL reference 2 N (P + C) (where done), training forward+backward 6 N (P + C); N
counts the policy's parameters (tied embedding = the LM head's matmul), N_rm the reward model's
minus its embedding (a lookup). %peak: against the best torch.matmul throughput measured here in
the table's precision (bf16 rows against the bf16 peak, fp32 rows against the fp32 one).

Machine figures: the matmul peaks, and the memory bandwidth (STREAM-like: a 256 MiB float32 copy,
bytes read + written, and a read-only sum; best of 10). Decode tokens/s per batch size for fp32,
bf16 (autocast over the fp32 model, and the bf16 rollout copy under autocast) and int8 (the int8
rollout copy), each with its lower bound per step: the bytes of Linear weights one decoding step
reads (LM head included: 4 per weight fp32, 2 bf16 copy, 2 autocast over the trainable fp32 policy
(autocast caches the cast of a weight that requires grad for the whole ``generate``; a frozen fp32
weight would be re-cast at every step, 4 + 2 + 2), 1 int8 and 4 for the down_proj layers it keeps in
fp32) over the measured copy bandwidth.

    python bench/reinforce_step.py --json bench-reinforce.json
    python bench/reinforce_step.py --repeats 3 --json bench-reinforce.json
    python bench/reinforce_step.py --steps 2 --warmup 1 --skip-trl --precision bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_scoring import seed_loop as seed_scores  # noqa: E402

import alignment.generation as generation  # noqa: E402
import alignment.hardware as hardware  # noqa: E402
from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce  # noqa: E402
from alignment.data import DataConfig, PairData, run_data_stage  # noqa: E402
from alignment.io import MANIFEST, sha256_file, write_json  # noqa: E402
from alignment.models import DEFAULT_MODEL, load_causal_lm, load_sequence_classifier, resolve_model  # noqa: E402
from alignment.rewards.model import tag_reward_model  # noqa: E402

PHASES = ["generate", "reward", "reference", "forward_backward", "optimizer"]
KL_BETA = 0.02
LR = 5e-6
PRECISIONS = {"both": ("bf16", "fp32"), "bf16": ("bf16",), "fp32": ("fp32",)}


# ---------------------------------------------------------------------------------------------
# Machine figures
# ---------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """The CPU's model name and whether it has the instructions bf16 and fp32 speed depend on."""
    info = hardware.cpu_info()
    return {"model_name": info["model_name"] or platform.processor() or platform.machine(),
            "flags": {f: f in info["flags"] for f in ("avx2", "avx512_bf16", "amx_tile")}}


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), budget_s: float = 4.0) -> float:
    """Best FLOP/s of a square torch.matmul over a few sizes (2 n^3 FLOPs each)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        spent, reps = 0.0, 0
        while reps < 3 or (spent < budget_s / len(sizes) and reps < 20):
            start = time.perf_counter()
            torch.matmul(a, b)
            dt = time.perf_counter() - start
            spent, reps = spent + dt, reps + 1
            best = max(best, 2 * n**3 / dt)
            if dt > budget_s:  # a very slow path (bf16 on AVX2): one timing is enough
                break
    return best


def memory_bandwidth(mib: int = 256, repeats: int = 10) -> dict[str, float]:
    """STREAM-like bytes/s of a ``mib`` MiB float32 tensor: copied into another (bytes read + written)
    and summed (bytes read); best of ``repeats``, after one untimed pass (pages touched)."""
    src = torch.rand(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    size = src.numel() * src.element_size()
    dst.copy_(src)
    src.sum()
    copy_s = read_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - start)
    return {"copy": 2 * size / copy_s, "read": size / read_s, "bytes": size}


def model_flops(n_policy: int, n_rm: int, prompt_tokens: float, completion_tokens: float, kl: bool) -> float:
    tokens = prompt_tokens + completion_tokens
    return (2 * n_policy + 2 * n_rm + (2 * n_policy if kl else 0) + 6 * n_policy) * tokens


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def untrained_rm(resolved, folder: Path) -> Path:
    """A SmolLM2 with a fresh 1-label head, saved as `align rm` would (kind, tokenizer fingerprint and
    max length in its config; a reward_model manifest listing its weights, which the trainers require)."""
    torch.manual_seed(0)
    model, tok = load_sequence_classifier(resolved, 1)
    tag_reward_model(model.config, "scalar", tok, 256)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json(folder / MANIFEST, {
        "stage": "reward_model", "kind": "scalar", "stage_key": "bench-untrained-head",
        "config": {"model": str(resolved.path), "kind": "scalar"},
        "files": {f.name: {"sha256": sha256_file(f)} for f in sorted(folder.glob("*.safetensors"))}})
    return folder


def param_counts(policy_path: str, rm_dir: str) -> tuple[int, int]:
    from transformers import AutoModelForSequenceClassification

    policy, _ = load_causal_lm(policy_path)
    n_policy = sum(p.numel() for p in policy.parameters())
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    n_rm = sum(p.numel() for p in rm.parameters()) - rm.get_input_embeddings().weight.numel()
    return n_policy, n_rm


# ---------------------------------------------------------------------------------------------
# (1) This project's trainer: train_reinforce itself, timed by its own per-step metrics
# ---------------------------------------------------------------------------------------------
def run_ours(args, policy_path: str, rm_dir: str, data_dir: str, tmp: Path, bf16: bool, *, kl: bool = True,
             k: int = 1, int8: bool = False, rollout_copy: bool | None = None) -> dict:
    """``k`` samples per prompt: ``args.prompts`` prompts x k samples in one step (prompt prefilled once,
    its KV cache expanded; the log-prob passes run each prompt once for its k samples). ``int8``: rollouts
    sampled by the int8 copy (re-quantised every step, inside "generate"), with the TIS correction.
    ``rollout_copy``: ReinforceConfig.bf16_rollouts (None: its default, the bf16 copy with LoRA only)."""
    copy = {"bf16_rollouts": rollout_copy} if rollout_copy is not None else {}
    config = ReinforceConfig(policy=policy_path, reward_model=rm_dir, data=data_dir, steps=100_000,
                             batch_size=args.prompts, samples_per_prompt=k, micro_batch_size=args.prompts * k,
                             max_new_tokens=args.new_tokens, learning_rate=LR, kl_beta=KL_BETA if kl else 0.0,
                             checkpoint_every=100_000, eval_prompts=0, bf16=bf16, device="cpu",
                             guard_min_distinct2=0.0, guard_max_repetition=1.0, seed=0, int8_rollouts=int8, **copy)
    name = f"ours-{'bf16' if bf16 else 'fp32'}-kl{int(kl)}-k{k}-int8{int(int8)}-copy{rollout_copy}-"
    out = Path(tempfile.mkdtemp(prefix=name, dir=tmp))  # a fresh folder per repeat (no resuming)
    train_reinforce(config, out, stop_after=args.warmup + args.steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    phases = {k: mean(r["seconds"][k] for r in rows) for k in PHASES}
    return {"phases": phases, "step_s": mean(r["seconds"]["generate"] + r["seconds"]["reward"] + r["seconds"]["policy"]
                                             for r in rows),
            "prompt_tokens": mean(r["tokens"]["prompt"] for r in rows),
            "completion_tokens": mean(r["tokens"]["completion"] for r in rows),
            "padded_tokens": mean(r["tokens"]["padded"] for r in rows),
            "mean_length": mean(r["length"] for r in rows), "samples": args.prompts * k, "kl": kl,
            "layout": f"{args.prompts} prompts x {k} samples",
            **({"int8": {key: mean(r["int8"][key] for r in rows) for key in rows[0]["int8"]}} if int8 else {})}


# The decode rows: (autocast, the sampler: None = the fp32 policy itself)
DECODE_MODES = {"fp32": (False, None), "bf16 autocast": (True, None), "bf16 copy": (True, "Bf16Rollouts"),
                "int8": (False, "Int8Rollouts")}


def decode_throughput(policy_path: str, mode: str = "fp32", batches=(1, 8, 32, 64), prompt_tokens: int = 128,
                      new_tokens: int = 32) -> dict:
    """Tokens/s of sampling exactly ``new_tokens`` after ``prompt_tokens``-token prompts, per batch size
    (prefill excluded: the time of a 1-token generate is subtracted), and the bytes of Linear weights a
    decoding step reads; ``mode``: a key of DECODE_MODES (the copies: the rollout samplers of generation)."""
    bf16, copy = DECODE_MODES[mode]
    policy, tok = load_causal_lm(policy_path, padding_side="left")
    policy.eval()
    if copy:
        sampler = getattr(generation, copy)(policy)
        sampler.refresh()
        policy = sampler.model
    figures = {"weight_bytes": linear_weight_bytes(policy, autocast=bf16), "batches": {}}
    for b in batches:
        ids = torch.randint(100, 20000, (b, prompt_tokens))
        _timed_generate(policy, tok, ids, 2, bf16)  # warm-up
        prefill = _timed_generate(policy, tok, ids, 1, bf16)
        decode = max(_timed_generate(policy, tok, ids, new_tokens, bf16) - prefill, 1e-9)
        figures["batches"][b] = {"ms_per_step": 1000 * decode / (new_tokens - 1),
                                 "tokens_per_s": b * (new_tokens - 1) / decode, "prefill_s": prefill}
    return figures


def linear_weight_bytes(model, autocast: bool) -> int:
    """Bytes of the Linear weights (LM head included) one decoding step reads: each at its own precision
    (int8 for the quantised layers). Under autocast a trainable fp32 weight is cast once per autocast block
    (one ``generate``: autocast caches casts of leaf tensors that require grad) and then read as bf16, 2;
    a frozen fp32 one is cast at every step, 4 + 2 + 2 (read, cast written, re-read)."""
    total = 0
    for module in model.modules():
        weight = module.weight() if _is_int8_linear(module) else getattr(module, "weight", None)
        if not (_is_int8_linear(module) or type(module) is torch.nn.Linear) or weight is None:
            continue
        size = weight.element_size()
        if autocast and weight.dtype == torch.float32:
            size = 2 if weight.requires_grad else 8
        total += weight.numel() * size
    return total


def _is_int8_linear(module) -> bool:
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:
        return False
    return isinstance(module, DynamicLinear)


def _timed_generate(policy, tok, ids: torch.Tensor, n: int, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, top_k=None, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# (2) TRL's RLOOTrainer, timed by wrapping its methods
# ---------------------------------------------------------------------------------------------
def run_trl(args, policy_path: str, rm_dir: str, prompts: list, tmp: Path, bf16: bool = False) -> dict:
    """``bf16``: RLOOConfig(bf16=True), the Trainer's bf16 autocast (accelerate's) over fp32 weights."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    policy, tokenizer = load_causal_lm(policy_path, padding_side="left")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    k = 2
    cfg = RLOOConfig(output_dir=tempfile.mkdtemp(prefix="trl-", dir=tmp), per_device_train_batch_size=args.prompts,
                     num_generations=k, max_completion_length=args.new_tokens, max_steps=args.warmup + args.steps,
                     learning_rate=LR, beta=KL_BETA, temperature=1.0, use_cpu=True, bf16=bf16, report_to="none",
                     logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                     gradient_checkpointing=False)  # TRL defaults to True; ours runs without
    trainer = RLOOTrainer(model=policy, reward_funcs=rm, args=cfg,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer, reward_processing_classes=rm_tok)
    acc: dict[str, float] = {}
    tokens = {"prompt": 0, "completion": 0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    calc = trainer._calculate_rewards

    def rewards_and_tokens(inputs, prompts_, completions, completion_ids_list):
        tokens["completion"] += sum(len(c) for c in completion_ids_list)
        tokens["prompt"] += sum(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)) for p in prompts_)
        return calc(inputs, prompts_, completions, completion_ids_list)

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", rewards_and_tokens)
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)
    trainer.compute_loss = timed("forward", trainer.compute_loss)
    trainer.training_step = timed("training_step", trainer.training_step)
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            acc.clear()
            tokens.update(prompt=0, completion=0)
            acc["t0"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - acc["t0"]
            steps.append({"total": total, **{k: v for k, v in acc.items() if k != "t0"}, **tokens})

    trainer.add_callback(Clock())
    trainer.train()
    rows = steps[args.warmup:]
    ph = {
        "generate": mean(r["generate"] for r in rows),
        "reward": mean(r["reward"] for r in rows),
        # TRL's no-grad passes: log-probs of the sampling policy ("old") and of the reference
        "reference": mean(r["prepare"] - r["generate"] - r["reward"] for r in rows),
        "forward_backward": mean(r["training_step"] - r["prepare"] for r in rows),
        "optimizer": mean(r["total"] - r["training_step"] for r in rows),  # with clipping, scheduler, Trainer bookkeeping
    }
    n = args.prompts
    result = {"phases": ph, "step_s": mean(r["total"] for r in rows),
              "prompt_tokens": mean(r["prompt"] for r in rows), "completion_tokens": mean(r["completion"] for r in rows),
              "samples": n, "kl": True, "layout": f"{n // k} prompts x {k} generations"}
    result["mean_length"] = result["completion_tokens"] / n
    del trainer, policy, rm
    return result


# ---------------------------------------------------------------------------------------------
# (3) The seed loop
# ---------------------------------------------------------------------------------------------
def run_seed(args, policy_path: str, rm_dir: str, prompts: list, bf16: bool = False) -> dict:
    """``bf16``: generate, reward scoring and the training forward under bf16 autocast (fp32 weights; the
    backward outside it, as torch recommends: each op's backward runs in its forward's dtype)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy, tok = load_causal_lm(policy_path, padding_side="left")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    torch.manual_seed(0)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    rows = []
    for step in range(args.warmup + args.steps):
        batch = [prompts[(step * args.prompts + i) % len(prompts)] for i in range(args.prompts)]
        t0 = time.perf_counter()
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)  # padded, never cut
        width = enc["input_ids"].shape[1]
        policy.eval()
        with torch.no_grad(), autocast():
            out = policy.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
                                  max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        policy.train()
        completion = out[:, width:]
        t_gen = time.perf_counter()
        decoded = [tok.decode(c, skip_special_tokens=True) for c in completion]
        with autocast():
            rewards, _ = seed_scores(rm, rm_tok, batch, decoded)  # one by one, padded to 256
        t_rew = time.perf_counter()
        cmask = (completion != tok.pad_token_id).float()
        attn = torch.cat([enc["attention_mask"], cmask.long()], dim=1)
        with autocast():
            logits = policy(input_ids=out, attention_mask=attn).logits
            logp = torch.log_softmax(logits[:, width - 1:-1], dim=-1)
            seq_logp = (logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1) * cmask).sum(-1)
            loss = -((rewards - rewards.mean()) * seq_logp).sum()
        loss.backward()
        t_fb = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t_opt = time.perf_counter()
        rows.append({"generate": t_gen - t0, "reward": t_rew - t_gen, "reference": 0.0, "forward_backward": t_fb - t_rew,
                     "optimizer": t_opt - t_fb, "prompt": int(enc["attention_mask"].sum()),
                     "completion": int(cmask.sum()), "padded": int(out.numel())})
    rows = rows[args.warmup:]
    result = {"phases": {k: mean(r[k] for r in rows) for k in PHASES},
              "step_s": mean(sum(r[k] for k in PHASES) for r in rows),
              "prompt_tokens": mean(r["prompt"] for r in rows), "completion_tokens": mean(r["completion"] for r in rows),
              "padded_tokens": mean(r["padded"] for r in rows), "samples": args.prompts, "kl": False}
    result["mean_length"] = result["completion_tokens"] / args.prompts
    del policy, rm, optimizer
    return result


# ---------------------------------------------------------------------------------------------
# Summaries over the repeats
# ---------------------------------------------------------------------------------------------
def summarise(reps: list[dict], n_policy: int, n_rm: int, peak: float) -> dict:
    """One row from its repeats: the mean of every figure (phases, tokens, samples/s, FLOP/s), samples/s's
    min-max, the fraction of the table's peak, the load average range, and the repeats themselves."""
    for r in reps:
        r["samples_per_s"] = r["samples"] / r["step_s"]
        r["flops_per_step"] = model_flops(n_policy, n_rm, r["prompt_tokens"], r["completion_tokens"], r["kl"])
        r["flops_per_s"] = r["flops_per_step"] / r["step_s"]
    row = {key: value for key, value in _mean_of(reps).items() if key != "repeat"}
    rates = [r["samples_per_s"] for r in reps]
    loads = [x for r in reps for x in r["load_average"]]
    row.update(samples_per_s_min=min(rates), samples_per_s_max=max(rates), fraction_of_peak=row["flops_per_s"] / peak,
               load_average=[min(loads), max(loads)], repeats=reps)
    return row


def _mean_of(dicts: list[dict]) -> dict:
    """Means of the numbers (nested dicts too); anything else, and the sample count, as in the first."""
    out = {}
    for key, value in dicts[0].items():
        if isinstance(value, dict):
            out[key] = _mean_of([d[key] for d in dicts])
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "samples":
            out[key] = mean(d[key] for d in dicts)
        else:
            out[key] = value
    return out


def ratio_pairs(precision: str, k: int) -> dict[str, tuple[str, str]]:
    """Ratio name -> (numerator row, denominator row) of samples/s, within one precision's table."""
    ours = f"ours {precision}"
    return {"ours_vs_trl": (ours, f"TRL RLOOTrainer {precision}"), "ours_vs_seed": (ours, f"seed loop {precision}"),
            f"ours_k{k}_vs_k1": (f"ours {precision} k={k}", ours),
            "ours_kl_off_vs_seed": (f"ours {precision} KL off", f"seed loop {precision}"),
            "ours_int8_vs_fp32": ("ours fp32 int8 rollouts", "ours fp32") if precision == "fp32" else None,
            "ours_copy_vs_no_copy": ("ours bf16, rollout copy", ours) if precision == "bf16" else None}


CROSS_PAIRS = {f"{impl}_bf16_vs_fp32": (f"{row} bf16", f"{row} fp32")
               for impl, row in (("ours", "ours"), ("trl", "TRL RLOOTrainer"), ("seed", "seed loop"))}


def ratios(pairs: dict, results: dict[str, list[dict]]) -> dict[str, dict]:
    """Each ratio per repeat (the rows of a repeat ran side by side), its mean and min-max."""
    out = {}
    for key, pair in pairs.items():
        if pair is None or not all(name in results for name in pair):
            continue
        per = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(*(results[name] for name in pair), strict=True)]
        out[key] = {"mean": mean(per), "min": min(per), "max": max(per), "per_repeat": per, "rows": list(pair)}
    return out


def print_table(precision: str, runs: dict, table_ratios: dict, repeats: int) -> None:
    title = "bf16 autocast, fp32 master weights" if precision == "bf16" else "fp32"
    print(f"\n{precision} table ({title}; %peak: of the {precision} matmul peak)")
    spread = f"{'min-max':>13s}" if repeats > 1 else ""
    print(f"{'':28s}{'samples':>8s}{'samples/s':>10s}{spread}{'step s':>8s}{'gen':>7s}{'reward':>7s}{'ref':>7s}"
          f"{'fwd+bwd':>8s}{'optim':>7s}{'len':>6s}{'GFLOP/s':>9s}{'%peak':>7s}  load")
    for name, r in runs.items():
        p = r["phases"]
        spread = f"{r['samples_per_s_min']:>6.3f}-{r['samples_per_s_max']:<6.3f}" if repeats > 1 else ""
        print(f"{name:28s}{r['samples']:>8d}{r['samples_per_s']:>10.3f}{spread}{r['step_s']:>8.2f}{p['generate']:>7.2f}"
              f"{p['reward']:>7.2f}{p['reference']:>7.2f}{p['forward_backward']:>8.2f}{p['optimizer']:>7.2f}"
              f"{r['mean_length']:>6.1f}{r['flops_per_s'] / 1e9:>9.1f}{100 * r['fraction_of_peak']:>6.1f}%"
              f"  {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}")
    for key, value in table_ratios.items():
        print(f"{key}: {_ratio_text(value, repeats)}")


def _ratio_text(value: dict, repeats: int) -> str:
    return f"{value['mean']:.2f}x" + (f" (min-max {value['min']:.2f}-{value['max']:.2f}x over {repeats} repeats)"
                                      if repeats > 1 else "")


# ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=DEFAULT_MODEL)
    parser.add_argument("--rm", help="a trained scalar RM folder from `align rm` (default: an untrained head)")
    parser.add_argument("--data", default="demo", help="prompt source (as for `align data`)")
    parser.add_argument("--prompts", type=int, default=8, help="samples per step (TRL: prompts/2 x 2 generations)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (averaged)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (in bf16 the first two or three steps of a run are slower: "
                             "docs/performance.md)")
    parser.add_argument("--precision", choices=list(PRECISIONS),
                        help="the tables to time (default: both where the CPU has fast bf16, else fp32)")
    parser.add_argument("--bf16", action="store_true",
                        help="time the bf16 rows even on a CPU without fast bf16 (with --precision unset: both)")
    parser.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode tokens/s per batch size")
    parser.add_argument("--skip-int8", action="store_true", help="skip ours with int8 rollouts (and int8 decode)")
    parser.add_argument("--k", type=int, default=4, help="also time ours with k samples per prompt (1: skip)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    if args.prompts % 2:
        parser.error("--prompts must be even (TRL's RLOO runs prompts/2 x 2 generations)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.bf16 and args.precision == "fp32":
        parser.error("--bf16 asks for the bf16 rows, --precision fp32 for none")
    precision = args.precision or ("both" if hardware.cpu_has_fast_bf16() or args.bf16 else "fp32")
    precisions = PRECISIONS[precision]
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]

    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    data_dir = str(run_data_stage(DataConfig(source=args.data, on_bad_rows="skip"), tmp / "data").out_dir)
    prompts = PairData.load(Path(data_dir) / "train.parquet").unique_prompts()
    resolved = resolve_model(args.policy)
    policy_path = str(resolved.path)
    rm_dir = args.rm or str(untrained_rm(resolved, tmp / "rm"))
    n_policy, n_rm = param_counts(policy_path, rm_dir)
    cpu = cpu_info()
    # The bf16 peak where the CPU has bf16 instructions or bf16 rows are timed (on AVX2: a slow fallback path).
    peaks = {"fp32": matmul_peak(torch.float32)}
    if hardware.cpu_has_fast_bf16() or "bf16" in precisions:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    bandwidth = memory_bandwidth()

    # The rows, in run order: (name, precision, function, keyword arguments)
    ours_args = (args, policy_path, rm_dir, data_dir, tmp)
    plan: list[tuple[str, str, object, tuple, dict]] = []
    for p in precisions:
        bf16 = p == "bf16"
        plan.append((f"ours {p}", p, run_ours, (*ours_args, bf16), {}))
        if bf16:
            plan.append(("ours bf16, rollout copy", p, run_ours, (*ours_args, bf16), {"rollout_copy": True}))
        if not bf16:
            plan.append(("ours fp32 KL off", p, run_ours, (*ours_args, bf16), {"kl": False}))
        if args.k > 1:
            plan.append((f"ours {p} k={args.k}", p, run_ours, (*ours_args, bf16), {"k": args.k}))
        if not bf16 and not args.skip_int8:
            plan.append(("ours fp32 int8 rollouts", p, run_ours, (*ours_args, bf16), {"int8": True}))
        if not args.skip_trl:
            plan.append((f"TRL RLOOTrainer {p}", p, run_trl, (args, policy_path, rm_dir, prompts, tmp, bf16), {}))
        if not args.skip_seed:
            plan.append((f"seed loop {p}", p, run_seed, (args, policy_path, rm_dir, prompts, bf16), {}))

    results: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    for repeat in range(args.repeats):  # interleaved: A B C A B C ...
        for name, _, fn, a, kw in plan:
            # The 1-minute load average around each run: on a shared machine other jobs slow a run down,
            # and a ratio between runs under different loads is not a measurement of the code.
            load = os.getloadavg()[0]
            figures = fn(*a, **kw)
            figures.update(repeat=repeat, load_average=[round(load, 2), round(os.getloadavg()[0], 2)])
            results[name].append(figures)
            gc.collect()

    tables = {}
    for p in precisions:
        runs = {name: summarise(results[name], n_policy, n_rm, peaks[p]) for name, q, *_ in plan if q == p}
        tables[p] = {"peak_flops": peaks[p], "runs": runs, "ratios": ratios(ratio_pairs(p, args.k), results)}
    cross = ratios(CROSS_PAIRS, results)

    print(f"\nREINFORCE step: {args.prompts} samples, <= {args.new_tokens} new tokens, {resolved.describe()}, "
          f"CPU {cpu['model_name']} ({', '.join(f for f, on in cpu['flags'].items() if on) or 'no avx2'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.repeats} repeat(s) interleaved")
    bf16_peak = f", bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in peaks else " (no bf16 instructions: no bf16 peak)"
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s{bf16_peak}; "
          f"N policy {n_policy / 1e6:.1f}M, N reward (no embedding) {n_rm / 1e6:.1f}M")
    print(f"memory bandwidth ({bandwidth['bytes'] / 2**20:.0f} MiB float32, best of 10): copy "
          f"{bandwidth['copy'] / 1e9:.1f} GB/s (read + write), read-only sum {bandwidth['read'] / 1e9:.1f} GB/s")
    for p in precisions:
        print_table(p, tables[p]["runs"], tables[p]["ratios"], args.repeats)
    if cross:
        print("\nbf16 vs fp32, per implementation:")
        for key, value in cross.items():
            print(f"{key}: {_ratio_text(value, args.repeats)}")
    print("(ref: TRL's no-grad old-policy + reference log-prob passes; ours: the KL reference pass; the seed has none)")
    every = {name: r for table in tables.values() for name, r in table["runs"].items()}
    for name, r in every.items():
        if r.get("padded_tokens"):
            print(f"{name}: forward+backward {1000 * r['phases']['forward_backward'] / r['padded_tokens']:.2f} ms per "
                  f"padded token ({r['padded_tokens']:.0f} = B x (prompt width + completion width); real tokens "
                  f"{r['prompt_tokens'] + r['completion_tokens']:.0f})")
    for name, r in every.items():
        if "int8" in r:
            print(f"{name}: sampler vs policy per token: mean log(pi/mu) {r['int8']['log_ratio']:.3f}, "
                  f"mean TIS weight {r['int8']['is_weight']:.3f}, capped {100 * r['int8']['capped']:.1f}%")

    decode = {}
    if not args.skip_decode:
        modes = ["fp32"]
        if "bf16" in precisions:
            modes += ["bf16 autocast", "bf16 copy"]
        modes += [] if args.skip_int8 else ["int8"]
        for mode in modes:
            decode[mode] = d = decode_throughput(policy_path, mode)
            d["bound_ms_per_step"] = 1000 * d["weight_bytes"] / bandwidth["copy"]
            for f in d["batches"].values():
                f["vs_bound"] = f["ms_per_step"] / d["bound_ms_per_step"]
        print("\ndecode (128-token prompts, 32 sampled tokens, prefill excluded; bound: the Linear weight bytes a "
              "step reads / copy bandwidth):")
        print(f"  {'':15s}{'weights MB':>11s}{'bound ms':>9s}{'batch':>7s}{'ms/step':>9s}{'tokens/s':>10s}"
              f"{'x bound':>8s}{'vs fp32':>8s}")
        for mode, d in decode.items():
            for b, f in d["batches"].items():
                fp32 = decode["fp32"]["batches"][b]["ms_per_step"]
                print(f"  {mode:15s}{d['weight_bytes'] / 1e6:>11.0f}{d['bound_ms_per_step']:>9.1f}{b:>7d}"
                      f"{f['ms_per_step']:>9.1f}{f['tokens_per_s']:>10.1f}{f['vs_bound']:>8.2f}"
                      f"{fp32 / f['ms_per_step']:>7.2f}x")
        print("  (vs fp32: fp32 ms/step over this row's; bf16 copy: generation.Bf16Rollouts under autocast; "
              "int8: Int8Rollouts, down_proj kept fp32)")
    if args.json:
        figures = {"command": " ".join(["python", *sys.argv]), "model": resolved.describe(), "rm": args.rm or "untrained head",
                   "cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                   "samples": args.prompts, "new_tokens": args.new_tokens, "steps": args.steps, "warmup": args.warmup,
                   "precision": precision, "repeats": args.repeats, "k": args.k,
                   "peak_flops": peaks, "memory_bandwidth": bandwidth,
                   "params": {"policy": n_policy, "reward_no_embedding": n_rm},
                   "tables": tables, "ratios_bf16_vs_fp32": cross, "decode": decode}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
