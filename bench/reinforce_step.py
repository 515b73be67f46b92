"""One REINFORCE training step on SmolLM2-135M: samples/s and where the time goes, for this
project's trainer, TRL 1.16's RLOOTrainer and a re-creation of the seed loop, in the same run.

Matched settings: 8 samples per step (ours: 8 prompts x 1 sample, moving-average baseline; TRL: 4
prompts x num_generations=2, RLOO needs >= 2; seed: 8 prompts), up to 64 new tokens sampled at
temperature 1, the same demo prompts, a SmolLM2 policy and a SmolLM2 reward model (a fresh,
untrained sequence-classification head unless --rm gives a trained one: speed does not depend on
the head's weights), KL penalty 0.02 against a frozen copy of the policy (ours and TRL; the seed
had none), AdamW, fp32 unless --bf16 (this AVX2-only CPU runs bf16 matmuls far slower than fp32).

The seed loop (the naive implementation this project replaced): prompts chat-templated and padded
to the longest (never cut), one batched generate, each completion decoded, re-tokenised alone and
scored one by one padded to 256 tokens, fp32, a plain full-sequence forward/backward of the policy
with a full log-softmax, loss = -sum_i (r_i - mean r) log pi(y_i | x_i) (summed, not averaged).

FLOP/s count only the step's necessary model work, with each implementation's own token counts
(P prompt tokens, C completion tokens, attention FLOPs ignored): generation 2 N (P + C), reward
2 N_rm (P + C), KL reference 2 N (P + C) (where done), training forward+backward 6 N (P + C); N
counts the policy's parameters (tied embedding = the LM head's matmul), N_rm the reward model's
minus its embedding (a lookup). Peaks: the best torch.matmul throughput measured here.

    python bench/reinforce_step.py --json bench-reinforce.json
    python bench/reinforce_step.py --steps 2 --warmup 1 --skip-trl --bf16
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

from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce  # noqa: E402
from alignment.data import DataConfig, PairData, run_data_stage  # noqa: E402
from alignment.generation import Int8Rollouts  # noqa: E402
from alignment.hardware import cpu_has_fast_bf16  # noqa: E402
from alignment.models import DEFAULT_MODEL, load_causal_lm, load_sequence_classifier, resolve_model  # noqa: E402
from alignment.rewards.model import tokenizer_fingerprint  # noqa: E402

PHASES = ["generate", "reward", "reference", "forward_backward", "optimizer"]
KL_BETA = 0.02
LR = 5e-6


# ---------------------------------------------------------------------------------------------
# Machine peaks
# ---------------------------------------------------------------------------------------------
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


def model_flops(n_policy: int, n_rm: int, prompt_tokens: float, completion_tokens: float, kl: bool) -> float:
    tokens = prompt_tokens + completion_tokens
    return (2 * n_policy + 2 * n_rm + (2 * n_policy if kl else 0) + 6 * n_policy) * tokens


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def untrained_rm(resolved, folder: Path) -> Path:
    """A SmolLM2 with a fresh 1-label head, saved as `align rm` would (kind + tokenizer fingerprint)."""
    torch.manual_seed(0)
    model, tok = load_sequence_classifier(resolved, 1)
    model.config.alignment_reward_kind = "scalar"
    model.config.alignment_tokenizer_sha = tokenizer_fingerprint(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
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
             k: int = 1, int8: bool = False) -> dict:
    """``k`` samples per prompt: ``args.prompts`` prompts x k samples in one step (prompt prefilled once,
    its KV cache expanded; the log-prob passes run each prompt once for its k samples). ``int8``: rollouts
    sampled by the int8 copy (re-quantised every step, inside "generate"), with the TIS correction."""
    config = ReinforceConfig(policy=policy_path, reward_model=rm_dir, data=data_dir, steps=100_000,
                             batch_size=args.prompts, samples_per_prompt=k, micro_batch_size=args.prompts * k,
                             max_new_tokens=args.new_tokens, learning_rate=LR, kl_beta=KL_BETA if kl else 0.0,
                             checkpoint_every=100_000, eval_prompts=0, bf16=bf16, device="cpu",
                             guard_min_distinct2=0.0, guard_max_repetition=1.0, seed=0, int8_rollouts=int8)
    out = tmp / f"ours-{'bf16' if bf16 else 'fp32'}-kl{int(kl)}-k{k}-int8{int(int8)}"
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


def decode_throughput(policy_path: str, batches=(1, 8, 32, 64), prompt_tokens: int = 128, new_tokens: int = 32,
                      bf16: bool = False, int8: bool = False) -> dict[int, dict[str, float]]:
    """Tokens/s of sampling exactly ``new_tokens`` after ``prompt_tokens``-token prompts, per batch size
    (prefill excluded: the time of a 1-token generate is subtracted); ``int8``: the int8 rollout copy."""
    policy, tok = load_causal_lm(policy_path, padding_side="left")
    policy.eval()
    if int8:
        sampler = Int8Rollouts(policy)
        sampler.refresh()
        policy = sampler.model
    figures = {}
    for b in batches:
        ids = torch.randint(100, 20000, (b, prompt_tokens))
        _timed_generate(policy, tok, ids, 2, bf16)  # warm-up
        prefill = _timed_generate(policy, tok, ids, 1, bf16)
        decode = max(_timed_generate(policy, tok, ids, new_tokens, bf16) - prefill, 1e-9)
        figures[b] = {"ms_per_step": 1000 * decode / (new_tokens - 1), "tokens_per_s": b * (new_tokens - 1) / decode,
                      "prefill_s": prefill}
    return figures


def _timed_generate(policy, tok, ids: torch.Tensor, n: int, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=True, top_k=None, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# (2) TRL's RLOOTrainer, timed by wrapping its methods
# ---------------------------------------------------------------------------------------------
def run_trl(args, policy_path: str, rm_dir: str, prompts: list, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    policy, tokenizer = load_causal_lm(policy_path, padding_side="left")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    k = 2
    cfg = RLOOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.prompts, num_generations=k,
                     max_completion_length=args.new_tokens, max_steps=args.warmup + args.steps, learning_rate=LR,
                     beta=KL_BETA, temperature=1.0, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
                     save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
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
def run_seed(args, policy_path: str, rm_dir: str, prompts: list) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy, tok = load_causal_lm(policy_path, padding_side="left")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    torch.manual_seed(0)
    rows = []
    for step in range(args.warmup + args.steps):
        batch = [prompts[(step * args.prompts + i) % len(prompts)] for i in range(args.prompts)]
        t0 = time.perf_counter()
        texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)  # padded, never cut
        width = enc["input_ids"].shape[1]
        policy.eval()
        with torch.no_grad():
            out = policy.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=1.0,
                                  max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        policy.train()
        completion = out[:, width:]
        t_gen = time.perf_counter()
        decoded = [tok.decode(c, skip_special_tokens=True) for c in completion]
        rewards, _ = seed_scores(rm, rm_tok, batch, decoded)  # one by one, padded to 256, fp32
        t_rew = time.perf_counter()
        cmask = (completion != tok.pad_token_id).float()
        attn = torch.cat([enc["attention_mask"], cmask.long()], dim=1)
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
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=DEFAULT_MODEL)
    parser.add_argument("--rm", help="a trained scalar RM folder from `align rm` (default: an untrained head)")
    parser.add_argument("--data", default="demo", help="prompt source (as for `align data`)")
    parser.add_argument("--prompts", type=int, default=8, help="samples per step (TRL: prompts/2 x 2 generations)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (averaged)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--bf16", action="store_true", help="also time our trainer with bf16 autocast")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode tokens/s per batch size")
    parser.add_argument("--skip-int8", action="store_true", help="skip ours with int8 rollouts")
    parser.add_argument("--k", type=int, default=4, help="also time ours with k samples per prompt (1: skip)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    if args.prompts % 2:
        parser.error("--prompts must be even (TRL's RLOO runs prompts/2 x 2 generations)")
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]

    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    data_dir = str(run_data_stage(DataConfig(source=args.data, on_bad_rows="skip"), tmp / "data").out_dir)
    prompts = PairData.load(Path(data_dir) / "train.parquet").unique_prompts()
    resolved = resolve_model(args.policy)
    policy_path = str(resolved.path)
    rm_dir = args.rm or str(untrained_rm(resolved, tmp / "rm"))
    n_policy, n_rm = param_counts(policy_path, rm_dir)
    # The bf16 peak only where the CPU has bf16 instructions (on AVX2 it measures a slow fallback path).
    peaks = {"fp32": matmul_peak(torch.float32)}
    if cpu_has_fast_bf16():
        peaks["bf16"] = matmul_peak(torch.bfloat16)

    runs: dict[str, dict] = {}

    def timed_run(name, fn, *a, **kw):
        # The 1-minute load average around each run: on a shared machine other jobs slow a run down,
        # and a ratio between runs under different loads is not a measurement of the code.
        load = os.getloadavg()[0]
        runs[name] = fn(*a, **kw)
        runs[name]["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        gc.collect()

    timed_run("ours fp32", run_ours, args, policy_path, rm_dir, data_dir, tmp, bf16=False)
    timed_run("ours fp32 KL off", run_ours, args, policy_path, rm_dir, data_dir, tmp, bf16=False, kl=False)
    if args.k > 1:
        timed_run(f"ours fp32 k={args.k}", run_ours, args, policy_path, rm_dir, data_dir, tmp, bf16=False, k=args.k)
    if not args.skip_int8:
        timed_run("ours fp32 int8 rollouts", run_ours, args, policy_path, rm_dir, data_dir, tmp, bf16=False, int8=True)
    if args.bf16:
        timed_run("ours bf16", run_ours, args, policy_path, rm_dir, data_dir, tmp, bf16=True)
    if not args.skip_trl:
        timed_run("TRL RLOOTrainer fp32", run_trl, args, policy_path, rm_dir, prompts, tmp)
    if not args.skip_seed:
        timed_run("seed loop fp32", run_seed, args, policy_path, rm_dir, prompts)

    for r in runs.values():
        r["samples_per_s"] = r["samples"] / r["step_s"]
        r["flops_per_step"] = model_flops(n_policy, n_rm, r["prompt_tokens"], r["completion_tokens"], r["kl"])
        r["flops_per_s"] = r["flops_per_step"] / r["step_s"]
        r["fraction_of_fp32_peak"] = r["flops_per_s"] / peaks["fp32"]
        if "bf16" in peaks:
            r["fraction_of_bf16_peak"] = r["flops_per_s"] / peaks["bf16"]
    ours = runs["ours fp32"]["samples_per_s"]
    ratios = {}
    if "ours fp32 KL off" in runs and "seed loop fp32" in runs:
        ratios["ours_kl_off_vs_seed"] = runs["ours fp32 KL off"]["samples_per_s"] / runs["seed loop fp32"]["samples_per_s"]
    if f"ours fp32 k={args.k}" in runs:
        ratios[f"ours_k{args.k}_vs_k1"] = runs[f"ours fp32 k={args.k}"]["samples_per_s"] / ours
    if "ours fp32 int8 rollouts" in runs:
        ratios["ours_int8_vs_fp32"] = runs["ours fp32 int8 rollouts"]["samples_per_s"] / ours
    if "TRL RLOOTrainer fp32" in runs:
        ratios["ours_vs_trl"] = ours / runs["TRL RLOOTrainer fp32"]["samples_per_s"]
    if "seed loop fp32" in runs:
        ratios["ours_vs_seed"] = ours / runs["seed loop fp32"]["samples_per_s"]

    print(f"\nREINFORCE step: {args.prompts} samples, <= {args.new_tokens} new tokens, {resolved.describe()}, "
          f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    bf16_peak = f", bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in peaks else " (no bf16 instructions: no bf16 peak)"
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s{bf16_peak}; "
          f"N policy {n_policy / 1e6:.1f}M, N reward (no embedding) {n_rm / 1e6:.1f}M")
    head = (f"{'':24s}{'samples':>8s}{'samples/s':>10s}{'step s':>8s}{'gen':>7s}{'reward':>7s}{'ref':>7s}{'fwd+bwd':>8s}"
            f"{'optim':>7s}{'len':>6s}{'GFLOP/s':>9s}{'%fp32':>7s}  load")
    print(head)
    for name, r in runs.items():
        p = r["phases"]
        print(f"{name:24s}{r['samples']:>8d}{r['samples_per_s']:>10.3f}{r['step_s']:>8.2f}{p['generate']:>7.2f}"
              f"{p['reward']:>7.2f}{p['reference']:>7.2f}{p['forward_backward']:>8.2f}{p['optimizer']:>7.2f}"
              f"{r['mean_length']:>6.1f}{r['flops_per_s'] / 1e9:>9.1f}{100 * r['fraction_of_fp32_peak']:>6.1f}%"
              f"  {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    print("(ref: TRL's no-grad old-policy + reference log-prob passes; ours: the KL reference pass; the seed has none)")
    for name, r in runs.items():
        if r.get("padded_tokens"):
            print(f"{name}: forward+backward {1000 * r['phases']['forward_backward'] / r['padded_tokens']:.2f} ms per "
                  f"padded token ({r['padded_tokens']:.0f} = B x (prompt width + completion width); real tokens "
                  f"{r['prompt_tokens'] + r['completion_tokens']:.0f})")
    for name, r in runs.items():
        if "int8" in r:
            print(f"{name}: sampler vs policy per token: mean log(pi/mu) {r['int8']['log_ratio']:.3f}, "
                  f"mean TIS weight {r['int8']['is_weight']:.3f}, capped {100 * r['int8']['capped']:.1f}%")
    decode = {}
    if not args.skip_decode:
        decode = {"fp32": decode_throughput(policy_path)}
        if not args.skip_int8:
            decode["int8"] = decode_throughput(policy_path, int8=True)
        print("\ndecode (128-token prompts, 32 sampled tokens, prefill excluded):")
        for b, f in decode["fp32"].items():
            int8 = decode.get("int8", {}).get(b)
            print(f"  batch {b:>3d}: fp32 {f['ms_per_step']:7.1f} ms/step {f['tokens_per_s']:8.1f} tokens/s"
                  + (f" | int8 rollout copy {int8['ms_per_step']:7.1f} ms/step {int8['tokens_per_s']:8.1f} tokens/s "
                     f"({f['ms_per_step'] / int8['ms_per_step']:.2f}x)" if int8 else ""))
    if args.json:
        figures = {"command": " ".join(["python", *sys.argv]), "model": resolved.describe(), "rm": args.rm or "untrained head",
                   "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                   "samples": args.prompts, "new_tokens": args.new_tokens, "steps": args.steps, "warmup": args.warmup,
                   "peak_flops": peaks, "params": {"policy": n_policy, "reward_no_embedding": n_rm},
                   "runs": runs, "ratios": ratios, "decode": decode}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
