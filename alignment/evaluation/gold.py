"""Gold checks: does a free-form completion state a prompt's reference answer?

A prompt may carry a reference answer and a checker kind, one of :data:`CHECKERS`:

``number``
    The reference is a number ("26", "-3.5", "1,200", "0.25", "3/4", "1e3") or LaTeX that math-verify
    reads as one ("\\frac{1}{2}", "\\sqrt{2}"); one with words ("26 apples"), a percent sign or no finite
    value is refused. Both are read as exact values (a plain decimal as a SymPy rational, LaTeX by
    math-verify). The completion's final stated number (:func:`extract_number`) is right when
    math-verify's ``verify`` finds it equal (symbolically: ``2\\sqrt{3}`` is ``\\sqrt{12}``, "0.50" is
    "1/2"), or when ``abs(got - ref) <= max(tolerance, 1e-9 * max(abs(got), abs(ref)))`` -- an absolute
    tolerance (default 1e-6) or a relative one of 1e-9, whichever is looser, computed exactly. Chosen
    so the documented tolerance keeps deciding for decimals: math-verify compares exact values exactly
    and rounds floats to 6 decimals, either of which differs from it ("10000000000.5" is 10000000000
    within 1e-9, "2.0000006" is 2 within 1e-6; with ``tolerance=0`` "0.333333" is not 1/3). math-verify
    runs bounded (:mod:`alignment.evaluation.mathverify`: a length cap, a timeout, no power towers).
``exact``
    The completion's final short answer (:func:`extract_answer`) equals the reference after
    :func:`normalise`.
``contains``
    The normalised reference occurs in the normalised completion as whole words ("Parisian" does not
    contain "paris"), and its last occurrence is not directly negated ("not Paris", "isn't Paris").
``constraints``
    The reference is a JSON object of verifiable instruction-following constraints (IFEval-style, as
    Tulu 3's RLVR rewards), e.g. ``{"max_words": 20, "lowercase": true, "must_include": ["blue"]}``; the
    completion is right when every constraint holds (:func:`check_constraints` gives the breakdown,
    :data:`CONSTRAINTS` lists the kinds and what each means; those with an IFEval equivalent,
    :data:`IFEVAL_EQUIVALENTS`, are graded by Google's IFEval checker).
``ifeval``
    The reference is an IFEval row's instructions, ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}``;
    the completion is right when it follows every instruction by lm-eval's IFEval checkers (strict
    evaluation; :mod:`alignment.ifeval`).
``reasoning_gym``
    The reference is a JSON reference to a reasoning-gym item (``alignment.tasks_gym``); the completion
    is right when the dataset's own ``score_answer`` gives it full credit (1.0) on its ``<answer>`` tag
    or final line (:func:`alignment.tasks_gym.score`; partial credit is not a right answer).

With ``prompt`` given, text in the completion that restates the question is ignored: a verbatim copy
of the prompt, and copies of its arithmetic expressions or assignments (``13 + 13``, ``x = 5``).

Decisions: simple fractions ``a/b`` without spaces are read as their value, so "3/4" gives 0.75; the
final answer is found by the rules of :func:`extract_number`, and LaTeX in it is read by math-verify
(``\\boxed{...}`` content, ``\\frac{1}{2}``, ``\\frac12``, ``1{,}000``). A percent sign is not part of
the number: "50%" and ``\\boxed{50\\%}`` state 50 (a question asking for a percentage has the gold
answer 50). Not supported: numbers in words ("twenty-six"), scientific notation in completions,
thousands separated by spaces.
"""

from __future__ import annotations

import json
import re
import unicodedata

from alignment import ifeval, tasks_gym
from alignment.evaluation import mathverify

CHECKERS = ("number", "exact", "contains", "constraints", tasks_gym.CHECKER, ifeval.CHECKER)


class GoldCheckError(ValueError):
    """An unknown checker kind, or a reference the checker cannot use."""


