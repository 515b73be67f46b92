"""The ``constraints`` gold checker: IFEval-style verifiable constraints, by hand-written cases.

The kinds with an IFEval equivalent (``gold.IFEVAL_EQUIVALENTS``) are graded by Google's IFEval checkers
(lm-eval); the cases marked "IFEval:" show where that meaning differs from the project's former rules."""

from __future__ import annotations

import json

import pytest

from alignment.evaluation.gold import (
    CHECKERS,
    CONSTRAINTS,
    GoldCheckError,
    check_answer,
    check_constraints,
    count_sentences,
    parse_constraints,
    validate_reference,
)

# (completion, spec, expected)
CASES = [
    # min_words / max_words
    ("The ocean is deep and blue.", {"min_words": 6}, True),
    ("The ocean is deep.", {"min_words": 6}, False),
    ("The ocean is deep and blue.", {"max_words": 6}, True),
    ("The ocean is deep, wide and blue.", {"max_words": 6}, False),
    ("  one two three   \n\n", {"max_words": 3, "min_words": 3}, True),  # surrounding whitespace
    # IFEval: words are runs of \w, so don't, well-known and 3.5 are two words each (10 in all)
    ("Don't stop: a well-known 3.5 km run!", {"max_words": 10}, True),
    ("Don't stop: a well-known 3.5 km run!", {"max_words": 9}, False),
    ("— , ; ! ...", {"min_words": 1}, False),  # punctuation is no word
    ("Café naïve über straße", {"min_words": 4, "max_words": 4}, True),  # unicode letters
    ("日本 と 中国", {"max_words": 3}, True),
    # max_sentences
    ("It is blue. It is deep.", {"max_sentences": 2}, True),
    ("It is blue. It is deep. It is cold!", {"max_sentences": 2}, False),
    ("It is 3.5 km deep and 20.1 km wide.", {"max_sentences": 1}, True),  # decimals do not end a sentence
    ("Is it blue? Yes!", {"max_sentences": 1}, False),
    ("One line\nanother line", {"max_sentences": 1}, False),  # a new line starts a sentence
    ("It is blue.   \n\n", {"max_sentences": 1}, True),
    ("空は青い。海は深い。", {"max_sentences": 1}, False),  # CJK full stops
    # lowercase / uppercase
    ("the ocean is blue, and deep 42.", {"lowercase": True}, True),
    ("the ocean is Blue.", {"lowercase": True}, False),
    ("the ÉCOLE", {"lowercase": True}, False),  # an accented capital
    ("straße café", {"lowercase": True}, True),
    ("THE OCEAN IS BLUE 42!", {"uppercase": True}, True),
    ("THE OCEAN IS bLUE", {"uppercase": True}, False),
    ("42 !", {"uppercase": True}, False),  # no letter at all is not "in capital letters"
    ("ÉCOLE", {"uppercase": True}, True),
    # no_commas
    ("The ocean is blue and deep.", {"no_commas": True}, True),
    ("The ocean is blue, and deep.", {"no_commas": True}, False),
    ("海は青い，深い", {"no_commas": True}, True),  # IFEval: the full-width comma is no comma
    ("It costs 1.200 euros; really.", {"no_commas": True}, True),
    # must_include / must_exclude: whole words, case and punctuation ignored
    ("Waves crash on the shore.", {"must_include": ["waves"]}, True),
    ("Waves crash on the shore.", {"must_include": "waves"}, True),  # a single word as text
    ("The microwaves hum.", {"must_include": ["waves"]}, False),
    ("The sea, the WAVES!", {"must_include": ["sea", "waves"]}, True),
    ("The sea is calm.", {"must_include": ["sea", "waves"]}, False),
    ("Get an umbrella-like hat.", {"must_include": ["umbrella"]}, True),  # a hyphen separates words
    ("Take the New York train.", {"must_include": ["new york"]}, True),  # a phrase
    ("A café by the sea.", {"must_include": ["cafe"]}, True),  # accents ignored
    ("The sea is calm.", {"must_exclude": ["water"]}, True),
    ("The sea is full of Water.", {"must_exclude": ["water"]}, False),
    ("The sea holds waterfalls.", {"must_exclude": ["water"]}, True),
    ("Rain falls, then snow.", {"must_exclude": ["hail", "snow"]}, False),
    # starts_with / ends_with (case-insensitive, after stripping)
    ("Sure, here it is.", {"starts_with": "Sure"}, True),
    ("  \n sure thing", {"starts_with": "Sure"}, True),
    ("I am sure.", {"starts_with": "Sure"}, False),
    ("The sea. Is there anything else?", {"ends_with": "Is there anything else?"}, True),
    ("The sea. Is there anything else?  \n", {"ends_with": "Is there anything else?"}, True),
    ("The sea. is there anything else?", {"ends_with": "Is there anything else?"}, True),
    ("The sea. Is there anything else? Bye.", {"ends_with": "Is there anything else?"}, False),
    ("The sea. Is there anything else", {"ends_with": "Is there anything else?"}, False),  # punctuation counts
    # json
    ('{"topic": "the sea", "fact": "it is salty"}', {"json": True}, True),
    ('  {"a": 1}\n', {"json": True}, True),
    ('```json\n{"a": 1}\n```', {"json": True}, True),
    ('```\n{"a": [1, 2]}\n```', {"json": True}, True),
    ('[1, 2]', {"json": True}, True),  # IFEval: any JSON value, an array too
    ('Here it is: {"a": 1}', {"json": True}, False),
    ("{'a': 1}", {"json": True}, False),  # Python, not JSON
    ('{"a": 1', {"json": True}, False),
    ('{"küste": "weiß"}', {"json": True}, True),
    # bullets: exactly N
    ("- one\n- two\n- three", {"bullets": 3}, True),
    ("* one\n* two\n* three", {"bullets": 3}, True),
    ("Intro:\n  - one\n  * two\n  - three\nDone.", {"bullets": 3}, True),
    ("Intro:\n  - one\n  • two\n  - three\nDone.", {"bullets": 3}, False),  # IFEval: '•' is no bullet
    ("- one\n- two", {"bullets": 3}, False),
    ("- one\n- two\n- three\n- four", {"bullets": 3}, False),
    ("**Bold** start\n-not a bullet\n- one", {"bullets": 2}, True),  # "**" is none; IFEval: "-x" is one
    ("1. one\n2. two\n3. three", {"bullets": 3}, False),  # numbered lists are not bullet points
    # several at once: all must hold
    ("the sea is blue and calm", {"max_words": 20, "lowercase": True, "no_commas": True, "must_include": ["blue"]},
     True),
    ("the sea is blue, and calm", {"max_words": 20, "lowercase": True, "no_commas": True, "must_include": ["blue"]},
     False),
]


