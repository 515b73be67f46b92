"""The Prefect pipeline on tiny models: end to end, fully cached on a second run, a changed parameter
re-runs exactly that stage and those below it, a deleted output folder re-runs its stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_pipeline_config

STAGES = ["data", "rm_scalar", "rm_distributional", "reinforce", "score", "judge"]


@pytest.fixture(scope="module")
def pipeline(prefect_harness, tiny_model, tmp_path_factory):
    from flows.pipeline import run_pipeline

    config = tiny_pipeline_config(tiny_model, tmp_path_factory.mktemp("pipeline") / "runs")
    return config, run_pipeline(config)


def _states(result):
    return {name: info["state"] for name, info in result["stages"].items()}


def test_pipeline_runs_end_to_end(pipeline):
    config, result = pipeline
    assert list(result["stages"]) == STAGES
    assert set(_states(result).values()) == {"Completed"}
    report = result["report"]
    text = Path(report).read_text()
    assert "Pairwise judge" in text and "weaker than an API judge" in text
    summary = json.loads(Path(result["stages"]["judge"]["path"] + "/summary.json").read_text())
    assert summary["model_a"] == "tuned" and summary["n"] == 4
    score = json.loads(Path(result["stages"]["score"]["path"] + "/scores.json").read_text())
    assert set(score["models"]) == {"base", "tuned"}
    assert set(score["models"]["tuned"]["rewards"]) == {"scalar", "distributional"}  # both RMs score both models
    # The proxy is the RM REINFORCE trained against; the other one is independent, during training too.
    assert score["proxy"] == "scalar" and score["independent"] == ["distributional"]
    assert score["models"]["tuned"]["gold"]["n"] == score["n_gold_prompts"] > 0  # the demo prompts carry gold
    heldout = json.loads(Path(result["stages"]["reinforce"]["path"] + "/summary.json").read_text())["heldout"]
    assert set(heldout[-1]["independent"]) == {"distributional"} and heldout[-1]["gold_n"] > 0
    # The verdict: returned, logged in the summary artifact's description, and opening the report.
    kinds = [c["kind"] for c in result["verdict"]["checks"]]
    assert kinds == ["proxy", "independent", "gold", "judge"] and result["verdict"]["reading"]
    assert text.index("## Verdict") < text.index("Mean reward")


def test_second_run_is_fully_cached(pipeline, monkeypatch):
    import alignment.algorithms.reinforce
    import alignment.data
    import alignment.evaluation.evaluate
    import alignment.evaluation.judge
    import alignment.rewards.model
    from flows.pipeline import run_pipeline

    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return wrapper

    # What planning a stage costs: reading/hashing the data source, hashing configs and input manifests.
    monkeypatch.setattr(alignment.data, "read_source", counted("data", alignment.data.read_source))
    for stage, module in (("reward", alignment.rewards.model), ("reinforce", alignment.algorithms.reinforce),
                          ("score", alignment.evaluation.evaluate), ("judge", alignment.evaluation.judge)):
        name = f"{stage}_stage_key"
        monkeypatch.setattr(module, name, counted(stage, getattr(module, name)))
    config, first = pipeline
    again = run_pipeline(config)
    assert set(_states(again).values()) == {"Cached"}
    # Each stage is planned once (the data stage's plan reads and hashes the source): the cache key
    # and the task reuse the flow's plan.
    assert calls == {"data": 1, "reward": 2, "reinforce": 1, "score": 1, "judge": 1}
    assert {k: v["path"] for k, v in again["stages"].items()} == {k: v["path"] for k, v in first["stages"].items()}


def test_planned_ahead_matches_the_flow_and_skips_prefect_when_complete(pipeline, capsys, monkeypatch):
    """plan_pipeline wires the stages as the flow does (same folders); with every stage complete,
    ``align run`` reports from the folders without a Prefect flow run; each stage recorded its cost."""
    import yaml

    import flows.pipeline
    from alignment.pipeline import completed_pipeline, plan_pipeline
    from cli.main import main

    config, first = pipeline
    planned = {name: str(plan.done) for name, (_, plan) in plan_pipeline(config).items()}
    assert planned == {name: info["path"] for name, info in first["stages"].items()}
    assert completed_pipeline(config) is not None
    for name, info in first["stages"].items():
        assert info["seconds"] is not None and info["peak_rss_mb"] > 0, name

    monkeypatch.setattr(flows.pipeline, "run_pipeline", lambda *a: pytest.fail("the flow ran"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cfg_file = Path(config.options.runs_dir).parent / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"section"})))
    assert main(["run", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "every stage is already complete" in out and out.count("Complete ") == len(STAGES)
    assert "reading:" in out and first["verdict"]["reading"] in out


def test_changed_parameter_reruns_that_stage_and_below(pipeline):
    from flows.pipeline import run_pipeline

    config, first = pipeline
    changed = config.model_copy(update={"reinforce": config.reinforce.model_copy(update={"steps": 3})})
    result = run_pipeline(changed)
    assert _states(result) == {"data": "Cached", "rm_scalar": "Cached", "rm_distributional": "Cached",
                               "reinforce": "Completed", "score": "Completed", "judge": "Completed"}
    assert result["stages"]["reinforce"]["path"] != first["stages"]["reinforce"]["path"]
    lines = Path(result["stages"]["reinforce"]["path"] + "/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_deleted_folder_reruns_its_stage(pipeline):
    from flows.pipeline import run_pipeline

    config, first = pipeline
    shutil.rmtree(first["stages"]["rm_distributional"]["path"])
    result = run_pipeline(config)
    states = _states(result)
    assert states["rm_distributional"] == "Completed"  # rebuilt, not a dead cached path
    manifest = json.loads(Path(first["stages"]["rm_distributional"]["path"] + "/manifest.json").read_text())
    assert manifest["kind"] == "distributional"
    assert states["data"] == states["rm_scalar"] == "Cached"
    # The rebuilt reward model has the same key (same config and data), so nothing below it changes.
    assert states["reinforce"] == "Cached"


def test_align_run_prints_config_and_rejects_bad_overrides(capsys):
    from cli.main import main

    assert main(["run", "--print-config", "reinforce.steps=3", "judge.backend=gemini"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["reinforce"]["steps"] == 3 and cfg["judge"]["backend"] == "gemini"
    assert cfg["data"]["source"] == "demo" and cfg["score"]["n_prompts"] == 16  # the demo preset
    assert main(["run", "reinforce.stepz=3"]) == 2
    assert "reinforce.stepz" in capsys.readouterr().err


def test_stages_under_accelerate_launch(tiny_stack, tmp_path):
    """options.num_processes > 1: the tasks run `align rm` / `align reinforce` under `accelerate launch`
    (2 CPU processes, gloo); the first process writes the complete folder."""
    from alignment.algorithms.reinforce import ReinforceConfig
    from alignment.rewards.model import RewardModelConfig
    from tasks.stages import launch_stage

    policy, rm, data = tiny_stack
    rm_config = RewardModelConfig(model=str(policy), data=str(data), max_length=128, max_train_pairs=16,
                                  max_eval_pairs=8, epochs=1, batch_size=4, learning_rate=1e-3, device="cpu")
    launch_stage("rm", rm_config, tmp_path / "rm", 2)
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and (tmp_path / "rm" / "manifest.json").is_file()

    config = ReinforceConfig(policy=str(policy), reward_model=str(rm), data=str(data), device="cpu", steps=2,
                             batch_size=4, max_new_tokens=8, eval_prompts=2, checkpoint_every=2,
                             learning_rate=1e-3, guard_min_distinct2=0.0, guard_max_repetition=1.0)
    launch_stage("reinforce", config, tmp_path / "rl", 2)
    summary = json.loads((tmp_path / "rl" / "final" / "summary.json").read_text())
    rows = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and summary["steps"] == 2 and summary["processes"] == 2
    assert (tmp_path / "rl" / "final" / "model.safetensors").is_file()
