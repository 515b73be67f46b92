"""On-policy preference data: the two stages a round adds before it retrains (no Prefect here).

* ``samples`` (:func:`run_samples_stage`): the current policy answers train-split prompts k times; every
  answer is scored by the current reward model; each prompt's pair is chosen by ``pairing``.
* ``labels`` (:func:`run_labels_stage`): a labeller chain decides each pair -- the gold check where the
  prompt has one, else Gemini (when a key is configured), else the reward models not trained against, else
  the local judge; the labeller of every pair is recorded, ties are dropped -- and the reward models named
  in ``evaluate`` are scored on the labelled pairs: does the reward model keep up with the policy?

Both follow the stage contract of :mod:`alignment.stage` (a folder named after the stage key, the manifest
written last, reused when complete).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from alignment import __version__
from alignment.config import Seed, StageConfig
from alignment.console import StageProgress
from alignment.data import PairData, PromptItem
from alignment.evaluation.evaluate import model_fingerprint
from alignment.evaluation.gold import check_answer
from alignment.evaluation.judge import (
    API_KEY_VARS,
    Budget,
    JudgeConfig,
    JudgeItem,
    debiased_verdict,
    final_verdict,
    instruction,
    judge_prompt,
)
from alignment.evaluation.stats import wilson_interval
from alignment.footprint import records_footprint
from alignment.generation import SamplingConfig, rollout
from alignment.inputs import require_model_source, require_stage_output
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL
from alignment.ownership import local_paths
from alignment.rounds.config import Labeller, Pairing
from alignment.rounds.store import STORE_MARK
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class RoundsError(ValueError):
    """A round's stage cannot run as configured (a missing input, nothing to pair or label)."""


def _messages_key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _plan_or_reuse(stage: str, plan: StagePlan, config: StageConfig, out_dir: str | Path | None, overwrite: bool,
                   runs_root: str | Path) -> tuple[str, Path, StageResult | None]:
    """(key, folder, the complete earlier result or None): the folder checked as every stage checks it (ours,
    not an input, not protected) before any work."""
    out = Path(out_dir) if out_dir is not None else plan.out
    existing = reuse_or_guard(out, plan.key, RoundsError, stage=stage, overwrite=overwrite,
                              inputs=local_paths(config.model_dump(mode="json")), runs_root=runs_root)
    if existing is None:
        return plan.key, out, None
    log.info("%s already complete in %s: reusing them", stage, out)
    return plan.key, out, StageResult(out, json.loads((out / "summary.json").read_text()), reused=True)


# --------------------------------------------------------------------------------------------
# Pairing (pure, tested by hand)
# --------------------------------------------------------------------------------------------
def choose_pair(texts: list[str], scores: list[float] | None, lengths: list[int], pairing: Pairing,
                rng: random.Random) -> tuple[int, int] | None:
    """Indices (a, b) of the two answers that form a prompt's pair, or None when fewer than two answers
    differ. ``best_worst``: the current reward model's highest and lowest; ``closest_length``: the two distinct
    answers of most similar length (first such pair on ties); ``random``: two distinct answers at random."""
    distinct: dict[str, int] = {}
    for i, t in enumerate(texts):
        distinct.setdefault(t, i)
    idx = sorted(distinct.values())
    if len(idx) < 2:
        return None
    if pairing == "best_worst":
        if scores is None:
            raise RoundsError("pairing='best_worst' needs the current reward model's scores (samples.reward_model)")
        best = max(idx, key=lambda i: (scores[i], -i))
        worst = min(idx, key=lambda i: (scores[i], i))
        return (best, worst) if best != worst else (idx[0], idx[1])
    if pairing == "closest_length":
        return min(((a, b) for n, a in enumerate(idx) for b in idx[n + 1:]),
                   key=lambda ab: (abs(lengths[ab[0]] - lengths[ab[1]]), ab))
    a, b = rng.sample(idx, 2)
    return a, b


