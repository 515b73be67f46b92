"""The scoring stage: fixed prompts, both models, the same reward model; saved generations; stats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignment.evaluation.evaluate import EvaluationError, ScoreConfig, run_score_stage, select_prompts
from alignment.evaluation.stats import bootstrap_ci
from alignment.rewards.model import RewardScorer


def test_bootstrap_ci_hand_cases():
    assert bootstrap_ci([2.0] * 20) == (2.0, 2.0)  # no spread, no width
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, n_resamples=4000)
    # mean 0.5, standard error 0.05: the 95% interval is about 0.5 +- 0.098
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert np.isnan(bootstrap_ci([])[0])


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
