"""align compare on the tiny model: every algorithm trains in its own process on the same budget, one
scoring, one table; a second run reuses everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.compare import CompareConfig, algorithm_configs


def test_equal_budgets():
    cfg = CompareConfig(data="d", reward_model="r", samples=32, batch_size=8,
                        algorithms=["reinforce", "rloo", "ppo", "reinforce++", "dpo"])
    configs = {name: c for name, (_, c) in algorithm_configs(cfg).items()}
    for name in ("reinforce", "rloo", "ppo", "reinforce++"):
        c = configs[name]
        assert c.steps * c.batch_size * c.samples_per_prompt == 32, name  # the same sampled completions
    assert configs["rloo"].baseline == "rloo" and configs["rloo"].samples_per_prompt == 2
    assert configs["reinforce++"].estimator == "reinforce++" and configs["ppo"].estimator == "gae"
    assert configs["dpo"].data == "d"
    with pytest.raises(ValueError, match="less than one batch"):
        CompareConfig(samples=4, batch_size=8)


@pytest.mark.slow
def test_compare_runs_every_algorithm_and_reuses(tmp_path, tiny_stack, capsys, monkeypatch):
    from cli.main import main

    policy, rm, data = tiny_stack
    monkeypatch.setenv("ALIGNMENT_RUNS_DIR", str(tmp_path / "runs"))
    argv = ["-q", "compare", "--data", str(data), "--rm", str(rm), "--independent", f"other={rm}", "--policy",
            str(policy), "--out", str(tmp_path / "cmp"), "samples=4", "batch_size=2", "max_new_tokens=8",
            "eval_prompts=2", "n_prompts=4", "score_max_new_tokens=8", "learning_rate=1e-3", "bf16=false",
            "algorithms=[rloo,reinforce++,dpo]"]  # reinforce and ppo run in the flow test and test_ppo
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:  # tracked: the comparison is one MLflow run, each algorithm's stage (its own process) and the scoring its children
        assert main([*argv, f"tracking.uri={store}"]) == 0
    finally:
        from alignment import tracking

        tracking.configure("none")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name.startswith("compare ")]
    children = sorted(r.info.run_name.split()[0] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["dpo", "ppo", "reinforce", "score"]  # rloo is reinforce, reinforce++ is ppo
    assert all(r.info.status == "FINISHED" for r in runs)
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["algorithm"] for r in rows] == ["rloo", "reinforce++", "dpo"]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_rss_gb"] > 0 and "proxy:proxy" in r and "independent:other" in r
    assert "| reinforce++ |" in out and (tmp_path / "cmp" / "frontier.png").stat().st_size > 1000
    assert main(argv) == 0  # everything reused: same timings
    again = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert all(r["reused"] for r in again["runs"].values())
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in rows]


@pytest.mark.slow
def test_comparison_flow_caches_each_algorithm(prefect_harness, tmp_path, tiny_stack):
    from alignment.compare import CompareConfig
    from flows.compare import algorithm_comparison

    policy, rm, data = tiny_stack
    config = CompareConfig(policy=str(policy), data=str(data), reward_model=str(rm), algorithms=["reinforce", "dpo"],
                           samples=4, batch_size=2, max_new_tokens=8, eval_prompts=2, n_prompts=4,
                           score_max_new_tokens=8, learning_rate=1e-3, bf16=False)
    first = algorithm_comparison(config, str(tmp_path / "runs"))
    assert first["algorithms"] == {"reinforce": "Completed", "dpo": "Completed"}
    assert (Path(first["report"]) / "compare.md").is_file()
    again = algorithm_comparison(config, str(tmp_path / "runs"))
    assert again["algorithms"] == {"reinforce": "Cached", "dpo": "Cached"}