# --------------------------------------------------------------------------------------------
# The samples stage
# --------------------------------------------------------------------------------------------
class SamplesConfig(StageConfig):
    """Sample k answers of a policy to train-split prompts and pair two of each prompt's answers."""

    section: str = "samples"
    policy: str = Field(DEFAULT_MODEL, description="The current policy (the previous round's).")
    reward_model: str | None = Field(None, description="The current reward model: every answer's score is "
                                     "recorded (and pairing='best_worst' uses it).")
    data: str | None = Field(None, description="Data folder whose train split's prompts are answered.")
    round: int = Field(1, ge=1, description="The round these samples are for (provenance).")
    n_prompts: int = Field(32, ge=1)
    samples_per_prompt: int = Field(4, ge=2)
    pairing: Pairing = "random"
    max_prompt_length: int = Field(256, ge=8)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1, description="Sequences per generation batch (prompts x k).")
    seed: Seed = 0
    bf16: bool | None = None
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")


def samples_stage_key(config: SamplesConfig) -> str:
    data = (read_manifest(config.data) if config.data else None) or {}
    cfg = config.model_dump(mode="json", exclude={"policy", "reward_model", "data", "batch_size", "section"})
    models = [model_fingerprint(config.policy), model_fingerprint(config.reward_model) if config.reward_model else None]
    return sha256_text(json.dumps([cfg, models, data.get("stage_key"), f"samples-schema={SCHEMA_VERSION}"],
                                  sort_keys=True))