# A number in free text: not glued to a word on its left ("COVID19", "COVID-19"), a "-" is a sign only
# when it does not follow a word ("99-28" is 99 and 28), a "." is a decimal point only before a digit.
_BODY = r"\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?"
_NUM = rf"(?<![\w./])(?<![A-Za-z]-)-?{_BODY}(?![\d/_]|[.,]\d)"
_NUM_RE = re.compile(_NUM)
_QUAL = r"(?:(?:approximately|about|roughly|around|exactly|just|equal to|:)\s*)*"
# Explicit answers: "\boxed{X}", "the answer is X", "final answer: X", "result = X", "X is the answer".
_STRONG = re.compile(
    rf"\\boxed\{{\s*({_NUM})"
    rf"|\b(?:answer|result)\b[^\d.?!\n]{{0,40}}?(?:\bis|\bwas|\bbe|\bequals|=|:)\s*{_QUAL}({_NUM})"
    rf"|({_NUM})\s+is\s+(?:the\s+|my\s+)?(?:final\s+|correct\s+)?answer\b",
    re.I,
)
# Statements: "is X", "equals X", "= X", "makes X", "it's X".
_WEAK = re.compile(
    rf"(?:\bis|\bequals|\bequal to|\bmakes|\bgives|\bcomes to|\b(?:it|that)['’]s|=)\s*{_QUAL}({_NUM})", re.I
)
_OPERATOR_NEXT = re.compile(r"\s*[-+*/x^]\s*\d")  # "is 13 + 13" starts an expression, not an answer
_NEGATION_BEFORE = re.compile(
    r"(?:\bnot|n['’]t|\bnever|\binstead of|\brather than)\s+(?:(?!but\b)[a-z]+\s+){0,2}$", re.I
)
# Justification is not the answer: "(multiply by 9/5, then add 32)", "because 1 metre is 100 centimetres".
_JUSTIFICATION = re.compile(r"\([^()]*\)|\b(?:because|since|given that)\b[^.!?\n]*", re.I)
_EXPRESSION = re.compile(rf"{_NUM}(?:\s*[-+*/x^]\s*{_NUM})+|\b[A-Za-z]\w*\s*=\s*{_NUM}")
_LATEX = (
    (r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2"),
    (r"\\text\{([^{}]*)\}", r" \1"),
    (r"\$([^$]*)\$", r"\1"),
    (r"\{,\}", ","),
    (r"\*\*|__|\\[()\[\],!;]|\\left|\\right", ""),
    (r"\\times|\\cdot|[×·]", "*"),
    (r"\\div|÷", "/"),
    ("[−–]", "-"),
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_ARG = r"(?:\{(?:[^{}]|\{[^{}]*\})*\}|\d)"  # "{...}" (one level of braces inside) or one digit
_FRAC = re.compile(rf"\\[dt]?frac\s*{_FRAC_ARG}\s*{_FRAC_ARG}")
_QUOTED = re.compile(r"\"([^\"\n]+)\"|“([^”\n]+)”|‘([^’\n]+)’|`([^`\n]+)`|(?<!\w)'([^'\n]+)'(?!\w)")
_STATED = re.compile(r"\b(?:answer|result)\s*(?:is|:|=)\s*:?\s*([^.,;!?\n]+)", re.I)
_SENTENCE_END = re.compile(r".*(?:\bis|\bare|:|=)\s*(.+?)[.!\s]*$", re.I)
_NEGATIONS = {"not", "no", "never", "nor", "neither", "isnt", "arent", "wasnt", "werent"}
_FILLERS = {"the", "a", "an", "in", "at", "actually", "really", "called"}
_SHORT = 5  # most words in a short answer


def normalise(text: str) -> str:
    """Case-folded, accents removed (NFKD), punctuation and surrounding quotes stripped, whitespace
    collapsed.

    Apostrophes are deleted ("isn't" -> "isnt"); other punctuation becomes a space ("Port-au-Prince" ->
    "port au prince"); symbols such as "+" or "$" are kept.
    """
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub("['’]", "", text.casefold())
    return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c for c in text).split())


def _clean(text: str) -> str:
    """Markdown and LaTeX markup removed ("**26**", "$26$", "\\frac{3}{4}" -> "3/4"); "\\boxed" is kept."""
    for pattern, replacement in _LATEX:
        text = re.sub(pattern, replacement, text)
    return text


def _loose(piece: str) -> str:
    """A regex for ``piece`` that ignores whitespace and case, anchored at word edges."""
    body = r"\s*".join(re.escape(c) for c in piece if not c.isspace())
    before = "(?<![\\w.])" if piece[0].isalnum() else ""
    return before + body + ("(?![\\w]|\\.\\d)" if piece[-1].isalnum() else "")


