"""Independent verdicts: interval statistics by hand, the verdict's reading, the over-optimisation alarm."""

from __future__ import annotations

import json
import math

import pytest

from alignment.evaluation.alarm import best_score, overoptimisation_alarm
from alignment.evaluation.stats import paired_proportion_diff, wilson_interval
from alignment.evaluation.verdict import direction, reading, verdict, verdict_markdown


def test_paired_proportion_diff_hand_values():
    # 10 prompts: 3 fixed by the tuned model (b), 1 broken (c), 6 unchanged -> d = 2/10. Agresti-Min:
    # b' = 3.5, c' = 1.5, n' = 12, d' = 2/12, se = sqrt(5 - 2^2/12) / 12; CI = d' -+ 1.96 se.
    after = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    before = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
    d, (lo, hi) = paired_proportion_diff(after, before)
    se = math.sqrt(5 - 4 / 12) / 12
    assert d == pytest.approx(0.2)
    assert (lo, hi) == pytest.approx((2 / 12 - 1.959964 * se, 2 / 12 + 1.959964 * se), abs=1e-6)
    # Nothing changed on 15 prompts: d = 0 with a real width, +-1.96 * sqrt(1) / 17 (plain Wald would give 0).
    d, (lo, hi) = paired_proportion_diff([1] * 4 + [0] * 11, [1] * 4 + [0] * 11)
    assert d == 0.0 and (lo, hi) == pytest.approx((-1.959964 / 17, 1.959964 / 17), abs=1e-6)
    assert paired_proportion_diff([1] * 5, [0] * 5)[1][1] == 1.0  # all fixed: clipped at 1
    with pytest.raises(ValueError, match="same items"):
        paired_proportion_diff([1], [1, 0])


def test_wilson_hand_value():
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    assert wilson_interval(0, 48)[0] == 0.0 and wilson_interval(48, 48)[1] == 1.0  # exact at the edges


def test_direction():
    assert direction((0.1, 0.5)) == "up" and direction((-0.5, -0.1)) == "down" and direction((-0.1, 0.2)) == "flat"
    assert direction((0.55, 0.7), 0.5) == "up" and direction((0.3, 0.6), 0.5) == "flat"


def _c(kind, d, name=None):
    return {"kind": kind, "name": name or kind, "direction": d}


@pytest.mark.parametrize("checks, expected", [
    ([_c("proxy", "up"), _c("gold", "flat"), _c("independent", "flat", "independent RM")],
     "proxy reward rose, gold and independent RM did not: the policy is likely exploiting the reward model"),
    ([_c("proxy", "up"), _c("gold", "down")], "proxy reward rose while gold fell: the policy is likely exploiting"),
    ([_c("proxy", "up"), _c("gold", "up"), _c("judge", "flat")], "proxy reward rose and gold confirms it; judge did not"),
    ([_c("proxy", "up")], "proxy reward rose; nothing independent was measured"),
    ([_c("proxy", "flat"), _c("gold", "flat")], "no clear change on any check"),
    ([_c("proxy", "flat"), _c("gold", "down")], "no clear proxy gain, and gold fell: the model got worse"),
    ([_c("proxy", "down"), _c("gold", "down")], "proxy reward fell, and gold fell too"),
    # gold as a training reward ('trained'): weighed against the checks never trained against
    ([_c("trained", "up"), _c("independent", "flat", "independent RM")],
     "gold accuracy (trained against, on held-out prompts) rose, independent RM did not: the policy is likely "
     "exploiting its training reward"),
    ([_c("trained", "up"), _c("independent", "up", "independent RM")],
     "gold accuracy (trained against, on held-out prompts) rose and independent RM confirms it"),
    ([_c("proxy", "flat"), _c("trained", "up"), _c("independent", "down", "independent RM")],
     "gold accuracy (trained against, on held-out prompts) rose while independent RM fell"),
    ([_c("proxy", "up"), _c("trained", "up")], "proxy reward rose; nothing independent was measured"),
])
def test_reading(checks, expected):
    assert reading(checks).startswith(expected)


