"""Where GRPO has a gradient: the base model's pass@1, pass@k and mixed-group share per task.

GRPO (and RLOO) learn only from a prompt whose k sampled answers get different rewards: a group that is
all right or all wrong has zero advantage everywhere. So before choosing a task mix, measure, per task on
the model that will be trained:

- ``greedy``: accuracy of the greedy answer (what ``align score`` reports);
- ``pass@1`` / ``pass@k``: the unbiased estimators (:func:`alignment.evaluation.stats.mean_pass_at_k`) from
  k samples at the training temperature;
- ``mixed``: the share of prompts whose k samples are neither all right nor all wrong (the prompts a GRPO
  step learns from);
- ``format``: the share of samples with one well-formed ``<answer>`` tag (for reasoning-gym tasks, whose
  scorers read the tag).

``align signal`` runs :func:`run_signal` on a data stage's *training* prompts (so the choice of tasks
never looks at the held-out items the gain is measured on) and prints :func:`signal_table`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field

from alignment.config import ConfigModel, Seed
from alignment.evaluation.stats import mean_pass_at_k


@dataclass(frozen=True)
class TaskSignal:
    task: str
    n: int  # prompts
    k: int  # samples per prompt
    greedy: float | None  # accuracy of the greedy answers (None when not measured)
    pass_at_1: float
    pass_at_k: float
    mixed: float  # share of prompts whose k samples are neither all right nor all wrong
    format: float | None  # share of samples in the answer format (None when the task has none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_signal(task: str, counts: Sequence[int], k: int, greedy: Sequence[bool] | None = None,
                formatted: Sequence[int] | None = None) -> TaskSignal:
    """One task's figures from, per prompt, ``counts`` (right answers among its k samples), optional
    ``greedy`` (whether its greedy answer was right) and ``formatted`` (samples in the answer format)."""
    if not counts:
        raise ValueError(f"task {task!r}: no prompts")
    if any(not 0 <= c <= k for c in counts):
        raise ValueError(f"task {task!r}: a count outside [0, {k}]")
    n = len(counts)
    pairs = [(k, c) for c in counts]
    return TaskSignal(task, n, k, None if greedy is None else sum(map(bool, greedy)) / n,
                      mean_pass_at_k(pairs, 1), mean_pass_at_k(pairs, k), sum(0 < c < k for c in counts) / n,
                      None if formatted is None else sum(formatted) / (n * k))


def signal_by_task(tasks: Sequence[str], counts: Sequence[int], k: int, greedy: Sequence[bool] | None = None,
                   formatted: Sequence[int] | None = None) -> list[TaskSignal]:
    """:func:`task_signal` per task (in first-seen order) of per-prompt ``tasks``, ``counts``, ... lists."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        groups[task].append(i)
    pick = lambda values, idx: None if values is None else [values[i] for i in idx]  # noqa: E731
    return [task_signal(t, pick(counts, idx), k, pick(greedy, idx), pick(formatted, idx)) for t, idx in groups.items()]


def signal_table(rows: Sequence[TaskSignal]) -> str:
    """A markdown table of :class:`TaskSignal` rows."""
    k = rows[0].k if rows else 0
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"| task | prompts | greedy | pass@1 | pass@{k} | mixed groups | format |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.n} | {fmt(r.greedy)} | {r.pass_at_1:.3f} | {r.pass_at_k:.3f} | "
                     f"{r.mixed:.3f} | {fmt(r.format)} |")
    return "\n".join(lines)


