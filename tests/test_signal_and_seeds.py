"""Where GRPO has a gradient (alignment/evaluation/signal.py) and one recipe on several seeds
(alignment/seeds.py, `align seeds`): figures against hand-computed values."""

from __future__ import annotations

import json

import pytest

from alignment.evaluation.signal import signal_by_task, signal_table, task_signal
from alignment.seeds import seed_overrides, seed_row, seeds_markdown, seeds_summary
from cli.main import main


def test_task_signal_by_hand():
    # 4 prompts, k = 4 samples: counts 0, 1, 2, 4. pass@1 = mean(c/k) = (0 + .25 + .5 + 1) / 4 = 0.4375;
    # pass@4 = share of prompts with any right = 3/4; mixed = 0 < c < 4: two of four.
    s = task_signal("t", [0, 1, 2, 4], 4, greedy=[False, False, True, True], formatted=[0, 1, 4, 3])
    assert (s.n, s.k, s.greedy, s.mixed) == (4, 4, 0.5, 0.5)
    assert s.pass_at_1 == pytest.approx(0.4375) and s.pass_at_k == pytest.approx(0.75)
    assert s.format == pytest.approx(8 / 16)
    # pass@2 of one prompt with c = 1 of n = 4: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 (through the per-task mean)
    assert task_signal("u", [1], 4).pass_at_k == 1.0  # pass@k with k = n: any right
    with pytest.raises(ValueError, match="outside"):
        task_signal("t", [5], 4)
    with pytest.raises(ValueError, match="no prompts"):
        task_signal("t", [], 4)


def test_signal_by_task_groups_in_first_seen_order_and_tabulates():
    rows = signal_by_task(["b", "a", "b"], [8, 0, 0], 8)
    assert [(r.task, r.n, r.pass_at_1, r.mixed) for r in rows] == [("b", 2, 0.5, 0.0), ("a", 1, 0.0, 0.0)]
    table = signal_table(rows)
    assert "| task | prompts | greedy | pass@1 | pass@8 | mixed groups | format |" in table
    assert "| b | 2 | - | 0.500 | 0.500 | 0.000 | - |" in table


def _scores(gold_after, gold_before, p, rm_diff, lenient=None):
    def gold(acc, diff=None, p=None):
        out = {"n": 300, "accuracy": acc, "correct": int(acc * 300), "ci95": [acc - .05, acc + .05],
               "by_task": {"sums": {"n": 300, "correct": int(acc * 300), "accuracy": acc, "ci95": [acc - .05, acc + .05]}}}
        if diff is not None:
            out.update(paired_diff=diff, paired_diff_ci95=[diff - .04, diff + .04],
                       mcnemar={"n": 300, "gained": 40, "lost": 10, "p_value": p})
        return out
    return {"reference": "base", "n_prompts": 300, "models": {
        "base": {"gold": gold(gold_before), "gold_lenient": lenient and gold(lenient[0]), "eos_rate": 0.9,
                 "mean_length": 30.0, "degenerate": {"share": 0.01}, "rewards": {}},
        "tuned": {"gold": gold(gold_after, gold_after - gold_before, p), "eos_rate": 1.0, "mean_length": 12.0,
                  "gold_lenient": lenient and gold(lenient[1], lenient[1] - lenient[0], p / 10),
                  "degenerate": {"share": 0.0},
                  "rewards": {"dist": {"role": "independent", "paired_diff": rm_diff,
                                       "paired_diff_ci95": [rm_diff - 0.1, rm_diff + 0.1]},
                              "proxy": {"role": "proxy", "paired_diff": 9.0, "paired_diff_ci95": [8, 10]}}}}}


def test_seed_rows_and_the_spread_across_seeds():
    rows = [seed_row(0, _scores(0.30, 0.10, 1e-6, 0.1, lenient=(0.2, 0.4))),
            seed_row(1, _scores(0.20, 0.10, 0.03, -0.1)),
            seed_row(2, _scores(0.40, 0.10, 1e-9, 0.3))]
    assert rows[0]["gold"]["paired_diff"] == pytest.approx(0.2) and rows[0]["gold"]["p_value"] == 1e-6
    assert rows[0]["independent"] == {"dist": {"paired_diff": 0.1, "ci95": [0.0, pytest.approx(0.2)]}}  # not the proxy
    assert rows[1]["gold_lenient"] is None and rows[0]["eos"] == (0.9, 1.0)
    summary = seeds_summary(rows)
    # diffs 0.2, 0.1, 0.3: mean 0.2, sample sd 0.1; seed 1's p = 0.03 is not below 0.01
    assert summary["gold"]["mean"] == pytest.approx(0.2) and summary["gold"]["sd"] == pytest.approx(0.1)
    assert (summary["gold"]["min"], summary["gold"]["max"]) == (pytest.approx(0.1), pytest.approx(0.3))
    assert summary["independent"]["dist"]["mean"] == pytest.approx(0.1)
    assert summary["significant_gain_seeds"] == {"gold": [0, 2], "gold_lenient": [0]}  # lenient p = p / 10
    assert summary["gold_lenient"]["n"] == 1
    md = seeds_markdown(summary)
    assert "| 0 | 300 | 0.100 -> 0.300 | +0.200 [+0.160, +0.240] | 40/10, p=1e-06 |" in md
    assert "- seeds with a gold (strict) gain at McNemar p < 0.01: 2 of 3 (0, 2)" in md
    assert "- seeds with a gold (lenient) gain at McNemar p < 0.01: 1 of 3 (0)" in md
    assert rows[0]["by_task"]["sums"]["gold_lenient"] == {"n": 300, "before": 0.2, "after": 0.4,
                                                          "ci95": [pytest.approx(0.35), 0.45]}
    assert "| 0 | sums | 300 | 0.100 -> 0.300 [0.250, 0.350] | 0.200 -> 0.400 [0.350, 0.450] |" in md
    assert "| 1 | sums | 300 | 0.100 -> 0.200 [0.150, 0.250] | — |" in md
    assert "- gold (strict): +0.200 ± 0.100 (range +0.100 to +0.300, 3 seeds)" in md
    with pytest.raises(ValueError, match="no model 'tuned'"):
        seed_row(0, {**_scores(.3, .1, .01, 0), "models": {"base": {}}})


