"""The ``align`` command: one subcommand per stage, plus ``run`` and ``serve`` for the Prefect pipeline.

This entry point sits above the core: it imports ``alignment`` (the ML core) and, for ``run`` and
``serve`` only, ``flows`` and ``deployments``; nothing imports it back.

Every stage takes ``--config FILE`` (YAML: the stage's fields, or a file with a section per stage),
``--preset NAME`` and trailing ``key=value`` overrides (``align data seed=3 column_map.prompt=question``).
Precedence: defaults < preset < config file < key=value < explicit flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

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
      ppo     fine-tune the policy with PPO (value head, GAE, clipped losses) against a reward model
      grpo    fine-tune the policy with GRPO (k samples per prompt, group-normalised advantages,
              token-level clipped loss) against a reward model or reward components
      dpo     fine-tune the policy with DPO on the data stage's pairs (TRL's DPOTrainer)
      compare run several algorithms on equal budgets, score them once, one table and a frontier
      score   answer fixed validation prompts with each model (default: starting and tuned) and
              score them with the reward model(s): mean reward with CI, paired difference, KL
      judge   pairwise LLM judge (Gemini through google-genai, or a local model) of two models'
              answers in both orders: wins/ties/losses, win rate with CI, report
      run     the whole pipeline as a cached, resumable Prefect flow (preset demo by default)
      round   the next on-policy re-training round (sample the policy, label pairs, retrain the
              reward model on old + new pairs, RL again, score, judge); `rounds --n N` runs N
      serve   serve the Prefect deployments (demo: manual, retrain: weekly schedule, one per stage)
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
    from alignment.presets import PRESETS

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
        "  align data --source my.csv column_map.prompt=question --on-bad-rows skip\n"
        "  align data --source openai/summarize_from_feedback --split validation   # TL;DR comparisons\n"
        "  align data --source demo-verifiable          # prompts with checkable constraints, for reinforce/grpo\n"
        "  align data --source gym:chain_sum:200,letter_counting   # reasoning-gym tasks (gym_settings.TASK.KEY=..)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument("--source", help="'demo', 'demo-verifiable', 'gym:TASK[:SIZE],...' (reasoning-gym), a "
                      ".jsonl/.json/.parquet/.csv file, or a hub dataset id")
    data.add_argument("--format", choices=["auto", "raw", "pairs", "hh", "comparisons", "prompts"],
                      help="input shape (default: detect)")
    data.add_argument("--split", help="hub split (default: the dataset's usual one)")
    data.add_argument("--subset", help="hub configuration, e.g. comparisons (openai/summarize_from_feedback's default)")
    data.add_argument("--on-bad-rows", choices=["error", "skip"], help="stop on bad rows (default) or drop them")
    data.add_argument("--out", metavar="DIR", help="output folder (default: runs/data/<source>-<hash>)")
    data.add_argument("--overwrite", action="store_true", help="rebuild even if --out is up to date, replacing what it holds")
    _add_common(data, sorted(PRESETS))

    rm = sub.add_parser(
        "rm", help="train a reward model (scalar or distributional)",
        description="Train a reward model on a data stage's train split with TRL's RewardTrainer (scalar: "
        "Bradley-Terry; distributional: 10 bins over ratings 1-10, KL and/or -log P(w > l)), evaluate it on the "
        "validation split and save a transformers folder with metrics.json and a plot.",
        epilog="examples:\n  align rm --kind scalar --data runs/data/demo-<hash>\n"
        "  align rm --kind distributional loss=pairwise lora=true\n"
        "  align rm --data runs/uf max_length=256 max_train_pairs=400 --out runs/rm/uf-scalar\n"
        "  align rm ensemble=3 max_train_pairs=400   # 3 members (seeds, bootstrap resamples) in one folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("--kind", choices=["scalar", "distributional"], help="reward model kind (default scalar)")
    rm.add_argument("--data", metavar="DIR", help="folder written by `align data` (default: the demo data)")
    rm.add_argument("--model", help="base model: hub id, folder or .gguf (default SmolLM2-135M-Instruct)")
    rm.add_argument("--out", metavar="DIR", help="output folder (default: runs/rm/<kind>-<hash>)")
    rm.add_argument("--overwrite", action="store_true", help="retrain even if --out is up to date")
    _add_common(rm, sorted(PRESETS))

    rm_eval = sub.add_parser(
        "rm-eval", help="evaluate a trained reward model on a data stage's pairs",
        description="Pairwise accuracy, margin and (distributional) P(w > l) accuracy, KL/NLL and calibration "
        "of a saved reward model on the train, validation or all pairs of a data stage output.",
    )
    rm_eval.add_argument("model_dir", help="folder written by `align rm`")
    rm_eval.add_argument("--data", metavar="DIR", required=True, help="folder written by `align data`")
    rm_eval.add_argument("--split", choices=["train", "validation", "all"], default="validation")
    rm_eval.add_argument("--max-length", type=int, default=None,
                         help="tokens per conversation (default: the length the model was trained with)")
    rm_eval.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    rm_eval.add_argument("--json", metavar="PATH", help="also write the metrics to this file")

    from alignment.algorithms.registry import ALGORITHMS

    for spec in ALGORITHMS.values():  # reinforce, ppo, grpo and any registered online algorithm
        p = sub.add_parser(spec.name, help=spec.help, description=spec.description or spec.help,
                           epilog=spec.epilog or None, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--rm", dest="reward_model", metavar="DIR", help="folder written by `align rm`")
        p.add_argument("--data", metavar="DIR", help="folder written by `align data`")
        p.add_argument("--policy", help="starting policy (default SmolLM2-135M-Instruct)")
        p.add_argument("--out", metavar="DIR", help=f"run folder (default: runs/{spec.name}/<hash>)")
        _add_common(p, sorted(PRESETS))

    dpo = sub.add_parser(
        "dpo", help="fine-tune the policy with DPO on the data stage's pairs (the offline baseline)",
        description="DPO with TRL's DPOTrainer on a data stage's train pairs, the starting model as the frozen "
        "reference; writes a policy folder (like reinforce's final/) with metrics.json and train_log.jsonl.",
        epilog="examples:\n  align dpo --data runs/data/demo-<hash>\n  align dpo --data DATA beta=0.05 loss_type=ipo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dpo.add_argument("--data", metavar="DIR", help="folder written by `align data`")
    dpo.add_argument("--policy", help="starting policy and reference (default SmolLM2-135M-Instruct)")
    dpo.add_argument("--out", metavar="DIR", help="policy folder (default: runs/dpo/<hash>)")
    dpo.add_argument("--overwrite", action="store_true", help="retrain even if --out is up to date")
    _add_common(dpo, sorted(PRESETS))

    sft = sub.add_parser(
        "sft", help="supervised fine-tuning on reference summaries (TL;DR), with ROUGE before and after",
        description="Fine-tune the policy on posts and their reference summaries with TRL's SFTTrainer (loss on the "
        "summary only), plain 'TL;DR:' prompts or the chat template; evaluates greedy summaries of held-out posts "
        "with ROUGE-1/2/L before and after (with intervals) and writes a policy folder later stages can start from.",
        epilog="examples:\n  align sft --source ../shared/data/tldr-rlaif/summaries.jsonl max_train_posts=256\n"
        "  align sft --source CarperAI/openai_summarize_tldr prompt_format=chat lora=true",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sft.add_argument("--source", help="summaries file or hub dataset (default CarperAI/openai_summarize_tldr)")
    sft.add_argument("--policy", help="starting policy (default SmolLM2-135M-Instruct)")
    sft.add_argument("--out", metavar="DIR", help="policy folder (default: runs/sft/<format>-<hash>)")
    sft.add_argument("--overwrite", action="store_true", help="retrain even if --out is up to date")
    _add_common(sft, sorted(PRESETS))

    compare = sub.add_parser(
        "compare", help="run several algorithms on equal budgets and compare them in one table",
        description="From one data stage and one reward model (the proxy), train each algorithm (reinforce, rloo, "
        "ppo, reinforce++, dpo) from the same policy with the same number of sampled completions, each in its "
        "own process, then score every policy once (proxy, independent reward models, gold) and write "
        "compare.md, compare.json and frontier.png. Finished algorithms are reused on a re-run.",
        epilog="examples:\n  align compare --data DATA --rm runs/rm/scalar-<hash> --independent dist=runs/rm/distributional-<hash>\n"
        "  align compare --data DATA --rm RM algorithms=[reinforce,ppo] samples=128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("--data", metavar="DIR", help="folder written by `align data`")
    compare.add_argument("--rm", dest="reward_model", metavar="DIR", help="the proxy reward model (`align rm`)")
    compare.add_argument("--independent", action="append", metavar="NAME=DIR",
                         help="a reward model never trained against (repeatable)")
    compare.add_argument("--policy", help="starting policy (default SmolLM2-135M-Instruct)")
    compare.add_argument("--out", metavar="DIR", help="output folder (default: runs/compare/<hash>)")
    _add_common(compare)

    score = sub.add_parser(
        "score", help="answer validation prompts with each model and score them with the reward model(s)",
        description="Generate answers to a fixed, seeded set of validation prompts with each model (default: the "
        "starting model), score them with each reward model and write a table: mean reward with a 95%% CI, paired "
        "difference to the first model, length, EOS rate, distinct-2, repetition and KL to the first model. "
        "Generations are saved for the judge.",
        epilog="examples:\n  align score --data runs/data/demo-<hash> --rm runs/rm/scalar-<hash> \\\n"
        "      --model base=HuggingFaceTB/SmolLM2-135M-Instruct --model tuned=runs/reinforce/<hash>/final\n"
        "  align score --data DATA --rm scalar=RM1 --rm dist=RM2 --model base=... --model tuned=... n_prompts=64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--data", metavar="DIR", help="folder written by `align data` (validation prompts)")
    score.add_argument("--model", action="append", metavar="NAME=SPEC",
                       help="a model to evaluate (repeatable; the first is the reference)")
    score.add_argument("--rm", action="append", metavar="[NAME=]DIR", help="a reward model folder (repeatable)")
    score.add_argument("--out", metavar="DIR", help="output folder (default: runs/score/<hash>)")
    score.add_argument("--overwrite", action="store_true", help="recompute even if --out is up to date")
    _add_common(score, sorted(PRESETS))

    judge = sub.add_parser(
        "judge", help="pairwise LLM judge of two models' answers (Gemini or a local model)",
        description="Judge model A's answers against model B's (from `align score`), each pair in both orders; a "
        "verdict that flips with the order is a tie. Writes judgments.csv, summary.json (wins/ties/losses, "
        "tie-adjusted win rate with 95%% CI, flip rate, split by length), judge.png and report.md/html. "
        "Resumable: re-running continues where a crash or an exhausted quota stopped it.",
        epilog="examples:\n  align judge --scores runs/score/<hash> --backend local\n"
        "  GEMINI_API_KEY=... align judge --scores runs/score/<hash> gemini_model=gemini-flash-latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    judge.add_argument("--scores", metavar="DIR", help="folder written by `align score`")
    judge.add_argument("--backend", choices=["gemini", "local"], help="gemini (API key in GEMINI_API_KEY) or local")
    judge.add_argument("--out", metavar="DIR", help="output folder (default: runs/judge/<backend>-<hash>)")
    _add_common(judge, sorted(PRESETS))

    run = sub.add_parser(
        "run", help="run the whole pipeline as a Prefect flow (cached, resumable)",
        description="Run data -> reward models -> RL -> scoring -> judge as the Prefect flow "
        "`alignment-pipeline`. The RL stage is options.algorithm (reinforce by default; any registered online "
        "algorithm: reinforce, ppo, grpo) with its section; an RL section with rewards (components) names the "
        "trained reward models as folder '@rm_scalar' / '@rm_distributional'. Without PREFECT_API_URL it runs on a temporary local Prefect (no server needed). "
        "Every stage is cached on its config and inputs: a second run of the same command finishes from cache, "
        "and after a failure only the failed stage and those below it run again. When every stage is already "
        "complete and no Prefect server is configured, it says so and prints the results without starting one "
        "(--force-flow runs the flow anyway).",
        epilog="examples:\n  align run                                   # the demo preset (embedded data, CPU, minutes)\n"
        "  align run reinforce.steps=16 judge.backend=gemini\n"
        "  align run options.algorithm=grpo grpo.steps=16\n"
        "  align run 'reinforce.rewards=[{kind: reward_model, folder: \"@rm_scalar\"}, {kind: gold}]'\n"
        "  align run --preset helpsteer2 options.runs_dir=/data/runs     # GPU, hub data, Gemini judge\n"
        "  align run --config pipeline.yaml --print-config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--runs-dir", metavar="DIR", help="where every stage writes (default: runs)")
    run.add_argument("--force-flow", action="store_true",
                     help="run the Prefect flow even when every stage is already complete (records a flow run)")
    _add_common(run, sorted(PRESETS))

    sig = sub.add_parser(
        "signal", help="where GRPO has a gradient: the base model's pass@1, pass@k and mixed groups per task",
        description="Answer a data stage's training prompts (those with a gold answer; n_per_task per task) greedily "
        "and k times at the sampling temperature, and print per task: greedy accuracy, pass@1 and the unbiased pass@k, "
        "the share of prompts whose k samples are neither all right nor all wrong (the only prompts a GRPO step learns "
        "from) and the share in the answer format. Training prompts only: the task mix is chosen without looking at "
        "the held-out items a gain is measured on.",
        epilog="examples:\n  align data --source gym:chain_sum:200,letter_counting:200 --out runs/data/gym\n"
        "  align signal --data runs/data/gym n_per_task=40 k=8 --json signal.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sig.add_argument("--data", metavar="DIR", help="folder written by `align data` (prompts with gold answers)")
    sig.add_argument("--model", help="the model to measure (default SmolLM2-135M-Instruct)")
    sig.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    _add_common(sig)

    seeds = sub.add_parser(
        "seeds", help="run one pipeline recipe on several seeds; each seed's interval and the spread",
        description="Run the pipeline (as `align run` would, preset demo-rlvr by default) once per seed, the seed set "
        "in the prompts, RL and score sections (which prompts are drawn and held out, the RL run's sampling, the scored "
        "subset); data and reward models keep theirs, so they are trained once and shared. Then write seeds.md and "
        "seeds.json under <runs>/seeds/: per seed the held-out gold difference with its 95%% CI and McNemar's exact "
        "p, the lenient gold check, the reward models never trained against, the degenerate-answer share and EOS; "
        "across seeds the mean, sd and range. Complete seeds come from cache.",
        epilog="examples:\n  align seeds                                   # demo-rlvr on seeds 0, 1, 2\n"
        "  align seeds --seeds 0,1 --preset demo-verifiable grpo.steps=20",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    seeds.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="comma-separated seeds (default 0,1,2)")
    seeds.add_argument("--runs-dir", metavar="DIR", help="where every stage writes (default: runs)")
    _add_common(seeds, sorted(PRESETS))

    for name, what in (("round", "the next round"), ("rounds", "several rounds")):
        rp = sub.add_parser(
            name, help=f"run {what} of on-policy re-training as the Prefect flow alignment-rounds",
            description="Round 0 is the pipeline (`align run` with the same config: the same stages and folders). "
            "Each round n >= 1 samples k answers of round n-1's policy to train prompts, pairs and labels them (the gold "
            "check where a prompt has one, else Gemini when a key is configured, else the reward models not trained "
            "against, else the local judge; ties dropped), appends them to the preference store (rounds.store; pairs "
            "dropped into its inbox/ are picked up too), retrains the reward model on old + new pairs, runs RL from "
            "round n-1's policy, scores and judges it against round 0's start. Complete rounds come from cache; past "
            "rounds.max_rounds nothing new runs. Writes the rounds report under the store.",
            epilog="examples:\n  align round                         # the next round of the demo-rounds preset\n"
            "  align rounds --n 3                  # three rounds in one go\n"
            "  align rounds --n 3 rounds.pairing=best_worst rounds.max_rounds=5",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "rounds":
            rp.add_argument("--n", type=int, default=3, metavar="N", help="new rounds to run (default 3)")
        rp.add_argument("--runs-dir", metavar="DIR", help="where every stage writes (default: runs)")
        _add_common(rp, sorted(PRESETS))

    serve = sub.add_parser(
        "serve", help="serve the pipeline's Prefect deployments (demo: manual; retrain: on a schedule)",
        description="Serve the deployments of `alignment-pipeline` and of each stage flow (data, SFT, reward model, "
        "one per registered online algorithm: reinforce, ppo, grpo, ..., DPO, score, judge) to a Prefect server "
        "(PREFECT_API_URL); runs triggered from the UI or `prefect deployment run` execute in this process.",
    )
    from deployments.options import add_serve_arguments

    add_serve_arguments(serve)

    model = sub.add_parser(
        "model", help="resolve a model and say where it comes from",
        description="Resolve a model spec (hub id, local folder or .gguf file) to a local folder, converting "
        "the offline SmolLM2 GGUF once if the hub is unreachable, and optionally ask it a question.",
    )
    model.add_argument("spec", nargs="?", default=None, help="hub id, folder or .gguf (default: SmolLM2-135M-Instruct)")
    model.add_argument("--ask", metavar="QUESTION", help="generate a greedy answer to this chat question")
    model.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def _stage_config(args: argparse.Namespace, cls, section: str, explicit: dict):
    """The stage's config from preset (its ``section`` of the one preset table), --config, key=value and
    flags; None after --print-config."""
    from alignment.presets import stage_preset

    preset = getattr(args, "preset", None)
    config = build_config(cls, base=stage_preset(preset, section) if preset else None, config_file=args.config,
                          overrides=args.overrides, explicit=explicit, section=section)
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return None
    return config


def _cmd_data(args: argparse.Namespace) -> int:
    from alignment.data import DataConfig, run_data_stage

    config = _stage_config(args, DataConfig, "data", {"source": args.source, "format": args.format,
                                                      "split": args.split, "subset": args.subset,
                                                      "on_bad_rows": args.on_bad_rows})
    if config is None:
        return 0
    result = run_data_stage(config, args.out, overwrite=args.overwrite,
                            runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.summary
    status = "reused" if result.reused else "written"
    print(f"data {status}: {result.out_dir}")
    print(f"  source {m['source']} ({m['format']}): {m['n_rows_read']} rows read, {m['n_rows_rejected']} rejected")
    if m.get("prompts_only"):
        print(f"  {m['n_prompts']} prompts, no pairs (for reinforce/ppo/grpo; gold answers: "
              f"{sum(m['n_gold_prompts'].values())})")
        print(f"  train {m['n_train']} prompts / validation {m['n_validation']} prompts")
        return 0
    dropped = "".join(f", {m[k]} {what} dropped" for k, what in (("n_rating_reversed_dropped", "rated chosen < rejected"),
                      ("n_contradictory_dropped", "contradictory")) if m.get(k))  # rules: docs/data.md
    print(f"  {m['n_prompts']} prompts -> {m['n_pairs']} pairs ({m['n_ties_dropped']} ties dropped{dropped})")
    print(f"  train {m['n_train']} pairs / validation {m['n_validation']} pairs; ratings: {m['has_ratings']}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from alignment.rewards.ensemble import train_reward_model
    from alignment.rewards.model import RewardModelConfig

    config = _stage_config(args, RewardModelConfig, f"rm_{args.kind or 'scalar'}",
                           {"kind": args.kind, "data": args.data, "model": args.model})
    if config is None:
        return 0
    result = train_reward_model(config, args.out, overwrite=args.overwrite,
                              runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.summary
    if not m:  # a non-first process of a multi-process launch: the first one reports
        return 0
    if "spread" in m:  # ensemble=N: N members in one folder
        sp = m["spread"]
        print(f"reward-model ensemble {'reused' if result.reused else 'trained'}: {result.out_dir} "
              f"({m['ensemble']} {m['kind']} members{', bootstrap resamples' if m['bootstrap'] else ''})")
        for member in m["members"]:
            print(f"  {member['folder']}: seed {member['seed']}, validation accuracy {member['accuracy']:.3f}, "
                  f"mean margin {member['mean_margin']:.3f}")
        print(f"  members' accuracy: mean {sp['member_accuracy_mean']:.3f}, std {sp['member_accuracy_std']:.3f} "
              f"(min {sp['member_accuracy_min']:.3f}, max {sp['member_accuracy_max']:.3f}) on {m['n_pairs']} pairs")
        print(f"  spread: margin std across members {sp['margin_std_mean']:.3f} (mean over pairs), members disagree "
              f"on {sp['disagreement']:.1%} of pairs")
        print("  ensemble accuracy: " + ", ".join(f"{how} {a:.3f}" for how, a in sp["ensemble_accuracy"].items()))
        print(f"  train: {m['train']['seconds']} s for {m['ensemble']} members")
        return 0
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

    from alignment.data import PairData
    from alignment.rewards.model import RewardScorer, evaluate_reward_model

    scorer = RewardScorer.from_pretrained(args.model_dir, batch_size=args.batch_size, max_length=args.max_length)
    splits = ["train", "validation"] if args.split == "all" else [args.split]
    pairs = PairData.concat([PairData.load(Path(args.data) / f"{s}.parquet") for s in splits])
    metrics = evaluate_reward_model(scorer, pairs)
    metrics.pop("reliability", None)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        from alignment.ownership import write_own_file

        write_own_file(args.json, text + "\n", "--json")  # checked before scoring too (_checked_paths)
    return 0


def _cmd_reinforce(args: argparse.Namespace) -> int:
    from alignment.algorithms.guard import CollapseDetected
    from alignment.algorithms.registry import get_algorithm
    from alignment.evaluation.alarm import OverOptimisationDetected

    spec = get_algorithm(args.command)
    cls, train = spec.config_cls, spec.train_fn
    config = _stage_config(args, cls, args.command, {"reward_model": args.reward_model, "data": args.data,
                                                     "policy": args.policy})
    if config is None:
        return 0
    try:
        result = train(config, args.out, runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    except (CollapseDetected, OverOptimisationDetected) as exc:
        print(f"align {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    from alignment.parallel import launched_rank

    if launched_rank() != 0:
        return 0  # a data-parallel launch: the first process reports
    s = result.summary
    print(f"policy {'reused' if result.reused else 'trained'}: {result.out_dir / 'final'}")
    if s.get("eval_before") and s.get("eval_after"):
        b, a = s["eval_before"], s["eval_after"]
        print(f"  held-out mean reward {b['mean_reward']:.4f} -> {a['mean_reward']:.4f} ({a['n']} prompts, greedy)")
        print(f"  EOS rate {b['eos_rate']:.2f} -> {a['eos_rate']:.2f}, distinct-2 {b['distinct2']:.2f} -> "
              f"{a['distinct2']:.2f}, length {b['mean_length']:.1f} -> {a['mean_length']:.1f}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from alignment.compare import CompareConfig, run_compare

    config = _stage_config(args, CompareConfig, "compare", {
        "data": args.data, "reward_model": args.reward_model, "policy": args.policy,
        "independent_reward_models": _named(args.independent, "independent", _rm_name)})
    if config is None:
        return 0
    result = run_compare(config, args.out, runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    print(f"comparison written: {result.out_dir}")
    print((result.out_dir / "compare.md").read_text())
    return 0


def _cmd_dpo(args: argparse.Namespace) -> int:
    from alignment.algorithms.dpo import DPOStageConfig, run_dpo_stage

    config = _stage_config(args, DPOStageConfig, "dpo", {"data": args.data, "policy": args.policy})
    if config is None:
        return 0
    result = run_dpo_stage(config, args.out, overwrite=args.overwrite,
                           runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.summary
    print(f"policy {'reused' if result.reused else 'trained'}: {result.out_dir}")
    print(f"  {m['pairs']} pairs x {m['epochs']} epochs in {m['seconds']} s; loss {m['first_loss']} -> {m['final_loss']}, "
          f"reward accuracy {m['final_reward_accuracy']}, margin {m['final_reward_margin']}")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from alignment.algorithms.sft import SFTConfig, run_sft_stage

    config = _stage_config(args, SFTConfig, "sft", {"source": args.source, "policy": args.policy})
    if config is None:
        return 0
    result = run_sft_stage(config, args.out, overwrite=args.overwrite,
                           runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    m = result.summary
    t = m["train"]
    print(f"policy {'reused' if result.reused else 'trained'}: {result.out_dir}")
    print(f"  {m['posts']['train']} posts x {t['epochs']} epochs in {t['seconds']} s; loss {t['first_loss']} -> "
          f"{t['final_loss']}")
    print(f"  ROUGE on {m['posts']['held_out']} held-out posts (F, 95% CI):")
    rows = [("before", m["rouge_before"]), ("after", m["rouge_after"])]
    if m.get("rouge_source_summaries"):
        rows.append(("source summaries", m["rouge_source_summaries"]))
    for name, r in rows:
        print(f"    {name:18s}" + "  ".join(f"{k} {v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]"
                                          for k, v in r.items()))
    print("    gain (paired)     " + "  ".join(f"{k} {v['mean']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
                                            for k, v in m["rouge_gain"].items()))
    return 0


def _named(items: list[str] | None, what: str, default_name=None) -> dict[str, str] | None:
    """``["a=x", "y"]`` -> ``{"a": "x", default_name("y"): "y"}``; None when no item was given."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if default_name is None:
                raise ConfigError(f"--{what} {item!r} is not of the form NAME=SPEC")
            name, value = default_name(item), item
        if name in out:
            raise ConfigError(f"--{what}: the name {name!r} is given twice")
        out[name] = value
    return out


