"""reasoning-gym tasks as a prompts source whose gold answers the library itself checks.

A data source ``gym:chain_sum,letter_counting:50`` names reasoning-gym generators, each with an optional
size (default :data:`DEFAULT_SIZE` items); ``DataConfig.gym_settings`` gives a task its generator
settings (difficulty), e.g. ``{"chain_sum": {"min_terms": 2, "max_terms": 3}}``. Of a task's ``size``
items, ``round(size * validation_fraction)`` (at least 1) are held out, as the data stage splits any
source. The two splits come from disjoint seeds: train from ``seed``, held-out from ``seed +``
:data:`HELD_OUT_SEED_OFFSET`; a training item whose question text is also a held-out question (a chance
repeat: small question spaces such as spell_backward's word list repeat) is dropped and counted, and
:func:`check_disjoint` then refuses any overlap left, naming the task and question. reasoning-gym seeds
item *i* with ``seed + i``, so nearby seeds draw shifted copies of one another (seed 1's items are seed 0's
from index 1 on); seeds further apart than the size draw disjoint items.

Each item becomes a prompt record: the question followed by :data:`ANSWER_INSTRUCTION`, ``gold_checker``
"reasoning_gym" and ``gold_answer`` a JSON reference ``{"task", "settings", "seed", "size", "index",
"version"}`` from which :func:`score` rebuilds the dataset entry (deterministic in those values and the
library version; datasets are cached) and calls the dataset's own ``score_answer`` on
:func:`extract_answer` of the completion. A scorer that raises scores 0 and is counted in
:data:`scorer_errors`. Generators whose scorers are broken are refused (:data:`DENIED`).

reasoning_gym is imported only when a dataset is built, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "gym:"
CHECKER = "reasoning_gym"
DEFAULT_SIZE = 100
# Held-out items are drawn with seed + this (a prime far above any size), so no seed is shared with train.
HELD_OUT_SEED_OFFSET = 1_000_003
ANSWER_INSTRUCTION = "\n\nGive your final answer inside <answer></answer>."
DENIED = {
    "game_of_life_halting": "its score_answer gives 1.0 to any non-empty answer (reasoning-gym 0.1.25), so it "
                            "rewards nothing but answering",
}
"""Generators refused as a source, with the reason: a broken scorer would train on noise."""
scorer_errors: Counter[str] = Counter()
"""Per task: how many times its ``score_answer`` raised (each such completion scored 0)."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_NAME_SIZE = re.compile(r"^([a-z0-9_]+)(?::(\d+))?$")


class GymError(ValueError):
    """A gym source or reference that cannot be used (unknown or denied task, bad settings, overlap)."""


@dataclass(frozen=True)
class GymTask:
    name: str
    size: int = DEFAULT_SIZE
    settings: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs: hashable, for the dataset cache


def _library():
    import reasoning_gym

    return reasoning_gym


def library_version() -> str:
    """The installed reasoning-gym's version (its distribution's: the module's own __version__ lags)."""
    from importlib.metadata import version

    return version("reasoning-gym")


def _check_name(name: str) -> None:
    if name in DENIED:
        raise GymError(f"gym task {name!r} is refused: {DENIED[name]}")
    known = _library().factory.DATASETS
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GymError(f"unknown reasoning-gym task {name!r}{hint}")


