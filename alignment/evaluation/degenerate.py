"""Degenerate answers: answers that are no answer at all, named by why.

The collapse modes the seed runs ended in -- an empty answer, one symbol or a few words repeated, and a policy
that just hands the prompt back -- score well under a fooled reward model, so a share of them beside the rewards
tells a real gain from a reward hack. Here (the evaluation layer) so the rounds report and the evaluation both
use the one definition.

* :func:`is_degenerate` -- empty or repetition (the rounds report's share).
* :func:`degenerate_reason` -- "empty", "repetition", "echo" (mostly the prompt) or None.
* :func:`degenerate_share` -- counts per reason and the share over a set of answers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\w+")
REASONS = ("empty", "repetition", "echo")
ECHO_SHARE = 0.8  # an answer whose word 3-grams come at least this much from the prompt is an echo


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _is_repetition(stripped: str) -> bool:
    """Mostly one repeated non-alphanumeric symbol (over 30% of the visible characters), or a loop of the same few
    words (fewer than half of its word bigrams distinct, from 8 words on)."""
    chars = Counter(c for c in stripped if not c.isspace())
    if chars and chars.most_common(1)[0][1] / sum(chars.values()) > 0.3 and not chars.most_common(1)[0][0].isalnum():
        return True
    words = _words(stripped)
    if len(words) >= 8:
        bigrams = list(zip(words, words[1:], strict=False))
        return len(set(bigrams)) / len(bigrams) < 0.5
    return False


def _is_echo(text: str, prompt: str) -> bool:
    """At least 80% of the answer's word 3-grams (counted with repeats) also occur in the prompt; answers of
    fewer than 3 words are never an echo (a one-word answer that the prompt happens to contain is an answer)."""
    words = _words(text)
    if len(words) < 3:
        return False
    grams = list(zip(words, words[1:], words[2:], strict=False))
    p = _words(prompt)
    in_prompt = set(zip(p, p[1:], p[2:], strict=False))
    return sum(g in in_prompt for g in grams) / len(grams) >= ECHO_SHARE


def is_degenerate(text: str) -> bool:
    """An answer that is no answer: empty, mostly one repeated symbol, or a loop of the same few words (fewer
    than half of its word bigrams distinct, from 8 words on). The collapse the seed runs ended in."""
    stripped = text.strip()
    return not stripped or _is_repetition(stripped)


def degenerate_reason(text: str, prompt: str | None = None) -> str | None:
    """Why an answer is degenerate: "empty" (nothing but whitespace), "repetition" (as :func:`is_degenerate`),
    "echo" (mostly the prompt handed back, checked only when ``prompt`` is given), or None for a real answer.
    The first reason that applies, in that order."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if _is_repetition(stripped):
        return "repetition"
    if prompt is not None and _is_echo(stripped, prompt):
        return "echo"
    return None


def degenerate_share(texts: Sequence[str], prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """{"n", "empty", "repetition", "echo", "degenerate", "share"} over the answers: the count per reason of
    :func:`degenerate_reason`, their total and the share of the n answers (None when there are none).
    ``prompts`` pairs with ``texts`` item by item (None: no echo check)."""
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"degenerate_share needs one prompt per answer: {len(prompts)} prompts, {len(texts)} answers")
    reasons = Counter(degenerate_reason(t, None if prompts is None else prompts[i]) for i, t in enumerate(texts))
    out: dict[str, Any] = {"n": len(texts), **{r: reasons[r] for r in REASONS}}
    out["degenerate"] = sum(out[r] for r in REASONS)
    out["share"] = out["degenerate"] / len(texts) if texts else None
    return out
