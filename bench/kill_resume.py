"""Kill -9 trials: a stage (or the whole pipeline) killed with SIGKILL at random moments resumes and finishes.

Each trial starts the command in a subprocess, kills it with SIGKILL after a random delay, and re-runs
the same command (killing again, up to ``--kills`` times) until it finishes. A trial passes when:

* ``--stage reinforce``: the final folder exists and metrics.jsonl holds steps 1..N exactly once each;
* ``--stage rm``: the reward model's folder is complete and its weights and validation metrics equal
  those of an uninterrupted run of the same command (made first);
* ``--stage sft``: the same for `align sft` on the shared TL;DR summaries (or ``--source``): weights and
  held-out ROUGE equal the uninterrupted run's, no checkpoint folder left;
* ``--stage pipeline`` (`align run` on a tiny configuration, Prefect included): the last run completes,
  every stage folder is complete (manifest and file hashes), no half-written folder is left, and every
  stage that had finished before a kill came back cached (its folder untouched).

    python bench/kill_resume.py                      # REINFORCE, 5 trials on a tiny random model
    python bench/kill_resume.py --stage rm --trials 5
    python bench/kill_resume.py --stage sft --trials 5 --steps 48
    python bench/kill_resume.py --stage pipeline --trials 5 --max-delay 40
    python bench/kill_resume.py --policy DIR --rm DIR --data DIR --steps 20 --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARIES = ROOT.parent / "shared" / "data" / "tldr-rlaif" / "summaries.jsonl"
sys.path.insert(0, str(ROOT))
ALIGN = str(Path(sys.executable).parent / "align")


def tiny_stack(folder: Path) -> tuple[str, str, str]:
    """A random 2-layer policy, a reward model trained briefly on the demo data, and the demo data."""
    from alignment.data import DataConfig, run_data_stage
    from alignment.rewards.model import RewardModelConfig, run_reward_stage
    from tests.tiny import tiny_model_dir

    policy = tiny_model_dir(folder / "policy")
    data = run_data_stage(DataConfig(), folder / "data").out_dir
    rm = run_reward_stage(RewardModelConfig(model=str(policy), data=str(data), max_length=128, epochs=1,
                                            learning_rate=1e-3, max_eval_pairs=8), folder / "rm").out_dir
    return str(policy), str(rm), str(data)


def reinforce_cmd(args, policy: str, rm: str, data: str, out: Path) -> list[str]:
    return [ALIGN, "-q", "reinforce", "--policy", policy, "--rm", rm, "--data", data, "--out", str(out),
            f"steps={args.steps}", "batch_size=4", "max_new_tokens=12", "checkpoint_every=2", "eval_prompts=2",
            "learning_rate=1e-4", "guard_min_distinct2=0", "guard_max_repetition=1"]


def rm_cmd(args, policy: str, data: str, out: Path) -> list[str]:
    return [ALIGN, "-q", "rm", "--model", policy, "--data", data, "--out", str(out), "max_length=128",
            f"epochs={max(1, args.steps // 8)}", "batch_size=4", "learning_rate=1e-3", "checkpoint_every=10",
            "max_eval_pairs=16", "bf16=false", "logging_steps=1"]


def sft_cmd(args, policy: str, out: Path) -> list[str]:
    """`align sft` for ``args.steps`` optimizer steps (batch 4 over 32 posts: 8 steps an epoch)."""
    return [ALIGN, "-q", "sft", "--policy", policy, "--source", args.source, "--out", str(out), "max_train_posts=32",
            f"epochs={args.steps / 8}", "eval_posts=8", "batch_size=4", "max_prompt_length=128",
            "max_completion_length=32", "max_new_tokens=16", "learning_rate=1e-4", "checkpoint_every=4",
            "bf16=false", "logging_steps=1"]


def pipeline_cmd(args, policy: str, work: Path, runs: Path) -> list[str]:
    """`align run` on a tiny pipeline configuration (written once as YAML)."""
    import yaml

    from tests.conftest import tiny_pipeline_config

    config_file = work / "pipeline.yaml"
    if not config_file.is_file():
        from alignment.algorithms.reinforce import ReinforceConfig

        config = tiny_pipeline_config(Path(policy), runs, reinforce=ReinforceConfig(
            policy=policy, steps=args.steps, batch_size=4, max_new_tokens=12, eval_prompts=2, checkpoint_every=2,
            learning_rate=1e-3, guard_min_distinct2=0.0, guard_max_repetition=1.0))
        sections = config.model_dump(mode="json")
        for name in ("rm_scalar", "rm_distributional"):
            sections[name].update(epochs=4, max_train_pairs=64, checkpoint_every=2, bf16=False)
        config_file.write_text(yaml.safe_dump(sections))
    return [ALIGN, "-q", "run", "--runs-dir", str(runs), "--config", str(config_file)]


def complete_folders(runs: Path) -> dict[str, int]:
    """Every complete stage folder under ``runs`` (manifest present, files intact) -> its manifest's mtime."""
    from alignment.io import files_intact, read_manifest

    done = {}
    for manifest in runs.rglob("manifest.json"):
        folder = manifest.parent
        m = read_manifest(folder)
        if m and (not m.get("files") or files_intact(folder, m)) and "checkpoints" not in folder.parts:
            done[str(folder.relative_to(runs))] = manifest.stat().st_mtime_ns
    return done


