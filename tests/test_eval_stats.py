"""The evaluation layer's tests and counts, against values computed by hand: the exact McNemar test, the
unbiased pass@k, and the degenerate-answer reasons and share."""

from __future__ import annotations

import math

import pytest

from alignment.evaluation.degenerate import degenerate_reason, degenerate_share, is_degenerate
from alignment.evaluation.stats import mcnemar_exact, mean_pass_at_k, paired_proportion_diff, pass_at_k


def paired(gained: int, lost: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """(after, before) with that many items gained, lost, right in both and wrong in both."""
    after = [True] * gained + [False] * lost + [True] * both + [False] * neither
    before = [False] * gained + [True] * lost + [True] * both + [False] * neither
    return after, before


# ---- McNemar ----

def test_mcnemar_three_gained_none_lost():
    # b=3, c=0: P(X <= 0) = C(3,0)/2^3 = 1/8, p = 2 * 1/8 = 0.25; the 4 concordant items count in n only
    out = mcnemar_exact(*paired(3, 0, both=2, neither=2))
    assert out == {"n": 7, "gained": 3, "lost": 0, "p_value": 0.25}


def test_mcnemar_ten_gained_two_lost():
    # b=10, c=2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * (1 + 12 + 66) / 4096 = 158/4096 = 0.0385742...
    out = mcnemar_exact(*paired(10, 2, both=5))
    assert (out["n"], out["gained"], out["lost"]) == (17, 10, 2)
    assert out["p_value"] == pytest.approx(0.03857421875, abs=1e-15)


def test_mcnemar_is_symmetric_in_gained_and_lost():
    # b=2, c=10 is the same test as b=10, c=2 with the roles swapped
    out = mcnemar_exact(*paired(2, 10))
    assert (out["gained"], out["lost"]) == (2, 10)
    assert out["p_value"] == pytest.approx(158 / 4096, abs=1e-15)


def test_mcnemar_no_evidence_gives_one():
    # b=c=2: 2 * (1 + 4 + 6)/16 = 22/16 > 1 -> clipped to 1; b=1, c=0: 2 * 1/2 = 1
    assert mcnemar_exact(*paired(2, 2, both=3))["p_value"] == 1.0
    assert mcnemar_exact(*paired(1, 0))["p_value"] == 1.0
    # b + c = 0: nothing changed, p = 1 (also with no items at all)
    assert mcnemar_exact(*paired(0, 0, both=4, neither=1)) == {"n": 5, "gained": 0, "lost": 0, "p_value": 1.0}
    assert mcnemar_exact([], []) == {"n": 0, "gained": 0, "lost": 0, "p_value": 1.0}


def test_mcnemar_large_case_matches_a_direct_float_sum():
    # b=900, c=800 (2^1700 overflows a float): the same tail summed term by term in log space with lgamma
    b, c = 900, 800
    m = b + c
    direct = 2 * sum(math.exp(math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2))
                     for i in range(c + 1))
    p = mcnemar_exact(*paired(b, c))["p_value"]
    assert 1e-4 < p < 0.05  # a real, small p: the comparison below is not between two zeros
    assert p == pytest.approx(direct, rel=1e-9)


def test_mcnemar_refuses_unpaired_outcomes():
    with pytest.raises(ValueError, match="same items: 3 != 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match="same items"):
        paired_proportion_diff([True], [])  # the shared counting keeps the old check


def test_paired_proportion_diff_unchanged_by_the_shared_count():
    # b=3, c=1, n=10: d = (3 - 1)/10 = 0.2
    d, (lo, hi) = paired_proportion_diff(*paired(3, 1, both=4, neither=2))
    assert d == pytest.approx(0.2)
    assert lo < 0.2 < hi


# ---- pass@k ----

def test_pass_at_k_by_hand():
    assert pass_at_k(8, 0, 1) == 0.0  # no correct sample: 1 - C(8,1)/C(8,1) = 0
    assert pass_at_k(8, 0, 4) == 0.0  # 1 - C(8,4)/C(8,4) = 0
    assert pass_at_k(8, 8, 1) == 1.0  # n - c = 0 < k
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)  # 1 - C(7,1)/C(8,1) = 1 - 7/8
    assert pass_at_k(8, 2, 8) == 1.0  # n - c = 6 < 8: every draw of 8 holds a correct one
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n: 1 - 7/10


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 6), (5, 6, 1), (-1, 0, 1), (5, -1, 1), (5, 1, 0), (5, 1, -2)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_over_items():
    # k=1: (1/8 + 3/10)/2 = (0.125 + 0.3)/2 = 0.2125
    assert mean_pass_at_k([(8, 1), (10, 3)], 1) == pytest.approx(0.2125)
    # k=5: (11/12 + 0)/2 = 11/24
    assert mean_pass_at_k([(10, 3), (10, 0)], 5) == pytest.approx(11 / 24)
    assert math.isnan(mean_pass_at_k([], 1))
    with pytest.raises(ValueError, match="k <= n"):
        mean_pass_at_k([(10, 3), (4, 1)], 5)


