"""Checkpoints by time as well as by steps (``checkpoint_every_s``): in the online loop and, through a
Trainer callback, in the Trainer stages; the setting is part of no stage key."""

from __future__ import annotations

import json
import types

import pytest

from alignment import checkpoints as C
from alignment.algorithms.reinforce import ReinforceConfig, plan_reinforce, train_reinforce
from tests.conftest import Interrupt, interrupt_at


def test_checkpoint_every_s_is_not_part_of_any_stage_key(tiny_stack):
    from alignment.algorithms.dpo import DPOStageConfig, dpo_stage_key
    from alignment.algorithms.sft import SFTConfig, sft_stage_key
    from alignment.rewards.model import RewardModelConfig, reward_stage_key

    policy, rm, data = tiny_stack
    online = ReinforceConfig(policy=str(policy), reward_model=str(rm), data=str(data))
    assert plan_reinforce(online).key == plan_reinforce(online.model_copy(update={"checkpoint_every_s": 1.0})).key
    rm_config = RewardModelConfig(data=str(data))
    assert reward_stage_key(rm_config, data) == reward_stage_key(rm_config.model_copy(update={"checkpoint_every_s": 0}),
                                                                 data)
    dpo = DPOStageConfig(data=str(data))
    assert dpo_stage_key(dpo) == dpo_stage_key(dpo.model_copy(update={"checkpoint_every_s": 5.0}))
    source = types.SimpleNamespace(sha256="x")
    sft = SFTConfig()
    assert sft_stage_key(sft, source) == sft_stage_key(sft.model_copy(update={"checkpoint_every_s": 5.0}), source)
    for config in (online, rm_config, dpo, sft):
        assert config.checkpoint_every_s == 600.0


@pytest.mark.parametrize("every_s", [1e-9, 0.0])
def test_the_online_loop_checkpoints_by_time(every_s, tmp_path, tiny_stack):
    policy, rm, data = tiny_stack
    config = ReinforceConfig(policy=str(policy), reward_model=str(rm), data=str(data), steps=4, batch_size=2,
                             max_new_tokens=4, checkpoint_every=10_000, checkpoint_every_s=every_s, eval_prompts=0,
                             guard_min_distinct2=0.0, guard_max_repetition=1.0, bf16=False)
    out = tmp_path / "run"
    train_reinforce(config, out, stop_after=1)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if every_s:
        assert ckpts == ["step-000001"] and C.step_checkpoint_problem(out / "checkpoints" / "step-000001") is None
        assert json.loads((out / "checkpoints" / "step-000001" / "state.json").read_text())["files"]
    else:
        assert ckpts == []


def test_the_trainer_callback_asks_for_a_save_once_the_interval_passed(monkeypatch):
    from transformers import TrainerControl, TrainerState

    now = [100.0]
    monkeypatch.setattr(C, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    callback, args, state = C.timed_checkpoint_callback(600), types.SimpleNamespace(device="cpu"), TrainerState()
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    now[0] = 699.0
    assert not callback.on_step_end(args, state, control).should_save
    now[0] = 700.0
    assert callback.on_step_end(args, state, control).should_save
    control.should_save = False
    callback.on_save(args, state, control)  # the clock restarts at every save (steps' or time's)
    now[0] = 1299.0
    assert not callback.on_step_end(args, state, control).should_save
    now[0] = 1300.0
    assert callback.on_step_end(args, state, control).should_save
    # the timed checkpoint is added only with an interval (beside the seal, tracking and console callbacks)
    assert len(C.trainer_callbacks(None, 600.0)) == len(C.trainer_callbacks(None, 0.0)) + 1
    assert not any(type(c).__name__ == type(callback).__name__ for c in C.trainer_callbacks(None, 0.0))


@pytest.mark.parametrize("every_s", [1e-9, 0.0])
def test_a_trainer_stage_checkpoints_by_time(every_s, tmp_path, tiny_stack):
    """checkpoint_every far away: with checkpoint_every_s tiny the reward-model stage saves (and seals) a
    checkpoint after its first step; with 0 it saves none."""
    from alignment.rewards.model import RewardModelConfig, run_reward_stage

    policy, _, data = tiny_stack
    config = RewardModelConfig(model=str(policy), data=str(data), max_length=64, max_train_pairs=16, batch_size=4,
                               logging_steps=1, bf16=False, checkpoint_every=10_000, checkpoint_every_s=every_s)
    out = tmp_path / "rm"
    with pytest.raises(Interrupt):
        run_reward_stage(config, out, progress=interrupt_at(2))  # saved after step 1 (if at all), stopped in step 2
    ckpts = sorted(C.checkpoint_folder(out).glob("checkpoint-*"))
    if every_s:
        assert [p.name for p in ckpts] == ["checkpoint-1"] and C.checkpoint_problem(ckpts[0]) is None
    else:
        assert ckpts == []
