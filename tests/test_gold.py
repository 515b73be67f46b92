"""Gold checks: finding the final answer in free-form completions, by hand-written cases."""

from __future__ import annotations

import json

import pytest

from alignment.evaluation.gold import (
    CHECKERS,
    GoldCheckError,
    check_answer,
    extract_answer,
    extract_number,
    normalise,
)
from alignment.tasks_gym import library_version

ADD = "What is 13 + 13?"
SUB = "What is 99 - 28?"
REVERSE = "Reverse the word 'hello'."
CAPITAL = "What is the capital of France?"
GYM_REF = json.dumps({"task": "chain_sum", "settings": {}, "seed": 0, "size": 4, "index": 0,
                      "version": library_version()})

# (completion, reference, checker, prompt, expected)
IFEVAL_REF = json.dumps({"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
                         "kwargs": [{}, {"num_words": 8, "relation": "at least"}]})
CASES = [
    # number: explicit statements win over later negated numbers
    ("The answer is 26, not 23.", "26", "number", ADD, True),
    ("The answer is 26, not 23.", "23", "number", ADD, False),
    ("The result is 26 instead of 23.", "26", "number", None, True),
    ("It is not 23 but 26.", "26", "number", None, True),
    ("The answer is not 23; it is 26.", "26", "number", None, True),
    ("26 is the answer, although 27 came up first.", "26", "number", None, True),
    # number formats
    ("26.0", "26", "number", None, True),
    ("x = 26.", "26", "number", None, True),
    ("The total is 1,200 dollars.", "1,200", "number", None, True),
    ("The total is 1,200 dollars.", "1200", "number", None, True),
    ("5 - 12 = -7", "-7", "number", None, True),
    ("5 - 12 = -7", "7", "number", None, False),
    ("She ate 3/4 of the pie.", "0.75", "number", None, True),
    ("The probability is 0.25.", "1/4", "number", None, True),
    ("It measures 3.5 metres.", "-3.5", "number", None, False),
    # equations: the number after the last "="
    ("13 + 13 = 26", "26", "number", ADD, True),
    ("13 + 13 = 26", "26", "number", None, True),
    ("First 10 + 3 = 13, then 13 + 13 = 26.", "26", "number", ADD, True),
    ("x = 5 + 3 = 8", "8", "number", None, True),
    ("So 13 + 13 = 26, checked in 2 ways.", "26", "number", None, True),
    ("The sum is 13 + 13, which I computed as 26 apples.", "26", "number", None, True),
    ("The answer is 26. Check: 26 - 13 = 13.", "26", "number", None, True),
    # restated questions are not answers
    ("What is 13 + 13? Let me think.", "26", "number", ADD, False),
    ("What is 13 + 13? Let me think.", "13", "number", ADD, False),
    ("13 + 13 is 26", "26", "number", ADD, True),
    ("The answer to 13 + 13 is 26.", "26", "number", ADD, True),
    ("We add 13 and 13.", "13", "number", ADD, False),
    ("We add 13 and 13 to get 26 apples.", "26", "number", ADD, True),
    ("99 - 28 is 28.", "71", "number", SUB, False),
    ("99 - 28 is 28.", "71", "number", None, False),
    ("99 - 28 is 71.", "71", "number", SUB, True),
    # markup and units
    ("The answer is **26**.", "26", "number", None, True),
    ("\\boxed{26}", "26", "number", None, True),
    ("We get $26$ in total.", "26", "number", None, True),
    ("$\\frac{3}{4}$ of them", "0.75", "number", None, True),
    ("The side is 26 cm long.", "26", "number", None, True),
    ("They drove 12km.", "12", "number", None, True),
    # fallback: the last number that is not a restated operand or a word part
    ("There were 42 cases of COVID19", "42", "number", None, True),
    ("There were 42 cases of COVID19", "19", "number", None, False),
    ("Thirteen twice makes twenty-six, so 26 apples, 13 from each basket.", "26", "number", ADD, True),
    # confident wrong answers and empty completions
    ("The answer is definitely 25.", "26", "number", ADD, False),
    ("", "26", "number", ADD, False),
    ("I am not sure.", "26", "number", ADD, False),
    # exact
    ("The reversed word is 'olleh'.", "olleh", "exact", REVERSE, True),
    ("'olleh' is the reverse of 'hello'.", "olleh", "exact", REVERSE, True),
    ("The reversed word is olleh.", "olleh", "exact", REVERSE, True),
    ("Answer: Olleh!", "olleh", "exact", REVERSE, True),
    ("olleh", "olleh", "exact", None, True),
    ("The answer is olleh, which is hello backwards.", "olleh", "exact", REVERSE, True),
    ("The reversed word is 'hello'.", "olleh", "exact", REVERSE, False),
    ("The reversed word is ollhe.", "olleh", "exact", REVERSE, False),
    ("Reverse the word 'hello'.", "hello", "exact", REVERSE, False),
    ("Sure, I would be happy to help you with reversing this word for you today", "olleh", "exact", REVERSE,
     False),
    ("", "olleh", "exact", REVERSE, False),
    ("It is Café.", "cafe", "exact", None, True),
    # contains
    ("The capital of France is Paris.", "Paris", "contains", CAPITAL, True),
    ("PARIS", "paris", "contains", CAPITAL, True),
    ("Parisian cuisine is famous.", "Paris", "contains", CAPITAL, False),
    ("It is not Paris.", "Paris", "contains", CAPITAL, False),
    ("It isn't Paris, it is Lyon.", "Paris", "contains", CAPITAL, False),
    ("Not London but Paris.", "Paris", "contains", CAPITAL, True),
    ("The capital is Lyon.", "Paris", "contains", CAPITAL, False),
    ("It is Port-au-Prince.", "Port au Prince", "contains", None, True),
    ("Is it Paris or Lyon? It is Lyon.", "Paris", "contains", "Is it Paris or Lyon?", False),
    ("", "Paris", "contains", CAPITAL, False),
    # constraints: a JSON spec, every constraint must hold (each kind in tests/test_constraints.py)
    ("the ocean is deep and blue.", '{"max_words": 15, "lowercase": true}', "constraints", None, True),
    ("The ocean is deep and blue.", '{"max_words": 15, "lowercase": true}', "constraints", None, False),
    # reasoning_gym: chain_sum item 0 of seed 0 is 1663 - 5242 - 9376 - 8961 + 7634 = -14282 (tests/test_gym_source.py)
    ("Adding up: <answer>-14282</answer>", GYM_REF, "reasoning_gym", None, True),
    ("Adding up: <answer>-14283</answer>", GYM_REF, "reasoning_gym", None, False),
    # ifeval: an IFEval row, every instruction must hold (each kind used in tests/test_ifeval.py)
    ("the sea is deep and blue and very cold", IFEVAL_REF, "ifeval", None, True),
    ("the sea is deep, blue and very cold", IFEVAL_REF, "ifeval", None, False),
]