def plan_samples(config: SamplesConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/samples/r<round>-<key[:12]>``."""
    key = samples_stage_key(config)
    out = stage_folder(runs_dir, "samples", key, f"r{config.round}")
    return StagePlan(key, out, out)


def train_prompts(data_dir: str | Path, n: int, seed: int) -> list[PromptItem]:
    """A seeded subset of ``n`` distinct prompts of the train split (with their gold answers)."""
    items = PairData.load(Path(data_dir) / "train.parquet", prompts_ok=True).prompt_items()
    if not items:
        raise RoundsError(f"{data_dir}: the train split has no prompts")
    if len(items) > n:
        keep = sorted(np.random.default_rng(seed).choice(len(items), n, replace=False).tolist())
        items = [items[i] for i in keep]
    return items


@exclusive_stage
@records_footprint
def run_samples_stage(config: SamplesConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                      runs_root: str | Path = "runs") -> StageResult:
    """Write ``samples.jsonl`` (every answer with its length and reward), ``pairs.jsonl`` (one pair per prompt
    whose answers differ) and ``summary.json``; the manifest last."""
    import torch

    from alignment.hardware import bf16_enabled, resolve_device
    from alignment.models import load_causal_lm
    from alignment.rewards.model import RewardScorer

    data_manifest = require_stage_output(config.data, "data", RoundsError, "samples: data")
    require_model_source(config.policy, RoundsError, "samples: policy")
    key, out, reused = _plan_or_reuse("samples", plan_samples(config, runs_root), config, out_dir, overwrite, runs_root)
    if reused is not None:
        return reused

    items = train_prompts(config.data, config.n_prompts, config.seed)
    k = config.samples_per_prompt
    device = resolve_device(config.device)
    bf16 = bf16_enabled(config.bf16, device)
    policy, tokenizer = load_causal_lm(config.policy, device=device, padding_side="left")
    policy.eval()
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, greedy=False, temperature=config.temperature,
                              top_p=config.top_p, top_k=config.top_k)
    torch.manual_seed(config.seed)
    per_batch = max(1, config.batch_size // k)
    texts: list[str] = []
    lengths: list[int] = []
    eos: list[bool] = []
    with StageProgress("sampled prompts", len(items), logger=log) as progress:
        for s in range(0, len(items), per_batch):
            chunk = [it.messages for it in items[s:s + per_batch]]
            with torch.no_grad():
                ro = rollout(policy, tokenizer, chunk, sampling, config.max_prompt_length, bf16=bf16,
                             samples_per_prompt=k)
            texts += ro.texts
            lengths += [int(n) for n in ro.lengths.tolist()]
            eos += ro.has_eos.tolist()
            progress.update(min(s + per_batch, len(items)))
    del policy
    prompts = [it.messages for it in items for _ in range(k)]
    scores = None
    if config.reward_model:
        scorer = RewardScorer.from_pretrained(config.reward_model, device=str(device))
        scores = scorer.score(prompts, texts).mean.tolist()
        del scorer

    rng = random.Random(config.seed)
    samples, pairs = [], []
    for p, item in enumerate(items):
        span = slice(p * k, (p + 1) * k)
        answers = [{"text": t, "tokens": n, "eos": bool(e), "reward": None if scores is None else s}
                   for t, n, e, s in zip(texts[span], lengths[span], eos[span],
                                         scores[span] if scores is not None else [None] * k, strict=True)]
        samples.append({"prompt": item.messages, "gold_answer": item.gold_answer, "gold_checker": item.gold_checker,
                        "answers": answers})
        ab = choose_pair([a["text"] for a in answers], None if scores is None else [a["reward"] for a in answers],
                         [a["tokens"] for a in answers], config.pairing, rng)
        if ab is not None:
            a, b = (answers[i] for i in ab)
            pairs.append({"prompt": item.messages, "gold_answer": item.gold_answer, "gold_checker": item.gold_checker,
                          "answer_a": a["text"], "answer_b": b["text"], "tokens_a": a["tokens"],
                          "tokens_b": b["tokens"], "reward_a": a["reward"], "reward_b": b["reward"]})
    summary = {"round": config.round, "policy": config.policy, "reward_model": config.reward_model,
               "n_prompts": len(items), "samples_per_prompt": k, "n_answers": len(texts), "n_pairs": len(pairs),
               "n_prompts_without_pair": len(items) - len(pairs), "pairing": config.pairing,
               "eos_rate": float(np.mean(eos)), "mean_tokens": float(np.mean(lengths)),
               "mean_reward": None if scores is None else float(np.mean(scores)),
               "n_gold_prompts": sum(it.gold_answer is not None for it in items)}
    with atomic_directory(out) as tmp:
        for name, rows in (("samples.jsonl", samples), ("pairs.jsonl", pairs)):
            with open(tmp / name, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json(tmp / "summary.json", summary)
        write_json(tmp / MANIFEST, {
            "stage": "samples", "stage_key": key, "schema_version": SCHEMA_VERSION,
            "config": config.model_dump(mode="json"), "data_stage_key": data_manifest.get("stage_key"),
            "policy_fingerprint": model_fingerprint(config.policy),
            "files": {n: {"sha256": sha256_file(tmp / n)} for n in ("samples.jsonl", "pairs.jsonl", "summary.json")},
            "created_by": f"alignment {__version__}", "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    log.info("samples (round %d): %d prompts x %d answers -> %d pairs in %s", config.round, len(items), k,
             len(pairs), out)
    return StageResult(out, summary)


# --------------------------------------------------------------------------------------------
# The labels stage
# --------------------------------------------------------------------------------------------
class LabelsConfig(StageConfig):
    """Label a samples stage's pairs with the labeller chain; score reward models on the labelled pairs."""

    section: str = "labels"
    samples: str | None = Field(None, description="Folder written by the samples stage (filled in by the rounds flow).")
    labellers: list[Labeller] = Field(default_factory=lambda: ["gold", "gemini", "reward_models", "local"])
    gemini: bool = Field(False, description="Whether the 'gemini' labeller applies: a key is configured (set by "
                         "the rounds flow from the environment or judge.api_key_secret).")
    reward_models: dict[str, str] = Field(default_factory=dict, description="The 'reward_models' labeller: name -> "
                                          "folder, reward models not trained on these pairs (their mean "
                                          "standardised margin decides).")
    rm_tie_margin: float = Field(0.1, ge=0.0)
    evaluate: dict[str, str] = Field(default_factory=dict, description="name -> reward model folder whose accuracy "
                                     "on the labelled pairs is reported (e.g. the previous round's and round 0's).")
    judge: JudgeConfig = Field(default_factory=lambda: JudgeConfig(backend="local"),
                               description="The judge labellers' settings (gemini_model, local_model, ...).")


def labels_stage_key(config: LabelsConfig) -> str:
    samples = (read_manifest(config.samples) if config.samples else None) or {}
    cfg = config.model_dump(mode="json", exclude={"samples", "reward_models", "evaluate", "judge", "section"})
    judge = config.judge.model_dump(mode="json", exclude=set(JudgeConfig.OPERATIONAL) | {"section", "backend"})
    rms = {k: model_fingerprint(v) for k, v in config.reward_models.items()}
    ev = {k: model_fingerprint(v) for k, v in config.evaluate.items()}
    return sha256_text(json.dumps([cfg, judge, rms, ev, samples.get("stage_key"), f"labels-schema={SCHEMA_VERSION}"],
                                  sort_keys=True))


def plan_labels(config: LabelsConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/labels/r<round>-<key[:12]>``."""
    key = labels_stage_key(config)
    rnd = ((read_manifest(config.samples) or {}).get("config") or {}).get("round") if config.samples else None
    out = stage_folder(runs_dir, "labels", key, f"r{rnd}" if rnd else None)
    return StagePlan(key, out, out)


def gemini_configured(judge: JudgeConfig) -> bool:
    """Whether a Gemini key is configured: in the environment or as a Prefect Secret block name."""
    import os

    return any(os.environ.get(v) for v in API_KEY_VARS) or bool(judge.api_key_secret)


def assign_labellers(pairs: list[dict[str, Any]], config: LabelsConfig) -> list[str]:
    """The labeller of each pair: the first of the chain that applies to it."""
    applies = {"gold": lambda p: p.get("gold_answer") is not None, "gemini": lambda p: config.gemini,
               "reward_models": lambda p: bool(config.reward_models), "local": lambda p: True}
    out = []
    for p in pairs:
        who = next((name for name in config.labellers if applies[name](p)), None)
        if who is None:
            raise RoundsError(f"labels: no labeller of {config.labellers} applies to a pair (add 'local' at the end "
                              "of rounds.labellers)")
        out.append(who)
    return out


def gold_label(pair: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """'a', 'b' or 'tie' by the gold check (both right or both wrong is a tie)."""
    prompt = pair["prompt"][-1]["content"]
    ok = [check_answer(pair[f"answer_{s}"], pair["gold_answer"], pair["gold_checker"], prompt=prompt) for s in "ab"]
    return ("a" if ok[0] and not ok[1] else "b" if ok[1] and not ok[0] else "tie"), {"gold_a": ok[0], "gold_b": ok[1]}


def rm_labels(pairs: list[dict[str, Any]], folders: dict[str, str], margin: float) -> list[tuple[str, dict[str, Any]]]:
    """Each pair decided by the reward models' mean standardised margin (each model's margin over the standard
    deviation of its scores on these answers), a tie within ``margin``."""
    from alignment.rewards.model import RewardScorer

    prompts = [p["prompt"] for p in pairs]
    margins = []
    for folder in folders.values():
        scorer = RewardScorer.from_pretrained(folder)
        ra = scorer.score(prompts, [p["answer_a"] for p in pairs]).mean.numpy()
        rb = scorer.score(prompts, [p["answer_b"] for p in pairs]).mean.numpy()
        sd = float(np.concatenate([ra, rb]).std()) or 1.0
        margins.append((ra - rb) / sd)
        del scorer
    mean = np.mean(margins, axis=0)
    return [("a" if m > margin else "b" if m < -margin else "tie", {"rm_margin_sd": float(m)}) for m in mean]


def judge_labels(pairs: list[dict[str, Any]], judge: JudgeConfig, backend: Literal["gemini", "local"],
                 api_key: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Each pair judged in both orders (position bias: a flip is a tie; the local judge's preference averaged
    over the orders), by Gemini or the local judge."""
    from alignment.evaluation.judge import GeminiJudge, LocalJudge

    config = judge.model_copy(update={"backend": backend})
    question = instruction(config.task, backend)
    items = []
    for i, p in enumerate(pairs):
        items.append(JudgeItem(i, "ab", judge_prompt(p["prompt"], p["answer_a"], p["answer_b"], config.max_answer_chars,
                                                     question)))
        items.append(JudgeItem(i, "ba", judge_prompt(p["prompt"], p["answer_b"], p["answer_a"], config.max_answer_chars,
                                                     question)))
    done: dict[tuple[int, str], Any] = {}
    runner = GeminiJudge(config, api_key=api_key) if backend == "gemini" else LocalJudge(config)
    failed = runner.run(items, lambda item, outcome: done.__setitem__((item.pair, item.order), outcome),
                        Budget(config.budget_calls))
    if failed:
        raise RoundsError(f"labels: {len(failed)} of {len(items)} {backend} judgments failed ({failed[0][1]}); "
                          "run the round again to retry")
    out = []
    for i in range(len(pairs)):
        ab, ba = done[(i, "ab")], done[(i, "ba")]
        if backend == "local" and config.local_debias and ab.p_a is not None and ba.p_a is not None:
            final = debiased_verdict(ab.p_a, ba.p_a, config.local_tie_margin)
        else:
            final = final_verdict(ab.winner, ba.winner)
        out.append(({"win": "a", "loss": "b"}.get(final, "tie"),
                    {"verdict_ab": ab.winner, "verdict_ba": ba.winner, "p_a_ab": ab.p_a, "p_a_ba": ba.p_a,
                     "judge_model": ab.model_version}))
    return out


STORE_SCHEMA = pa.schema([
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("chosen", pa.string()), ("rejected", pa.string()),
    ("round", pa.int64()), ("policy", pa.string()), ("labeller", pa.string()), ("label_detail", pa.string()),
    ("chars_chosen", pa.int64()), ("chars_rejected", pa.int64()),
    ("tokens_chosen", pa.int64()), ("tokens_rejected", pa.int64()),
    ("reward_chosen", pa.float64()), ("reward_rejected", pa.float64()),
], metadata={STORE_MARK: b"1"})


def accuracy(correct: list[bool]) -> dict[str, Any]:
    n = len(correct)
    hits = int(sum(correct))
    return {"n": n, "accuracy": hits / n if n else None, "ci95": list(wilson_interval(hits, n)) if n else None}


def reward_model_accuracy(folder: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A reward model's accuracy on labelled pairs (does it rank the labeller's choice higher?), overall and
    split by whether the chosen answer is the longer one."""
    from alignment.evaluation.length import length_split
    from alignment.rewards.model import RewardScorer

    scorer = RewardScorer.from_pretrained(folder)
    prompts = [r["prompt"] for r in rows]
    rc = scorer.score(prompts, [r["chosen"] for r in rows]).mean.numpy()
    rr = scorer.score(prompts, [r["rejected"] for r in rows]).mean.numpy()
    correct = (rc > rr).tolist()
    return {**accuracy(correct), "folder": folder,
            "length_split": length_split(correct, [r["chars_chosen"] for r in rows],
                                         [r["chars_rejected"] for r in rows])}


@exclusive_stage
@records_footprint
def run_labels_stage(config: LabelsConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                     runs_root: str | Path = "runs", api_key: str | None = None) -> StageResult:
    """Write ``pairs.parquet`` (the labelled pairs in the store's form, ties dropped) and ``summary.json``
    (pairs per labeller, ties, the labellers' preference for the longer answer, each ``evaluate`` reward
    model's accuracy on the pairs); the manifest last. ``api_key``: a Gemini key not in the environment."""
    from alignment.evaluation.length import longer_preferred

    samples_manifest = require_stage_output(config.samples, "samples", RoundsError, "labels: samples")
    key, out, reused = _plan_or_reuse("labels", plan_labels(config, runs_root), config, out_dir, overwrite, runs_root)
    if reused is not None:
        return reused

    scfg = samples_manifest["config"]
    pairs = [json.loads(line) for line in (Path(config.samples) / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    who = assign_labellers(pairs, config)
    decided: list[tuple[str, dict[str, Any]] | None] = [None] * len(pairs)
    for name in dict.fromkeys(who):  # each labeller once, over its pairs
        idx = [i for i, w in enumerate(who) if w == name]
        group = [pairs[i] for i in idx]
        if name == "gold":
            results = [gold_label(p) for p in group]
        elif name == "reward_models":
            results = rm_labels(group, config.reward_models, config.rm_tie_margin)
        else:
            results = judge_labels(group, config.judge, name, api_key=api_key if name == "gemini" else None)
        for i, r in zip(idx, results, strict=True):
            decided[i] = r
    rows, ties = [], Counter()
    for p, name, (label, detail) in zip(pairs, who, decided, strict=True):
        if label == "tie":
            ties[name] += 1
            continue
        c, r = ("a", "b") if label == "a" else ("b", "a")
        rows.append({"prompt": p["prompt"], "chosen": p[f"answer_{c}"], "rejected": p[f"answer_{r}"],
                     "round": scfg["round"], "policy": samples_manifest.get("policy_fingerprint") or scfg["policy"],
                     "labeller": name, "label_detail": json.dumps(detail, sort_keys=True),
                     "chars_chosen": len(p[f"answer_{c}"]), "chars_rejected": len(p[f"answer_{r}"]),
                     "tokens_chosen": p[f"tokens_{c}"], "tokens_rejected": p[f"tokens_{r}"],
                     "reward_chosen": p[f"reward_{c}"], "reward_rejected": p[f"reward_{r}"]})
    counts = Counter(who)

    def length_bias(kept: list[dict[str, Any]]) -> dict[str, Any] | None:
        return longer_preferred([r["chars_chosen"] for r in kept], [r["chars_rejected"] for r in kept]) if kept else None

    by_labeller = {name: {"pairs": counts[name], "labelled": sum(r["labeller"] == name for r in rows),
                          "ties_dropped": ties[name],
                          "length": length_bias([r for r in rows if r["labeller"] == name])}
                   for name in counts}
    summary: dict[str, Any] = {
        "round": scfg["round"], "n_pairs": len(pairs), "n_labelled": len(rows), "n_ties_dropped": sum(ties.values()),
        "labellers": by_labeller,
        "length": length_bias(rows),
        "reward_model_accuracy": {name: reward_model_accuracy(folder, rows) for name, folder in config.evaluate.items()}
        if rows else {}}
    with atomic_directory(out) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=STORE_SCHEMA), tmp / "pairs.parquet")
        write_json(tmp / "summary.json", summary)
        write_json(tmp / MANIFEST, {
            "stage": "labels", "stage_key": key, "schema_version": SCHEMA_VERSION,
            "config": config.model_dump(mode="json"), "samples_stage_key": samples_manifest.get("stage_key"),
            "files": {n: {"sha256": sha256_file(tmp / n)} for n in ("pairs.parquet", "summary.json")},
            "created_by": f"alignment {__version__}", "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    acc = "; ".join(f"{n} RM accuracy {a['accuracy']:.2f}" for n, a in summary["reward_model_accuracy"].items()
                    if a.get("accuracy") is not None)
    log.info("labels (round %s): %d of %d pairs labelled (%s), %d ties dropped%s", scfg["round"], len(rows),
             len(pairs), ", ".join(f"{n} {c}" for n, c in counts.items()), summary["n_ties_dropped"],
             f"; {acc}" if acc else "")
    return StageResult(out, summary)