def frozen_settings(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Generator settings as sorted (key, value) pairs, lists as tuples: hashable, for the dataset cache
    (``{"operators": ["+", "-"]}`` from YAML or a JSON reference is ``(("operators", ("+", "-")),)``)."""
    def frozen(value):
        return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

    return tuple(sorted((k, frozen(v)) for k, v in settings.items()))


def parse_spec(spec: str, settings: dict[str, dict[str, Any]] | None = None) -> list[GymTask]:
    """The tasks of a source spec ``gym:NAME[:SIZE],...`` with their settings from ``settings``."""
    settings = settings or {}
    body = spec.removeprefix(PREFIX)
    tasks: list[GymTask] = []
    for part in (p.strip() for p in body.split(",")):
        match = _NAME_SIZE.match(part)
        if not match:
            raise GymError(f"gym source {spec!r}: {part!r} is not NAME or NAME:SIZE (e.g. gym:chain_sum:200)")
        name, size = match.group(1), int(match.group(2) or DEFAULT_SIZE)
        _check_name(name)
        if size < 2:
            raise GymError(f"gym source {spec!r}: task {name!r} needs a size of at least 2 (train and held-out)")
        if any(t.name == name for t in tasks):
            raise GymError(f"gym source {spec!r}: task {name!r} is named twice")
        tasks.append(GymTask(name, size, frozen_settings(settings.get(name, {}))))
    unused = sorted(set(settings) - {t.name for t in tasks})
    if unused:
        raise GymError(f"gym_settings names task(s) {unused} that the source {spec!r} does not")
    return tasks


@functools.lru_cache(maxsize=64)
def _dataset(name: str, settings: tuple[tuple[str, Any], ...], seed: int, size: int):
    """The reasoning-gym dataset (cached per task, settings, seed and size: score() rebuilds entries)."""
    _check_name(name)
    try:
        return _library().create_dataset(name, size=size, seed=seed, **dict(settings))
    except Exception as exc:  # a settings class raises TypeError, AssertionError or ValueError
        raise GymError(f"gym task {name!r}: settings {dict(settings)} are not accepted ({exc})") from None


def split_sizes(size: int, validation_fraction: float) -> dict[str, int]:
    """Train and held-out sizes of ``size`` items: ``round(size * validation_fraction)`` held out, at least 1
    each side."""
    n_val = min(max(1, round(size * validation_fraction)), size - 1)
    return {"train": size - n_val, "validation": n_val}


def _records(task: GymTask, split: str, seed: int, size: int) -> list[dict[str, Any]]:
    """One split's prompt records of a task; a repeated question is kept once."""
    seed = seed + HELD_OUT_SEED_OFFSET if split == "validation" else seed
    dataset = _dataset(task.name, task.settings, seed, size)
    version = library_version()
    out, seen = [], set()
    for index in range(size):
        question = dataset[index]["question"]
        if question in seen:
            continue
        seen.add(question)
        ref = {"task": task.name, "settings": dict(task.settings), "seed": seed, "size": size, "index": index,
               "version": version}
        out.append({"prompt": question + ANSWER_INSTRUCTION, "gold_answer": json.dumps(ref, sort_keys=True),
                    "gold_checker": CHECKER, "task": task.name, "split": split, "question": question})
    return out


def build_items(tasks: list[GymTask], seed: int, validation_fraction: float) -> list[dict[str, Any]]:
    """Prompt records of every task, train then held-out (``split`` names which); see the module text."""
    out: list[dict[str, Any]] = []
    for task in tasks:
        sizes = split_sizes(task.size, validation_fraction)
        held_out = _records(task, "validation", seed, sizes["validation"])
        questions = {r["question"] for r in held_out}
        train = [r for r in _records(task, "train", seed, sizes["train"]) if r["question"] not in questions]
        dropped = sizes["train"] - len(train)
        if dropped:
            log.info("gym %s: %d training item(s) dropped (repeated, or the text of a held-out question)",
                     task.name, dropped)
        out += train + held_out
    check_disjoint(out)
    return out


def check_disjoint(records: list[dict[str, Any]]) -> None:
    """Raise :class:`GymError` (one line: the task and the question) when a held-out question text
    occurs among the training records."""
    train = {(r["task"], r["question"]) for r in records if r["split"] == "train"}
    for r in records:
        if r["split"] != "train" and (r["task"], r["question"]) in train:
            raise GymError(f"gym task {r['task']!r}: the held-out question {json.dumps(r['question'])[:200]} also "
                           "occurs in the training items")


def parse_reference(reference: str | dict) -> dict[str, Any]:
    """The JSON reference as a dict, checked: a known, allowed task, the fields :func:`score` needs and the
    reasoning-gym version installed now (another version may build other entries)."""
    try:
        ref = json.loads(reference) if isinstance(reference, str) else reference
    except ValueError:
        raise GymError(f"reasoning_gym reference {str(reference)[:80]!r} is not JSON") from None
    fields = {"task": str, "settings": dict, "seed": int, "size": int, "index": int, "version": str}
    if not isinstance(ref, dict) or any(not isinstance(ref.get(k), t) for k, t in fields.items()):
        raise GymError(f"reasoning_gym reference {str(reference)[:80]!r} needs {', '.join(fields)}")
    _check_name(ref["task"])
    if ref["version"] != library_version():
        raise GymError(f"reasoning_gym reference built with reasoning-gym {ref['version']}, installed "
                       f"{library_version()}: rebuild the data folder")
    if not 0 <= ref["index"] < ref["size"]:
        raise GymError(f"reasoning_gym reference index {ref['index']} is outside its size {ref['size']}")
    return ref


def extract_answer(text: str) -> str | None:
    """The answer reasoning-gym's scorers expect: the last ``<answer>...</answer>`` content, stripped,
    else the last non-empty line; None for an empty completion."""
    tags = _ANSWER_TAG.findall(text or "")
    if tags:
        return tags[-1].strip()
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def format_reward(text: str) -> float:
    """1.0 when the completion holds exactly one well-formed ``<answer>X</answer>`` (one opening and one
    closing tag, in that order, X not blank), else 0.0; what the gold component's ``format_credit``
    rewards on a wrong answer."""
    text = text or ""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return 0.0
    match = _ANSWER_TAG.search(text)
    return 1.0 if match and match.group(1).strip() else 0.0


def reference_answer(reference: str | dict) -> str:
    """The gold answer text of the referenced item (what its dataset stores as ``answer``)."""
    _, _, entry = _referenced(reference)
    return str(entry["answer"])


def _referenced(reference: str | dict) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(the checked reference, its dataset, the item): the item rebuilt from the reference (datasets cached)."""
    ref = parse_reference(reference)
    dataset = _dataset(ref["task"], frozen_settings(ref["settings"]), ref["seed"], ref["size"])
    return ref, dataset, dataset[ref["index"]]


def score(completion: str, reference: str | dict) -> float:
    """The dataset's own ``score_answer`` of the completion's answer, in [0, 1]. A scorer that raises, or
    returns something other than a number in [0, 1], scores 0 and is counted in :data:`scorer_errors`.
    (The lenient form, a number stated in words, is the gold check's: ``gold.check_answer(lenient=True)``.)"""
    ref, dataset, entry = _referenced(reference)
    answer = extract_answer(completion)
    try:
        value = float(dataset.score_answer(answer, entry))
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"score {value} is outside [0, 1]")
    except Exception as exc:  # the library's scorers raise many types on odd answers
        scorer_errors[ref["task"]] += 1
        if scorer_errors[ref["task"]] == 1:
            log.warning("gym %s: score_answer raised (%s); scored 0 (counted in scorer_errors)", ref["task"], exc)
        return 0.0
    return value