def _scores(proxy_ci, other_ci, gold_ci):
    def rm(ci):
        return {"mean": 1.0, "ci95": [0, 2], "paired_diff": (ci[0] + ci[1]) / 2, "paired_diff_ci95": ci}

    return {"reference": "base", "proxy": "scalar", "models": {
        "base": {"rewards": {"scalar": {"mean": 1.0, "ci95": [0, 2]}, "dist": {"mean": 5.0, "ci95": [4, 6]}},
                 "gold": {"n": 20, "correct": 5, "accuracy": 0.25, "ci95": [0.1, 0.4]}},
        "tuned": {"rewards": {"scalar": rm(proxy_ci), "dist": rm(other_ci)},
                  "gold": {"n": 20, "correct": 5, "accuracy": 0.25, "ci95": [0.1, 0.4], "paired_diff": 0.0,
                           "paired_diff_ci95": gold_ci}}}}


def test_verdict_from_a_scores_summary_and_a_judge():
    v = verdict(_scores([0.3, 0.9], [-0.1, 0.2], [-0.1, 0.1]),
                {"n": 16, "backend": "local", "win_rate": 0.47, "win_rate_ci95_wilson": [0.3, 0.65]})
    assert [c["kind"] for c in v["checks"]] == ["proxy", "independent", "gold", "judge"]
    assert [c["direction"] for c in v["checks"]] == ["up", "flat", "flat", "flat"]
    assert v["model"] == "tuned" and "likely exploiting the reward model" in v["reading"]
    md = verdict_markdown(v)
    assert "| proxy RM 'scalar' | +0.600 [0.300, 0.900] | reward | ↑ rose |" in md
    assert "| local judge | 0.470 [0.300, 0.650] | win rate, 16 pairs | ≈ no clear change |" in md
    assert "**Reading:** proxy reward rose" in md
    # Gold falls: over-optimisation named.
    v = verdict(_scores([0.3, 0.9], [-0.1, 0.2], [-0.4, -0.1]))
    assert v["reading"].startswith("proxy reward rose while gold accuracy fell")


def test_the_verdict_gives_mcnemar_for_the_gold_change():
    """The gold row and the reading carry gained/lost and the exact p; p >= 0.05 reads as not significant."""
    scores = _scores([0.3, 0.9], [-0.1, 0.2], [0.02, 0.3])
    gold = scores["models"]["tuned"]["gold"]
    gold["mcnemar"] = {"n": 20, "gained": 3, "lost": 0, "p_value": 0.25}  # 2 * 0.5^3, by hand
    v = verdict(scores)
    assert next(c for c in v["checks"] if c["kind"] == "gold")["mcnemar"]["p_value"] == 0.25
    assert v["reading"].endswith("(gold accuracy: 3 gained, 0 lost, McNemar exact p = 0.25 (not significant))")
    assert ("| gold accuracy | +0.000 [0.020, 0.300] | accuracy, 20 prompts | ↑ rose; 3 gained, 0 lost, McNemar "
            "exact p = 0.25 (not significant) |") in verdict_markdown(v)
    gold["mcnemar"] = {"n": 20, "gained": 6, "lost": 0, "p_value": 2 / 64}
    assert "6 gained, 0 lost, McNemar exact p = 0.0312 (significant)" in verdict_markdown(verdict(scores))
    del gold["mcnemar"]  # an older summary without the test: the verdict as before
    assert "McNemar" not in verdict_markdown(verdict(scores))


