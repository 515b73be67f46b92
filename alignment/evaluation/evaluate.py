"""Validation mean-reward scoring: the same prompts, the same reward model(s), before and after.

For each model (by default the starting policy and the tuned one) answer a fixed, seeded set of
held-out validation prompts, score every answer with every reward model, and report per model:
mean reward with a 95% bootstrap CI, the paired difference to the reference model (the first one)
with its CI, completion length, EOS rate, distinct-2, repetition rate and the KL to the reference.

Generations are saved (``generations/<model>.jsonl``) and reused by the judge stage, so nothing is
generated twice.

Departures, stated once: the "KL to the starting model" is the k1 estimate
mean_i sum_t (log pi(y_t) - log pi_ref(y_t)) over the *evaluated* completions; with greedy decoding
these are not samples of pi, so it measures how far the tuned model's own answers moved in
likelihood, not the exact KL(pi || pi_ref).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from alignment import tasks_gym
from alignment.config import Seed, StageConfig
from alignment.console import StageProgress
from alignment.data import Message, PairData, PromptItem, read_summaries
from alignment.evaluation.degenerate import degenerate_share
from alignment.evaluation.gold import check_answer
from alignment.evaluation.stats import (
    bootstrap_ci,
    mcnemar_exact,
    mean_pass_at_k,
    paired_proportion_diff,
    wilson_interval,
)
from alignment.evaluation.verdict import trained_against
from alignment.footprint import records_footprint
from alignment.generation import (
    Rollout,
    SamplingConfig,
    batched_logprobs,
    encode_prompts,
    pad_completions,
    rollout,
    text_health,
)
from alignment.hardware import bf16_enabled, resolve_device
from alignment.inputs import require_model_source, require_stage_output
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL, ModelSourceError, bf16_frozen_linears, load_causal_lm
from alignment.ownership import local_paths
from alignment.rewards.model import RewardModelError, RewardScorer
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: gold checks, proxy/independent roles; 3: McNemar, gold per task, degenerate share
GENERATIONS = "generations"


class EvaluationError(ValueError):
    """The scoring stage cannot run as configured (the message says why)."""


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1/2/L F-measures (Google's ``rouge-score`` package, Porter stemming), one (N,)
    array per type, predictions against references (the same order)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {t: np.array([r[t].fmeasure for r in rows]) for t in ROUGE_TYPES}


def rouge_summary(scores: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Mean F-measure of each ROUGE type with its 95% bootstrap interval over examples."""
    return {t: {"mean": float(v.mean()), "ci95": list(bootstrap_ci(v, seed=seed)), "n": int(v.size)}
            for t, v in scores.items()}


def paired_rouge_gain(after: dict[str, np.ndarray], before: dict[str, np.ndarray], seed: int = 0
                      ) -> dict[str, dict[str, Any]]:
    """Mean per-example difference after - before of each ROUGE type, with its bootstrap interval
    (paired: the same posts and references on both sides)."""
    return {t: {"mean": float((after[t] - before[t]).mean()), "ci95": list(bootstrap_ci(after[t] - before[t], seed=seed))}
            for t in after}


class ScoreConfig(StageConfig):
    """Answer fixed validation prompts with each model and score the answers with each reward model."""

    section: str = "score"
    models: dict[str, str] = Field(
        default_factory=lambda: {"base": DEFAULT_MODEL},
        description="name -> model (hub id, folder or .gguf). The first is the reference for paired "
                    "differences and KL (the starting model).")
    reward_models: dict[str, str] = Field(
        default_factory=dict, description="name -> folder written by `align rm`; every answer is scored by each.")
    data: str | None = Field(None, description="Folder written by `align data`; prompts come from its validation "
                             "split (filled in by the pipeline).")
    n_prompts: int = Field(32, ge=1, description="Validation prompts (a seeded subset when there are more).")
    max_prompt_length: int = Field(512, ge=8, description="Prompt tokens; longer prompts are cut from the left.")
    max_new_tokens: int = Field(128, ge=1)
    greedy: bool = Field(True, description="Greedy decoding; false samples with temperature/top_p/top_k and seed.")
    temperature: float = Field(0.7, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: Seed = 0
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    samples_per_prompt: int = Field(1, ge=1, description="k > 1: each prompt with a gold answer is also answered k "
                                    "times, sampled at temperature/top_p/top_k, for pass@1 and the unbiased pass@k "
                                    "(k times the generation cost of those prompts).")
    kl: bool = Field(True, description="Also compute the k1 KL of each model's answers to the first model.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the 95% CIs.")
    proxy_reward_model: str | None = Field(None, description="Name (in reward_models) of the reward model the "
                                           "tuned policy was trained against; every other one is independent "
                                           "(filled in by the pipeline).")
    rouge_references: str | None = Field(None, description="A summaries source (as for `align sft`, e.g. "
                                         "../shared/data/tldr-rlaif/summaries.jsonl): every scored prompt that is "
                                         "one of its posts gets ROUGE-1/2/L of each model's answer against that "
                                         "post's reference summary.")
    bf16: bool | None = None
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=self.greedy, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k)

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one model is needed (the first is the reference)")
        for name in value:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' or '.'")
        return value


