from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# MLflow tracking off unless a test turns it on (tests/test_tracking*.py): every CLI command and pipeline
# would otherwise make an MLflow store in its runs folder (seconds each); the default itself is tested there.
os.environ["ALIGNMENT_TRACKING"] = "none"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_data() -> Path:
    """The real preference data beside the project (../shared/data); skips cleanly when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (see the project README)")
    return SHARED_DATA


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupt(Exception):
    """Raised by :func:`interrupt_at`: a controlled interruption of a Trainer stage."""


def interrupt_at(step: int):
    """A stage progress callback that interrupts the stage once ``step`` optimizer steps are done."""
    def progress(done: int, total: int) -> None:
        if done == step:
            raise Interrupt(f"interrupted at step {done}")
    return progress


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def raw_row(prompt: str, response: str, *scores: int) -> dict:
    """A raw HelpSteer2-form row; scores in attribute order (helpfulness .. verbosity)."""
    from alignment.data import ATTRIBUTES

    assert len(scores) == 5
    return {"prompt": prompt, "response": response, **dict(zip(ATTRIBUTES, scores, strict=True))}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder with a random 2-layer, 64-dim Llama and a SmolLM2-shaped tokenizer."""
    from tests.tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def eval_stack(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Demo data (half held out, ~110 validation prompts), a tiny scalar RM, two different tiny policies
    and the scoring stage's output for them (base vs tuned, 56 prompts, 12 new tokens)."""
    from alignment.data import DataConfig, run_data_stage
    from alignment.evaluation.evaluate import ScoreConfig, run_score_stage
    from alignment.rewards.model import RewardModelConfig, run_reward_stage
    from tests.tiny import tiny_model_dir

    tmp = tmp_path_factory.mktemp("eval")
    data = run_data_stage(DataConfig(validation_fraction=0.5), tmp / "data").out_dir
    rm = run_reward_stage(RewardModelConfig(model=str(tiny_model), data=str(data), max_length=128, epochs=1,
                                            learning_rate=1e-3, max_train_pairs=32, max_eval_pairs=8),
                          tmp / "rm").out_dir
    tuned = tiny_model_dir(tmp / "tuned", seed=1)
    scores = run_score_stage(ScoreConfig(models={"base": str(tiny_model), "tuned": str(tuned)},
                                         reward_models={"scalar": str(rm)}, data=str(data), n_prompts=56,
                                         max_new_tokens=12, bootstrap=500, bf16=False), tmp / "scores").out_dir
    return {"data": data, "rm": rm, "base": tiny_model, "tuned": tuned, "scores": scores}


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (it takes seconds to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def tiny_pipeline_config(tiny_model: Path, runs_dir: Path, **sections):
    """The whole pipeline on the tiny model: a few pairs, steps, prompts and judgments."""
    from alignment.algorithms.reinforce import ReinforceConfig
    from alignment.evaluation.evaluate import ScoreConfig
    from alignment.evaluation.judge import JudgeConfig
    from alignment.pipeline import PipelineConfig, PipelineOptions
    from alignment.rewards.model import RewardModelConfig

    rm = dict(model=str(tiny_model), max_length=128, max_train_pairs=16, max_eval_pairs=8, epochs=1, batch_size=8,
              learning_rate=1e-3)
    parts = dict(
        rm_scalar=RewardModelConfig(kind="scalar", **rm), rm_distributional=RewardModelConfig(kind="distributional", **rm),
        reinforce=ReinforceConfig(policy=str(tiny_model), steps=2, batch_size=4, max_new_tokens=8, eval_prompts=2,
                                  checkpoint_every=2, learning_rate=1e-3, guard_min_distinct2=0.0,
                                  guard_max_repetition=1.0),
        score=ScoreConfig(n_prompts=4, max_new_tokens=8, bootstrap=200),
        judge=JudgeConfig(backend="local", local_model=str(tiny_model), max_pairs=4),
        options=PipelineOptions(runs_dir=str(runs_dir)))
    parts.update(sections)
    return PipelineConfig(**parts)


@pytest.fixture(scope="session")
def tiny_stack(tmp_path_factory, tiny_model) -> tuple[Path, Path, Path]:
    """(tiny policy folder, a tiny scalar RM trained on the demo data, the demo data folder)."""
    from alignment.data import DataConfig, run_data_stage
    from alignment.rewards.model import RewardModelConfig, run_reward_stage

    tmp = tmp_path_factory.mktemp("rl")
    data = run_data_stage(DataConfig(), tmp / "data").out_dir
    rm = run_reward_stage(RewardModelConfig(model=str(tiny_model), data=str(data), max_length=128, epochs=1,
                                            learning_rate=1e-3, max_eval_pairs=8), tmp / "rm").out_dir
    return tiny_model, rm, data