@pytest.mark.parametrize(("completion", "spec", "expected"), CASES)
def test_constraint_cases(completion, spec, expected):
    assert check_answer(completion, json.dumps(spec), "constraints") is expected
    assert all(check_constraints(completion, spec).values()) is expected


def test_every_constraint_has_true_and_false_cases():
    single = {(next(iter(spec)), expected) for _, spec, expected in CASES if len(spec) == 1}
    assert single == {(name, e) for name in CONSTRAINTS for e in (True, False)}
    assert "constraints" in CHECKERS and len(CONSTRAINTS) == 12


def test_breakdown_names_each_constraint_in_spec_order():
    spec = {"max_words": 6, "lowercase": True, "ends_with": "Is there anything else?", "no_commas": True}
    assert check_constraints("the sea, Is there anything else?", spec) == {
        "max_words": True, "lowercase": False, "ends_with": True, "no_commas": False}
    assert list(check_constraints("x", json.dumps(spec))) == list(spec)


def test_empty_and_missing_completions():
    # IFEval's strict evaluation: an empty completion follows no instruction; the hand-written kinds still read it
    assert check_constraints("", {"max_words": 3, "lowercase": True, "no_commas": True, "bullets": 1,
                                  "max_sentences": 1, "must_exclude": "sea"}) == {
        "max_words": False, "lowercase": True, "no_commas": False, "bullets": False, "max_sentences": True,
        "must_exclude": True}
    assert check_constraints(None, {"min_words": 1}) == {"min_words": False}


def test_counts():
    assert count_sentences("Hi. How are you? Fine!") == 3
    assert count_sentences("No end punctuation") == 1
    assert count_sentences("...") == 0


def test_parse_normalises_single_words_to_lists_and_strips_phrases():
    assert parse_constraints('{"must_include": "blue", "starts_with": "  Sure "}') == {
        "must_include": ["blue"], "starts_with": "Sure"}


@pytest.mark.parametrize(("spec", "match"), [
    ({"max_word": 5}, r"constraint 'max_word': unknown constraint; known constraints: min_words, max_words"),
    ({"max_words": 0}, r"constraint 'max_words': expected a whole number"),
    ({"max_words": -3}, r"constraint 'max_words': expected a whole number"),
    ({"max_words": 2.5}, r"constraint 'max_words'.*2\.5"),
    ({"bullets": True}, r"constraint 'bullets': expected a whole number"),
    ({"max_sentences": "2"}, r"constraint 'max_sentences'.*'2'"),
    ({"min_words": 10**12}, r"constraint 'min_words': expected a whole number from 1 to 100,000"),
    ({"lowercase": False}, r"constraint 'lowercase': expected true"),
    ({"json": "yes"}, r"constraint 'json': expected true"),
    ({"starts_with": "  "}, r"constraint 'starts_with': expected a non-empty phrase"),
    ({"ends_with": 3}, r"constraint 'ends_with': expected a non-empty phrase"),
    ({"must_include": []}, r"constraint 'must_include': expected a word or a non-empty list"),
    ({"must_exclude": ["ok", 3]}, r"constraint 'must_exclude': item 1 is 3"),
    ({"must_include": ["!!"]}, r"constraint 'must_include': item 0 is '!!'"),
    ({"min_words": 10, "max_words": 5}, r"constraint 'min_words': 10 is above max_words=5"),
    ({"lowercase": True, "uppercase": True}, r"constraint 'uppercase': contradicts lowercase"),
    ({"must_include": ["Blue"], "must_exclude": ["blue"]}, r"constraint 'must_exclude': forbids 'blue'"),
    ({}, r"names no constraint"),
])
def test_bad_specs_name_the_constraint(spec, match):
    with pytest.raises(GoldCheckError, match=match):
        validate_reference(json.dumps(spec), "constraints")
    with pytest.raises(GoldCheckError, match=match):
        check_answer("anything", json.dumps(spec), "constraints")


@pytest.mark.parametrize("reference", ["max_words: 5", "[1, 2]", '"lowercase"', "", "{bad json}"])
def test_a_reference_that_is_no_json_object(reference):
    with pytest.raises(GoldCheckError, match="not a JSON object of constraints"):
        validate_reference(reference, "constraints")