def test_seed_overrides_name_the_rl_stage_by_its_algorithm():
    assert seed_overrides(3, "grpo") == {"prompts": {"seed": 3}, "grpo": {"seed": 3}, "score": {"seed": 3}}


def test_seeds_command_sets_each_seed_and_refuses_bad_seed_lists(capsys):
    assert main(["seeds", "--seeds", "4,5", "--print-config"]) == 0
    configs = json.loads(capsys.readouterr().out)
    assert list(configs) == ["4", "5"]
    for seed, c in configs.items():
        assert c["prompts"]["seed"] == c["grpo"]["seed"] == c["score"]["seed"] == int(seed)
        assert c["data"]["seed"] == 0 and c["rm_distributional"]["seed"] == 0  # shared: trained once
        assert c["prompts"]["source"].startswith("gym:") and c["options"]["algorithm"] == "grpo"
    for bad in ("1,1", "a,b", "", "-1"):
        assert main(["seeds", "--seeds", bad, "--print-config"]) == 2
        assert "--seeds" in capsys.readouterr().err


def test_align_signal_measures_training_prompts_only_per_task(tmp_path, tiny_model, capsys):
    """Through the CLI on a gym data folder with the tiny random model: one row per task, n_per_task training
    prompts each (never the held-out ones), figures in range, and the --json file."""
    from alignment.evaluation.signal import select_train_items

    data = tmp_path / "d"
    assert main(["data", "--source", "gym:chain_sum:12,letter_counting:12", "--out", str(data)]) == 0
    items, tasks = select_train_items(data, 3, 0)
    assert tasks == ["chain_sum"] * 3 + ["letter_counting"] * 3
    assert {json.loads(i.gold_answer)["seed"] for i in items} == {0}  # the training seed, not the held-out one
    out = tmp_path / "signal.json"
    capsys.readouterr()
    assert main(["signal", "--data", str(data), "--model", str(tiny_model), "--json", str(out), "n_per_task=3", "k=2",
                 "max_new_tokens=4"]) == 0
    printed = capsys.readouterr().out
    assert "| chain_sum | 3 |" in printed and "| letter_counting | 3 |" in printed
    rows = json.loads(out.read_text())["tasks"]
    assert [(r["task"], r["n"], r["k"]) for r in rows] == [("chain_sum", 3, 2), ("letter_counting", 3, 2)]
    assert all(0 <= r[f] <= 1 for r in rows for f in ("greedy", "pass_at_1", "pass_at_k", "mixed", "format"))
    assert main(["signal", "--data", str(tmp_path / "nothing"), "--model", str(tiny_model)]) == 2
    assert "no train.parquet" in capsys.readouterr().err


def test_score_stage_on_gym_items_reports_the_lenient_check_beside_the_strict_one(tmp_path, eval_stack):
    """reasoning-gym prompts: scores.json holds gold (strict) and gold_lenient with their own McNemar tests,
    the generations a per-answer gold_lenient, and the scorer errors counted during the stage."""
    data, out = tmp_path / "d", tmp_path / "s"
    assert main(["data", "--source", "gym:chain_sum:16", "--out", str(data)]) == 0
    assert main(["score", "--data", str(data), "--model", f"base={eval_stack['base']}", "--model",
                 f"tuned={eval_stack['tuned']}", "--rm", f"scalar={eval_stack['rm']}", "--out", str(out), "n_prompts=4",
                 "max_new_tokens=4", "kl=false", "bootstrap=100", "samples_per_prompt=2"]) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["scorer_errors"] == {}
    tuned = summary["models"]["tuned"]
    rows = [json.loads(line) for line in (out / "generations" / "tuned.jsonl").read_text().splitlines()]
    assert tuned["gold_lenient"]["n"] == tuned["gold"]["n"] == len(rows) == 3  # 3 of 16 held out
    assert tuned["gold_lenient"]["correct"] == sum(bool(r["gold_lenient"]) for r in rows)
    assert tuned["gold_lenient"]["correct"] >= tuned["gold"]["correct"]  # lenient accepts all strict accepts
    assert "mcnemar" in tuned["gold_lenient"] and "mcnemar" not in summary["models"]["base"]["gold_lenient"]
    assert "Lenient check" in (out / "scores.md").read_text()
    strict, lenient = tuned["pass_at_k"], tuned["pass_at_k_lenient"]  # pass@k by each check, from 2 samples
    assert (strict["k"], strict["n"], lenient["n"]) == (2, 3, 3) and lenient["pass_at_k"] >= strict["pass_at_k"]
    assert lenient["pass_at_1"] == pytest.approx(sum(r["samples_correct_lenient"] for r in rows) / 6)
    assert "lenient pass@2" in (out / "scores.md").read_text()
