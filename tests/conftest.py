from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


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
def tiny_stack(tmp_path_factory, tiny_model) -> tuple[Path, Path, Path]:
    """(tiny policy folder, a tiny scalar RM trained on the demo data, the demo data folder)."""
    from alignment.data import DataConfig, run_data_stage
    from alignment.reward import RewardModelConfig, run_reward_stage

    tmp = tmp_path_factory.mktemp("rl")
    data = run_data_stage(DataConfig(), tmp / "data").out_dir
    rm = run_reward_stage(RewardModelConfig(model=str(tiny_model), data=str(data), max_length=128, epochs=1,
                                            learning_rate=1e-3, max_eval_pairs=8), tmp / "rm").out_dir
    return tiny_model, rm, data