def _mask_question(text: str, prompt: str | None) -> str:
    """``text`` (already cleaned) with restatements of the prompt and its expressions replaced by " § "."""
    if not prompt or not prompt.strip():
        return text
    prompt = _clean(prompt).strip()
    for piece in sorted({prompt, *(m.group() for m in _EXPRESSION.finditer(prompt))}, key=len, reverse=True):
        text = re.sub(_loose(piece), " § ", text, flags=re.I)
    return text


def _value(token: str) -> float | None:
    token = token.replace(",", "")
    if "/" in token:
        numerator, denominator = token.split("/")
        return float(numerator) / float(denominator) if float(denominator) else None
    return float(token)


def _negated(text: str, at: int) -> bool:
    return bool(_NEGATION_BEFORE.search(text[max(0, at - 40):at]))


def extract_number(text: str, prompt: str | None = None) -> float | None:
    """The final numeric answer stated in a free-form completion, or None.

    Rules, in order (restatements of ``prompt`` are masked out first, see the module docstring):

    1. the last explicit answer: ``\\boxed{X}``, "the answer is X", "final answer: X", "X is the answer";
    2. the last statement "is X", "equals X", "= X", "makes X", "it's X" -- so "13 + 13 = 26" gives 26 --
       unless X starts an expression ("is 13 + 13") or the statement is negated ("is not equal to 23");
    3. the last number that is not negated ("not 23", "instead of 23") and does not merely repeat a
       number of the prompt (an operand of the question).

    Numbers: "1,200" is 1200, "26." is 26 (a sentence-final period), "-7" is -7, "3/4" is 0.75, units
    may follow ("26 cm"), a number glued to a word ("COVID19") is not one. LaTeX is read by math-verify
    (:func:`_latex_numbers`): ``\\boxed{...}`` content, ``\\frac{1}{2}`` and ``\\frac12``.

    Justifications -- parentheses and "because / since ..." clauses -- are read only when the rest
    states no number: "There are 3100 cm in 31 m, because 1 m is 100 cm" gives 3100.
    """
    value = _read(_final_answer(text, prompt))
    return None if value is None else float(value)


def _read(token: str | None):
    """The exact value of a number token or LaTeX number (:func:`mathverify.read_number`), or None (also
    for one too large to evaluate)."""
    try:
        return mathverify.read_number(token) if token else None
    except mathverify.TooLarge:
        return None


def _final_answer(text: str, prompt: str | None) -> str | None:
    """The number token :func:`extract_number` picks (e.g. "1,200", "-3/4"), or None."""
    prompt = _latex_numbers(prompt) if prompt else prompt
    text = _mask_question(_clean(_latex_numbers(text or "")), prompt)
    stated = _JUSTIFICATION.sub(" ", text)
    if stated != text:
        found = _final_number(stated, prompt)
        if found is not None:
            return found
    return _final_number(text, prompt)


def _final_number(text: str, prompt: str | None) -> str | None:
    """Rules 1-3 of :func:`extract_number` on masked, cleaned text: the chosen number token."""
    strong = [m for m in _STRONG.finditer(text) if not _negated(text, m.start())]
    if strong:
        return next(g for g in strong[-1].groups() if g)
    for m in reversed(list(_WEAK.finditer(text))):
        if not _negated(text, m.start()) and not _OPERATOR_NEXT.match(text, m.end()):
            return m.group(1)
    operands = {_value(m.group()) for m in _NUM_RE.finditer(_clean(prompt or ""))}
    for m in reversed(list(_NUM_RE.finditer(text))):
        value = _value(m.group())
        if value is not None and value not in operands and not _negated(text, m.start()):
            return m.group()
    return None


