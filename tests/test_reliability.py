"""Reliability: resume of the reward-model stage after an interruption, corrupt checkpoints, a full disk,
one writer per stage folder (two processes), and bad configuration refused before any work."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce
from alignment.checkpoints import checkpoint_folder, checkpoint_problem
from alignment.data import DataConfig, run_data_stage
from alignment.io import DiskFullError
from alignment.rewards.model import RewardModelConfig, run_reward_stage
from alignment.stage import StageBusy
from tests.conftest import Interrupt, interrupt_at, raw_row, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _rm_data(tmp_path: Path) -> Path:
    rows = []
    for a in range(24):
        rows.append(raw_row(f"What is {a} plus 1?", f"{a} plus 1 is {a + 1}.", 4, 4, 4, 2, 2))
        rows.append(raw_row(f"What is {a} plus 1?", "!!!!!!!!!!!!!!!!", 0, 0, 0, 0, 4))
    return run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "toy.jsonl", rows))), tmp_path / "data").out_dir


# ---------------------------------------------------------------------------------------------
# Reward-model stage: checkpoints and resume
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_runs(tmp_path_factory, tiny_model):
    """An uninterrupted scalar RM run with checkpoints every 2 steps (its weights and metrics), and its config."""
    tmp = tmp_path_factory.mktemp("rm-resume")
    config = RewardModelConfig(kind="scalar", model=str(tiny_model), data=str(_rm_data(tmp)), max_length=64,
                               epochs=2, batch_size=4, learning_rate=2e-3, logging_steps=1, seed=0, bf16=False,
                               checkpoint_every=2)
    straight = run_reward_stage(config, tmp / "straight")
    assert not checkpoint_folder(straight.out_dir).exists()  # spent once the output is complete
    return config, straight


def _same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_reward_model_resumes_after_an_interruption_with_the_uninterrupted_result(tmp_path, rm_runs):
    config, straight = rm_runs
    out = tmp_path / "rm"
    with pytest.raises(Interrupt):
        run_reward_stage(config, out, progress=interrupt_at(5))  # checkpoints at 2 and 4, killed in step 5
    assert not out.exists()  # the output folder is atomic: nothing half-written
    ckpts = sorted(p.name for p in checkpoint_folder(out).glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"] and all(
        checkpoint_problem(p) is None for p in checkpoint_folder(out).glob("checkpoint-*"))
    steps: list[int] = []
    resumed = run_reward_stage(config, out, progress=lambda done, total: steps.append(done))
    assert steps[0] == 5  # continued after checkpoint-4, not from the start
    _same_model(resumed.out_dir, straight.out_dir)
    for key in ("accuracy", "mean_margin"):
        assert resumed.summary[key] == pytest.approx(straight.summary[key], abs=1e-6), key
    assert resumed.summary["train"]["steps"] == straight.summary["train"]["steps"]
    assert not checkpoint_folder(out).exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, rm_runs, caplog):
    config, straight = rm_runs
    out = tmp_path / "rm"
    with pytest.raises(Interrupt):
        run_reward_stage(config, out, progress=interrupt_at(5))
    latest = checkpoint_folder(out) / "checkpoint-4"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated (a disk, a copy)
    assert "truncated" in checkpoint_problem(latest)
    caplog.set_level(logging.WARNING)
    steps: list[int] = []
    resumed = run_reward_stage(config, out, progress=lambda done, total: steps.append(done))
    assert "checkpoint-4 is unusable" in caplog.text and "falling back" in caplog.text
    assert steps[0] == 3  # from checkpoint-2
    _same_model(resumed.out_dir, straight.out_dir)


def test_a_full_disk_during_a_reward_model_checkpoint_keeps_the_previous_one(tmp_path, rm_runs, monkeypatch,
                                                                             caplog):
    config, straight = rm_runs
    out = tmp_path / "rm"
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the disk fills up while checkpoint-4's optimizer state is written
        if "checkpoint-4" in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {out}"):
        run_reward_stage(config, out)
    assert not out.exists()
    monkeypatch.setattr(torch, "save", real_save)
    caplog.set_level(logging.WARNING)
    steps: list[int] = []
    resumed = run_reward_stage(config, out, progress=lambda done, total: steps.append(done))
    assert "checkpoint-4 is unusable: not sealed" in caplog.text and steps[0] == 3
    _same_model(resumed.out_dir, straight.out_dir)


def test_checkpoints_of_another_config_are_not_resumed(tmp_path, rm_runs, caplog):
    config, _ = rm_runs
    out = tmp_path / "rm"
    with pytest.raises(Interrupt):
        run_reward_stage(config, out, progress=interrupt_at(3))
    other = config.model_copy(update={"learning_rate": 1e-3})
    caplog.set_level(logging.WARNING)
    steps: list[int] = []
    run_reward_stage(other, out, progress=lambda done, total: steps.append(done), overwrite=True)
    assert steps[0] == 1 and "checkpoints of another run" in caplog.text


def test_dpo_resumes_after_an_interruption_with_the_uninterrupted_result(tmp_path, tiny_stack):
    from alignment.algorithms.dpo import DPOStageConfig, run_dpo_stage

    policy, _, data = tiny_stack
    config = DPOStageConfig(policy=str(policy), data=str(data), max_train_pairs=24, batch_size=4, epochs=1,
                            learning_rate=5e-3, beta=0.5, max_length=96, logging_steps=1, bf16=False,
                            checkpoint_every=2)
    straight = run_dpo_stage(config, tmp_path / "straight")
    with pytest.raises(Interrupt):
        run_dpo_stage(config, tmp_path / "dpo", progress=interrupt_at(5))
    assert not (tmp_path / "dpo").exists()
    steps: list[int] = []
    resumed = run_dpo_stage(config, tmp_path / "dpo", progress=lambda done, total: steps.append(done))
    assert steps[0] == 5
    _same_model(resumed.out_dir, straight.out_dir)
    assert resumed.summary["steps"] == straight.summary["steps"] == 6


# ---------------------------------------------------------------------------------------------
# REINFORCE: a full disk while checkpointing, a corrupt latest checkpoint
# ---------------------------------------------------------------------------------------------
def _rl_config(stack, **kw) -> ReinforceConfig:
    policy, rm, data = stack
    base = dict(policy=str(policy), reward_model=str(rm), data=str(data), steps=6, batch_size=2, max_new_tokens=8,
                learning_rate=1e-3, checkpoint_every=2, eval_prompts=0, seed=0, guard_min_distinct2=0.0,
                guard_max_repetition=1.0, bf16=False)
    base.update(kw)
    return ReinforceConfig(**base)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_full_disk_while_checkpointing_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path, tiny_stack,
                                                                                          monkeypatch):
    import alignment.checkpoints as checkpoints

    config = _rl_config(tiny_stack)
    train_reinforce(config, tmp_path / "straight")
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):  # the disk fills up while the second checkpoint is written
        calls.append(path)
        if "step-000004" in str(path):
            Path(path).write_bytes(b"\0" * 100)  # part of the file made it before the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    with pytest.raises(DiskFullError, match="no space left on the device while writing .*step-000004") as err:
        train_reinforce(config, out)
    assert "run the same command again" in str(err.value)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # the partial step-4 folder is gone, step 2 intact
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    train_reinforce(config, out)  # space freed: resumes from step 2
    for a, b in zip(_metrics(tmp_path / "straight"), _metrics(out), strict=True):
        assert a["sample"] == b["sample"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_a_corrupt_latest_reinforce_checkpoint_falls_back_with_a_warning(tmp_path, tiny_stack, caplog):
    config = _rl_config(tiny_stack)
    train_reinforce(config, tmp_path / "straight")
    out = tmp_path / "run"
    train_reinforce(config, out, stop_after=5)  # checkpoints at 2 and 4
    weights = out / "checkpoints" / "step-000004" / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    train_reinforce(config, out)
    assert "step-000004 is unusable" in caplog.text and "step-000002" in caplog.text
    for a, b in zip(_metrics(tmp_path / "straight"), _metrics(out), strict=True):
        assert a["sample"] == b["sample"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# One writer per stage folder
# ---------------------------------------------------------------------------------------------
def test_a_second_run_never_writes_a_folder_another_run_is_writing(tmp_path, tiny_stack):
    """Two processes on one stage folder: the second stops with a message naming the first; after the
    first is killed with SIGKILL the kernel has dropped its lock and the folder resumes."""
    from cli.main import main

    policy, rm, data = tiny_stack
    out = tmp_path / "run"
    argv = ["-q", "reinforce", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out", str(out),
            "steps=400", "batch_size=2", "max_new_tokens=8", "eval_prompts=0", "checkpoint_every=1", "bf16=false",
            "guard_min_distinct2=0.0", "guard_max_repetition=1.0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("step-*")):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first run made no checkpoint"
            time.sleep(0.5)
        with pytest.raises(StageBusy, match=f"being written by another run \\(process {first.pid} on .*reinforce"):
            train_reinforce(_rl_config(tiny_stack, steps=400, checkpoint_every=1), out)
        assert main(argv) == 2  # the CLI: one clear line, exit code 2
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    # the lock died with its holder: the same command's config resumes the folder (one more step here)
    result = train_reinforce(ReinforceConfig(**_cli_config(argv)), out, stop_after=1)
    assert result.summary == {"stopped_at": last + 1}


def _cli_config(argv: list[str]) -> dict:
    """The ReinforceConfig fields the CLI builds from ``argv`` (its --print-config)."""
    import contextlib
    import io

    from cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--print-config"]) == 0
    return json.loads(buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Bad configuration: one clear error naming the field, before any work, for every stage
# ---------------------------------------------------------------------------------------------
def _stage_argv(stage: str, stack, tmp_path: Path) -> list[str]:
    policy, rm, data = stack
    common = {"data": ["data", "--out", str(tmp_path / "out")],
              "rm": ["rm", "--data", str(data), "--model", str(policy), "--out", str(tmp_path / "out")],
              "reinforce": ["reinforce", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out",
                            str(tmp_path / "out")],
              "ppo": ["ppo", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out",
                      str(tmp_path / "out")],
              "dpo": ["dpo", "--data", str(data), "--policy", str(policy), "--out", str(tmp_path / "out")],
              "score": ["score", "--data", str(data), "--model", f"base={policy}", "--rm", f"proxy={rm}", "--out",
                        str(tmp_path / "out")],
              "judge": ["judge", "--scores", str(tmp_path), "--out", str(tmp_path / "out")]}
    return common[stage]


BAD = [
    ("data", "rating_max=-3", "rating_max"),
    ("data", "colum_map={}", "colum_map"),  # an unknown key (a typo)
    ("rm", "learning_rate=-1e-5", "learning_rate"),
    ("rm", "loss=kl", "loss='kl' applies to kind='distributional'"),
    ("rm", "batch_size=0", "batch_size"),
    ("reinforce", "learning_rate=-1", "learning_rate"),
    ("reinforce", "max_new_tokens=0", "max_new_tokens"),
    ("reinforce", "baseline=rloo", "samples_per_prompt"),
    ("reinforce", "variance_weighted_advantage=true", "needs a distributional reward model"),
    ("reinforce", "int8_rollouts=true device=cuda", "int8_rollouts"),
    ("ppo", "clip_range=0", "clip_range"),
    ("ppo", "estimator=reinforce++-group", "samples_per_prompt"),
    ("dpo", "beta=-0.1", "beta"),
    ("score", "n_prompts=0", "n_prompts"),
    ("judge", "max_pairs=0", "max_pairs"),
    ("judge", "backend=openai", "backend"),
]


@pytest.mark.parametrize(("stage", "override", "names"), BAD, ids=[f"{s}:{o}" for s, o, _ in BAD])
def test_bad_configuration_is_one_clear_error_before_any_work(stage, override, names, tmp_path, tiny_stack, capsys):
    from cli.main import main

    code = main(["-q", *_stage_argv(stage, tiny_stack, tmp_path), *override.split()])
    err = capsys.readouterr().err
    assert code == 2, err
    assert names in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err  # one message, not a dump
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_batch_not_divisible_by_the_process_count_is_refused_before_any_model_loads(tmp_path, tiny_stack,
                                                                                    monkeypatch):
    import alignment.algorithms.online as online
    from alignment.algorithms.reinforce import ReinforceError

    class ThreeProcesses(online.DataParallel):
        def __init__(self, device):
            super().__init__(device)
            self.world = 3

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(online, "DataParallel", ThreeProcesses)
    monkeypatch.setattr(online, "load_causal_lm", no_model)
    with pytest.raises(ReinforceError, match="batch_size=4 prompts do not split evenly over 3 processes"):
        train_reinforce(_rl_config(tiny_stack, batch_size=4), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_temporary_folders_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    """SIGKILL skips atomic_directory's cleanup: the next writer of the folder (holding its lock) removes
    what the dead one left (here the data stage), and only those: a look-alike without the project's marker stays."""
    from alignment.ownership import write_marker, write_scratch_marker

    out = tmp_path / "data"
    stale = [tmp_path / ".data.tmp-deadbeef", tmp_path / ".data.old-deadbeef"]
    for folder in stale:
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"half written")
    write_scratch_marker(stale[0])  # what atomic_directory writes first into every folder it makes
    write_marker(stale[1], ["train.parquet"])  # a finished output (sealed) renamed aside for its replacement
    look_alike = tmp_path / ".data.tmp-notmine"
    look_alike.mkdir()
    (look_alike / "thesis.txt").write_text("keep me")
    result = run_data_stage(DataConfig(), out)
    assert (out / "manifest.json").is_file() and result.summary
    assert not any(folder.exists() for folder in stale)
    assert (look_alike / "thesis.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", ".data.tmp-notmine", "data"]