def test_gold_trained_against_is_not_an_independent_check(tmp_path):
    """A policy trained with a gold reward: its held-out gold gain is reported as trained against, and the
    reading rests on the reward models it never trained against."""
    from alignment.evaluation.verdict import trained_against

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"stage": "grpo", "config": {
        "reward_model": None, "rewards": [{"kind": "reward_model", "folder": "rm"}, {"kind": "gold"}]}}))
    assert trained_against(folder) == ["gold", "reward_model"] and trained_against(tmp_path / "nothing") == []
    (folder / "manifest.json").write_text(json.dumps({"stage": "reinforce", "config": {"reward_model": "rm"}}))
    assert trained_against(folder) == ["reward_model"]
    best = tmp_path / "best"  # an online run's best/ folder records its config in best.json
    best.mkdir()
    (best / "best.json").write_text(json.dumps({"step": 15, "config": {"rewards": [{"kind": "gold"}]}}))
    assert trained_against(best) == ["gold"]
    scores = _scores([-0.1, 0.1], [-0.1, 0.2], [0.05, 0.3])
    scores["models"]["tuned"]["trained_against"] = ["gold", "reward_model"]
    v = verdict(scores)
    gold = next(c for c in v["checks"] if c["kind"] == "trained")
    assert gold["name"] == "gold accuracy (trained against, held-out prompts)" and gold["direction"] == "up"
    assert v["reading"] == ("gold accuracy (trained against, on held-out prompts) rose, independent RM 'dist' did "
                            "not: the policy is likely exploiting its training reward rather than getting better")
    assert "| gold accuracy (trained against, held-out prompts) | +0.000 [0.050, 0.300]" in verdict_markdown(v)


def test_rouge_against_the_references_is_a_check_of_its_own():
    """Scored posts with reference summaries: the paired ROUGE-L gain is a check beside gold and the judge
    (the tldr run of the README: proxy up, ROUGE-L flat -> the exploitation reading)."""
    scores = _scores([0.005, 0.184], [-0.1, 0.2], [-0.1, 0.1])
    tuned = scores["models"]["tuned"]
    tuned["rouge"] = {"rougeL": {"mean": 0.17, "ci95": [0.14, 0.2], "n": 16}}
    tuned["rouge_gain"] = {"rougeL": {"mean": -0.006, "ci95": [-0.023, 0.010]}}
    v = verdict(scores)
    assert [c["kind"] for c in v["checks"]] == ["proxy", "independent", "gold", "reference"]
    assert "| ROUGE-L vs references | -0.006 [-0.023, 0.010] | ROUGE-L F, 16 posts | ≈ no clear change |" in (
        verdict_markdown(v))
    assert v["reading"] == ("proxy reward rose, independent RM 'dist', gold accuracy and ROUGE-L vs references did "
                            "not: the policy is likely exploiting the reward model rather than getting better")
    tuned["rouge_gain"]["rougeL"]["ci95"] = [0.01, 0.05]
    assert "ROUGE-L vs references confirms it" in verdict(scores)["reading"]


def _history(proxy, gold, independent):
    return [{"step": 10 * i, "proxy": p, "gold": g, "independent": {"dist": r}, "independent_std": {"dist": 0.4}}
            for i, (p, g, r) in enumerate(zip(proxy, gold, independent, strict=True))]


def test_alarm_fires_when_the_proxy_rises_and_gold_falls():
    history = _history([1.0, 1.5, 2.0], [0.50, 0.45, 0.40], [5.0, 5.0, 5.0])
    message = overoptimisation_alarm(history, window=3, gold_margin=0.05, rm_margin_sd=0.25)
    assert message == ("over-optimisation: from step 0 to 20 the proxy reward rose 1.000 -> 2.000 while gold "
                       "accuracy 0.500 -> 0.400")


def test_alarm_fires_when_an_independent_rm_falls_by_more_than_its_margin():
    history = _history([1.0, 1.5, 2.0], [None] * 3, [5.0, 4.95, 4.85])  # fell 0.15 > 0.25 * 0.4 = 0.10
    assert "independent RM 'dist' 5.000 -> 4.850" in overoptimisation_alarm(history, 3, 0.05, 0.25)
    history = _history([1.0, 1.5, 2.0], [None] * 3, [5.0, 4.95, 4.92])  # fell 0.08 < 0.10: noise
    assert overoptimisation_alarm(history, 3, 0.05, 0.25) is None


def test_alarm_ignores_gold_when_gold_is_trained_against():
    history = _history([1.0, 1.5, 2.0], [0.50, 0.45, 0.40], [5.0, 5.0, 5.0])
    assert overoptimisation_alarm(history, 3, 0.05, 0.25, watch_gold=False) is None
    history = _history([1.0, 1.5, 2.0], [0.50, 0.45, 0.40], [5.0, 4.9, 4.8])  # the RM not trained against fell
    assert "independent RM 'dist'" in overoptimisation_alarm(history, 3, 0.05, 0.25, watch_gold=False)