def _latex_numbers(text: str) -> str:
    """``text`` with the LaTeX numbers math-verify reads written as plain number tokens.

    ``\\boxed{X}`` (or ``\\fbox``): X, percent signs dropped, when math-verify reads it as one number
    ("\\boxed{\\frac{1}{2}}" -> "\\boxed{1/2}", "\\boxed{1{,}000}" -> "\\boxed{1000}"); a number too large to
    evaluate (:class:`mathverify.TooLarge`) states nothing (" § "). Then every ``\\frac``, ``\\dfrac``,
    ``\\tfrac`` with braced or one-digit arguments ("\\frac12" -> "1/2"), as :func:`mathverify.fraction` writes them;
    what math-verify does not read as a number stays as it was."""
    out, at = [], 0
    for m in _BOXED.finditer(text):
        if m.start() < at:
            continue
        end = _closing_brace(text, m.end())
        if end is None:
            break
        content = text[m.end():end]
        try:
            token = mathverify.fraction(mathverify.read_number(re.sub(r"\\?%", "", content)))
        except mathverify.TooLarge:
            out += [text[at:m.start()], " § "]
        else:
            out += [text[at:m.end()], token if token is not None else content, "}"]
        at = end + 1
    text = "".join(out) + text[at:]
    return _FRAC.sub(lambda m: mathverify.fraction(_read(m.group())) or m.group(), text)


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the "}" that closes the "{" just before ``start``, or None."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _in_prompt(answer: str, prompt: str | None) -> bool:
    return bool(prompt) and f" {normalise(answer)} " in f" {normalise(prompt)} "


def extract_answer(text: str, prompt: str | None = None) -> str | None:
    """The final short answer stated in a completion (for string checkers), normalised, or None.

    Rules, in order (restatements of ``prompt`` are masked out first):

    1. after "answer is" / "answer:" / "result is": a quoted span, or up to the next punctuation when
       that is at most five words;
    2. the last quoted span ('x', "x", curly quotes, backticks) that is not a word of the prompt, else the
       last quoted span;
    3. after the last "is" / "are" / ":" / "=" of the last sentence that does not end in "?", when that is
       at most five words ("The reversed word is olleh.");
    4. the whole completion when it is at most five words.
    """
    text = _mask_question(_clean(text or ""), prompt)
    candidates = []
    for m in reversed(list(_STATED.finditer(text))):
        quoted = _QUOTED.match(m.group(1).strip())
        candidates.append(next(g for g in quoted.groups() if g) if quoted else m.group(1))
    quotes = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(text)]
    candidates += [q for q in quotes if not _in_prompt(q, prompt)][-1:] or quotes[-1:]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s and not s.endswith("?")]
    end = _SENTENCE_END.match(sentences[-1]) if sentences else None
    candidates += [end.group(1)] if end else []
    candidates.append(text)
    for candidate in candidates:
        answer = normalise(candidate)
        if answer and len(answer.split()) <= _SHORT:
            return answer
    return None


def _contains(completion: str, reference: str, prompt: str | None) -> bool:
    text = normalise(_mask_question(_clean(completion or ""), prompt))
    hits = list(re.finditer(rf"(?<!\w){re.escape(reference)}(?!\w)", text))
    if not hits:
        return False
    before = text[: hits[-1].start()].split()
    while before and before[-1] in _FILLERS:
        before.pop()
    return not (before and before[-1] in _NEGATIONS)


def _parse_reference(reference: str):
    """The exact value of a ``number`` reference: a plain number ("26", "-3.5", "1,200", "3/4", "1e3") or
    LaTeX that math-verify reads as one finite number ("\\frac{1}{2}", "$\\sqrt{2}$"). Refused (one line):
    anything with words ("26 apples", "twenty-six", "nan"), a percent sign (50 or 0.5? write which),
    no finite number ("1/0"), or a number too large to evaluate."""
    text = reference.strip()
    words = re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", text)) and not mathverify.is_plain(text)
    try:
        value = None if words or "%" in text else mathverify.read_number(text)
    except mathverify.TooLarge:
        value = None
    if value is None:
        hint = ": a percent sign is ambiguous, write 50 or 0.5" if "%" in text else ""
        raise GoldCheckError(f"gold reference {reference!r} is not a number (checker 'number'){hint}")
    return value


