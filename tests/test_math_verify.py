"""The ``number`` gold checker reads LaTeX and compares numbers with math-verify, through the bounded wrapper
``alignment.evaluation.mathverify``; hand-computed cases."""

from __future__ import annotations

import threading

import pytest
import sympy

from alignment.evaluation import mathverify
from alignment.evaluation.gold import GoldCheckError, check_answer, extract_number, validate_reference

ADD = "What is 13 + 13?"
HALVES = "What is \\frac12 + \\frac14?"


@pytest.mark.parametrize(("completion", "reference", "prompt", "expected"), [
    # thousands separators, plain and LaTeX
    ("The total is 1,000.", "1000", None, True),
    ("The total is 1,000.", "1,000", None, True),
    ("\\boxed{1{,}000}", "1000", None, True),
    ("The total is 1,001.", "1000", None, False),
    # LaTeX fractions: braced, unbraced (\frac12 = 1/2), boxed, in $...$; the reference in LaTeX too
    ("\\boxed{\\frac{1}{2}}", "0.5", None, True),
    ("\\boxed{\\frac{1}{2}}", "0.25", None, False),
    ("So it is $\\frac12$.", "1/2", None, True),
    ("So it is $\\frac12$.", "\\frac{1}{2}", None, True),
    ("It is \\dfrac{3}{4} of the cake.", "0.75", None, True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", None, True),
    # math-verify reads a whole boxed expression: sqrt(3)/2 = 0.8660254..., 2*sqrt(3) = sqrt(12)
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", None, True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "2", None, False),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", None, True),
    ("The answer is \\boxed{\\$18}.", "18", None, True),
    ("\\boxed{2^{1+1}}", "4", None, True),
    ("\\boxed{\\pi}", "3.1415926", None, True),  # |pi - 3.1415926| = 5.4e-8 <= 1e-6
    ("\\boxed{\\pi}", "3.14", None, False),
    # a percent sign is not part of the number: "50%" states 50 (the question asked for a percentage)
    ("The share is 50%.", "50", None, True),
    ("The share is 50%.", "0.5", None, False),
    ("\\boxed{50\\%}", "50", None, True),
    # negative numbers
    ("It comes to -4 degrees.", "-4", None, True),
    ("It comes to 4 degrees.", "-4", None, False),
    # equal values in other forms: 3.0 = 3, 0.50 = 1/2
    ("3.0", "3", None, True),
    ("The probability is 0.50.", "1/2", None, True),
    # a wrong number
    ("The answer is 27.", "26", ADD, False),
    # an answer that restates the question's numbers last: the stated answer wins, the restatement is masked
    ("The answer is 26. Check: 13 + 13.", "26", ADD, True),
    ("The answer is 26. Check: 13 + 13.", "13", ADD, False),
    ("We need 13 + 13.", "13", ADD, False),
    # a LaTeX question restated in LaTeX: the prompt is read the same way, so the restatement is masked
    ("\\frac12 + \\frac14 = \\frac34", "0.75", HALVES, True),
    ("\\frac12 + \\frac14 = \\frac34", "0.5", HALVES, False),
])
def test_number_checker_reads_with_math_verify(completion, reference, prompt, expected):
    assert check_answer(completion, reference, "number", prompt=prompt) is expected


def test_latex_the_regexes_misread():
    # before math-verify: \frac12 gave None, \boxed{\frac{\sqrt{3}}{2}} gave 2, \boxed{9^{9^{9}}} gave 9
    assert extract_number("\\frac12") == 0.5
    assert extract_number("\\boxed{\\frac{\\sqrt{3}}{2}}") == pytest.approx(3 ** 0.5 / 2, rel=1e-14)
    assert extract_number("\\boxed{9^{9^{9}}}") is None


@pytest.mark.parametrize("huge", [
    "\\boxed{9^{9^{9^{9}}}}", "\\boxed{100000!}", "\\boxed{10^{10^{10}}}",
    "\\boxed{((10^{1000})^{1000})^{1000}}",  # each exponent small, the value 10^(10^9)
    "\\boxed{((10^{-1000})^{1000})^{1000}}",  # as small: exactly, 1 over a billion-digit number
    "\\boxed{e^{e^{e^{100}}}}",
])
def test_a_huge_expression_is_no_answer_and_is_not_evaluated(huge):
    # evaluated, each would take hours or all memory; the bounds refuse them before SymPy computes a digit
    assert check_answer(huge, "9", "number") is False
    assert extract_number(huge) is None
    with pytest.raises(mathverify.TooLarge):
        mathverify.read_number(huge.removeprefix("\\boxed{").removesuffix("}"))