def test_no_alarm_when_both_rise_or_the_proxy_does_not():
    assert overoptimisation_alarm(_history([1.0, 1.5, 2.0], [0.4, 0.45, 0.5], [5.0, 5.1, 5.2]), 3, 0.05, 0.25) is None
    assert overoptimisation_alarm(_history([2.0, 1.5, 1.0], [0.5, 0.4, 0.3], [5.0, 4.0, 3.0]), 3, 0.05, 0.25) is None
    assert overoptimisation_alarm(_history([1.0, 2.0], [0.5, 0.3], [5.0, 4.0]), 3, 0.05, 0.25) is None  # too short
    # Only the last window counts: an early fall followed by a recovery does not fire.
    history = _history([0.5, 0.6, 1.0, 1.5, 2.0], [0.9, 0.2, 0.40, 0.42, 0.44], [5.0] * 5)
    assert overoptimisation_alarm(history, 3, 0.05, 0.25) is None


def test_best_score_prefers_gold_then_the_first_independent_rm():
    assert best_score({"gold": 0.4, "independent": {"a": 5.0}}) == 0.4
    assert best_score({"gold": None, "independent": {"a": 5.0, "b": 1.0}}) == 5.0
    assert best_score({"gold": None, "independent": {}}) is None


def test_the_lenient_gold_check_is_a_second_row_with_its_own_mcnemar():
    """reasoning-gym items: the lenient check (a number stated in words) beside the strict one; a strict gain
    without a lenient one would be a gain in the answer format alone, so both are read."""
    scores = _scores([0.1, 0.4], [0.0, 0.2], [0.02, 0.3])
    tuned = scores["models"]["tuned"]
    tuned["gold"]["mcnemar"] = {"n": 20, "gained": 3, "lost": 0, "p_value": 0.25}
    tuned["gold_lenient"] = {"n": 20, "correct": 9, "accuracy": 0.45, "ci95": [0.2, 0.6], "paired_diff": 0.0,
                             "paired_diff_ci95": [-0.1, 0.1], "mcnemar": {"n": 20, "gained": 2, "lost": 2, "p_value": 1.0}}
    v = verdict(scores)
    rows = [c for c in v["checks"] if c["kind"] == "gold"]
    assert [c["name"] for c in rows] == ["gold accuracy", "gold accuracy, lenient"]
    assert [c["direction"] for c in rows] == ["up", "flat"]
    assert v["reading"].endswith("(gold accuracy: 3 gained, 0 lost, McNemar exact p = 0.25 (not significant); "
                                 "gold accuracy, lenient: 2 gained, 2 lost, McNemar exact p = 1 (not significant))")


def test_the_verdict_warns_when_answers_degenerate_or_lose_their_eos():
    """Degenerate share up by >= 0.05 or EOS down by >= 0.10 (absolute) is a warning in the reading; smaller
    moves are listed, not flagged."""
    scores = _scores([0.1, 0.4], [0.0, 0.2], [0.02, 0.3])
    base, tuned = scores["models"]["base"], scores["models"]["tuned"]
    base.update(eos_rate=0.96, degenerate={"share": 0.0})
    tuned.update(eos_rate=0.90, degenerate={"share": 0.04})
    v = verdict(scores)
    assert v["health"] == {"degenerate_share": [0.0, 0.04], "eos_rate": [0.96, 0.90], "warnings": []}
    assert "; but" not in v["reading"]
    assert "Answers: degenerate share 0.000 -> 0.040, EOS rate 0.96 -> 0.90 (no warning)." in verdict_markdown(v)
    tuned.update(eos_rate=0.80, degenerate={"share": 0.05})
    v = verdict(scores)
    assert v["reading"].endswith("; but degenerate answers rose (0.000 -> 0.050) and the EOS rate fell "
                                 "(0.96 -> 0.80: answers cut off)")
    del tuned["degenerate"], tuned["eos_rate"]  # an older summary: nothing to say
    assert verdict(scores)["health"]["warnings"] == []