def check_answer(completion: str, reference: str, checker: str, *, prompt: str | None = None,
                 tolerance: float = 1e-6, lenient: bool = False) -> bool:
    """True when the completion's final answer matches the reference under the checker kind.

    ``number``: the final answer :func:`extract_number` finds equals the reference by math-verify or within
    ``tolerance`` (absolute) or 1e-9 (relative) (:func:`mathverify.same_number`);
    ``exact``: :func:`extract_answer` equals the normalised reference; ``contains``: the normalised
    reference appears as whole words and its last occurrence is not negated; ``constraints``: every
    constraint of the JSON spec holds (:func:`check_constraints`; ``prompt`` and ``tolerance`` unused);
    ``ifeval``: every instruction of the IFEval row holds (:func:`alignment.ifeval.check_reference`, given the
    ``prompt``);
    ``reasoning_gym``: the dataset's scorer gives full credit (:func:`alignment.tasks_gym.score`); ``lenient``:
    or, for a numeric gold answer, the answer (the ``<answer>`` tag, else the last line) states it as the
    ``number`` checker reads it, the prompt's own expressions masked ("The sum is 6." and "8 - 2 = 6" state 6;
    a copy of the question's "8 - 2 =" states nothing, though math-verify would evaluate it to 6). Raises :class:`GoldCheckError`
    for an unknown checker, a ``number`` reference that does not parse, a bad constraints spec or IFEval
    row, or a reference that normalises to nothing.
    """
    if checker not in CHECKERS:
        raise GoldCheckError(f"unknown gold checker {checker!r}; known checkers: {', '.join(CHECKERS)}")
    reference = str(reference)
    if checker == "constraints":
        return all(check_constraints(completion, reference).values())
    if checker == tasks_gym.CHECKER:
        if _library_call(tasks_gym.score, completion, reference) >= 1.0:
            return True
        return lenient and _lenient_gym(completion, reference, prompt, tolerance)
    if checker == ifeval.CHECKER:
        return all(_library_call(ifeval.check_reference, completion, reference, prompt).values())
    if checker == "number":
        expected = _parse_reference(reference)
        got = _read(_final_answer(completion, prompt))
        return got is not None and mathverify.same_number(expected, got, tolerance)
    expected = normalise(reference)
    if not expected:
        raise GoldCheckError(f"gold reference {reference!r} is empty after normalising (checker {checker!r})")
    if checker == "exact":
        return extract_answer(completion, prompt) == expected
    return _contains(completion, expected, prompt)


def validate_reference(reference: str, checker: str) -> None:
    """Raise :class:`GoldCheckError` when ``checker`` is unknown or ``reference`` cannot be checked with it
    (what the data stage runs on every row that carries a gold answer)."""
    if checker not in CHECKERS:
        raise GoldCheckError(f"unknown gold checker {checker!r}; known checkers: {', '.join(CHECKERS)}")
    if checker == "number":
        _parse_reference(str(reference))
    elif checker == "constraints":
        parse_constraints(reference)
    elif checker == tasks_gym.CHECKER:
        _library_call(tasks_gym.parse_reference, reference)
    elif checker == ifeval.CHECKER:
        _library_call(ifeval.parse_reference, reference)
    elif not normalise(str(reference)):
        raise GoldCheckError(f"gold reference {reference!r} is empty after normalising (checker {checker!r})")


def _lenient_gym(completion: str, reference: str, prompt: str | None, tolerance: float) -> bool:
    """A reasoning-gym item with a numeric gold answer whose answer states that number (``check_answer``'s
    ``lenient``); False for a non-numeric gold answer (words, lists: scored strictly only)."""
    gold = _library_call(tasks_gym.reference_answer, reference)
    answer = tasks_gym.extract_answer(completion)
    if answer is None or _read(gold) is None:
        return False
    return check_answer(answer, gold, "number", prompt=prompt, tolerance=tolerance)


def _library_call(fn, *args):
    """``fn(*args)`` of :mod:`alignment.tasks_gym` or :mod:`alignment.ifeval`, its refusals raised as
    :class:`GoldCheckError`."""
    try:
        return fn(*args)
    except (tasks_gym.GymError, ifeval.IfevalError) as exc:
        raise GoldCheckError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# constraints: verifiable instruction following (IFEval-style)
