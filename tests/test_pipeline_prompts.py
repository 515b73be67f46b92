"""The pipeline's optional prompts section: a second data stage whose prompts-only folder the RL stage trains on
and the score stage (so the judge) scores, while the reward models keep the pairs of `data`; and the
`demo-verifiable` preset built on it (GRPO against gold checks, the distributional RM independent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_pipeline_config

STAGES = ["data", "prompts", "rm_scalar", "rm_distributional", "grpo", "score", "judge"]


def _tiny(tiny_model, runs: Path):
    from alignment.algorithms.grpo import GRPOConfig
    from alignment.data import DataConfig
    from alignment.pipeline import PipelineOptions

    grpo = GRPOConfig(policy=str(tiny_model), steps=2, batch_size=2, samples_per_prompt=2, max_new_tokens=8,
                      eval_prompts=2, checkpoint_every=2, learning_rate=1e-3, guard_min_distinct2=0.0,
                      guard_max_repetition=1.0,
                      rewards=[{"kind": "gold", "weight": 1.0},
                               {"kind": "reward_model", "folder": "@rm_scalar", "weight": 0.1}])
    return tiny_pipeline_config(tiny_model, runs, prompts=DataConfig(source="demo-verifiable"), grpo=grpo,
                                options=PipelineOptions(runs_dir=str(runs), algorithm="grpo"))


@pytest.fixture(scope="module")
def prompts_pipeline(prefect_harness, tiny_model, tmp_path_factory):
    from flows.pipeline import run_pipeline

    config = _tiny(tiny_model, tmp_path_factory.mktemp("prompts") / "runs")
    return config, run_pipeline(config)


def _manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def test_prompts_stage_is_planned_and_wired(tiny_model, tmp_path):
    from alignment.pipeline import plan_pipeline

    stages = plan_pipeline(_tiny(tiny_model, tmp_path / "runs"))
    assert list(stages) == STAGES
    data, prompts = (str(stages[name][1].done) for name in ("data", "prompts"))
    assert data != prompts and Path(prompts).name.startswith("demo-verifiable-")
    assert stages["prompts"][0].source == "demo-verifiable"
    assert stages["rm_scalar"][0].data == data and stages["rm_distributional"][0].data == data
    assert stages["grpo"][0].data == prompts and stages["score"][0].data == prompts
    assert stages["grpo"][0].rewards[1].folder == str(stages["rm_scalar"][1].done)
    assert list(stages["grpo"][0].independent_reward_models) == ["distributional"]


def test_prompts_pipeline_end_to_end(prompts_pipeline):
    from alignment.data import PairData

    config, result = prompts_pipeline
    stages = result["stages"]
    assert list(stages) == STAGES and {info["state"] for info in stages.values()} == {"Completed"}
    data, prompts = stages["data"]["path"], stages["prompts"]["path"]
    assert _manifest(prompts)["prompts_only"] is True and not _manifest(data).get("prompts_only")
    # The reward models trained on the pairs, the RL stage on the verifiable prompts.
    assert _manifest(stages["rm_scalar"]["path"])["config"]["data"] == data
    assert _manifest(stages["rm_distributional"]["path"])["config"]["data"] == data
    rl = _manifest(stages["grpo"]["path"])["config"]
    assert rl["data"] == prompts and [c["kind"] for c in rl["rewards"]] == ["gold", "reward_model"]
    assert rl["rewards"][1]["folder"] == stages["rm_scalar"]["path"]
    assert rl["independent_reward_models"] == {"distributional": stages["rm_distributional"]["path"]}
    # Scoring scored the verifiable (held-out) prompts with their gold checks.
    score_dir = Path(stages["score"]["path"])
    assert _manifest(score_dir)["config"]["data"] == prompts
    scores = json.loads((score_dir / "scores.json").read_text())
    assert scores["n_gold_prompts"] == config.score.n_prompts and "constraints" in scores["gold_checkers"]
    validation = {json.dumps(item.messages) for item in
                  PairData.load(Path(prompts) / "validation.parquet", prompts_ok=True).prompt_items()}
    rows = [json.loads(line) for line in (score_dir / "generations" / "tuned.jsonl").read_text().splitlines()]
    assert all(json.dumps(row["prompt"]) in validation for row in rows)
    assert {row["gold_checker"] for row in rows} <= {"constraints", "number", "contains"}
    assert scores["models"]["tuned"]["trained_against"] == ["gold", "reward_model"]
    # The verdict: gold is what it trained for (on held-out prompts), the distributional RM is independent.
    checks = {c["name"]: c["kind"] for c in result["verdict"]["checks"]}
    assert checks["gold accuracy (trained against, held-out prompts)"] == "trained"
    assert checks["proxy RM 'scalar'"] == "proxy" and checks["independent RM 'distributional'"] == "independent"
    assert _manifest(stages["judge"]["path"])["config"]["scores"] == str(score_dir)


def test_demo_verifiable_preset(capsys):
    from alignment.pipeline import PipelineConfig, plan_pipeline
    from cli.main import main

    config = PipelineConfig(**PipelineConfig.preset("demo-verifiable"))
    assert config.data.source == "demo" and config.prompts.source == "demo-verifiable"
    assert config.options.algorithm == "grpo" and config.grpo.steps == 30 and config.grpo.kl_beta == 0.0
    assert [(c.kind, c.weight) for c in config.grpo.rewards] == [("gold", 1.0), ("reward_model", 0.1),
                                                                ("length", 0.5)]
    assert config.rm_scalar.max_train_pairs == PipelineConfig(**PipelineConfig.preset("demo")).rm_scalar.max_train_pairs
    stages = plan_pipeline(config)
    assert list(stages) == STAGES
    assert stages["grpo"][0].data == stages["score"][0].data == str(stages["prompts"][1].done)
    assert stages["rm_scalar"][0].data == str(stages["data"][1].done)
    assert stages["score"][0].proxy_reward_model == "scalar"
    assert main(["run", "--preset", "demo-verifiable", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompts"]["source"] == "demo-verifiable" and printed["options"]["algorithm"] == "grpo"
    assert printed["grpo"]["rewards"][1]["folder"] == "@rm_scalar" and printed["score"]["n_prompts"] == 30


def test_default_pipeline_has_no_prompts_stage():
    from alignment.pipeline import PipelineConfig, PipelineOptions, pipeline_stages, plan_pipeline

    demo = PipelineConfig(**PipelineConfig.preset("demo"))
    assert demo.prompts is None and "prompts" not in demo.flow_parameters()
    stages = plan_pipeline(demo)
    assert list(stages) == ["data", "rm_scalar", "rm_distributional", "reinforce", "score", "judge"]
    assert stages["reinforce"][0].data == stages["score"][0].data == str(stages["data"][1].done)
    assert pipeline_stages(PipelineOptions()) == list(stages)
    grpo = PipelineConfig(**PipelineConfig.preset("demo")).grpo  # `align run options.algorithm=grpo`: CPU-sized
    assert (grpo.steps, grpo.batch_size, grpo.samples_per_prompt, grpo.max_new_tokens, grpo.lora) == (8, 2, 4, 32, True)


def test_preset_placeholder_outside_the_pipeline_is_explained(tiny_model, tmp_path, capsys):
    """`align grpo --preset demo-verifiable` alone: its '@rm_scalar' is refused, saying only `align run` resolves it."""
    from alignment.data import DataConfig, run_data_stage
    from cli.main import main

    prompts = run_data_stage(DataConfig(source="demo-verifiable"), tmp_path / "prompts").out_dir
    assert main(["grpo", "--preset", "demo-verifiable", "--data", str(prompts), "--out", str(tmp_path / "g"),
                 f"policy={tiny_model}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert "@rm_scalar" in err and "is a placeholder that only the pipeline (`align run`) resolves" in err
    assert not (tmp_path / "g" / "final").exists()
