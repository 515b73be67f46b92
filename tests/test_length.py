"""Length-aware readings (alignment/evaluation/length.py) against hand-computed values, and their wiring
into the judge's summary and report and the reward model's evaluation."""

from __future__ import annotations

import math

import pytest

from alignment.evaluation.judge import final_verdict, summarise, write_report
from alignment.evaluation.length import length_controlled_win_rate, length_split, longer_preferred

# Two groups of 10 pairs, A longer by 10 characters / shorter by 10, A's win rate 0.8 / 0.4.
# A saturated model (one parameter per group after tanh): sigmoid(theta +- phi x) = 0.8, 0.4, so
# theta = (logit 0.8 + logit 0.4) / 2 = (ln 4 + ln 2/3) / 2 = ln(8/3) / 2 and
# LC = 1 / (1 + exp(-theta)) = 1 / (1 + sqrt(3/8)) = 0.6202041.
# The feature: delta = +-10, sample std (ddof=1) = 10 sqrt(20/19), x = tanh(sqrt(19/20)) = 0.7507534, so
# phi = (ln 4 - ln 2/3) / (2 x) = ln 6 / 1.5015069 = 1.1933075.
LC_TWO_GROUPS = 1 / (1 + math.sqrt(3 / 8))
PHI_TWO_GROUPS = math.log(6) / (2 * math.tanh(math.sqrt(19 / 20)))
LEN_A = [110] * 10 + [90] * 10
LEN_B = [100] * 20


def test_hand_constants():
    assert math.isclose(LC_TWO_GROUPS, 0.6202041, abs_tol=1e-7)
    assert math.isclose(PHI_TWO_GROUPS, 1.1933075, abs_tol=1e-7)


def test_no_length_difference_gives_the_raw_win_rate_exactly():
    out = length_controlled_win_rate([1.0, 1.0, 0.5, 0.0, 1.0], [7] * 5, [7] * 5, n_bootstrap=200)
    assert out["n"] == 5 and out["win_rate"] == 0.7
    assert out["lc_win_rate"] == 0.7 and out["length_coef"] == 0.0 and out["mean_length_diff"] == 0.0
    assert out["lc_ci95"][0] <= 0.7 <= out["lc_ci95"][1]
    # One pair: no spread to standardise by.
    one = length_controlled_win_rate([0.5], [3], [9], n_bootstrap=10)
    assert one["lc_win_rate"] == 0.5 and one["length_coef"] == 0.0


def test_two_saturated_groups_hand_values():
    pref = [1.0] * 8 + [0.0] * 2 + [1.0] * 4 + [0.0] * 6
    out = length_controlled_win_rate(pref, LEN_A, LEN_B, n_bootstrap=500)
    assert out["win_rate"] == pytest.approx(0.6)
    assert out["lc_win_rate"] == pytest.approx(LC_TWO_GROUPS, abs=1e-4)
    assert out["length_coef"] == pytest.approx(PHI_TWO_GROUPS, abs=1e-3)
    assert out["mean_length_diff"] == 0.0
    lo, hi = out["lc_ci95"]
    assert 0.3 < lo < LC_TWO_GROUPS < hi <= 1.0
    # Swapping the roles of A and B mirrors everything: LC(B over A) = 1 - LC(A over B), phi the same.
    mirror = length_controlled_win_rate([1 - p for p in pref], LEN_B, LEN_A, n_bootstrap=0)
    assert mirror["lc_win_rate"] == pytest.approx(1 - LC_TWO_GROUPS, abs=1e-4)
    assert mirror["length_coef"] == pytest.approx(PHI_TWO_GROUPS, abs=1e-3)
    # The same seed gives the same interval.
    assert length_controlled_win_rate(pref, LEN_A, LEN_B, n_bootstrap=500)["lc_ci95"] == out["lc_ci95"]


def test_ties_count_one_half():
    # Group means again 0.8 (6 wins, 4 ties) and 0.4 (8 ties, 2 losses): the soft-target likelihood of the
    # saturated model depends on the group means only, so the fit is the one above.
    pref = [1.0] * 6 + [0.5] * 4 + [0.5] * 8 + [0.0] * 2
    out = length_controlled_win_rate(pref, LEN_A, LEN_B, n_bootstrap=0)
    assert out["win_rate"] == pytest.approx(0.6)
    assert out["lc_win_rate"] == pytest.approx(LC_TWO_GROUPS, abs=1e-4)
    assert out["length_coef"] == pytest.approx(PHI_TWO_GROUPS, abs=1e-3)