# --------------------------------------------------------------------------------------------
CONSTRAINTS = {
    "min_words": "at least N words (N a positive integer); IFEval's words: runs of \\w",
    "max_words": "at most N words; IFEval's words: runs of \\w",
    "max_sentences": "at most N sentences (hand-written: IFEval's sentence count needs nltk's punkt data)",
    "lowercase": "true: no uppercase letter anywhere (hand-written: IFEval's english_lowercase also asks for English)",
    "uppercase": "true: no lowercase letter anywhere, and at least one letter (hand-written, as lowercase)",
    "no_commas": "true: IFEval's no_comma, no ',' (the full-width '，' is allowed)",
    "must_include": "a word or phrase, or a list of them: each occurs as whole words, case-insensitively",
    "must_exclude": "a word or phrase, or a list of them: none occurs as whole words, case-insensitively",
    "starts_with": "a phrase the answer begins with (case-insensitive)",
    "ends_with": "IFEval's end_checker: a phrase the answer ends with (case-insensitive), nothing after it but a '\"'",
    "json": "true: IFEval's json_format, the answer is JSON (any value; ```json fences are dropped)",
    "bullets": "IFEval's number_bullet_lists: exactly N lines starting with '*' (not '**') or '-' (N >= 1)",
}
"""The constraint kinds of the ``constraints`` checker. Those in :data:`IFEVAL_EQUIVALENTS` are graded by
Google's IFEval checker (lm-eval's, strict: on the completion as it is, and an empty completion meets none
of them); the others run on the completion with its surrounding whitespace stripped. Sentences are the
pieces between sentence-ending punctuation (. ! ? … and the CJK 。！？) followed by whitespace, and between
lines, that hold a word (so an abbreviation such as "e.g. " ends a sentence). Phrases (must_include,
must_exclude) are compared after :func:`normalise`, so case, accents and punctuation do not matter.

Kept hand-written, with no IFEval equivalent of the same meaning: ``max_sentences`` (IFEval's
number_sentences needs nltk's punkt data, :data:`alignment.ifeval.LEFT_OUT`), ``must_include`` (IFEval's
keywords:existence matches a substring as a regular expression: "waves" is in "microwaves"),
``must_exclude`` (keywords:forbidden_words reads each word as a regular expression, so "c++" raises and
"a.b" matches "axb"), ``starts_with`` (IFEval has no start-phrase kind in its registry), ``lowercase`` and
``uppercase`` (IFEval's english_lowercase / english_capital also require langdetect to read the text as
English, which it often does not on a short answer: "it is vast and quiet and green." is refused; the
``ifeval`` checker uses them, with IFEval's own instruction text that asks for English)."""

IFEVAL_EQUIVALENTS = {
    "min_words": ("length_constraints:number_words", lambda n: {"num_words": n, "relation": "at least"}),
    # IFEval has "less than" only: at most N words is less than N + 1
    "max_words": ("length_constraints:number_words", lambda n: {"num_words": n + 1, "relation": "less than"}),
    "no_commas": ("punctuation:no_comma", None),
    "ends_with": ("startend:end_checker", lambda phrase: {"end_phrase": phrase}),
    "json": ("detectable_format:json_format", None),
    "bullets": ("detectable_format:number_bullet_lists", lambda n: {"num_bullets": n}),
}
"""Constraint kind -> (IFEval instruction id, its kwargs from the constraint's value): the kinds graded by
IFEval's checker. Where the meaning shifts: words are IFEval's runs of ``\\w`` ("don't" and "3.5" are two
words each); the full-width comma passes no_commas; any JSON value (an array, a bare number) passes json; bullets count lines
starting with '*' or '-' (a "-x" line and a "---" rule count, '•' does not)."""

_COUNTS = ("min_words", "max_words", "max_sentences", "bullets")
_FLAGS = ("lowercase", "uppercase", "no_commas", "json")
_WORD_LISTS = ("must_include", "must_exclude")
_PHRASES = ("starts_with", "ends_with")
_WORD = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…。！？])\s+|\n+|(?<=[。！？])")
MAX_CONSTRAINT_COUNT = 100_000  # a bound far above any completion, so a typo (1e12) is an error


def _spec_error(name: str, message: str) -> GoldCheckError:
    return GoldCheckError(f"constraint {name!r}: {message}")