# ---- degenerate answers ----

PROMPT = "What is the capital of France and why is it famous?"


def test_empty_answers():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("  \n\t") == "empty"
    assert degenerate_reason("4") is None  # short is not empty


def test_repetition():
    assert degenerate_reason("!!!!!!!!!! ok") == "repetition"  # '!' is 10 of 12 visible characters
    assert degenerate_reason("the cat the cat the cat the cat the cat") == "repetition"  # 2 distinct of 8 bigrams
    assert degenerate_reason("Paris is the capital of France, on the Seine.") is None
    # 7 words: under the 8 words the bigram rule needs
    assert degenerate_reason("the cat the cat the cat the") is None


def test_echo_of_the_prompt():
    # 6 words, 4 trigrams (what is the, is the capital, the capital of, capital of france): all in the prompt
    assert degenerate_reason("What is the capital of France", PROMPT) == "echo"
    assert degenerate_reason("WHAT IS THE CAPITAL OF FRANCE", PROMPT) == "echo"  # words compare lower-cased
    assert degenerate_reason("What is the capital of France") is None  # no prompt, no echo check
    # 7 trigrams, 2 in the prompt (the capital of, capital of france): 2/7 < 0.8
    assert degenerate_reason("The capital of France is Paris, famous for art.", PROMPT) is None
    # under 3 words never echo, even when the prompt holds them
    assert degenerate_reason("of France", PROMPT) is None


def test_echo_threshold_is_eighty_percent():
    prompt = "one two three four five six"
    # 5 trigrams, 4 in the prompt (123, 234, 345, 456; not 567): 4/5 = 0.8 -> echo
    assert degenerate_reason("one two three four five six seven", prompt) == "echo"
    # 4 trigrams, 3 in the prompt (123, 234, 345; not 4-5-seven): 3/4 = 0.75 -> not
    assert degenerate_reason("one two three four five seven", prompt) is None


def test_reasons_come_in_order():
    # a repetitive prompt handed back is named by its repetition, the first reason that applies
    loop = "ha ha ha ha ha ha ha ha ha"
    assert degenerate_reason(loop, loop) == "repetition"
    assert degenerate_reason(" ", "anything at all here") == "empty"


def test_is_degenerate_moved_with_the_same_behaviour():
    from alignment.rounds import report

    assert report.is_degenerate is is_degenerate  # the rounds report uses the evaluation layer's one
    for text in ("", "   ", "!!!!!!!!!! ok", "the cat the cat the cat the cat the cat"):
        assert is_degenerate(text)
    for text in ("Paris is the capital of France, on the Seine.", "4", "What is the capital of France"):
        assert not is_degenerate(text)  # an echo is not one of is_degenerate's cases


def test_degenerate_share_counts_each_reason():
    texts = ["", "!!!!!!!!", "What is the capital of France", "Paris, for its art and the Eiffel tower."]
    # 1 empty, 1 repetition, 1 echo of 4 answers: share 3/4
    assert degenerate_share(texts, [PROMPT] * 4) == {"n": 4, "empty": 1, "repetition": 1, "echo": 1,
                                                     "degenerate": 3, "share": 0.75}
    # without prompts the echo is not checked: 2/4
    assert degenerate_share(texts) == {"n": 4, "empty": 1, "repetition": 1, "echo": 0, "degenerate": 2, "share": 0.5}
    assert degenerate_share([], []) == {"n": 0, "empty": 0, "repetition": 0, "echo": 0, "degenerate": 0,
                                        "share": None}
    with pytest.raises(ValueError, match="3 prompts, 4 answers"):
        degenerate_share(texts, [PROMPT] * 3)