def _rm_name(folder: str) -> str:
    from alignment.io import read_manifest

    return (read_manifest(folder) or {}).get("kind") or os.path.basename(os.path.normpath(folder))


def _cmd_score(args: argparse.Namespace) -> int:
    from alignment.evaluation.evaluate import ScoreConfig, run_score_stage

    config = _stage_config(args, ScoreConfig, "score", {"data": args.data, "models": _named(args.model, "model"),
                                                   "reward_models": _named(args.rm, "rm", _rm_name)})
    if config is None:
        return 0
    result = run_score_stage(config, args.out, overwrite=args.overwrite,
                             runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    print(f"scores {'reused' if result.reused else 'written'}: {result.out_dir}")
    print((result.out_dir / "scores.md").read_text())
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from alignment.evaluation.judge import JudgeConfig, run_judge_stage

    config = _stage_config(args, JudgeConfig, "judge", {"scores": args.scores, "backend": args.backend})
    if config is None:
        return 0
    result = run_judge_stage(config, args.out, runs_root=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"))
    s = result.summary
    lo, hi = s["win_rate_ci95_wilson"]
    print(f"judgments {'reused' if result.reused else 'written'}: {result.out_dir}")
    print(f"  {s['model_a']} vs {s['model_b']} ({s['backend']} judge, {s['n']} pairs): {s['wins']} wins, "
          f"{s['ties']} ties, {s['losses']} losses; win rate {s['win_rate']:.3f} [{lo:.3f}, {hi:.3f}], "
          f"flip rate {s['flip_rate']:.3f}")
    if s.get("note"):
        print(f"  note: {s['note']}")
    print(f"  report: {result.out_dir / 'report.md'}")
    return 0


def _pipeline_config(args: argparse.Namespace, default_preset: str):
    """(preset name, PipelineConfig) of `align run` / `align round(s)`: preset < --config < key=value < --runs-dir."""
    from alignment.pipeline import PipelineConfig

    preset = args.preset or default_preset
    explicit = {"options": {"runs_dir": args.runs_dir}} if args.runs_dir else None
    config = build_config(PipelineConfig, base=PipelineConfig.preset(preset), config_file=args.config,
                          overrides=args.overrides, explicit=explicit)
    config.options.runs_dir = _runs_dir(config.options.runs_dir, "options.runs_dir")  # from a file or key=value too
    return preset, config


def _cmd_run(args: argparse.Namespace) -> int:
    from alignment.pipeline import completed_pipeline, completed_result

    preset, config = _pipeline_config(args, "demo")
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    start = time.perf_counter()
    done = None if args.force_flow or os.environ.get("PREFECT_API_URL") else completed_pipeline(config)
    if done is not None:
        # Nothing to run: report from the stage folders without starting a temporary Prefect server (~5 s).
        result = completed_result(done)
        print(f"pipeline ({preset}): every stage is already complete, nothing to run (no Prefect flow run; "
              f"--force-flow runs the flow anyway) [{time.perf_counter() - start:.1f} s]:")
    else:
        from flows.pipeline import run_pipeline  # sets Prefect's environment before Prefect is imported
        from flows.server import prefect_api

        with prefect_api():  # PREFECT_API_URL, else a temporary server this command owns and stops
            result = run_pipeline(config)
        print(f"pipeline ({preset}) finished in {time.perf_counter() - start:.0f} s (each stage's line above)")
    for name, info in result["stages"].items() if done is not None else ():
        peak = info.get("peak_rss_mb")
        cost = f"{info['seconds']:>6.0f} s {peak / 1024:5.2f} GB" if peak is not None and info.get("seconds") is not None \
            else " " * 17
        print(f"  {name:<18} {info['state']:<10} {cost}  {info['path']}")
    v = result["verdict"]
    print(f"verdict ({v['model']} vs {v['reference']}):")
    for c in v["checks"]:
        value = f"{c['value']:.3f}" if c["kind"] == "judge" else f"{c['value']:+.3f}"
        print(f"  {c['name']:<34} {value} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]  ({c['unit']})")
    print(f"  reading: {v['reading']}")
    if result["report"]:
        print(f"report: {result['report']}  (and report.html beside it)")
    tracked = result.get("tracking")
    if tracked:
        version = f"; policy registered as alignment-policy v{tracked['model_version']}" \
            if tracked.get("model_version") else ""
        print(f"MLflow run: {tracked.get('where') or tracked['url']}{version}")
    from alignment.presets import PRESET_NOTES

    if preset in PRESET_NOTES:
        print(PRESET_NOTES[preset])
    return 0


def _cmd_signal(args: argparse.Namespace) -> int:
    from alignment.evaluation.signal import SignalConfig, run_signal, signal_table
    from alignment.ownership import file_problem, write_own_file

    config = _stage_config(args, SignalConfig, "signal", {"data": args.data, "model": args.model})
    if config is None:
        return 0
    if config.data is None:
        raise ConfigError("give --data (a folder written by `align data` with gold answers)")
    problem = args.json and file_problem(args.json, "--json")
    if problem:
        raise ConfigError(problem)
    start = time.perf_counter()
    rows = run_signal(config, progress=lambda done, total: log.info("signal: %d/%d prompts", done, total))
    table = signal_table(rows)
    print(f"base model {config.model}: {config.k} samples per prompt at temperature {config.temperature}, "
          f"{config.max_new_tokens} new tokens, {'lenient' if config.lenient else 'strict'} gold check "
          f"[{time.perf_counter() - start:.0f} s]")
    print(table)
    if args.json:
        write_own_file(args.json, json.dumps({"config": config.model_dump(mode="json"),
                                              "tasks": [r.as_dict() for r in rows]}, indent=2) + "\n", "--json")
        print(f"written: {args.json}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct integers in [0, 2^32), e.g. 0,1,2")
    return seeds


def _cmd_seeds(args: argparse.Namespace) -> int:
    from alignment.io import sha256_text
    from alignment.ownership import file_problem, write_own_file
    from alignment.pipeline import PipelineConfig
    from alignment.seeds import seed_overrides, seed_row, seeds_markdown, seeds_summary

    preset, base = _pipeline_config(args, "demo-rlvr")
    seeds = _parse_seeds(args.seeds)
    configs = {}
    for seed in seeds:
        data = base.model_dump(mode="json")
        for section, value in seed_overrides(seed, base.options.algorithm).items():
            if data.get(section) is not None:
                data[section].update(value)
        configs[seed] = PipelineConfig.model_validate(data)
    if args.print_config:
        print(json.dumps({str(s): c.model_dump(mode="json") for s, c in configs.items()}, indent=2))
        return 0
    key = sha256_text(json.dumps({"seeds": seeds, "config": base.model_dump(mode="json")}, sort_keys=True))[:12]
    out = Path(base.options.runs_dir) / "seeds" / f"{preset}-{key}"
    for name in ("seeds.md", "seeds.json"):
        problem = file_problem(out / name, f"the seeds report {name}")
        if problem:
            raise ConfigError(problem)
    from flows.pipeline import run_pipeline  # sets Prefect's environment before Prefect is imported
    from flows.server import prefect_api

    start, rows = time.perf_counter(), []
    with prefect_api():
        for seed in seeds:
            print(f"=== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) ===", flush=True)
            result = run_pipeline(configs[seed])
            score = Path(result["stages"]["score"]["path"]) / "scores.json"
            rows.append(seed_row(seed, json.loads(score.read_text(encoding="utf-8"))))
    summary = {"preset": preset, **seeds_summary(rows)}
    write_own_file(out / "seeds.json", json.dumps(summary, indent=2) + "\n", "the seeds report seeds.json")
    write_own_file(out / "seeds.md", seeds_markdown(summary), "the seeds report seeds.md")
    print(f"{len(seeds)} seeds of {preset} finished in {time.perf_counter() - start:.0f} s")
    print(seeds_markdown(summary))
    print(f"seeds report: {out / 'seeds.md'}")
    return 0


def _cmd_rounds(args: argparse.Namespace) -> int:
    preset, config = _pipeline_config(args, "demo-rounds")
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    n = getattr(args, "n", 1)
    if n < 0:
        raise ConfigError(f"--n {n}: give 0 (report only) or more")
    start = time.perf_counter()
    from flows.rounds import run_rounds  # sets Prefect's environment before Prefect is imported
    from flows.server import prefect_api

    with prefect_api():
        result = run_rounds(config, n)
    print(f"rounds ({preset}, {result['experiment']}): {result['new_rounds']} new round(s) in "
          f"{time.perf_counter() - start:.0f} s; complete: {', '.join(map(str, result['rounds_complete']))}")
    for rnd, reading in result["verdicts"].items():
        print(f"  round {rnd}: {reading}")
    for note in result["notes"]:
        print(f"  {note}")
    print(f"report: {result['report']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    # Ctrl-C / SIGTERM: Prefect's serve shuts its runner down and returns; main() reports the signal.
    serve_all(cron=args.cron, timezone=args.timezone, retrain_preset=args.retrain_preset, runs_dir=args.runs_dir)
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


TRACKED = {"data", "rm", "rm-eval", "dpo", "sft", "compare", "score", "judge"}  # + every online algorithm
STOPPABLE = {"run", "seeds", "round", "rounds", "serve"}  # SIGTERM stops them as Ctrl-C does (cli.shutdown)


def _loaded_errors() -> tuple[type[Exception], ...]:
    """Expected errors of modules that only some commands import (a temporary Prefect server that did not
    come up), so the others need not import them."""
    server = sys.modules.get("flows.server")
    return (server.PrefectServerError,) if server is not None else ()


def _stopped(command: str, signum: int) -> int:
    """One line after Ctrl-C / SIGTERM, once every process this one started is stopped; 130 / 143."""
    from cli import shutdown

    shutdown.ignore_stop_signals()
    n = shutdown.stop_children()
    children = f" ({n} child process{'es' if n > 1 else ''} stopped)" if n else ""
    print(f"align {command}: stopped by {signal.Signals(signum).name}{children}", file=sys.stderr)
    return shutdown.exit_code(signum)


def _checked_paths(args: argparse.Namespace) -> None:
    """Expand ``~`` in --out, --json and --runs-dir once, here, so that what is checked is what is written, and
    refuse (one line) a path that cannot be written: through a file or a broken or looping symbolic link, a
    name too long, a --runs-dir that is a file, a --json file this project did not write."""
    from alignment.ownership import file_problem, path_problem

    for attr, flag in (("out", "--out"), ("json", "--json"), ("runs_dir", "--runs-dir")):
        value = getattr(args, attr, None)
        if not value:
            continue
        value = os.path.expanduser(value)
        setattr(args, attr, value)
        if attr == "runs_dir":
            _runs_dir(value, flag)
            continue
        problem = file_problem(value, flag) if attr == "json" else path_problem(value, flag)
        if problem is not None:
            raise ConfigError(problem)


def _runs_dir(value: str, what: str) -> str:
    """A runs folder, ``~``-expanded; :class:`ConfigError` (one line) when it cannot be a folder."""
    from alignment.ownership import path_problem

    value = os.path.expanduser(value)
    problem = path_problem(value, what)
    if problem is None and os.path.exists(value) and not os.path.isdir(value):
        problem = f"{what} {value} is a file, not a folder"
    if problem is not None:
        raise ConfigError(problem)
    return value


def _tracking_root(args: argparse.Namespace) -> str:
    """The runs folder whose ``mlflow.db`` a single-stage command tracks into: ``$ALIGNMENT_RUNS_DIR``, else
    ``runs`` (in the current directory) when the command writes there (no --out, or an --out inside it), else
    the folder its --out sits in, so that a command pointed elsewhere never writes ``./runs/mlflow.db``."""
    runs = os.environ.get("ALIGNMENT_RUNS_DIR")
    if runs:
        return runs
    out = getattr(args, "out", None)
    if not out:
        return "runs"
    here, target = os.path.realpath("runs"), os.path.realpath(out)
    if target == here or target.startswith(here + os.sep):
        return "runs"
    return os.path.dirname(target)


def _configure_tracking(args: argparse.Namespace) -> None:
    """Tracking for a single-stage command: ``tracking=none`` / ``tracking.uri=...`` among its key=value
    overrides (taken out of the stage's), else what the environment says (``ALIGNMENT_TRACKING``, set by a
    parent process or ``=none``), else MLflow on a SQLite file under the runs folder."""
    from pydantic import ValidationError

    from alignment import tracking
    from alignment.config import check_keys, format_validation_error, parse_overrides

    mine = [o for o in getattr(args, "overrides", None) or [] if o.split("=", 1)[0].split(".", 1)[0] == "tracking"]
    if mine:
        args.overrides = [o for o in args.overrides if o not in mine]
    runs_root = _tracking_root(args)
    if mine:
        value = parse_overrides(mine, check=lambda item, alone: check_keys(  # a misspelt key: one line, nearest name
            tracking.TrackingConfig, alone["tracking"], f"override {item!r}", path=("tracking",))).get("tracking")
        try:
            config = tracking.TrackingConfig.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix="tracking.")) from None
        except ValueError as exc:
            raise ConfigError(f"tracking: {exc}") from None
        tracking.configure(config, runs_root)
    elif os.environ.get(tracking.TRACKING_ENV):
        tracking.settings()  # inherited (a launched stage) or switched off
    else:
        tracking.configure(tracking.TrackingConfig(), runs_root)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # one line per HTTP request (Prefect's API, the judge's calls) is noise
        for name in ("httpx", "httpcore", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    from alignment.console import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # library load reports, bars and deprecations; -v keeps them
    from alignment.footprint import tune_allocator

    tune_allocator()  # freed tensor memory goes back to the system between steps and stages
    from alignment.algorithms.dpo import DPOError
    from alignment.algorithms.ppo import PPOError
    from alignment.algorithms.registry import ALGORITHMS
    from alignment.algorithms.reinforce import ReinforceError
    from alignment.algorithms.sft import SFTError
    from alignment.checkpoints import ResumeError
    from alignment.compare import CompareError
    from alignment.data import DataError
    from alignment.evaluation.evaluate import EvaluationError
    from alignment.evaluation.judge import JudgeError
    from alignment.finite import NonFiniteError
    from alignment.hardware import DeviceError
    from alignment.io import DiskFullError
    from alignment.models import ModelSourceError
    from alignment.ownership import NotOurs
    from alignment.rewards.components import RewardComponentError
    from alignment.rewards.model import RewardModelError
    from alignment.rounds.onpolicy import RoundsError
    from alignment.rounds.store import StoreError
    from alignment.stage import StageBusy
    from cli import shutdown

    TRACKED.update(ALGORITHMS)
    handlers = {"data": _cmd_data, "rm": _cmd_rm, "rm-eval": _cmd_rm_eval, "dpo": _cmd_dpo, "sft": _cmd_sft,
                "compare": _cmd_compare, **dict.fromkeys(ALGORITHMS, _cmd_reinforce),
                "score": _cmd_score, "judge": _cmd_judge, "run": _cmd_run, "seeds": _cmd_seeds, "signal": _cmd_signal, "round": _cmd_rounds, "rounds": _cmd_rounds,
                "serve": _cmd_serve, "model": _cmd_model}
    with shutdown.stop_signals(install=args.command in STOPPABLE):
        try:
            _checked_paths(args)
            from alignment.hardware import apply_threads

            apply_threads()  # once per process: torch threads from the free cores (ALIGN_THREADS wins)
            if args.command in TRACKED:
                _configure_tracking(args)
            code = handlers[args.command](args)
        except (ConfigError, DataError, ModelSourceError, RewardModelError, DeviceError, ReinforceError,
                EvaluationError, JudgeError, ResumeError, PPOError, DPOError, CompareError, StageBusy,
                DiskFullError, SFTError, NotOurs, RewardComponentError, RoundsError, StoreError, NonFiniteError,
                *_loaded_errors()) as exc:
            if args.debug:
                raise
            print(f"align {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except BaseException as exc:  # Ctrl-C, SIGTERM, and whatever a library turned them into on the way up
            signum = shutdown.received(exc)
            if signum is None or args.debug:
                raise
            return _stopped(args.command, signum)
        signum = shutdown.received()  # a library that handles the interruption itself returns (Prefect's serve)
        return code if signum is None else _stopped(args.command, signum)


if __name__ == "__main__":
    sys.exit(main())