def parse_constraints(reference: str | dict) -> dict:
    """The constraints spec of a ``constraints`` reference (a JSON object text, or the object itself),
    validated: every name one of :data:`CONSTRAINTS`, counts positive integers, flags ``true``, phrases
    non-empty text, the word lists text or lists of text (returned as lists), and no contradiction
    (``min_words`` above ``max_words``, ``lowercase`` with ``uppercase``, a word both required and
    forbidden). Raises :class:`GoldCheckError` naming the constraint."""
    if isinstance(reference, str):
        try:
            spec = json.loads(reference)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise GoldCheckError(f"gold reference {cut_repr(reference)} is not a JSON object of constraints "
                                 f"(checker 'constraints'): {exc}") from None
    else:
        spec = reference
    if not isinstance(spec, dict):
        raise GoldCheckError(f"gold reference {cut_repr(reference)} is not a JSON object of constraints "
                             "(checker 'constraints')")
    if not spec:
        raise GoldCheckError("gold reference {} names no constraint (checker 'constraints'; known: "
                             f"{', '.join(CONSTRAINTS)})")
    out: dict = {}
    for name, value in spec.items():
        if name not in CONSTRAINTS:
            raise _spec_error(name, f"unknown constraint; known constraints: {', '.join(CONSTRAINTS)}")
        if name in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONSTRAINT_COUNT:
                raise _spec_error(name, f"expected a whole number from 1 to {MAX_CONSTRAINT_COUNT:,}, got "
                                        f"{cut_repr(value)}")
            out[name] = value
        elif name in _FLAGS:
            if value is not True:
                raise _spec_error(name, f"expected true (leave the constraint out otherwise), got {cut_repr(value)}")
            out[name] = True
        elif name in _PHRASES:
            if not isinstance(value, str) or not value.strip():
                raise _spec_error(name, f"expected a non-empty phrase, got {cut_repr(value)}")
            out[name] = value.strip()
        else:
            words = [value] if isinstance(value, str) else value
            if not isinstance(words, list) or not words:
                raise _spec_error(name, f"expected a word or a non-empty list of words, got {cut_repr(value)}")
            for i, word in enumerate(words):
                if not isinstance(word, str) or not normalise(word):
                    raise _spec_error(name, f"item {i} is {cut_repr(word)}, not a word or phrase")
            out[name] = list(words)
    if out.get("min_words", 0) > out.get("max_words", MAX_CONSTRAINT_COUNT):
        raise _spec_error("min_words", f"{out['min_words']} is above max_words={out['max_words']}")
    if out.get("lowercase") and out.get("uppercase"):
        raise _spec_error("uppercase", "contradicts lowercase (no text is both)")
    both = {normalise(w) for w in out.get("must_include", [])} & {normalise(w) for w in out.get("must_exclude", [])}
    if both:
        raise _spec_error("must_exclude", f"forbids {sorted(both)[0]!r}, which must_include requires")
    return out


def cut_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_sentences(text: str) -> int:
    """Sentences as :data:`CONSTRAINTS` counts them (``max_sentences``)."""
    return sum(1 for piece in _SENTENCE_SPLIT.split(text) if piece and _WORD.search(piece))


def _has_phrase(text: str, phrase: str) -> bool:
    return f" {normalise(phrase)} " in f" {normalise(text)} "


def _ifeval_holds(completion: str, name: str, value) -> bool:
    """Whether the completion meets constraint ``name`` by its IFEval checker (:data:`IFEVAL_EQUIVALENTS`)."""
    kind, kwargs = IFEVAL_EQUIVALENTS[name]
    return ifeval.check_instructions(completion, [kind], [kwargs(value) if kwargs else {}])[kind]


def check_constraints(completion: str, reference: str | dict) -> dict[str, bool]:
    """Per constraint of the spec (see :data:`CONSTRAINTS`), in the spec's order: does the completion
    (surrounding whitespace stripped) meet it? The ``constraints`` checker is right when all are True.
    Raises :class:`GoldCheckError` for a bad spec (:func:`parse_constraints`)."""
    spec = parse_constraints(reference)
    text = (completion or "").strip()
    result: dict[str, bool] = {}
    for name, value in spec.items():
        if name in IFEVAL_EQUIVALENTS:
            ok = _ifeval_holds(completion or "", name, value)
        elif name == "max_sentences":
            ok = count_sentences(text) <= value
        elif name == "lowercase":
            ok = not any(c.isupper() for c in text)
        elif name == "uppercase":
            ok = any(c.isalpha() for c in text) and not any(c.islower() for c in text)
        elif name == "must_include":
            ok = all(_has_phrase(text, w) for w in value)
        elif name == "must_exclude":
            ok = not any(_has_phrase(text, w) for w in value)
        else:  # starts_with
            ok = text.casefold().startswith(value.casefold())
        result[name] = ok
    return result
