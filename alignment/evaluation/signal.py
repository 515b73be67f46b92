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

``align signal`` runs :func:`measure_signal` on a data stage's prompts and prints :func:`signal_table`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
    from alignment.evaluation.evaluate import gold_results
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
    counts = [sum(bool(h) for h in hits[j * k:(j + 1) * k]) for j in range(len(items))]
    shaped = [states_final_answer(t, item.gold_checker) for t, item in zip(sampled, repeated)]
    formatted = [sum(shaped[j * k:(j + 1) * k]) for j in range(len(items))]
    return signal_by_task(tasks, counts, k, greedy, formatted)
