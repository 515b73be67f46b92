"""The pipeline's RL stage as any registered online algorithm (options.algorithm), reward components with
'@rm_<kind>' placeholders inside `align run`, and one served stage deployment per registered algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_pipeline_config

GUARD_OFF = dict(guard_min_distinct2=0.0, guard_max_repetition=1.0)


@pytest.fixture(scope="module")
def grpo_pipeline(prefect_harness, tiny_model, tmp_path_factory):
    from alignment.algorithms.grpo import GRPOConfig
    from alignment.pipeline import PipelineOptions
    from flows.pipeline import run_pipeline

    runs = tmp_path_factory.mktemp("algorithms") / "runs"
    grpo = GRPOConfig(policy=str(tiny_model), steps=2, batch_size=2, samples_per_prompt=2, max_new_tokens=8,
                      eval_prompts=2, checkpoint_every=2, learning_rate=1e-3, **GUARD_OFF)
    config = tiny_pipeline_config(tiny_model, runs, grpo=grpo,
                                  options=PipelineOptions(runs_dir=str(runs), algorithm="grpo"))
    return config, run_pipeline(config)


def _manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def test_grpo_pipeline_scores_the_grpo_policy(grpo_pipeline):
    config, result = grpo_pipeline
    runs = Path(config.options.runs_dir)
    assert list(result["stages"]) == ["data", "rm_scalar", "rm_distributional", "grpo", "score", "judge"]
    assert {info["state"] for info in result["stages"].values()} == {"Completed"}
    policy = Path(result["stages"]["grpo"]["path"])
    assert policy.name == "final" and policy.parent.parent == runs / "grpo"
    rl = _manifest(policy)
    assert rl["stage"] == "grpo" and rl["config"]["samples_per_prompt"] == 2
    assert rl["config"]["reward_model"] == result["stages"]["rm_scalar"]["path"]
    assert len((policy.parent / "metrics.jsonl").read_text().splitlines()) == 2
    score = _manifest(result["stages"]["score"]["path"])["config"]
    assert score["models"]["tuned"] == str(policy) and score["proxy_reward_model"] == "scalar"
    assert result["verdict"]["checks"] and result["report"]


def test_rewards_placeholder_is_resolved_and_not_both(grpo_pipeline):
    """reinforce.rewards with '@rm_scalar': the RL stage trains on the trained scalar RM (its real folder in
    the run's manifest), reward_model stays unset, the distributional RM stays independent; data and RMs
    come from the cache of the grpo run above."""
    from alignment.algorithms.reinforce import ReinforceConfig
    from alignment.pipeline import PipelineOptions, plan_pipeline
    from flows.pipeline import run_pipeline

    config, first = grpo_pipeline
    rewards = [{"kind": "reward_model", "folder": "@rm_scalar"},
               {"kind": "length", "max_tokens": 8, "buffer": 4, "weight": 0.5}]
    reinforce = ReinforceConfig(**{**config.reinforce.model_dump(exclude={"section"}), "rewards": rewards})
    cfg = config.model_copy(update={"reinforce": reinforce, "options": PipelineOptions(
        runs_dir=config.options.runs_dir, judge=False)})
    planned, _ = plan_pipeline(cfg)["reinforce"]
    scalar = first["stages"]["rm_scalar"]["path"]
    assert planned.reward_model is None and planned.rewards[0].folder == scalar
    assert planned.independent_reward_models == {"distributional": first["stages"]["rm_distributional"]["path"]}

    result = run_pipeline(cfg)
    states = {name: info["state"] for name, info in result["stages"].items()}
    assert states == {"data": "Cached", "rm_scalar": "Cached", "rm_distributional": "Cached",
                      "reinforce": "Completed", "score": "Completed"}
    rl = _manifest(result["stages"]["reinforce"]["path"])["config"]
    assert rl["reward_model"] is None
    assert [c["kind"] for c in rl["rewards"]] == ["reward_model", "length"] and rl["rewards"][0]["folder"] == scalar
    assert rl["independent_reward_models"] == {"distributional": first["stages"]["rm_distributional"]["path"]}
    rows = [json.loads(line) for line in (Path(result["stages"]["reinforce"]["path"]).parent
                                          / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/length/mean" in rows[-1] and "rewards/reward_model/mean" in rows[-1]
    assert _manifest(result["stages"]["score"]["path"])["config"]["proxy_reward_model"] == "scalar"


def test_placeholders_planned_without_running(tiny_model, tmp_path):
    """Wiring only: a real folder is left as given (then both trained RMs are independent and nothing is the
    proxy), an ensemble's '@rm_*' members are resolved, the default keeps reward_model, a placeholder of an
    untrained RM or an unknown one is refused before anything runs."""
    from alignment.algorithms.reinforce import ReinforceConfig
    from alignment.pipeline import PipelineOptions, check_pipeline, stage_config

    outputs = {"data": str(tmp_path / "data"), "rm_scalar": str(tmp_path / "s"), "rm_distributional": str(tmp_path / "d")}

    def wired(rewards, **options):
        rl = ReinforceConfig(policy=str(tiny_model), rewards=rewards)
        cfg = tiny_pipeline_config(tiny_model, tmp_path, reinforce=rl,
                                   options=PipelineOptions(runs_dir=str(tmp_path), **options))
        return cfg, stage_config(cfg, "reinforce", outputs)

    _, default = wired(None)
    assert default.reward_model == outputs["rm_scalar"] and default.rewards is None
    cfg, real = wired([{"kind": "reward_model", "folder": "/elsewhere/rm"}])
    assert real.rewards[0].folder == "/elsewhere/rm" and real.reward_model is None
    assert real.independent_reward_models == {"scalar": outputs["rm_scalar"], "distributional": outputs["rm_distributional"]}
    assert stage_config(cfg, "score", {**outputs, "reinforce": "x"}).proxy_reward_model is None
    _, ens = wired([{"kind": "ensemble", "members": ["@rm_scalar", "@rm_distributional"]}])
    assert ens.rewards[0].members == [outputs["rm_scalar"], outputs["rm_distributional"]]
    assert ens.independent_reward_models == {}
    cfg, _ = wired([{"kind": "reward_model", "folder": "@rm_distributional"}])
    check_pipeline(cfg)
    with pytest.raises(ValueError, match="train_distributional=false"):
        check_pipeline(wired([{"kind": "reward_model", "folder": "@rm_distributional"}],
                             train_distributional=False)[0])
    with pytest.raises(ValueError, match="unknown placeholder '@rm_gold'"):
        wired([{"kind": "reward_model", "folder": "@rm_gold"}])


def test_unknown_algorithm_is_a_clear_error(capsys):
    from pydantic import ValidationError

    from alignment.algorithms.registry import ALGORITHMS
    from alignment.pipeline import PipelineConfig
    from cli.main import main

    with pytest.raises(ValidationError, match="unknown algorithm 'sac'; known: grpo, ppo, reinforce"):
        PipelineConfig(options={"algorithm": "sac"})
    assert main(["run", "--print-config", "options.algorithm=sac"]) == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'sac'" in err and all(name in err for name in ALGORITHMS)
    assert main(["run", "--print-config", "options.algorithm=ppo", "ppo.steps=3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["options"]["algorithm"] == "ppo" and cfg["ppo"]["steps"] == 3 and "grpo" in cfg


def test_every_algorithm_has_a_section_and_keeps_the_reinforce_stage(tiny_model, tmp_path):
    from alignment.algorithms.registry import ALGORITHMS
    from alignment.pipeline import ONLINE_SECTIONS, PipelineConfig, PipelineOptions, pipeline_stages

    for name, spec in ALGORITHMS.items():
        assert spec.section in ONLINE_SECTIONS and spec.section in PipelineConfig.model_fields, name
        assert pipeline_stages(PipelineOptions(algorithm=name))[-3] == name
    assert pipeline_stages(PipelineOptions()) == ["data", "rm_scalar", "rm_distributional", "reinforce", "score",
                                                  "judge"]


def test_served_deployments_one_per_algorithm(monkeypatch):
    """build_deployments (no server needed): a stage deployment per registered online algorithm, SFT and DPO,
    each online one with its own config class as the form; registering an algorithm adds its deployment."""
    import flows.pipeline
    from alignment.algorithms.registry import ALGORITHMS, AlgorithmSpec
    from deployments.serve import build_deployments

    names = {d.flow_name for d in build_deployments()}
    assert {f"stage-{name}" for name in ALGORITHMS} | {"stage-sft", "stage-dpo", "stage-data", "stage-reward-model",
                                                       "stage-score", "stage-judge"} <= names
    grpo = next(d for d in build_deployments() if d.flow_name == "stage-grpo")
    assert grpo.entrypoint == "flows/pipeline.py:grpo_flow" and flows.pipeline.grpo_flow.name == "stage-grpo"
    assert "GRPOConfig" in json.dumps(grpo._parameter_openapi_schema.model_dump())

    monkeypatch.setitem(ALGORITHMS, "grpo2", AlgorithmSpec("grpo2", "alignment.algorithms.grpo", "GRPOConfig", "train_grpo",
                                                           "plan_grpo", help="a test entry"))
    try:
        assert "stage-grpo2" in {d.flow_name for d in build_deployments()}
    finally:
        flows.pipeline._ONLINE_FLOWS.pop("grpo2", None)
        vars(flows.pipeline).pop("grpo2_flow", None)
