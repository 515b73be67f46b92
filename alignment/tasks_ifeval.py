"""IFEval-style instruction-following prompts as a prompts source, graded by IFEval's own checkers.

A data source ``ifeval:N`` builds N prompts: a plain request about a topic ("Describe the ocean.")
followed by one verifiable instruction written like IFEval's ("Your entire response should be in English,
and in all lowercase letters. No capital letters are allowed."). Each record carries ``gold_checker``
"ifeval" and ``gold_answer`` IFEval's own row format, ``{"instruction_id_list": [...], "kwargs": [...]}``,
which :func:`alignment.ifeval.check_reference` grades; ``task`` is the instruction kind, ``question`` the
request, ``topic`` its topic, ``split`` train or validation.

Of N, ``round(N * validation_fraction)`` (at least 1) are held out, as the data stage splits any source;
the held-out prompts are about a DISJOINT set of topics (a seeded ``round(len(TOPICS) *
validation_fraction)`` of :data:`TOPICS`), and :func:`check_disjoint` refuses a topic in both splits.
The kinds take turns (the prompts are spread evenly over them) and everything is seeded.

The kinds used (:data:`INSTRUCTIONS`) are those a 135M chat model can plausibly satisfy and that a
degenerate answer cannot trivially satisfy; kinds that a short answer ("ok") would meet are paired with
"Answer with at least N words." (length_constraints:number_words), and every instruction sentence is
written so that a copy of the prompt does not follow it. :data:`LEFT_OUT` gives the reason for each of
the registry's other kinds.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from alignment.ifeval import CHECKER
from alignment.tasks_gym import split_sizes

PREFIX = "ifeval:"
_SPEC = re.compile(r"^ifeval:(\d+)$")

TOPICS = (
    "the ocean", "a forest", "the moon", "a farm", "bread", "rain", "a library", "bicycles", "the desert",
    "honey bees", "volcanoes", "a city park", "trains", "the night sky", "coffee", "a river", "snow", "mountains",
    "a school day", "gardening", "cats", "dogs", "the sun", "a birthday party", "apples", "the wind", "music",
    "a lighthouse", "penguins", "a kitchen", "soup", "autumn", "spring", "the post office", "a museum",
    "bridges", "elephants", "a market", "the beach", "clouds", "a castle", "chess", "a camping trip", "owls",
    "tea", "a bakery", "islands", "a zoo", "kites", "the rainforest", "a small village", "whales", "books",
    "a thunderstorm", "a picnic", "butterflies", "a train station", "a fire station", "sunflowers", "the harbour",
)
"""Plain topics; train and held-out prompts are about disjoint subsets of them."""

REQUESTS = ("Describe {topic}.", "Write a short paragraph about {topic}.", "Tell me some facts about {topic}.",
            "Explain {topic} to a child.")

_WORDS = "length_constraints:number_words"
_END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Have a nice day.")


def _at_least(n: int) -> tuple[str, dict[str, Any], str]:
    return _WORDS, {"num_words": n, "relation": "at least"}, f"Answer with at least {n} words."


def _with_length(kind: str, sentence: str, lengths=(15, 25)) -> list[list[tuple[str, dict[str, Any], str]]]:
    """One variant per length: the instruction, then "Answer with at least N words."."""
    return [[(kind, {}, sentence), _at_least(n)] for n in lengths]


INSTRUCTIONS: dict[str, list[list[tuple[str, dict[str, Any], str]]]] = {
    "punctuation:no_comma": _with_length(
        "punctuation:no_comma", "In your entire response, refrain from the use of any commas."),
    "change_case:english_lowercase": _with_length(
        "change_case:english_lowercase", "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed."),
    "change_case:english_capital": _with_length(
        "change_case:english_capital", "Your entire response should be in English, and in all capital letters."),
    "startend:quotation": _with_length(
        "startend:quotation", "Wrap your entire response with double quotation marks."),
    "detectable_format:json_format": _with_length(
        "detectable_format:json_format", "Entire output should be wrapped in JSON format. You can use markdown "
        "ticks such as ```.", (10, 15)),
    "detectable_format:number_bullet_lists": [
        [("detectable_format:number_bullet_lists", {"num_bullets": n},
          f"Your answer must contain exactly {n} bullet points. Use markdown bullet points: start each point on a "
          "new line with an asterisk and a space.")] for n in (2, 3, 4)],
    "detectable_format:title": [
        [("detectable_format:title", {}, "Your answer must contain a title, wrapped in double angular brackets: "
          "two < signs before the title and two > signs after it.")]],
    "startend:end_checker": [
        [("startend:end_checker", {"end_phrase": phrase},
          f'Finish your response with this exact phrase: "{phrase}". No other words should follow this phrase.')]
        for phrase in _END_PHRASES],
    "length_constraints:number_paragraphs": [
        [("length_constraints:number_paragraphs", {"num_paragraphs": n},
          f"There should be {n} paragraphs. Paragraphs are separated with the markdown divider: ***")]
        for n in (2, 3)],
    "detectable_format:number_highlighted_sections": [
        [("detectable_format:number_highlighted_sections", {"num_highlights": n},
          f"Highlight at least {n} {'section' if n == 1 else 'sections'} in your answer with markdown, by putting "
          "a single asterisk before and after each highlighted part.")] for n in (1, 2, 3)],
    "detectable_content:number_placeholders": [
        [("detectable_content:number_placeholders", {"num_placeholders": n},
          f"The response must contain at least {n} {'placeholder' if n == 1 else 'placeholders'} represented by "
          "square brackets, standing for a name or a place.")] for n in (1, 2)],
    "detectable_format:multiple_sections": [
        [("detectable_format:multiple_sections", {"section_spliter": word, "num_sections": n},
          f"Your response must have {n} sections. Mark the beginning of each section with {word} X, where X is "
          "the number of the section.")] for word in ("Section", "SECTION") for n in (2, 3)],
}
"""Kind -> its variants; a variant is the (instruction id, kwargs, instruction sentence) list of one
prompt: the kind's own instruction, and for kinds a short answer would meet, a minimum word count."""