def test_huge_or_overlong_text_reads_as_no_number():
    assert mathverify.parse("1" * (mathverify.MAX_CHARS + 1)) == []
    assert extract_number("It is " + "1" * 1500 + ".") is None  # beyond 10^1000
    with pytest.raises(GoldCheckError, match="not a number"):
        validate_reference("1e999999999", "number")  # an exponent of more than 3 digits is not plain
    assert mathverify.read_number("1e999") == sympy.Integer(10) ** 999
    assert mathverify.read_number("10^{999}") == sympy.Integer(10) ** 999  # within the bound: read, exactly


def test_tolerance_semantics_kept_beside_math_verify():
    # math-verify's verify rounds to 6 decimals; the checker also accepts |got - ref| <= max(tolerance, 1e-9 * max)
    assert check_answer("It is 2.0000006.", "2", "number")  # 6e-7 <= 1e-6, though rounding gives 2.000001
    assert not check_answer("It is 2.000002.", "2", "number")  # 2e-6 > 1e-6
    assert check_answer("It is 2.000002.", "2", "number", tolerance=1e-5)
    assert check_answer("It is 10000000000.5.", "10000000000", "number")  # relative: 0.5 <= 1e-9 * 1e10 = 10
    assert not check_answer("It is 1000001.", "1000000", "number")  # 1 > 1e-9 * 1e6 = 1e-3
    assert check_answer("It is 0.333333.", "\\frac{1}{3}", "number")  # |1/3 - 0.333333| = 3.3e-7
    # values are exact, so tolerance=0 asks for equality: 1/3 is not 0.333333 (math-verify would round floats)
    assert not check_answer("It is 0.333333.", "\\frac{1}{3}", "number", tolerance=0)
    assert check_answer("It is 0.5.", "\\frac{1}{2}", "number", tolerance=0)


@pytest.mark.parametrize(("reference", "value"), [
    ("26", 26), ("-3.5", sympy.Rational(-7, 2)), ("1,200", 1200), ("3/4", sympy.Rational(3, 4)), ("1e3", 1000),
    (".5", sympy.Rational(1, 2)), ("+5", 5), ("\\frac{1}{2}", sympy.Rational(1, 2)), ("$\\frac12$", sympy.Rational(1, 2)),
    ("\\sqrt{2}", sympy.sqrt(2)),
])
def test_references_are_read_exactly(reference, value):
    assert mathverify.read_number(reference) == value
    validate_reference(reference, "number")


@pytest.mark.parametrize("reference", ["50%", "x = 5", "\\text{five}", "9^{9^{9^{9}}}", "\\frac{1}{0}", "1, 2"])
def test_unreadable_references_are_refused_in_one_line(reference):
    with pytest.raises(GoldCheckError, match="is not a number") as info:
        validate_reference(reference, "number")
    assert repr(reference) in str(info.value) and "\n" not in str(info.value)


def test_percent_reference_says_why():
    with pytest.raises(GoldCheckError, match="percent sign is ambiguous"):
        check_answer("50", "50%", "number")


def test_off_the_main_thread_math_verify_runs_without_its_alarm():
    # math-verify's timeout is a SIGALRM, which raises off the main thread; the wrapper drops it there, so a
    # worker thread reads the same answers (the lenient gym check used to give False there, always)
    results = []

    def work():
        results.append(check_answer("\\boxed{\\frac{1}{2}}", "\\frac12", "number"))
        results.append(check_answer("\\boxed{9^{9^{9^{9}}}}", "9", "number"))
        results.append(check_answer("It is 1,000.", "1000", "number"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [True, False, True]


def test_number_check_drops_values_beyond_the_bounds():
    # the shared wrapper bounds the number check (and so the lenient gym check): a tower is not compared
    # (math-verify's own 2 s alarm would otherwise be all that stops it, and only in the main thread)
    assert not check_answer("The sum is $((10^{1000})^{1000})^{1000}$", "9", "number")
