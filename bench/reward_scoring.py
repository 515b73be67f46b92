"""Reward scoring throughput: the project's batched scorer vs the seed's per-example loop.

Same model, same texts, same process. The seed loop is re-created faithfully: each text is
chat-formatted and tokenised alone, padded to 256 tokens (pad == EOS, as SmolLM2 ships), scored one
at a time in fp32. The scorer tokenises everything at once, sorts by length, pads each batch only to
its longest text and runs without grad (bf16 only where the CPU/GPU runs it fast).

Also measures reward-model training throughput (pairs/s through TRL's RewardTrainer).

    python bench/reward_scoring.py                          # demo data, SmolLM2 (offline GGUF if no hub)
    python bench/reward_scoring.py --pairs 64 --data ../shared/data/ultrafeedback/test.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.data import DataConfig, PairData, run_data_stage  # noqa: E402
from alignment.hardware import bf16_enabled, resolve_device  # noqa: E402
from alignment.models import DEFAULT_MODEL, load_sequence_classifier, resolve_model  # noqa: E402
from alignment.rewards.model import RewardModelConfig, RewardScorer, run_reward_stage  # noqa: E402


def seed_loop(model, tokenizer, prompts, completions, max_length=256) -> tuple[torch.Tensor, float]:
    """The seed's scoring: one text at a time, padded to 256, fp32, pad token == EOS."""
    tokenizer.pad_token = tokenizer.eos_token  # as SmolLM2 ships; the head then skips the final <|im_end|>
    model.config.pad_token_id = tokenizer.pad_token_id
    scores = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions, strict=True):
            text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": completion}],
                                                 tokenize=False)
            enc = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            scores.append(model(**enc).logits[0, 0].item())
    return torch.tensor(scores), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model (a fresh 1-label head is added)")
    parser.add_argument("--rm", help="a trained scalar RM folder from `align rm` (used instead of --model)")
    parser.add_argument("--data", default="demo", help="preference data source (as for `align data`)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="scorer batch (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--max-length", type=int, default=256, help="same cut for both scorers")
    parser.add_argument("--train-pairs", type=int, default=32, help="pairs for the training-throughput run (0: skip)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    tmp = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    data_dir = run_data_stage(DataConfig(source=args.data, on_bad_rows="skip"), tmp / "data").out_dir
    pairs = PairData.load(data_dir / "train.parquet", limit=args.pairs, seed=0)
    prompts = pairs.prompts + pairs.prompts
    completions = pairs.chosen + pairs.rejected
    n_pairs = len(pairs)

    device = resolve_device("auto")
    if args.rm:
        loaded = RewardScorer.from_pretrained(args.rm, expect_kind="scalar", device=str(device))
        model, tokenizer, model_name = loaded.model, loaded.tokenizer, f"trained RM {args.rm}"
    else:
        resolved = resolve_model(args.model)
        model, tokenizer = load_sequence_classifier(resolved, 1)
        model_name = resolved.describe()
    model.eval()
    model.to(device)
    bf16 = bf16_enabled(None, device)

    scorer = RewardScorer(model, tokenizer, kind="scalar", batch_size=args.batch_size, max_length=args.max_length,
                          bf16=bf16)
    scorer.score(prompts[:4], completions[:4])  # warm-up
    start = time.perf_counter()
    fast = scorer.score(prompts, completions).mean
    t_fast = time.perf_counter() - start
    tokens = sum(len(t) for t in scorer.tokenizer(
        [scorer.tokenizer.apply_chat_template([*p, {"role": "assistant", "content": c}], tokenize=False)
         for p, c in zip(prompts, completions, strict=True)], add_special_tokens=False)["input_ids"])

    model.float()
    seed_scores, t_seed = seed_loop(model, tokenizer, prompts, completions, args.max_length)
    agree = float(((fast[:n_pairs] > fast[n_pairs:]) == (seed_scores[:n_pairs] > seed_scores[n_pairs:])).float().mean())

    train_pps = None
    if args.train_pairs:
        cfg = RewardModelConfig(model=args.model, data=str(data_dir), max_train_pairs=args.train_pairs,
                                max_eval_pairs=4, max_length=args.max_length, batch_size=8, epochs=1.0,
                                logging_steps=1000)
        train_pps = run_reward_stage(cfg, tmp / "rm").summary["train"]["pairs_per_second"]

    figures = {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "bf16": bf16, "model": model_name, "data": args.data, "pairs": n_pairs,
        "max_length": args.max_length, "batch_size": scorer.batch_size, "mean_tokens_per_text": round(tokens / len(prompts), 1),
        "scorer_pairs_per_s": round(n_pairs / t_fast, 3), "seed_loop_pairs_per_s": round(n_pairs / t_seed, 3),
        "speedup": round(t_seed / t_fast, 2), "pairwise_order_agreement": round(agree, 3),
        "rm_train_pairs_per_s": train_pps, "command": " ".join(["python", *sys.argv]),
    }
    print(f"\nreward scoring, {n_pairs} pairs ({2 * n_pairs} texts, mean {figures['mean_tokens_per_text']} tokens), "
          f"{device}, {'bf16' if bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    print(f"{'':28s}{'pairs/s':>10s}{'seconds':>10s}")
    print(f"{'scorer (batched, sorted)':28s}{figures['scorer_pairs_per_s']:>10.2f}{t_fast:>10.1f}")
    print(f"{'seed loop (1 by 1, pad 256)':28s}{figures['seed_loop_pairs_per_s']:>10.2f}{t_seed:>10.1f}")
    print(f"speed-up: {figures['speedup']}x   (chosen-vs-rejected order agreement {agree:.2f}: the seed reads the "
          "token before the final <|im_end|>)")
    if train_pps is not None:
        print(f"RM training (TRL RewardTrainer, batch 8, max_length {args.max_length}): {train_pps} pairs/s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
