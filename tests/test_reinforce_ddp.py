"""REINFORCE data-parallel over 2 CPU processes (gloo), launched with `accelerate launch` like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _launch(stack, out: Path, dump: Path, *, stop_after: int | None = None) -> None:
    policy, rm, data = stack
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "DDP_TEST_DUMP": str(dump)}
    env.pop("DDP_TEST_STOP_AFTER", None)
    if stop_after is not None:
        env["DDP_TEST_STOP_AFTER"] = str(stop_after)
    # --multi_gpu, not --cpu: accelerate sends --cpu to its single-process launcher. The processes
    # still run on CPU (device=cpu) over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "ddp_worker.py"),
           "-q", "reinforce", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out", str(out),
           "device=cpu", "steps=4", "batch_size=4", "max_new_tokens=12", "learning_rate=1e-3",
           "checkpoint_every=2", "eval_prompts=2", "guard_min_distinct2=0.0", "guard_max_repetition=1.0",
           "baseline=rloo", "samples_per_prompt=2", "whiten_advantages=true",
           "micro_batch_size=2"]  # 4 sequences per process in 2 micro-batches: no_sync on the first
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_stack):
    """Two launches: interrupted after step 3 (checkpoint at 2), then resumed to the end (4 steps)."""
    tmp = tmp_path_factory.mktemp("ddp")
    _launch(tiny_stack, tmp / "run", tmp / "dump", stop_after=3)
    assert not (tmp / "run" / "final").exists()
    interrupted = _metrics(tmp / "run")
    _launch(tiny_stack, tmp / "run", tmp / "dump")  # both processes restart from step 2, redo 3, do 4
    return tmp, interrupted


def test_two_processes_keep_identical_replicas_and_write_once(ddp_run, tiny_stack):
    tmp, _ = ddp_run
    rank0 = load_file(tmp / "dump" / "rank0.safetensors")
    rank1 = load_file(tmp / "dump" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas diverged: gradients were not all-reduced"
    start = load_file(tiny_stack[0] / "model.safetensors")
    assert any(not torch.equal(start[k], rank0[k]) for k in start if k in rank0), "training did not move the weights"
    final = load_file(tmp / "run" / "final" / "model.safetensors")
    assert all(torch.equal(final[k], rank0[k]) for k in final if k in rank0)
    rows = _metrics(tmp / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: no duplicated lines
    # RLOO over the gathered batch (2 prompts x 2 samples per process), whitened over all 8 samples.
    assert all(abs(r["advantage"]) < 1e-5 for r in rows)
    summary = json.loads((tmp / "run" / "final" / "summary.json").read_text())
    assert summary["eval_after"]["n"] == 2


def test_two_processes_resume_exactly(ddp_run):
    tmp, interrupted = ddp_run
    resumed = _metrics(tmp / "run")
    assert [r["step"] for r in interrupted] == [1, 2, 3]
    # Step 3 was run twice: before the interruption and again from the step-2 checkpoint. With every
    # process's RNG restored it samples the same completions and takes the same loss.
    for a, b in zip(interrupted, resumed[:3], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["sample"] == b["sample"], a["step"]
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)


def test_resuming_with_another_process_count_is_refused(ddp_run, tmp_path):
    import shutil

    from alignment.algorithms.reinforce import ReinforceConfig, train_reinforce
    from alignment.checkpoints import ResumeError

    run = tmp_path / "run"
    shutil.copytree(ddp_run[0] / "run", run)
    shutil.rmtree(run / "final")
    config = ReinforceConfig(**json.loads((run / "run.json").read_text())["config"])
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\); resume it with the same number"):
        train_reinforce(config, run)


def test_ppo_two_processes_keep_identical_replicas(tmp_path, tiny_stack):
    """PPO over 2 processes: per-process rollouts and minibatch orders, all-reduced updates, one writer."""
    policy, rm, data = tiny_stack
    dump, out = tmp_path / "dump", tmp_path / "run"
    dump.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "DDP_TEST_DUMP": str(dump)}
    env.pop("DDP_TEST_STOP_AFTER", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "ddp_worker.py"),
           "-q", "ppo", "--rm", str(rm), "--data", str(data), "--policy", str(policy), "--out", str(out),
           "device=cpu", "steps=2", "batch_size=4", "max_new_tokens=10", "learning_rate=1e-3", "ppo_epochs=2",
           "minibatch_size=1", "eval_prompts=0", "guard_min_distinct2=0.0", "guard_max_repetition=1.0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas diverged"
    start = load_file(policy / "model.safetensors")
    assert any(not torch.equal(start[k], rank0[k]) for k in start if k in rank0)
    assert [r["step"] for r in _metrics(out)] == [1, 2]