def newest_intact_checkpoint(out: Path) -> int | str:
    """The step of the newest sealed, intact Trainer checkpoint of ``out`` (0: none), i.e. where a re-run
    resumes; "complete" when the output was already written (the kill came after it)."""
    from alignment.checkpoints import checkpoint_folder, checkpoint_problem

    if (out / "manifest.json").is_file():
        return "complete"
    steps = [int(c.name.split("-")[-1]) for c in checkpoint_folder(out).glob("checkpoint-*")
             if checkpoint_problem(c) is None]
    return max(steps, default=0)


def weights_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5) for k in wa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["reinforce", "rm", "sft", "pipeline"], default="reinforce")
    parser.add_argument("--policy")
    parser.add_argument("--source", default=str(SUMMARIES), help="sft: the summaries file")
    parser.add_argument("--rm")
    parser.add_argument("--data")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="REINFORCE / SFT steps (rm: epochs = steps / 8)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial before letting it finish")
    parser.add_argument("--max-delay", type=float, default=15.0, help="seconds; each kill waits U(1, max-delay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the trials here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix=f"kill-resume-{args.stage}-"))
    if args.stage == "sft":
        from tests.tiny import tiny_model_dir

        if not Path(args.source).is_file():
            parser.error(f"--source {args.source}: no such file (the shared TL;DR summaries, or pass one)")
        policy, rm, data = args.policy or str(tiny_model_dir(work / "policy")), None, None
    else:
        policy, rm, data = (args.policy, args.rm, args.data) if args.rm else tiny_stack(work)
    reference = None
    if args.stage in ("rm", "sft"):  # the uninterrupted run every trial must reproduce
        reference = work / f"{args.stage}-reference"
        cmd = rm_cmd(args, policy, data, reference) if args.stage == "rm" else sft_cmd(args, policy, reference)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = []
    for trial in range(args.trials):
        out = work / f"trial-{trial}"
        if args.stage == "reinforce":
            cmd = reinforce_cmd(args, policy, rm, data, out)
        elif args.stage == "rm":
            cmd = rm_cmd(args, policy, data, out)
        elif args.stage == "sft":
            cmd = sft_cmd(args, policy, out)
        else:
            cmd = pipeline_cmd(args, policy, work, out)
        kills, runs, killed_at, finished_before, resumable = 0, 0, [], {}, []
        start = time.perf_counter()
        while True:
            runs += 1
            if args.stage == "pipeline":
                done = complete_folders(out) if out.is_dir() else {}
                finished_before.update({k: v for k, v in done.items() if k not in finished_before})
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            if kills < args.kills:
                delay = rng.uniform(1.0, args.max_delay)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: `align run`'s Prefect server too
                    proc.wait()
                    kills += 1
                    killed_at.append(round(delay, 1))
                    resumable.append(newest_intact_checkpoint(out))
                    continue
            else:
                proc.wait()
            if proc.returncode != 0:
                results.append({"trial": trial, "ok": False, "why": f"exit code {proc.returncode}"})
                break
            if args.stage != "reinforce" or (out / "final" / "manifest.json").is_file():
                break
        if len(results) == trial:  # not already failed
            trainer = {"resumable_step_after_kill": resumable} if args.stage in ("rm", "sft") else {}
            results.append({"trial": trial, **check(args, out, reference, finished_before), "kills": kills,
                            "killed_after_s": killed_at, **trainer, "runs": runs,
                            "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(results[-1]), flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{args.stage}: {passed} passed, {len(results) - passed} failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"stage": args.stage, "trials": results}, indent=2) + "\n")
    return 0 if passed == len(results) else 1


def check(args, out: Path, reference: Path | None, finished_before: dict[str, int]) -> dict:
    """Whether a finished trial's output is right (see the module docstring)."""
    if args.stage == "reinforce":
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        ok = steps == list(range(1, args.steps + 1)) and (out / "final" / "model.safetensors").is_file()
        return {"ok": ok, **({} if ok else {"why": f"metrics steps {steps}"})}
    if args.stage == "rm":
        if not (out / "manifest.json").is_file():
            return {"ok": False, "why": "no complete output"}
        got, want = (json.loads((f / "metrics.json").read_text()) for f in (out, reference))
        same_metrics = all(abs(got[k] - want[k]) < 1e-6 for k in ("accuracy", "mean_margin"))
        ok = same_metrics and weights_equal(out, reference) and not (out.parent / f".{out.name}.checkpoints").exists()
        return {"ok": ok, "accuracy": got["accuracy"], **({} if ok else {"why": "differs from the uninterrupted run"})}
    if args.stage == "sft":
        if not (out / "manifest.json").is_file():
            return {"ok": False, "why": "no complete output"}
        got, want = (json.loads((f / "metrics.json").read_text()) for f in (out, reference))
        ok = (got["rouge_after"] == want["rouge_after"] and weights_equal(out, reference)
              and not (out.parent / f".{out.name}.checkpoints").exists())
        return {"ok": ok, "rougeL_after": got["rouge_after"]["rougeL"]["mean"],
                **({} if ok else {"why": "differs from the uninterrupted run"})}
    done = complete_folders(out)
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*.tmp-*")]
    recomputed = [k for k, mtime in finished_before.items() if done.get(k) != mtime]
    stages = {Path(k).parts[0] for k in done}
    ok = not leftovers and not recomputed and {"data", "rm", "reinforce", "score", "judge"} <= stages
    return {"ok": ok, "stages_complete": len(done), "cached_after_kills": len(finished_before),
            **({} if ok else {"why": f"leftovers {leftovers}, recomputed {recomputed}, stages {sorted(stages)}"})}


if __name__ == "__main__":
    sys.exit(main())