def test_separable_data_stays_finite():
    # All wins: no finite maximum; the rate is the raw one and length explains nothing.
    wins = length_controlled_win_rate([1.0] * 6, [1, 2, 3, 4, 5, 6], [3] * 6, n_bootstrap=50)
    assert wins["lc_win_rate"] == 1.0 and wins["length_coef"] == 0.0 and wins["lc_ci95"] == (1.0, 1.0)
    # The longer answer always wins: phi is large but finite; by symmetry theta = 0, LC = 1/2.
    sep = length_controlled_win_rate([1.0] * 5 + [0.0] * 5, [20] * 5 + [10] * 5, [10] * 5 + [20] * 5,
                                     n_bootstrap=100)
    assert math.isfinite(sep["length_coef"]) and sep["length_coef"] > 5
    assert sep["lc_win_rate"] == pytest.approx(0.5, abs=1e-6) and sep["win_rate"] == 0.5
    assert all(math.isfinite(v) for v in sep["lc_ci95"])


def test_length_split_and_longer_preferred_hand_values():
    correct = [True, True, False, True, False, True]
    chosen = [10, 20, 30, 5, 5, 7]
    rejected = [5, 10, 12, 8, 5, 9]
    # chosen longer: pairs 0, 1, 2 -> 2 of 3 right; shorter: 3, 5 -> 2 of 2; equal: 4 -> 0 of 1.
    split = length_split(correct, chosen, rejected)
    assert split["chosen_longer"]["n"] == 3 and split["chosen_longer"]["accuracy"] == pytest.approx(2 / 3)
    # Wilson, z = 1.96, n = 3, p = 2/3: center 1.30691 / 2.28049 = 0.57308, half 0.36543.
    assert split["chosen_longer"]["ci95"] == pytest.approx((0.2077, 0.9385), abs=1e-4)
    assert split["chosen_shorter"]["n"] == 2 and split["chosen_shorter"]["accuracy"] == 1.0
    assert split["chosen_shorter"]["ci95"] == pytest.approx((0.3424, 1.0), abs=1e-4)
    assert split["equal_length"]["n"] == 1 and split["equal_length"]["accuracy"] == 0.0
    assert split["equal_length"]["ci95"] == pytest.approx((0.0, 0.7935), abs=1e-4)
    empty_group = length_split([True, False], [5, 6], [1, 2])
    assert empty_group["chosen_shorter"] == {"n": 0, "accuracy": None, "ci95": None}

    # The same lengths read as (winner, loser): the winner is longer in pairs 0, 1, 2 of the 5 unequal ones.
    bias = longer_preferred(chosen, rejected)
    assert (bias["n"], bias["n_equal"]) == (5, 1) and bias["share_longer_preferred"] == pytest.approx(0.6)
    assert bias["ci95"] == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert longer_preferred([4, 4], [4, 4]) == {"n": 0, "n_equal": 2, "share_longer_preferred": None, "ci95": None}


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="length_b has 2"):
        length_controlled_win_rate([1.0, 0.0, 0.5], [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="preference is empty"):
        length_controlled_win_rate([], [], [])
    with pytest.raises(ValueError, match=r"preference must be in \[0, 1\]"):
        length_controlled_win_rate([2.0], [1], [1])
    with pytest.raises(ValueError, match="length_a holds a value that is not a finite number"):
        length_controlled_win_rate([1.0], [float("nan")], [1])
    with pytest.raises(ValueError, match="rejected_length has 1"):
        length_split([True, False], [1, 2], [3])
    with pytest.raises(ValueError, match="correct is empty"):
        length_split([], [], [])
    with pytest.raises(ValueError, match="correct must be true/false"):
        length_split([0.5], [1], [2])
    with pytest.raises(ValueError, match="winner_length is empty"):
        longer_preferred([], [])
    with pytest.raises(ValueError, match="loser_length has 0"):
        longer_preferred([3], [])


# ---------------------------------------------------------------------------------------------
# Wiring: the judge's summary and report, the reward model's evaluation
# ---------------------------------------------------------------------------------------------
def _judge_rows() -> list[dict]:
    """The two saturated groups as judged pairs (A longer: 8 wins, 2 losses; A shorter: 4 wins, 6 losses)."""
    def row(ab, ba, la):
        return {"verdict_ab": ab, "verdict_ba": ba, "final": final_verdict(ab, ba), "len_a": la, "len_b": 100}
    return ([row("A", "B", 110)] * 8 + [row("B", "A", 110)] * 2 + [row("A", "B", 90)] * 4
            + [row("B", "A", 90)] * 6)


def test_summarise_reports_the_length_controlled_win_rate():
    s = summarise(_judge_rows(), n_bootstrap=300)
    assert (s["n"], s["wins"], s["losses"], s["ties"]) == (20, 12, 8, 0) and s["win_rate"] == pytest.approx(0.6)
    assert s["lc_win_rate"] == pytest.approx(LC_TWO_GROUPS, abs=1e-4)
    assert s["length_coef"] == pytest.approx(PHI_TWO_GROUPS, abs=1e-3)
    assert s["lc_ci95"][0] < s["lc_win_rate"] < s["lc_ci95"][1]
    assert {"win_rate_ci95_wilson", "win_rate_ci95_bootstrap", "flip_rate", "by_length"} <= set(s)


def test_the_judge_report_shows_the_lc_win_rate(eval_stack, tmp_path):
    s = summarise(_judge_rows(), n_bootstrap=300)
    summary = {"backend": "local", "judge_model": "tiny", "model_a": "tuned", "model_b": "base", "complete": True,
               "pairs_total": 20, **s}
    text = write_report(eval_stack["scores"], tmp_path, summary).read_text()
    lo, hi = s["lc_ci95"]
    assert (f"Length-controlled win rate (AlpacaEval 2 GLM on the length difference, at equal length): "
            f"**0.620** [{lo:.3f}, {hi:.3f}] vs raw 0.600; length coefficient +1.193") in text


def test_reward_model_evaluation_splits_accuracy_by_length(tiny_model):
    from alignment.data import PairData
    from alignment.models import load_sequence_classifier
    from alignment.rewards.model import RewardScorer, evaluate_reward_model

    model, tok = load_sequence_classifier(str(tiny_model), 1)
    scorer = RewardScorer(model, tok, kind="scalar", batch_size=4, max_length=96, bf16=False)
    user = [{"role": "user", "content": "What is 2 plus 2?"}]
    chosen = ["It is 4, because two and two make four.", "Four.", "4 it is, clearly.", "4", "It is 4.", "Four!"]
    rejected = ["It is 5.", "Five, I think.", "Maybe 3 or so?", "22", "It is 5.", "Five"]
    # Characters: chosen longer in pairs 0 (40 vs 8), 2 (17 vs 14), 5 (5 vs 4); shorter in 1 (5 vs 14) and
    # 3 (1 vs 2); equal in 4 (8 vs 8).
    n = len(chosen)
    pairs = PairData([user] * n, chosen, rejected, *([None] * n for _ in range(6)))
    metrics = evaluate_reward_model(scorer, pairs)
    right = (scorer.logits(pairs.prompts, chosen) > scorer.logits(pairs.prompts, rejected)).squeeze(-1).tolist()
    split = metrics["length_split"]
    assert metrics["length_split_unit"] == "characters"
    assert [split[g]["n"] for g in ("chosen_longer", "chosen_shorter", "equal_length")] == [3, 2, 1]
    assert split["chosen_longer"]["accuracy"] == pytest.approx(sum(right[i] for i in (0, 2, 5)) / 3)
    assert split["chosen_shorter"]["accuracy"] == pytest.approx(sum(right[i] for i in (1, 3)) / 2)
    assert split["equal_length"]["accuracy"] == float(right[4])
    assert metrics["accuracy_chosen_longer"] == split["chosen_longer"]["accuracy"]
    assert metrics["accuracy_chosen_shorter"] == split["chosen_shorter"]["accuracy"]
    assert metrics["accuracy"] == pytest.approx(sum(right) / n)  # the existing metrics are untouched
