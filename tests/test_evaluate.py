"""The scoring stage: fixed prompts, both models, the same reward model; saved generations; stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignment.evaluation.degenerate import degenerate_reason, degenerate_share
from alignment.evaluation.evaluate import (
    EvaluationError,
    ScoreConfig,
    gold_summary,
    pass_at_k_summary,
    run_score_stage,
    scores_markdown,
    select_prompts,
)
from alignment.evaluation.stats import bootstrap_ci, wilson_interval
from alignment.rewards.model import RewardScorer


def test_bootstrap_ci_hand_cases():
    assert bootstrap_ci([2.0] * 20) == (2.0, 2.0)  # no spread, no width
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, n_resamples=4000)
    # mean 0.5, standard error 0.05: the 95% interval is about 0.5 +- 0.098
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert np.isnan(bootstrap_ci([])[0])


# 8 prompts, one without a gold answer (index 5); tasks a and b. The tuned model fixes prompts 0, 1 and 2 and
# breaks none: gained 3, lost 0, so McNemar's exact p = 2 * P(X <= 0), X ~ Bin(3, 1/2) = 2 / 8 = 0.25.
TUNED = [True, True, True, False, True, None, False, True]
BASE = [False, False, False, False, True, None, False, True]
TASKS = ["a", "a", "b", "b", "a", "b", "b", "a"]


def test_gold_summary_hand_counts():
    g = gold_summary(TUNED, BASE, TASKS)
    assert (g["n"], g["correct"]) == (7, 5) and g["ci95"] == wilson_interval(5, 7)
    assert g["paired_diff"] == pytest.approx(3 / 7)
    assert g["mcnemar"] == {"n": 7, "gained": 3, "lost": 0, "p_value": 0.25}
    # Per task (the graded prompts only): a = 0, 1, 4, 7 all right; b = 2, 3, 6 with one right.
    assert g["by_task"] == {"a": {"n": 4, "correct": 4, "accuracy": 1.0, "ci95": wilson_interval(4, 4)},
                            "b": {"n": 3, "correct": 1, "accuracy": 1 / 3, "ci95": wilson_interval(1, 3)}}
    # 4 gained, 1 lost: p = 2 * (C(5,0) + C(5,1)) / 2^5 = 0.375; 6 gained, 0 lost: p = 2 / 64.
    assert gold_summary([1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1])["mcnemar"]["p_value"] == 0.375
    assert gold_summary([1] * 6, [0] * 6)["mcnemar"] == {"n": 6, "gained": 6, "lost": 0, "p_value": 2 / 64}
    base = gold_summary(BASE, None, TASKS)
    assert "mcnemar" not in base and "paired_diff" not in base and base["by_task"]["b"]["correct"] == 0
    assert "by_task" not in gold_summary(TUNED, BASE) and gold_summary([None, None], [None, None]) is None


def test_degenerate_share_of_hand_written_answers():
    prompt = "What is the capital of France?"
    answers = ["  ", "!!!!!!!! !!!!", "what is the capital of France", "Paris."]
    assert [degenerate_reason(a, prompt) for a in answers] == ["empty", "repetition", "echo", None]
    assert degenerate_share(answers, [prompt] * 4) == {"n": 4, "empty": 1, "repetition": 1, "echo": 1,
                                                        "degenerate": 3, "share": 0.75}


def test_scores_markdown_shows_mcnemar_tasks_and_degenerate_answers():
    def model(correct, reference, degenerate):
        return {"rewards": {}, "kl_to_reference": None, "gold": gold_summary(correct, reference, TASKS),
                "degenerate": degenerate}

    summary = {"n_prompts": 8, "reference": "base", "greedy": True, "max_new_tokens": 16, "n_gold_prompts": 7,
               "models": {"base": model(BASE, None, degenerate_share(["a b c", ""])),
                          "tuned": model(TUNED, BASE, degenerate_share(["Paris.", "Rome."]))}}
    md = scores_markdown(summary)
    assert f"| tuned | 0.714 [{wilson_interval(5, 7)[0]:.3f}, {wilson_interval(5, 7)[1]:.3f}] | 5/7 | +0.429" in md
    assert md.split("| tuned | 0.714")[1].split("\n")[0].endswith("| 3 / 0 | 0.25 |")
    lo, hi = wilson_interval(1, 3)
    assert f"| tuned | b | 0.333 [{lo:.3f}, {hi:.3f}] | 1/3 |" in md and "| base | a | 0.500" in md
    assert "| base | 1 | 0 | 0 | 0.500 |" in md and "| tuned | 0 | 0 | 0 | 0.000 |" in md
    assert "3 gained, 0 lost, McNemar exact p = 0.25 (not significant)" in md  # the verdict reads the test


def test_pass_at_k_summary_hand_values():
    # 3 gold prompts, 3 samples each, 0, 1 and 3 right (None: no gold answer): pass@1 = (0 + 1/3 + 1) / 3 = 4/9;
    # pass@3 = (0 + 1 + 1) / 3 (one right of three is a hit when all three are drawn).
    assert pass_at_k_summary([0, None, 1, 3], 3) == pytest.approx({"k": 3, "n": 3, "pass_at_1": 4 / 9,
                                                                    "pass_at_k": 2 / 3})
    # k = 4, c = 1 of n = 4: pass@1 = 1/4; c = 2: pass@1 = 1/2; pass@4 = 1 for both.
    assert pass_at_k_summary([1, 2], 4) == pytest.approx({"k": 4, "n": 2, "pass_at_1": 0.375, "pass_at_k": 1.0})
    assert pass_at_k_summary([None, None], 8) is None


def test_score_stage_samples_for_pass_at_k(eval_stack, tmp_path):
    config = ScoreConfig(models={"base": str(eval_stack["base"]), "tuned": str(eval_stack["tuned"])},
                         reward_models={"scalar": str(eval_stack["rm"])}, data=str(eval_stack["data"]), n_prompts=6,
                         max_new_tokens=4, kl=False, bootstrap=100, bf16=False, samples_per_prompt=3)
    summary = run_score_stage(config, tmp_path / "s").summary
    rows = [json.loads(line) for line in (tmp_path / "s" / "generations" / "tuned.jsonl").read_text().splitlines()]
    counts = [row["samples_correct"] for row in rows]
    assert [c is None for c in counts] == [row["gold_answer"] is None for row in rows]
    assert summary["n_gold_prompts"] > 0 and all(0 <= c <= 3 for c in counts if c is not None)
    assert summary["models"]["tuned"]["pass_at_k"] == pass_at_k_summary(counts, 3)
    assert "| tuned | " in (tmp_path / "s" / "scores.md").read_text().split("pass@3 | prompts |")[1]
    # The default (one answer per prompt) samples nothing more.
    scores = json.loads((eval_stack["scores"] / "scores.json").read_text())
    assert "pass_at_k" not in scores["models"]["tuned"]
    assert "samples_correct" not in (eval_stack["scores"] / "generations" / "tuned.jsonl").read_text()


def test_prompts_are_a_fixed_seeded_subset(eval_stack):
    a = select_prompts(eval_stack["data"], 20, seed=0)
    assert a == select_prompts(eval_stack["data"], 20, seed=0)
    assert a != select_prompts(eval_stack["data"], 20, seed=1)
    assert len({json.dumps(p) for p in a}) == 20


def test_score_stage_outputs(eval_stack):
    out = eval_stack["scores"]
    summary = json.loads((out / "scores.json").read_text())
    assert summary["n_prompts"] == 56 and summary["reference"] == "base"
    base, tuned = summary["models"]["base"], summary["models"]["tuned"]
    assert base["kl_to_reference"] == 0.0 and tuned["kl_to_reference"] != 0.0
    r = tuned["rewards"]["scalar"]
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1]
    assert r["paired_diff_ci95"][0] <= r["paired_diff"] <= r["paired_diff_ci95"][1]
    assert "paired_diff" not in base["rewards"]["scalar"]
    for key in ("mean_length", "eos_rate", "distinct2", "repetition"):
        assert np.isfinite(tuned[key])
    # The saved generations carry the same rewards the scorer gives when asked again.
    rows = [json.loads(line) for line in (out / "generations" / "tuned.jsonl").read_text().splitlines()]
    assert len(rows) == 56 and rows[0]["id"] == 0
    scorer = RewardScorer.from_pretrained(eval_stack["rm"], bf16=False)
    again = scorer.score([row["prompt"] for row in rows[:5]], [row["completion"] for row in rows[:5]]).mean
    assert again.tolist() == pytest.approx([row["rewards"]["scalar"]["mean"] for row in rows[:5]], abs=1e-4)
    assert np.mean([row["rewards"]["scalar"]["mean"] for row in rows]) == pytest.approx(r["mean"], abs=1e-6)
    # Gold: the demo validation prompts carry answers; accuracy with a Wilson interval, paired difference.
    assert summary["n_gold_prompts"] > 0 and summary["proxy"] is None
    g = tuned["gold"]
    assert g["n"] == summary["n_gold_prompts"] and g["ci95"][0] <= g["accuracy"] <= g["ci95"][1]
    assert g["paired_diff_ci95"][0] <= g["paired_diff"] <= g["paired_diff_ci95"][1] and "paired_diff" not in base["gold"]
    graded = [row for row in rows if row["gold_answer"] is not None]
    assert len(graded) == g["n"] and sum(row["gold_correct"] for row in graded) == g["correct"]
    base_rows = [json.loads(line) for line in (out / "generations" / "base.jsonl").read_text().splitlines()]
    lost = sum(bool(b["gold_correct"]) and t["gold_correct"] is False for b, t in zip(base_rows, rows, strict=True))
    gained = sum(b["gold_correct"] is False and bool(t["gold_correct"]) for b, t in zip(base_rows, rows, strict=True))
    assert (g["mcnemar"]["n"], g["mcnemar"]["gained"], g["mcnemar"]["lost"]) == (g["n"], gained, lost)
    assert "mcnemar" not in base["gold"]
    assert list(g["by_task"]) == ["all"] and g["by_task"]["all"]["correct"] == g["correct"]  # the demo names no task
    assert tuned["gold_lenient"] is None and summary["scorer_errors"] == {}  # no reasoning-gym item here
    # Degenerate answers: the counts per reason of the saved answers against their prompts.
    reasons = [degenerate_reason(row["completion"], row["prompt"][-1]["content"]) for row in rows]
    d = tuned["degenerate"]
    assert d["n"] == 56 and all(d[r] == reasons.count(r) for r in ("empty", "repetition", "echo"))
    # The table and the plot.
    table = (out / "scores.md").read_text()
    assert "| tuned | scalar |" in table and "paired diff" in table and "| tuned | " in table.split("Gold checks")[1]
    assert table.startswith("## Verdict: `tuned` against `base`")
    assert (out / "rewards.png").stat().st_size > 1000


def test_score_stage_is_reused_and_checks_inputs(eval_stack, tmp_path):
    config = ScoreConfig(**json.loads((eval_stack["scores"] / "manifest.json").read_text())["config"])
    assert run_score_stage(config, eval_stack["scores"]).reused
    with pytest.raises(EvaluationError, match="no reward model"):
        run_score_stage(config.model_copy(update={"reward_models": {}}), tmp_path / "x")
    with pytest.raises(EvaluationError, match="'bad'.*not a saved reward model"):
        run_score_stage(config.model_copy(update={"reward_models": {"bad": str(tmp_path)}}), tmp_path / "y")
    with pytest.raises(ValueError, match="at least one model"):
        ScoreConfig(data="x", models={})


def test_cli_score_prints_the_table(eval_stack, tmp_path, capsys):
    from cli.main import main

    code = main(["score", "--data", str(eval_stack["data"]), "--rm", str(eval_stack["rm"]),
                 "--model", f"base={eval_stack['base']}", "--model", f"tuned={eval_stack['tuned']}",
                 "--out", str(tmp_path / "s"), "n_prompts=4", "max_new_tokens=4", "kl=false"])
    out = capsys.readouterr().out
    assert code == 0 and "| tuned | scalar |" in out
    assert (tmp_path / "s" / "generations" / "base.jsonl").is_file()
    assert main(["score", "--data", str(eval_stack["data"]), "--model", "nonsense", "--rm", "x"]) == 2
    assert "NAME=SPEC" in capsys.readouterr().err