@pytest.mark.parametrize(("completion", "reference", "checker", "prompt", "expected"), CASES)
def test_check_answer_cases(completion, reference, checker, prompt, expected):
    assert check_answer(completion, reference, checker, prompt=prompt) is expected


def test_cases_cover_every_checker_both_ways():
    assert {(c[2], c[4]) for c in CASES} == {(k, e) for k in CHECKERS for e in (True, False)}
    assert len(CASES) >= 40


@pytest.mark.parametrize(("text", "prompt", "expected"), [
    ("The answer is 26, not 23", None, 26.0),
    ("26.0", None, 26.0),
    ("= 26.", None, 26.0),
    ("1,200", None, 1200.0),
    ("-7", None, -7.0),
    ("3/4", None, 0.75),
    ("13 + 13 = 26", None, 26.0),
    ("What is 13 + 13? Let me think.", ADD, None),
    ("What is 13 + 13? Let me think.", None, 13.0),  # without the prompt the restatement is not known
    ("13 + 13 is 26", ADD, 26.0),
    ("99-28=71", None, 71.0),
    ("COVID-19", None, None),
    ("version v2 of the model", None, None),
    ("It is not 23.", None, None),
    ("It is not equal to 23, it equals 24.", None, 24.0),
    ("\\boxed{\\frac{1}{8}}", None, 0.125),
    ("It's 26.", None, 26.0),
    ("", None, None),
])
def test_extract_number(text, prompt, expected):
    assert extract_number(text, prompt) == expected


