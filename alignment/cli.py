"""The ``align`` command: one subcommand per stage.

Every stage takes ``--config FILE`` (YAML: the stage's fields, or a file with a section per stage),
``--preset NAME`` and trailing ``key=value`` overrides (``align data seed=3 column_map.prompt=question``).
Precedence: defaults < preset < config file < key=value < explicit flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time

from alignment import __version__
from alignment.config import ConfigError, build_config

log = logging.getLogger("alignment")

EPILOG = textwrap.dedent("""\
    stages:
      data    load preference data (hub id or local file), binarise raw ratings, map ratings to
              10-bin distributions, split train/validation by prompt; writes parquet + manifest.json
      rm      train a reward model (scalar Bradley-Terry or distributional over ratings 1-10)
              with TRL; evaluate on validation; save model, metrics.json and a plot
      rm-eval evaluate a saved reward model on a data stage's pairs
      reinforce  fine-tune the policy with REINFORCE (moving-average baseline) against a reward
              model, with a collapse guard and exact resume from checkpoints
      model   resolve a model spec (hub id, folder, .gguf), say which source is used, optionally
              ask it a question; warms the offline SmolLM2 cache

    Run `align <stage> --help` for a stage's options. Configs are YAML; any field can be set
    with key=value after the options.
""")


def _add_common(p: argparse.ArgumentParser, presets: list[str] | None = None) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (the stage's fields, or a mapping with a section per stage)")
    if presets:
        p.add_argument("--preset", choices=presets, help="start from a named preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field (YAML values)")


def build_parser() -> argparse.ArgumentParser:
    from alignment.data import PRESETS

    parser = argparse.ArgumentParser(
        prog="align", description="RLHF alignment pipeline: data, reward models, REINFORCE, evaluation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")

    data = sub.add_parser(
        "data", help="build train/validation preference pairs",
        description="Load preference data, binarise raw per-attribute ratings, map ratings to 10-bin "
        "distributions and write a seeded, prompt-grouped train/validation split (parquet) with manifest.json.",
        epilog="examples:\n  align data                                   # embedded demo set\n"
        "  align data --source ../shared/data/helpsteer2/validation.jsonl --out runs/hs2\n"
        "  align data --preset helpsteer2               # esfrankel17/HelpSteer2_binarized from the hub\n"
        "  align data --source my.csv column_map.prompt=question --on-bad-rows skip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument("--source", help="'demo', a .jsonl/.json/.parquet/.csv file, or a hub dataset id")
    data.add_argument("--format", choices=["auto", "raw", "pairs", "hh"], help="input shape (default: detect)")
    data.add_argument("--split", help="hub split (default: the dataset's usual one)")
    data.add_argument("--on-bad-rows", choices=["error", "skip"], help="stop on bad rows (default) or drop them")
    data.add_argument("--out", metavar="DIR", help="output folder (default: runs/data/<source>-<hash>)")
    data.add_argument("--overwrite", action="store_true", help="rebuild even if --out is up to date, replacing what it holds")
    _add_common(data, sorted(PRESETS))

    from alignment.reward import PRESETS as RM_PRESETS

    rm = sub.add_parser(
        "rm", help="train a reward model (scalar or distributional)",
        description="Train a reward model on a data stage's train split with TRL's RewardTrainer (scalar: "
        "Bradley-Terry; distributional: 10 bins over ratings 1-10, KL and/or -log P(w > l)), evaluate it on the "
        "validation split and save a transformers folder with metrics.json and a plot.",
        epilog="examples:\n  align rm --kind scalar --data runs/data/demo-<hash>\n"
        "  align rm --kind distributional loss=pairwise lora=true\n"
        "  align rm --data runs/uf max_length=256 max_train_pairs=400 --out runs/rm/uf-scalar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("--kind", choices=["scalar", "distributional"], help="reward model kind (default scalar)")
    rm.add_argument("--data", metavar="DIR", help="folder written by `align data` (default: the demo data)")
    rm.add_argument("--model", help="base model: hub id, folder or .gguf (default SmolLM2-135M-Instruct)")
    rm.add_argument("--out", metavar="DIR", help="output folder (default: runs/rm/<kind>-<hash>)")
    rm.add_argument("--overwrite", action="store_true", help="retrain even if --out is up to date")
    _add_common(rm, sorted(RM_PRESETS))

    rm_eval = sub.add_parser(
        "rm-eval", help="evaluate a trained reward model on a data stage's pairs",
        description="Pairwise accuracy, margin and (distributional) P(w > l) accuracy, KL/NLL and calibration "
        "of a saved reward model on the train, validation or all pairs of a data stage output.",
    )
    rm_eval.add_argument("model_dir", help="folder written by `align rm`")
    rm_eval.add_argument("--data", metavar="DIR", required=True, help="folder written by `align data`")
    rm_eval.add_argument("--split", choices=["train", "validation", "all"], default="validation")
    rm_eval.add_argument("--max-length", type=int, default=1024)
    rm_eval.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    rm_eval.add_argument("--json", metavar="PATH", help="also write the metrics to this file")

    rl = sub.add_parser(
        "reinforce", help="fine-tune the policy with REINFORCE against a reward model",
        description="REINFORCE with a moving-average (or EMA / RLOO / no) baseline, the whole completion as one "
        "action (Ahmadian et al. 2024). Logs reward, KL, entropy, length, EOS rate, distinct-n and repetition every "
        "step, stops on collapse, checkpoints atomically; re-running the same command resumes.",
        epilog="examples:\n  align reinforce --rm runs/rm/scalar-<hash> --data runs/data/demo-<hash>\n"
        "  align reinforce --rm RM --data DATA baseline=rloo samples_per_prompt=4 kl_beta=0.05",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rl.add_argument("--rm", dest="reward_model", metavar="DIR", help="folder written by `align rm`")
    rl.add_argument("--data", metavar="DIR", help="folder written by `align data`")
    rl.add_argument("--policy", help="starting policy (default SmolLM2-135M-Instruct)")
    rl.add_argument("--out", metavar="DIR", help="run folder (default: runs/reinforce/<hash>)")
    _add_common(rl)

    model = sub.add_parser(
        "model", help="resolve a model and say where it comes from",
        description="Resolve a model spec (hub id, local folder or .gguf file) to a local folder, converting "
        "the offline SmolLM2 GGUF once if the hub is unreachable, and optionally ask it a question.",
    )
    model.add_argument("spec", nargs="?", default=None, help="hub id, folder or .gguf (default: SmolLM2-135M-Instruct)")
    model.add_argument("--ask", metavar="QUESTION", help="generate a greedy answer to this chat question")
    model.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def _stage_config(args: argparse.Namespace, cls, presets: dict, explicit: dict):
    """The stage's config from preset, --config, key=value and flags; None after --print-config."""
    preset = getattr(args, "preset", None)
    config = build_config(cls, base=presets[preset] if preset else None, config_file=args.config,
                          overrides=args.overrides, explicit=explicit)
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return None
    return config


