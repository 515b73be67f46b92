"""Finite outputs: a stage whose weights or metrics hold NaN or inf stops with one line before it marks its output
complete (alignment.finite); a tiny model trained with an absurd (finite) learning rate is refused at save."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from alignment.finite import (
    NonFiniteError,
    check_output,
    check_tensors,
    first_nonfinite_metric,
    first_nonfinite_tensor,
)
from tests.conftest import raw_row, write_jsonl


def test_first_nonfinite_tensor_names_the_first_bad_float_tensor():
    good = torch.ones(3)
    assert first_nonfinite_tensor([("a", good), ("b", torch.zeros(2, 2))]) is None
    assert first_nonfinite_tensor([("a", good), ("b", torch.tensor([1.0, math.nan])),
                                   ("c", torch.tensor([math.inf]))]) == "b"
    assert first_nonfinite_tensor([("w", torch.tensor([-math.inf], dtype=torch.bfloat16))]) == "w"
    assert first_nonfinite_tensor([("ids", torch.tensor([1, 2], dtype=torch.int64))]) is None  # ints are finite


def test_first_nonfinite_metric_gives_the_path_and_the_value():
    assert first_nonfinite_metric({"a": 1.0, "b": None, "c": "nan", "d": True, "e": [1, 2.5]}) is None
    path, value = first_nonfinite_metric({"a": 1.0, "b": {"c": [0.5, math.nan]}, "z": math.inf})
    assert path == "b.c[1]" and math.isnan(value)
    assert first_nonfinite_metric({"eval_after": {"mean_reward": -math.inf}}) == ("eval_after.mean_reward", -math.inf)
    import numpy as np

    assert first_nonfinite_metric({"x": np.float32("inf")}) == ("x", math.inf)
    assert first_nonfinite_metric(math.nan)[0] == "(value)"


def test_check_output_names_stage_file_and_tensor_in_one_line(tmp_path):
    save_file({"a.weight": torch.ones(2), "b.weight": torch.tensor([0.0, math.nan])}, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteError) as caught:
        check_output(tmp_path, "reward_model", "runs/rm/x", {"metrics.json": {"accuracy": 0.5}})
    message = str(caught.value)
    assert message.startswith("reward_model: runs/rm/x/model.safetensors: tensor 'b.weight' holds NaN or inf")
    assert "\n" not in message and "not marked complete" in message


def test_check_output_names_the_first_bad_metric(tmp_path):
    save_file({"a.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    check_output(tmp_path, "dpo", "out", {"metrics.json": {"final_loss": 0.3}})  # all finite: no error
    with pytest.raises(NonFiniteError, match=r"^dpo: out/metrics\.json: metric 'final_loss' is nan: training "
                                             r"diverged"):
        check_output(tmp_path, "dpo", "out", {"metrics.json": {"first_loss": 0.7, "final_loss": math.nan}})


def test_check_tensors_says_what_became_of_the_output():
    with pytest.raises(NonFiniteError, match="tensor 'w' holds NaN or inf: .*; it was not written"):
        check_tensors([("w", torch.tensor([math.inf]))], "reinforce", "ckpt/policy.safetensors", "it was not written")


def _toy_data(tmp_path):
    from alignment.data import DataConfig, run_data_stage

    rows = []
    for a in range(12):
        rows.append(raw_row(f"What is {a} plus 1?", f"{a} plus 1 is {a + 1}.", 4, 4, 4, 2, 2))
        rows.append(raw_row(f"What is {a} plus 1?", "!!!!!!!!!!!!!!!!!!!!!!!!", 0, 0, 0, 0, 4))
    return run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "toy.jsonl", rows))), tmp_path / "data").out_dir


def test_a_reward_model_trained_with_an_absurd_learning_rate_is_refused_at_save(tmp_path, tiny_model, capsys):
    from cli.main import main

    data, out = _toy_data(tmp_path), tmp_path / "rm"
    code = main(["-q", "rm", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "max_length=64",
                 "epochs=1", "batch_size=8", "learning_rate=1e30", "bf16=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"align rm: error: reward_model: {out}/") and "training diverged" in err, err
    assert "tensor '" in err or "metric '" in err, err
    assert not (out / "manifest.json").exists()  # never marked complete
    # the same data at a sane learning rate trains and is marked complete: the check refuses only divergence
    assert main(["-q", "rm", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "max_length=64",
                 "epochs=1", "batch_size=8", "learning_rate=1e-3", "bf16=false"]) == 0
    assert (out / "manifest.json").is_file()


def test_a_diverging_reinforce_run_stops_with_one_line_and_no_final(tmp_path, tiny_stack):
    from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce

    policy, rm, data = tiny_stack
    config = ReinforceConfig(policy=str(policy), reward_model=str(rm), data=str(data), steps=4, batch_size=2,
                             max_new_tokens=8, learning_rate=1e30, eval_prompts=0, checkpoint_every=2, bf16=False)
    with pytest.raises(NonFiniteError) as caught:
        train_reinforce(config, tmp_path / "rl")
    message = str(caught.value)
    assert message.startswith("reinforce: ") and "training diverged" in message and "\n" not in message
    assert not (tmp_path / "rl" / "final").exists()
    assert not list((tmp_path / "rl").glob("checkpoints/step-*/state.json"))  # no diverged checkpoint either