USED_KINDS = (*INSTRUCTIONS, _WORDS)
"""Every IFEval kind the prompts use (number_words only with another instruction)."""

LEFT_OUT = {
    _WORDS: "alone, 'less than N words' is met by any short answer and 'at least N words' by a repetition loop "
            "(it is used only as the companion of kinds a short answer would meet)",
    "keywords:existence": "the instruction names the keywords, so a copy of the prompt contains them",
    "keywords:frequency": "the instruction names the keyword, so a copy of the prompt holds it once; the checker "
                          "also counts substrings ('cat' in 'education')",
    "keywords:forbidden_words": "an empty-ish or off-topic short answer avoids any word: nothing to learn",
    "keywords:letter_frequency": "letter counts are beyond a 135M model's control, and 'less than' is met by a "
                                 "short answer",
    "language:response_language": "a 135M English chat model cannot write other languages plausibly, and "
                                  "'English' is met by anything English",
    "length_constraints:nth_paragraph_first_word": "paragraph counting and a first word at once are beyond a "
                                                   "135M model",
    "length_constraints:number_sentences": "left out of the checkers (needs nltk's punkt data; alignment.ifeval)",
    "change_case:capital_word_frequency": "left out of the checkers (needs nltk's punkt data; alignment.ifeval)",
    "detectable_content:postscript": "the instruction must name the marker (P.S.) and the checker finds it on "
                                     "any line, so a copy of the prompt passes",
    "detectable_format:constrained_response": "the instruction lists the allowed answers, so a copy of the prompt "
                                              "passes, and one fixed sentence answers every prompt",
    "combination:two_responses": "two trivial answers split by ****** pass, and it is beyond a 135M model",
    "combination:repeat_prompt": "it asks for a copy of the prompt, the degenerate answer itself",
}
"""The IFEval registry's kinds the prompts do not use as their own kind, with the reason."""


class IfevalSourceError(ValueError):
    """An ``ifeval:`` source that cannot be built (a bad spec, too many prompts, overlapping topics)."""


def parse_spec(spec: str) -> int:
    """N of a source spec ``ifeval:N`` (at least 2: train and held-out)."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise IfevalSourceError(f"ifeval source {spec!r}: expected ifeval:N, N the number of prompts (e.g. "
                                "ifeval:200)")
    size = int(match.group(1))
    if size < 2:
        raise IfevalSourceError(f"ifeval source {spec!r}: needs at least 2 prompts (train and held-out)")
    return size


def split_topics(seed: int, validation_fraction: float) -> dict[str, list[str]]:
    """The seeded, disjoint train and held-out topic sets."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    n_val = split_sizes(len(topics), validation_fraction)["validation"]
    return {"train": topics[n_val:], "validation": topics[:n_val]}


def _record(topic: str, request: str, kind: str, variant, split: str) -> dict[str, Any]:
    question = request.format(topic=topic)
    ref = {"instruction_id_list": [i for i, _, _ in variant], "kwargs": [k for _, k, _ in variant]}
    return {"prompt": " ".join([question, *(s for _, _, s in variant)]), "gold_answer": json.dumps(ref),
            "gold_checker": CHECKER, "task": kind, "split": split, "question": question, "topic": topic}


def _split_records(topics: list[str], split: str, size: int, rng: random.Random) -> list[dict[str, Any]]:
    """``size`` distinct prompts about ``topics``, the kinds taking turns (each kind's prompts shuffled)."""
    pools = []
    for kind, variants in INSTRUCTIONS.items():
        pool = [(t, r, kind, v) for t in topics for r in REQUESTS for v in variants]
        rng.shuffle(pool)
        pools.append(pool)
    rng.shuffle(pools)
    available = sum(len(p) for p in pools)
    if size > available:
        raise IfevalSourceError(f"ifeval source: {size} {split} prompts asked, but its {len(topics)} topics give "
                                f"{available}; ask for fewer prompts")
    picked = [pool[i] for i in range(max(len(p) for p in pools)) for pool in pools if i < len(pool)][:size]
    return [_record(*item, split) for item in picked]


def build_items(size: int, seed: int, validation_fraction: float) -> list[dict[str, Any]]:
    """``size`` prompt records, train then held-out (``split`` names which), about disjoint topics."""
    sizes = split_sizes(size, validation_fraction)
    topics = split_topics(seed, validation_fraction)
    rng = random.Random(seed)
    out = [r for split in ("train", "validation") for r in _split_records(topics[split], split, sizes[split], rng)]
    check_disjoint(out)
    return out


def check_disjoint(records: list[dict[str, Any]]) -> None:
    """Raise :class:`IfevalSourceError` (one line, naming the topic) when a held-out topic is also a training
    topic."""
    train = {r["topic"] for r in records if r["split"] == "train"}
    for r in records:
        if r["split"] != "train" and r["topic"] in train:
            raise IfevalSourceError(f"ifeval source: the held-out topic {r['topic']!r} also occurs in the training "
                                    "prompts")