@pytest.mark.parametrize(("text", "prompt", "expected"), [
    ("The reversed word is 'olleh'.", None, "olleh"),
    ("“Olleh”", None, "olleh"),
    ("The word is `olleh`.", None, "olleh"),
    ("Answer: New York City.", None, "new york city"),
    ("What is the reverse of hello?", None, None),
    ("", None, None),
])
def test_extract_answer(text, prompt, expected):
    assert extract_answer(text, prompt) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("  'Olleh'  ", "olleh"),
    ("“Héllo,   Wörld!”", "hello world"),
    ("São Paulo", "sao paulo"),
    ("It isn't", "it isnt"),
    ("Port-au-Prince", "port au prince"),
    ("Straße", "strasse"),
    ("C++", "c++"),
    ("\t\n", ""),
])
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_number_tolerance():
    assert not check_answer("It is 0.333.", "1/3", "number")
    assert check_answer("It is 0.333.", "1/3", "number", tolerance=1e-3)
    assert check_answer("It is 26.0000001.", "26", "number")
    assert not check_answer("It is 1000001.", "1000000", "number")
    assert check_answer("It is 10000000000.5.", "10000000000", "number")  # relative 1e-9


def test_number_reference_forms():
    assert check_answer("It is 0.5.", ".5", "number")
    assert check_answer("It is 1000.", "1e3", "number")
    assert check_answer("It is 26.", 26, "number")  # a reference read from JSON as an int


def test_unknown_checker_names_kind_and_known_ones():
    with pytest.raises(GoldCheckError, match=r"'regex'.*number, exact, contains"):
        check_answer("26", "26", "regex")


@pytest.mark.parametrize("reference", ["twenty-six", "", "26 apples", "1/0", "nan", "inf"])
def test_unparsable_number_reference(reference):
    with pytest.raises(GoldCheckError, match="not a number") as info:
        check_answer("26", reference, "number")
    assert repr(reference) in str(info.value)


@pytest.mark.parametrize("checker", ["exact", "contains"])
def test_empty_string_reference(checker):
    with pytest.raises(GoldCheckError, match="empty"):
        check_answer("Paris", " '' ", checker)


def test_gold_check_error_is_value_error():
    assert issubclass(GoldCheckError, ValueError)


def test_validate_reference_accepts_checkable_and_names_the_problem():
    from alignment.evaluation.gold import validate_reference

    validate_reference("26", "number")
    validate_reference("olleh", "exact")
    validate_reference("Paris", "contains")
    with pytest.raises(GoldCheckError, match="unknown gold checker 'regex'"):
        validate_reference("x", "regex")
    with pytest.raises(GoldCheckError, match="'twenty' is not a number"):
        validate_reference("twenty", "number")
    with pytest.raises(GoldCheckError, match="empty after normalising"):
        validate_reference("!!", "exact")


CM = "How many centimetres are in 31 metres?"


@pytest.mark.parametrize("completion, prompt, expected", [
    ("There are 3100 centimetres in 31 metres, because 1 metre is 100 centimetres.", CM, 3100),
    ("25 °C is 77 °F (multiply by 9/5, then add 32).", "Convert 25 degrees Celsius to Fahrenheit.", 77),
    ("Since 1 metre is 100 centimetres, 31 metres is 3100 centimetres.", CM, 3100),
    ("(1 metre is 100 cm)", CM, 100),  # nothing but the justification: it is read
])
def test_justifications_are_not_the_answer(completion, prompt, expected):
    assert extract_number(completion, prompt) == expected
