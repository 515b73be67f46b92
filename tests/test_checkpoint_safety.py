"""Checkpoints load without pickle: the online stages keep RNG states as tensors and read every checkpoint
file with ``weights_only=True``; a file that would run code when unpickled is refused (or, when its hash
differs, dropped as damaged) and never executed; the Trainer stages' refusal is one line too."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment import checkpoints as C
from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce
from alignment.io import sha256_file, write_json
from tests.conftest import Interrupt, interrupt_at


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(3)


def _same(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and torch.equal(a[4], b[4])


# ---------------------------------------------------------------------------------------------
# RNG states without pickle
# ---------------------------------------------------------------------------------------------
def test_rng_states_are_tensors_and_plain_values_and_restore_exactly(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both
    torch.save(C.rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # no allowlist needed: tensors and plain values
    C.set_rng_state(state)
    assert _same(_draws(), expected)


def test_rng_states_of_checkpoints_written_before_tensors_still_restore(tmp_path):
    """Earlier checkpoints pickled numpy's state tuple (an ndarray): read with weights_only=True and numpy's
    array reconstruction allowed (as transformers does), they resume exactly."""
    np.random.seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    expected = _draws()
    C.set_rng_state(C.load_tensors(tmp_path / "old.pt"))
    assert _same(_draws(), expected)


class RunsCode:
    """A pickle whose loading creates ``marker`` (what a malicious checkpoint file could do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poison(path: Path, marker: Path) -> None:
    """Replace a checkpoint file with one of the same shape that carries a code-running object."""
    payload = {"ranks": [RunsCode(marker)]} if path.name == "rng.pt" else {"state": {}, "param_groups": [],
                                                                           "x": RunsCode(marker)}
    torch.save(payload, path)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_stack) -> tuple[ReinforceConfig, Path]:
    """A REINFORCE run stopped after step 2, its checkpoint at step 2 (copied by each test)."""
    policy, rm, data = tiny_stack
    config = ReinforceConfig(policy=str(policy), reward_model=str(rm), data=str(data), steps=4, batch_size=2,
                             max_new_tokens=8, learning_rate=1e-3, checkpoint_every=2, eval_prompts=0, seed=0,
                             guard_min_distinct2=0.0, guard_max_repetition=1.0, bf16=False)
    out = tmp_path_factory.mktemp("poison") / "run"
    assert train_reinforce(config, out, stop_after=2).summary == {"stopped_at": 2}
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
    return config, out


def test_the_poisoned_payload_does_run_code_when_unpickled(tmp_path):
    """The premise of the tests below: this file executes code under a plain (pickle) load."""
    probe = tmp_path / "probe"
    _poison(tmp_path / "rng.pt", probe)
    torch.load(tmp_path / "rng.pt", weights_only=False)
    assert probe.exists()


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt"])
def test_a_tampered_but_consistent_checkpoint_is_refused_and_runs_nothing(name, tmp_path, checkpointed_run,
                                                                         capsys):
    """The file replaced and state.json's hashes updated to match: the hashes cannot tell, the load does:
    one clear error (exit code 2 on the CLI), the code in it never runs, the checkpoint kept for a look."""
    config, source = checkpointed_run
    out = Path(shutil.copytree(source, tmp_path / "run"))
    ckpt, marker = out / "checkpoints" / "step-000002", tmp_path / "marker"
    _poison(ckpt / name, marker)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"][name]["sha256"] = sha256_file(ckpt / name)
    write_json(ckpt / "state.json", state)
    assert C.step_checkpoint_problem(ckpt) is None  # consistent: it looks intact
    with pytest.raises(C.ResumeError, match=rf"{name} holds a pickled reference to .*open.* refused. Remove .*step-000002"):
        train_reinforce(config, out)
    assert not marker.exists() and ckpt.is_dir()
    from cli.main import main

    policy, rm, data = config.policy, config.reward_model, config.data
    argv = ["-q", "reinforce", "--rm", rm, "--data", data, "--policy", policy, "--out", str(out), "steps=4",
            "batch_size=2", "max_new_tokens=8", "learning_rate=1e-3", "checkpoint_every=2", "eval_prompts=0",
            "guard_min_distinct2=0.0", "guard_max_repetition=1.0", "bf16=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err  # (after the models' loading bars: the models load before the checkpoint)
    errors = [line for line in err.splitlines() if line.startswith("align reinforce: error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "Traceback" not in err and not marker.exists()


def test_a_tampered_checkpoint_whose_hash_differs_is_dropped_unread(tmp_path, checkpointed_run, caplog):
    """The file replaced, state.json left alone: a hash differs, so the checkpoint is removed with a warning
    before anything in it is read, and the run starts over and finishes."""
    config, source = checkpointed_run
    out = Path(shutil.copytree(source, tmp_path / "run"))
    ckpt, marker = out / "checkpoints" / "step-000002", tmp_path / "marker"
    _poison(ckpt / "rng.pt", marker)
    caplog.set_level(logging.WARNING)
    result = train_reinforce(config, out)
    assert "step-000002 is unusable" in caplog.text and not marker.exists()
    assert result.summary["steps"] == 4 and (out / "final" / "manifest.json").is_file()


def test_a_trainer_checkpoint_carrying_a_pickle_is_refused_in_one_line(tmp_path, tiny_stack):
    """The Trainer stages resume through transformers, which reads rng_state.pth (and optimizer.pt,
    scheduler.pt) with weights_only=True: a resealed checkpoint whose RNG file carries a code-running
    pickle is refused with the stage's error, and the code never runs."""
    from alignment.rewards.model import RewardModelConfig, RewardModelError, run_reward_stage

    policy, _, data = tiny_stack
    config = RewardModelConfig(model=str(policy), data=str(data), max_length=64, max_train_pairs=16, batch_size=4,
                               bf16=False, checkpoint_every=2)
    out = tmp_path / "rm"
    with pytest.raises(Interrupt):
        run_reward_stage(config, out, progress=interrupt_at(3))
    ckpt, marker = C.checkpoint_folder(out) / "checkpoint-2", tmp_path / "marker"
    torch.save({"python": RunsCode(marker)}, ckpt / "rng_state.pth")
    C.seal(ckpt)  # consistent: the seal matches
    assert C.checkpoint_problem(ckpt) is None
    with pytest.raises(RewardModelError, match=r"checkpoint-2 holds a file with a pickled reference to .*open.*refused"):
        run_reward_stage(config, out)
    assert not marker.exists() and not out.exists()
