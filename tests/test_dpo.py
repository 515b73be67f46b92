"""DPO (TRL's DPOTrainer) on the data stage's pairs: the loss starts at log 2 and falls on a learnable set."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignment.algorithms.dpo import DPOError, DPOStageConfig, preference_dataset, run_dpo_stage


def test_preference_dataset_is_trl_conversational():
    from alignment.data import PairData

    pairs = PairData([[{"role": "user", "content": "q"}]], ["good"], ["bad"], [None], [None], [None], [None],
                     [None], [None])
    row = preference_dataset(pairs)[0]
    assert row == {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
                   "rejected": [{"role": "assistant", "content": "bad"}]}


def test_dpo_loss_starts_at_log2_falls_and_the_policy_changes(tmp_path, tiny_stack):
    policy, _, data = tiny_stack
    config = DPOStageConfig(policy=str(policy), data=str(data), max_train_pairs=32, batch_size=8, epochs=4,
                            learning_rate=5e-3, beta=0.5, max_length=128, logging_steps=1, bf16=False)
    result = run_dpo_stage(config, tmp_path / "dpo")
    log = [json.loads(line) for line in (tmp_path / "dpo" / "train_log.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in log if "loss" in h]
    # At the first step the policy is the reference: every log-ratio is 0 and -log sigma(0) = log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert min(losses[-4:]) < losses[0] - 0.1  # it learns the toy preferences
    before = load_file(policy / "model.safetensors")
    after = load_file(tmp_path / "dpo" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert result.summary["pairs"] == 32 and run_dpo_stage(config, tmp_path / "dpo").reused


def test_dpo_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(DPOError, match="not a completed data stage output"):
        run_dpo_stage(DPOStageConfig(data=str(tmp_path / "nothing")), tmp_path / "out")


def test_cli_dpo(tmp_path, tiny_stack, capsys):
    from cli.main import main

    policy, _, data = tiny_stack
    argv = ["-q", "dpo", "--data", str(data), "--policy", str(policy), "--out", str(tmp_path / "dpo"),
            "max_train_pairs=8", "batch_size=4", "max_length=96", "bf16=false"]
    assert main(argv) == 0 and "policy trained" in capsys.readouterr().out
    assert main(argv) == 0 and "policy reused" in capsys.readouterr().out
    assert main([*argv[:-1], "beta=0.3"]) == 2 and "already holds" in capsys.readouterr().err