def measure_signal(model, tokenizer, items: Sequence[Any], tasks: Sequence[str], *, k: int = 8,
                   temperature: float = 1.0, max_new_tokens: int = 64, max_prompt_length: int = 512,
                   batch_size: int = 16, bf16: bool = False, lenient: bool = False, progress=None
                   ) -> list[TaskSignal]:
    """Answer each prompt item (``PromptItem`` with a gold answer) greedily and ``k`` times at ``temperature``;
    the per-task figures (:func:`signal_by_task`). ``tasks``: each item's task name; ``lenient``: the gold
    check's lenient form (:func:`alignment.evaluation.gold.check_answer`)."""
    from alignment.evaluation.evaluate import gold_results, per_prompt_counts
    from alignment.generation import SamplingConfig, rollout
    from alignment.rewards.components import states_final_answer

    messages = [item.messages for item in items]

    def answers(prompts, sampling, per_prompt):
        texts: list[str] = []
        step = max(1, batch_size // per_prompt)
        for s in range(0, len(prompts), step):
            texts += rollout(model, tokenizer, prompts[s:s + step], sampling, max_prompt_length, bf16=bf16,
                             samples_per_prompt=per_prompt).texts
            if progress:
                progress(len(texts) // per_prompt, len(prompts))
        return texts

    greedy_texts = answers(messages, SamplingConfig(max_new_tokens=max_new_tokens, greedy=True), 1)
    greedy = [bool(h) for h in gold_results(items, greedy_texts, lenient)]
    sampled = answers(messages, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                                               top_p=1.0), k)
    repeated = [item for item in items for _ in range(k)]
    hits = gold_results(repeated, sampled, lenient)
    counts = per_prompt_counts(hits, k)
    shaped = [states_final_answer(t, item.gold_checker) for t, item in zip(sampled, repeated, strict=True)]
    formatted = per_prompt_counts(shaped, k)
    return signal_by_task(tasks, counts, k, greedy, formatted)


class SignalConfig(ConfigModel):
    """`align signal`: the base model's pass@1 / pass@k / mixed-group share per task on a data stage's
    training prompts (those with a gold answer)."""

    section: str = "signal"
    data: str | None = Field(None, description="Folder written by `align data` (a prompts source with gold answers).")
    model: str = Field("HuggingFaceTB/SmolLM2-135M-Instruct", description="The model to measure (hub id, folder, .gguf).")
    n_per_task: int = Field(40, ge=1, description="Training prompts per task (a seeded subset when there are more).")
    k: int = Field(8, ge=2, description="Samples per prompt.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (GRPO's rollouts sample at 1.0).")
    max_new_tokens: int = Field(48, ge=1)
    max_prompt_length: int = Field(256, ge=8)
    batch_size: int = Field(32, ge=1, description="Sequences per generation batch.")
    lenient: bool = Field(True, description="The gold check's lenient form (reasoning-gym numbers stated in words).")
    seed: Seed = 0


def select_train_items(data_dir, n_per_task: int, seed: int) -> tuple[list[Any], list[str]]:
    """Up to ``n_per_task`` seeded training prompts with a gold answer per task, and their task names."""
    from pathlib import Path

    import numpy as np

    from alignment.data import PairData
    from alignment.evaluation.evaluate import EvaluationError, item_task

    path = Path(data_dir) / "train.parquet"
    if not path.is_file():
        raise EvaluationError(f"{data_dir} is not a data stage output (no train.parquet)")
    items = [i for i in PairData.load(path, prompts_ok=True).prompt_items() if i.gold_answer is not None]
    if not items:
        raise EvaluationError(f"{path} holds no prompt with a gold answer: nothing to measure")
    by_task: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        by_task[item_task(item)].append(item)
    rng = np.random.default_rng(seed)
    chosen: list[Any] = []
    for group in by_task.values():
        keep = sorted(rng.choice(len(group), min(n_per_task, len(group)), replace=False))
        chosen += [group[i] for i in keep]
    return chosen, [item_task(i) for i in chosen]


def run_signal(config: SignalConfig, progress=None) -> list[TaskSignal]:
    """Load the model and measure (:func:`measure_signal`) on :func:`select_train_items`."""
    import torch

    from alignment.hardware import bf16_enabled
    from alignment.models import bf16_frozen_linears, load_causal_lm

    items, tasks = select_train_items(config.data, config.n_per_task, config.seed)
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(config.model, padding_side="left")
    model.eval()
    bf16 = bf16_enabled(None, torch.device("cpu"))
    if bf16:
        bf16_frozen_linears(model)
    with torch.no_grad():
        return measure_signal(model, tokenizer, items, tasks, k=config.k, temperature=config.temperature,
                              max_new_tokens=config.max_new_tokens, max_prompt_length=config.max_prompt_length,
                              batch_size=config.batch_size, bf16=bf16, lenient=config.lenient, progress=progress)