def _cmd_data(args: argparse.Namespace) -> int:
    from alignment.data import PRESETS, DataConfig, run_data_stage

    config = _stage_config(args, DataConfig, PRESETS, {"source": args.source, "format": args.format,
                                                      "split": args.split, "on_bad_rows": args.on_bad_rows})
    if config is None:
        return 0
    result = run_data_stage(config, args.out, overwrite=args.overwrite,
                            runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.manifest
    status = "reused" if result.reused else "written"
    print(f"data {status}: {result.out_dir}")
    print(f"  source {m['source']} ({m['format']}): {m['n_rows_read']} rows read, {m['n_rows_rejected']} rejected")
    print(f"  {m['n_prompts']} prompts -> {m['n_pairs']} pairs ({m['n_ties_dropped']} ties dropped)")
    print(f"  train {m['n_train']} pairs / validation {m['n_validation']} pairs; ratings: {m['has_ratings']}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from alignment.reward import PRESETS as RM_PRESETS
    from alignment.reward import RewardModelConfig, run_reward_stage

    config = _stage_config(args, RewardModelConfig, RM_PRESETS,
                           {"kind": args.kind, "data": args.data, "model": args.model})
    if config is None:
        return 0
    result = run_reward_stage(config, args.out, overwrite=args.overwrite,
                              runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.metrics
    print(f"reward model {'reused' if result.reused else 'trained'}: {result.out_dir}")
    print(f"  validation: {m['n_pairs']} pairs, accuracy {m['accuracy']:.3f}, mean margin {m['mean_margin']:.3f}")
    if "accuracy_prob" in m:
        print(f"  P(w > l) > 0.5: {m['accuracy_prob']:.3f}, ECE {m['ece']:.3f}"
              + (f", KL to ratings {m['kl_to_ratings']:.3f}" if "kl_to_ratings" in m else ""))
    t = m["train"]
    print(f"  train: {t['pairs']} pairs x {t['epochs']} epochs in {t['seconds']} s ({t['pairs_per_second']} pairs/s)"
          + (f", loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}" if t["first_loss"] is not None else ""))
    return 0


def _cmd_rm_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alignment.reward import PairData, RewardScorer, evaluate_reward_model

    scorer = RewardScorer.from_pretrained(args.model_dir, batch_size=args.batch_size, max_length=args.max_length)
    splits = ["train", "validation"] if args.split == "all" else [args.split]
    pairs = PairData.concat([PairData.load(Path(args.data) / f"{s}.parquet") for s in splits])
    metrics = evaluate_reward_model(scorer, pairs)
    metrics.pop("reliability", None)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _cmd_reinforce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alignment.reinforce import CollapseDetected, ReinforceConfig, reinforce_stage_key, train_reinforce

    config = _stage_config(args, ReinforceConfig, {}, {"reward_model": args.reward_model, "data": args.data,
                                                       "policy": args.policy})
    if config is None:
        return 0
    out = Path(args.out) if args.out else (Path(os.environ.get("ALIGNMENT_RUNS_DIR", "runs")) / "reinforce"
                                           / reinforce_stage_key(config)[:12])
    try:
        result = train_reinforce(config, out)
    except CollapseDetected as exc:
        print(f"align reinforce: stopped: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # a data-parallel launch: the first process reports
    s = result.summary
    print(f"policy {'reused' if result.reused else 'trained'}: {out / 'final'}")
    if s.get("eval_before") and s.get("eval_after"):
        b, a = s["eval_before"], s["eval_after"]
        print(f"  held-out mean reward {b['mean_reward']:.4f} -> {a['mean_reward']:.4f} ({a['n']} prompts, greedy)")
        print(f"  EOS rate {b['eos_rate']:.2f} -> {a['eos_rate']:.2f}, distinct-2 {b['distinct2']:.2f} -> "
              f"{a['distinct2']:.2f}, length {b['mean_length']:.1f} -> {a['mean_length']:.1f}")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from alignment.models import DEFAULT_MODEL, load_causal_lm, resolve_model

    start = time.perf_counter()
    resolved = resolve_model(args.spec or DEFAULT_MODEL)
    print(f"model: {resolved.spec}\n  source: {resolved.source}\n  {resolved.detail}\n  folder: {resolved.path}")
    if args.ask:
        import torch

        model, tokenizer = load_causal_lm(resolved)
        batch = tokenizer.apply_chat_template([{"role": "user", "content": args.ask}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  Q: {args.ask}\n  A: {answer.strip()}")
    print(f"  ({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    from alignment.data import DataError
    from alignment.hardware import DeviceError
    from alignment.models import ModelSourceError
    from alignment.reinforce import ReinforceError
    from alignment.reward import RewardModelError

    handlers = {"data": _cmd_data, "rm": _cmd_rm, "rm-eval": _cmd_rm_eval, "reinforce": _cmd_reinforce,
                "model": _cmd_model}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelSourceError, RewardModelError, DeviceError, ReinforceError) as exc:
        if args.debug:
            raise
        print(f"align {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"align {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