# --------------------------------------------------------------------------------------------
# Prompts, generation, scoring
# --------------------------------------------------------------------------------------------
def select_prompt_items(data_dir: str | Path, n: int, seed: int) -> list[PromptItem]:
    """A fixed, seeded subset of the unique validation prompts (with their gold answers), in file order."""
    path = Path(data_dir) / "validation.parquet"
    if not path.is_file():
        raise EvaluationError(f"{data_dir} is not a data stage output (no validation.parquet)")
    items = PairData.load(path, prompts_ok=True).prompt_items()  # a prompts-only folder is fine: prompts only
    if not items:
        raise EvaluationError(f"{path} holds no prompts")
    if len(items) > n:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
        items = [items[i] for i in keep]
    return items


def select_prompts(data_dir: str | Path, n: int, seed: int) -> list[list[Message]]:
    """The messages of :func:`select_prompt_items`."""
    return [item.messages for item in select_prompt_items(data_dir, n, seed)]


def gold_results(items: Sequence[PromptItem], completions: Sequence[str], lenient: bool = False
                 ) -> list[bool | None]:
    """Per prompt: whether the completion states its gold answer (None for a prompt without one); ``lenient``:
    reasoning-gym numbers stated in words around them count (:func:`alignment.evaluation.gold.check_answer`)."""
    return [None if item.gold_answer is None else
            check_answer(text, item.gold_answer, item.gold_checker, prompt=item.messages[-1]["content"],
                         lenient=lenient)
            for item, text in zip(items, completions, strict=True)]


def has_gym_items(items: Sequence[PromptItem]) -> bool:
    """Whether any prompt is a reasoning-gym item with a gold answer (then the lenient gold check is reported too)."""
    return any(item.gold_answer is not None and item.gold_checker == tasks_gym.CHECKER for item in items)


def per_prompt_counts(hits: Sequence[bool | None], k: int) -> list[int]:
    """Right answers per prompt from ``hits`` of k answers per prompt, prompt-major (prompt j: hits[j*k:(j+1)*k])."""
    return [sum(bool(h) for h in hits[j * k:(j + 1) * k]) for j in range(len(hits) // k)]


def item_task(item: PromptItem) -> str:
    """The task a prompt belongs to (its source's ``task`` column), or 'all' when it names none."""
    task = item.extra.get("task") if isinstance(item.extra, dict) else None
    return str(task) if task not in (None, "") else "all"


def gold_summary(correct: Sequence[bool | None], reference: Sequence[bool | None] | None = None,
                 tasks: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Accuracy on the prompts with a gold answer (Wilson 95% CI), per task when ``tasks`` (one per prompt)
    is given, and, given the reference model's results on the same prompts, the paired difference with its
    95% CI and the exact McNemar test ({n, gained, lost, p_value}); None without gold prompts."""
    graded = [i for i, c in enumerate(correct) if c is not None]
    if not graded:
        return None
    hits = [bool(correct[i]) for i in graded]
    out: dict[str, Any] = {"n": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits),
                           "ci95": wilson_interval(sum(hits), len(hits))}
    if tasks is not None:
        per_task: dict[str, list[bool]] = {}
        for i in graded:
            per_task.setdefault(tasks[i], []).append(bool(correct[i]))
        out["by_task"] = {t: {"n": len(h), "correct": sum(h), "accuracy": sum(h) / len(h),
                              "ci95": wilson_interval(sum(h), len(h))} for t, h in sorted(per_task.items())}
    if reference is not None:
        before = [bool(reference[i]) for i in graded]
        diff, ci = paired_proportion_diff(hits, before)
        out.update(paired_diff=diff, paired_diff_ci95=ci, mcnemar=mcnemar_exact(hits, before))
    return out


def pass_at_k_summary(counts: Sequence[int | None], k: int) -> dict[str, Any] | None:
    """pass@1 (the mean per-sample accuracy) and the unbiased pass@k over the prompts with a gold answer, from
    each prompt's number of correct answers out of ``k`` samples (None: no gold answer); None without any."""
    pairs = [(k, c) for c in counts if c is not None]
    if not pairs:
        return None
    return {"k": k, "n": len(pairs), "pass_at_1": mean_pass_at_k(pairs, 1), "pass_at_k": mean_pass_at_k(pairs, k)}


def model_fingerprint(spec: str) -> str:
    """What identifies a model's weights: a stage's key, the weight files' hashes, or the hub id."""
    path = Path(spec)
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest and manifest.get("stage_key"):
            return f"stage:{manifest['stage_key']}"
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return "files:" + sha256_text(json.dumps([sha256_file(f) for f in files]))
    if path.is_file():
        return f"file:{sha256_file(path)}"
    return f"hub:{spec}"


def score_stage_key(config: ScoreConfig) -> str:
    data = (read_manifest(config.data) if config.data else None) or {}
    cfg = config.model_dump(mode="json", exclude={"models", "reward_models", "data", "rouge_references"})
    models = {k: model_fingerprint(v) for k, v in config.models.items()}
    rms = {k: model_fingerprint(v) for k, v in config.reward_models.items()}
    refs = read_summaries(config.rouge_references).sha256 if config.rouge_references else None
    return sha256_text(json.dumps([cfg, models, rms, data.get("stage_key"), refs, f"score-schema={SCHEMA_VERSION}"],
                                  sort_keys=True))


def plan_score(config: ScoreConfig, runs_dir: str | Path = "runs") -> StagePlan:
    """Key and default folder ``<runs_dir>/score/<key[:12]>``."""
    key = score_stage_key(config)
    out = stage_folder(runs_dir, "score", key)
    return StagePlan(key, out, out)


@dataclass
class Generations:
    """One model's answers: completion token lists, texts, and whether each ended with EOS."""

    tokens: list[list[int]]
    texts: list[str]
    eos: list[bool]
    seconds: float


def generate_answers(model, tokenizer, prompts: Sequence[Sequence[Message]], config: ScoreConfig, bf16: bool
                     ) -> Generations:
    torch.manual_seed(config.seed)  # the same sampling noise for every model when greedy=False
    tokens, texts, eos = [], [], []
    start = time.perf_counter()
    batches = range(0, len(prompts), config.batch_size)
    with StageProgress("generated answers", len(prompts), logger=log, every=len(prompts)) as progress:  # a bar, or one line
        for s in batches:
            ro = rollout(model, tokenizer, prompts[s:s + config.batch_size], config.sampling(),
                         config.max_prompt_length, bf16=bf16)
            tokens += ro.tokens
            texts += ro.texts
            eos += ro.has_eos.tolist()
            progress.update(min(s + config.batch_size, len(prompts)))
    return Generations(tokens, texts, eos, time.perf_counter() - start)


def gold_sample_counts(model, tokenizer, items: Sequence[PromptItem], config: ScoreConfig, bf16: bool
                       ) -> tuple[list[int | None], list[int | None]]:
    """Per prompt: how many of ``config.samples_per_prompt`` answers, sampled at the config's temperature, state
    its gold answer (None for a prompt without one), by the gold check and by its lenient form. Sampled even when
    the scored answers are greedy: pass@k needs k independent tries, and greedy decoding gives one answer k times."""
    k = config.samples_per_prompt
    graded = [item for item in items if item.gold_answer is not None]
    repeated = [item for item in graded for _ in range(k)]
    texts = generate_answers(model, tokenizer, [item.messages for item in repeated],
                             config.model_copy(update={"greedy": False}), bf16).texts

    def counts(lenient: bool) -> list[int | None]:
        hits = gold_results(repeated, texts, lenient)
        per_prompt = iter(per_prompt_counts(hits, k))
        return [None if item.gold_answer is None else next(per_prompt) for item in items]

    return counts(False), counts(True)


def answer_logprobs(model, tokenizer, prompts: Sequence[Sequence[Message]], tokens: Sequence[Sequence[int]],
                    config: ScoreConfig, bf16: bool) -> list[float]:
    """sum_t log pi(y_t | x, y_<t) of given completions under ``model``. Returns one float per prompt."""
    out: list[float] = []
    for s in range(0, len(prompts), config.batch_size):
        batch = encode_prompts(tokenizer, prompts[s:s + config.batch_size], config.max_prompt_length)
        comp, mask = pad_completions(tokens[s:s + config.batch_size], tokenizer.pad_token_id)
        ids = torch.cat([batch["input_ids"], comp], 1)
        attn = torch.cat([batch["attention_mask"], mask.long()], 1)
        logp, _ = batched_logprobs(model, ids, attn, batch["input_ids"].shape[1], mask, config.batch_size, bf16=bf16,
                                   entropy=False)
        out += logp.tolist()
    return out


# --------------------------------------------------------------------------------------------
# Held-out evaluation during training (greedy, one reward model)
# --------------------------------------------------------------------------------------------
@dataclass
class PolicyEval:
    """Held-out greedy answers of a policy, scored: the proxy (trained-against) reward, independent reward
    models, gold accuracy, KL to the start, and text health. Means over the prompts."""

    mean_reward: float  # the proxy: E[r] - lambda Var[r] of the reward model trained against
    reward_std: float
    eos_rate: float
    mean_length: float
    distinct2: float
    repetition: float
    n: int
    samples: list[dict[str, str]] = field(default_factory=list)
    independent: dict[str, float] = field(default_factory=dict)  # name -> mean E[r]
    independent_std: dict[str, float] = field(default_factory=dict)
    gold_accuracy: float | None = None
    gold_n: int = 0
    kl: float | None = None  # mean k1 sum_t (log pi - log pi_ref) of the answers
    gold_lenient: float | None = None  # reasoning-gym items: the lenient gold check's accuracy (None without any)


def evaluate_policy(policy, tokenizer, scorer: RewardScorer, prompts: Sequence[Sequence[Message] | PromptItem],
                    sampling: SamplingConfig, max_prompt_length: int, *, var_lambda: float = 0.0, bf16: bool = False,
                    batch_size: int = 8, independent: dict[str, RewardScorer] | None = None,
                    reference_logprobs: Callable[[Rollout], torch.Tensor | None] | None = None) -> PolicyEval:
    """Answer ``prompts`` (messages, or PromptItems with gold answers) and score the answers."""
    items = [p if isinstance(p, PromptItem) else PromptItem(list(p)) for p in prompts]
    independent = independent or {}
    rewards, lengths, eos, token_lists, texts, kls = [], [], [], [], [], []
    others: dict[str, list[float]] = {name: [] for name in independent}
    for start in range(0, len(items), batch_size):
        chunk = [item.messages for item in items[start:start + batch_size]]
        ro = rollout(policy, tokenizer, chunk, sampling, max_prompt_length, bf16=bf16)
        scores = scorer.score(ro.prompts, ro.texts)
        rewards += (scores.mean - var_lambda * scores.var).tolist()
        for name, other in independent.items():
            others[name] += other.score(ro.prompts, ro.texts).mean.tolist()
        if reference_logprobs is not None:
            ref = reference_logprobs(ro)
            if ref is not None:
                mine, _ = batched_logprobs(policy, ro.input_ids, ro.attention_mask, ro.prompt_width, ro.mask,
                                           batch_size, bf16=bf16, entropy=False)
                kls += (mine - ref).tolist()
        lengths += ro.lengths.tolist()
        eos += ro.has_eos.float().tolist()
        token_lists += ro.tokens
        texts += ro.texts
    health = text_health(token_lists)
    gold = gold_summary(gold_results(items, texts))
    lenient = gold_summary(gold_results(items, texts, lenient=True)) if has_gym_items(items) else None
    samples = [{"prompt": item.messages[-1]["content"], "completion": t} for item, t in zip(items, texts, strict=True)]
    return PolicyEval(float(np.mean(rewards)), float(np.std(rewards)), float(np.mean(eos)), float(np.mean(lengths)),
                      health["distinct2"], health["repetition"], len(rewards), samples[:8],
                      {k: float(np.mean(v)) for k, v in others.items()}, {k: float(np.std(v)) for k, v in others.items()},
                      gold["accuracy"] if gold else None, gold["n"] if gold else 0,
                      float(np.mean(kls)) if kls else None, lenient["accuracy"] if lenient else None)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def read_generations(folder: str | Path, name: str) -> list[dict[str, Any]]:
    path = Path(folder) / GENERATIONS / f"{name}.jsonl"
    if not path.is_file():
        raise EvaluationError(f"{folder} has no generations for model {name!r} ({path} missing)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@exclusive_stage
@records_footprint
def run_score_stage(config: ScoreConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                    runs_root: str | Path = "runs") -> StageResult:
    """Generate, score and summarise; writes generations/*.jsonl, scores.json, scores.md, rewards.png."""
    if config.data is None:
        raise EvaluationError("score: no data folder given (data: a folder written by `align data`)")
    if not config.reward_models:
        raise EvaluationError("score: no reward model given (reward_models: name -> folder written by `align rm`)")
    for name, folder in config.reward_models.items():
        if not (Path(folder) / "config.json").is_file():
            raise EvaluationError(f"score: reward model {name!r}: {folder} is not a saved reward model")
    if config.proxy_reward_model is not None and config.proxy_reward_model not in config.reward_models:
        raise EvaluationError(f"score: proxy_reward_model={config.proxy_reward_model!r} is not one of the reward "
                              f"models ({', '.join(config.reward_models)})")
    plan = plan_score(config, runs_root)
    key, out = plan.key, Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, key, EvaluationError, stage="score", overwrite=overwrite,
                      inputs=local_paths(config.model_dump(mode="json")), runs_root=runs_root) is not None:
        log.info("scores already computed in %s (same models, reward models and prompts): reusing them", out)
        return StageResult(out, json.loads((out / "scores.json").read_text()), reused=True)

    # 1. The inputs, before any model is loaded: complete, intact stage outputs and loadable models.
    require_stage_output(config.data, "data", EvaluationError, "score: data (--data)")
    for name, folder in config.reward_models.items():
        require_stage_output(folder, "reward_model", EvaluationError, f"score: reward model {name!r} (--rm)")
    for name, spec in config.models.items():
        require_model_source(spec, EvaluationError, f"score: model {name!r} (--model)")

    # 2. The fixed prompt set (with gold answers where the data has them).
    items = select_prompt_items(config.data, config.n_prompts, config.seed)
    scorer_errors_before = Counter(tasks_gym.scorer_errors)
    prompts = [item.messages for item in items]
    device = resolve_device(config.device)
    bf16 = bf16_enabled(config.bf16, device)
    names = list(config.models)
    reference = names[0]

    # 3. Each model answers (one model in memory at a time, plus the reference for KL).
    gens: dict[str, Generations] = {}
    kl: dict[str, list[float]] = {}
    sampled: dict[str, list[int | None]] = {}  # per prompt: correct answers of samples_per_prompt samples
    sampled_lenient: dict[str, list[int | None]] = {}  # the same by the lenient gold check
    if config.samples_per_prompt > 1 and all(item.gold_answer is None for item in items):
        log.warning("score: samples_per_prompt=%d but no scored prompt has a gold answer: no pass@k",
                    config.samples_per_prompt)
    ref_model = None
    for name in names:
        try:
            model, tokenizer = load_causal_lm(config.models[name], device=device, padding_side="left")
        except (ModelSourceError, OSError, ValueError) as exc:
            raise EvaluationError(f"score: model {name!r} ({config.models[name]}): {exc}") from exc
        model.eval()
        if bf16:  # frozen: Linear weights held in bf16 (what autocast computes, without a cast per decoding step)
            bf16_frozen_linears(model)
        log.info("model %s: answering %d prompts", name, len(prompts))
        gens[name] = generate_answers(model, tokenizer, prompts, config, bf16)
        if config.samples_per_prompt > 1 and any(item.gold_answer is not None for item in items):
            log.info("model %s: %d samples per gold prompt for pass@k", name, config.samples_per_prompt)
            sampled[name], sampled_lenient[name] = gold_sample_counts(model, tokenizer, items, config, bf16)
        if config.kl:
            if name == reference:
                ref_model, ref_tok = model, tokenizer
                kl[name] = [0.0] * len(prompts)
            else:
                mine = answer_logprobs(model, tokenizer, prompts, gens[name].tokens, config, bf16)
                ref = answer_logprobs(ref_model, ref_tok, prompts, gens[name].tokens, config, bf16)
                kl[name] = [a - b for a, b in zip(mine, ref, strict=True)]
        if name != reference:
            del model
    del ref_model

    # 4. Score every answer with every reward model.
    rewards: dict[str, dict[str, tuple[list[float], list[float]]]] = {n: {} for n in names}
    for rm_name, folder in config.reward_models.items():
        try:
            scorer = RewardScorer.from_pretrained(folder, device=str(device), bf16=bf16)
        except RewardModelError as exc:
            raise EvaluationError(f"score: reward model {rm_name!r}: {exc}") from exc
        for name in names:
            s = scorer.score(prompts, gens[name].texts)
            rewards[name][rm_name] = (s.mean.tolist(), s.var.tolist())
        del scorer

    # 5. Summaries: per model, per reward model, gold and ROUGE; paired differences against the reference.
    gold = {name: gold_results(items, gens[name].texts) for name in names}
    # reasoning-gym items: also the lenient check (the number stated in words around it), so a gain in the
    # strict check can be told apart from a gain in the answer format alone.
    lenient = {name: gold_results(items, gens[name].texts, lenient=True) for name in names} if has_gym_items(items) \
        else {}
    tasks = [item_task(item) for item in items]
    rouge = rouge_against_references(config, prompts, {name: gens[name].texts for name in names})
    summary: dict[str, Any] = {"n_prompts": len(prompts), "reference": reference, "greedy": config.greedy,
                               "max_new_tokens": config.max_new_tokens, "proxy": config.proxy_reward_model,
                               "independent": [rm for rm in config.reward_models if rm != config.proxy_reward_model],
                               "n_gold_prompts": sum(g is not None for g in gold[reference]),
                               "scorer_errors": dict(tasks_gym.scorer_errors - scorer_errors_before),
                               "gold_checkers": dict(sorted(Counter(str(item.gold_checker) for item in items
                                                                    if item.gold_answer is not None).items())),
                               "models": {}}
    for name in names:
        g = gens[name]
        health = text_health(g.tokens)
        entry: dict[str, Any] = {
            "model": config.models[name], "mean_length": float(np.mean([len(t) for t in g.tokens])),
            "eos_rate": float(np.mean(g.eos)), "distinct2": health["distinct2"], "repetition": health["repetition"],
            "kl_to_reference": float(np.mean(kl[name])) if config.kl else None,
            "generation_seconds": round(g.seconds, 1), "rewards": {},
            "gold": gold_summary(gold[name], gold[reference] if name != reference else None, tasks),
            "gold_lenient": (gold_summary(lenient[name], lenient[reference] if name != reference else None, tasks)
                             if lenient else None),
            "degenerate": degenerate_share(g.texts, [p[-1]["content"] for p in prompts]),
            "trained_against": trained_against(config.models[name]),  # e.g. gold: then not an independent check
        }
        for rm_name, (mean, var) in rewards[name].items():
            r = entry["rewards"][rm_name] = {
                "mean": float(np.mean(mean)), "ci95": bootstrap_ci(mean, config.bootstrap, config.seed),
                "std": float(np.std(mean)), "mean_var": float(np.mean(var)),
            }
            if name != reference:
                diff = np.asarray(mean) - np.asarray(rewards[reference][rm_name][0])
                r["paired_diff"] = float(diff.mean())
                r["paired_diff_ci95"] = bootstrap_ci(diff, config.bootstrap, config.seed)
                r["win_rate_vs_reference"] = float((diff > 0).mean())
            r["role"] = "proxy" if rm_name == config.proxy_reward_model else "independent"
        if name in sampled:
            entry["pass_at_k"] = pass_at_k_summary(sampled[name], config.samples_per_prompt)
            if lenient:
                entry["pass_at_k_lenient"] = pass_at_k_summary(sampled_lenient[name], config.samples_per_prompt)
        if rouge is not None:
            entry["rouge"] = rouge_summary(rouge[name], config.seed)
            if name != reference:
                entry["rouge_gain"] = paired_rouge_gain(rouge[name], rouge[reference], config.seed)
        summary["models"][name] = entry

    # 6. Write everything atomically (manifest last).
    with atomic_directory(out) as tmp:
        (tmp / GENERATIONS).mkdir()
        (tmp / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
        for name in names:
            g = gens[name]
            with open(tmp / GENERATIONS / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for i, p in enumerate(prompts):
                    row = {"id": i, "prompt": p, "completion": g.texts[i], "n_tokens": len(g.tokens[i]),
                           "eos": bool(g.eos[i]), "kl": kl[name][i] if config.kl else None,
                           "gold_answer": items[i].gold_answer, "gold_correct": gold[name][i],
                           **({"gold_lenient": lenient[name][i]} if lenient else {}),
                           "gold_checker": items[i].gold_checker if items[i].gold_answer is not None else None,
                           **({"samples_correct": sampled[name][i]} if name in sampled else {}),
                           **({"samples_correct_lenient": sampled_lenient[name][i]} if name in sampled and lenient
                              else {}),
                           "rewards": {rm: {"mean": rewards[name][rm][0][i], "var": rewards[name][rm][1][i]}
                                       for rm in config.reward_models}}
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json(tmp / "scores.json", summary)
        (tmp / "scores.md").write_text(scores_markdown(summary), encoding="utf-8")
        plot_rewards(rewards, tmp / "rewards.png")
        files = [tmp / "scores.json", tmp / "prompts.jsonl", *sorted((tmp / GENERATIONS).glob("*.jsonl"))]
        write_json(tmp / MANIFEST, {
            "stage": "score", "stage_key": key, "config": config.model_dump(mode="json"),
            "files": {str(f.relative_to(tmp)): {"sha256": sha256_file(f)} for f in files},
        })
    log.info("scores written to %s", out)
    return StageResult(out, summary)


# --------------------------------------------------------------------------------------------
# Report pieces
# --------------------------------------------------------------------------------------------
def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def rouge_against_references(config: ScoreConfig, prompts: Sequence[Sequence[Message]],
                             answers: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]] | None:
    """Per model, per-example ROUGE of the answers to the prompts that are posts of
    ``config.rouge_references`` (matched on the last user message's text) against their references;
    None without references, or when no scored prompt is one of their posts (a warning)."""
    if not config.rouge_references:
        return None
    refs = read_summaries(config.rouge_references)
    by_post = {p.strip(): r for p, r in zip(refs.prompts, refs.references, strict=True)}
    matched = [(i, by_post[p[-1]["content"].strip()]) for i, p in enumerate(prompts)
               if p and p[-1]["content"].strip() in by_post]
    if not matched:
        log.warning("score: none of the %d prompts is a post of %s: no ROUGE", len(prompts), config.rouge_references)
        return None
    index, references = zip(*matched, strict=True)
    return {name: rouge_scores([texts[i] for i in index], list(references)) for name, texts in answers.items()}


def scores_markdown(summary: dict[str, Any], with_verdict: bool = True) -> str:
    """The verdict block, then the scores table (one row per model and reward model) and gold accuracy."""
    from alignment.evaluation.verdict import verdict, verdict_markdown

    lines = []
    if with_verdict and len(summary["models"]) > 1:
        lines += [verdict_markdown(verdict(summary)), ""]
    lines += [f"Validation prompts: {summary['n_prompts']} ({'greedy' if summary['greedy'] else 'sampled'}, "
             f"up to {summary['max_new_tokens']} new tokens); reference model: `{summary['reference']}`.", "",
             "| model | reward model | mean reward (95% CI) | paired diff vs reference (95% CI) | length | EOS rate "
             "| distinct-2 | repetition | KL to reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        for rm, r in m["rewards"].items():
            diff = (f"{r['paired_diff']:+.3f} {_fmt_ci(r['paired_diff_ci95'])}" if "paired_diff" in r else "—")
            kl = "—" if m["kl_to_reference"] is None else f"{m['kl_to_reference']:.3f}"
            role = f" ({r['role']})" if summary.get("proxy") else ""
            lines.append(f"| {name} | {rm}{role} | {r['mean']:.3f} {_fmt_ci(r['ci95'])} | {diff} | {m['mean_length']:.1f} "
                         f"| {m['eos_rate']:.2f} | {m['distinct2']:.3f} | {m['repetition']:.3f} | {kl} |")
    if summary.get("n_gold_prompts"):
        lines += gold_markdown(summary)
    if any("degenerate" in m for m in summary["models"].values()):
        lines += ["", "Degenerate answers (no answer at all: empty, a repetition loop, the prompt handed back):", "",
                  "| model | empty | repetition | echo | share |", "|---|---|---|---|---|"]
        for name, m in summary["models"].items():
            d = m.get("degenerate")
            if d:
                share = "—" if d["share"] is None else f"{d['share']:.3f}"
                lines.append(f"| {name} | {d['empty']} | {d['repetition']} | {d['echo']} | {share} |")
    if any("rouge" in m for m in summary["models"].values()):
        n = next(m["rouge"]["rougeL"]["n"] for m in summary["models"].values() if "rouge" in m)
        lines += ["", f"ROUGE (F) against the reference summaries of the {n} scored posts that have one:", "",
                  "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L paired diff vs reference (95% CI) |",
                  "|---|---|---|---|---|"]
        for name, m in summary["models"].items():
            r = m["rouge"]
            gain = m.get("rouge_gain", {}).get("rougeL")
            diff = f"{gain['mean']:+.4f} {_fmt_ci(gain['ci95'])}" if gain else "—"
            lines.append(f"| {name} | " + " | ".join(f"{r[t]['mean']:.4f} {_fmt_ci(r[t]['ci95'])}" for t in ROUGE_TYPES)
                         + f" | {diff} |")
    return "\n".join(lines) + "\n"


def gold_markdown(summary: dict[str, Any]) -> list[str]:
    """The gold lines of :func:`scores_markdown`: accuracy, the paired difference and McNemar's exact test against
    the reference per model, then accuracy per task when the prompts name more than one task."""
    lines = ["", f"Gold checks: {summary['n_gold_prompts']} of the prompts have a checkable answer.", ""]
    lines += _gold_table(summary, "gold", "gold accuracy")
    if any(m.get("gold_lenient") for m in summary["models"].values()):
        lines += ["", "Lenient check (reasoning-gym numbers also right when the answer line states them in words "
                  "around them, read as the number checker reads them, the question's own expressions masked; the "
                  "strict check above is reasoning-gym's own): a strict gain without a lenient one is a gain in the "
                  "answer format alone.", ""]
        lines += _gold_table(summary, "gold_lenient", "lenient accuracy")
    if any(m.get("pass_at_k") for m in summary["models"].values()):
        k = next(m["pass_at_k"]["k"] for m in summary["models"].values() if m.get("pass_at_k"))
        both = any(m.get("pass_at_k_lenient") for m in summary["models"].values())
        lines += ["", f"Sampled: {k} answers per gold prompt (unbiased pass@k, Chen et al. 2021):", "",
                  f"| model | pass@1 | pass@{k} | prompts |" + (f" lenient pass@1 | lenient pass@{k} |" if both else ""),
                  "|---|---|---|---|" + ("---|---|" if both else "")]
        for name, m in summary["models"].items():
            if m.get("pass_at_k"):
                pk, pl = m["pass_at_k"], m.get("pass_at_k_lenient")
                lines.append(f"| {name} | {pk['pass_at_1']:.3f} | {pk['pass_at_k']:.3f} | {pk['n']} |"
                             + (f" {pl['pass_at_1']:.3f} | {pl['pass_at_k']:.3f} |" if pl else " — | — |" if both else ""))
    tasks = sorted({t for m in summary["models"].values() for t in (m["gold"] or {}).get("by_task", {})})
    if len(tasks) > 1:
        lenient = any(m.get("gold_lenient") for m in summary["models"].values())
        lines += ["", "Gold accuracy per task (95% Wilson CI):", "",
                  "| model | task | accuracy (95% CI) | correct |" + (" lenient (95% CI) | correct |" if lenient else ""),
                  "|---|---|---|---|" + ("---|---|" if lenient else "")]
        for name, m in summary["models"].items():
            for task, t in m["gold"].get("by_task", {}).items():
                row = f"| {name} | {task} | {t['accuracy']:.3f} {_fmt_ci(t['ci95'])} | {t['correct']}/{t['n']} |"
                tl = ((m.get("gold_lenient") or {}).get("by_task") or {}).get(task)
                if lenient:
                    row += f" {tl['accuracy']:.3f} {_fmt_ci(tl['ci95'])} | {tl['correct']}/{tl['n']} |" if tl else " — | — |"
                lines.append(row)
    return lines


def _gold_table(summary: dict[str, Any], key: str, label: str) -> list[str]:
    """Per model: ``key``'s accuracy, its paired difference and McNemar's test against the reference."""
    lines = [f"| model | {label} (95% CI) | correct | paired diff vs reference (95% CI) | gained / lost "
             "| McNemar exact p |", "|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        g = m.get(key)
        if not g:
            continue
        diff = f"{g['paired_diff']:+.3f} {_fmt_ci(g['paired_diff_ci95'])}" if "paired_diff" in g else "—"
        mc = g.get("mcnemar")
        test = f"{mc['gained']} / {mc['lost']} | {mc['p_value']:.3g}" if mc else "— | —"
        lines.append(f"| {name} | {g['accuracy']:.3f} {_fmt_ci(g['ci95'])} | {g['correct']}/{g['n']} | {diff} | {test} |")
    return lines


def plot_rewards(rewards: dict[str, dict[str, tuple[list[float], list[float]]]], png: Path) -> None:
    """Histogram of each model's rewards, one panel per reward model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rms = list(next(iter(rewards.values())))
    fig, axes = plt.subplots(1, len(rms), figsize=(5.5 * len(rms), 4), squeeze=False)
    for ax, rm in zip(axes[0], rms, strict=True):
        allv = np.concatenate([rewards[m][rm][0] for m in rewards])
        bins = np.linspace(allv.min(), allv.max() + 1e-6, 25)
        for model in rewards:
            vals = rewards[model][rm][0]
            ax.hist(vals, bins=bins, alpha=0.55, label=f"{model} (mean {np.mean(vals):.2f})")
        ax.set_title(f"reward model: {rm}")
        ax.set_xlabel("reward")
        ax.set_ylabel("answers")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
