"""Kill -9 trials: a REINFORCE run killed with SIGKILL at random moments resumes and finishes.

Each trial starts `align reinforce` in a subprocess, kills it with SIGKILL after a random delay,
and re-runs the same command (killing again, up to ``--kills`` times) until it finishes. A trial
passes when the final folder exists and metrics.jsonl holds steps 1..N exactly once each, in order.

    python bench/kill_resume.py                      # 5 trials on a tiny random model (a few minutes)
    python bench/kill_resume.py --policy DIR --rm DIR --data DIR --steps 20 --trials 5
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_stack(folder: Path) -> tuple[str, str, str]:
    """A random 2-layer policy, a reward model trained briefly on the demo data, and the demo data."""
    from alignment.data import DataConfig, run_data_stage
    from alignment.reward import RewardModelConfig, run_reward_stage
    from tests.tiny import tiny_model_dir

    policy = tiny_model_dir(folder / "policy")
    data = run_data_stage(DataConfig(), folder / "data").out_dir
    rm = run_reward_stage(RewardModelConfig(model=str(policy), data=str(data), max_length=128, epochs=1,
                                            learning_rate=1e-3, max_eval_pairs=8), folder / "rm").out_dir
    return str(policy), str(rm), str(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy")
    parser.add_argument("--rm")
    parser.add_argument("--data")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial before letting it finish")
    parser.add_argument("--max-delay", type=float, default=15.0, help="seconds; each kill waits U(1, max-delay)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    policy, rm, data = (args.policy, args.rm, args.data) if args.rm else tiny_stack(work)
    align = str(Path(sys.executable).parent / "align")
    results = []
    for trial in range(args.trials):
        out = work / f"trial-{trial}"
        cmd = [align, "-q", "reinforce", "--policy", policy, "--rm", rm, "--data", data, "--out", str(out),
               f"steps={args.steps}", "batch_size=4", "max_new_tokens=12", "checkpoint_every=2", "eval_prompts=2",
               "learning_rate=1e-4", "guard_min_distinct2=0", "guard_max_repetition=1"]
        kills, runs, killed_at = 0, 0, []
        start = time.perf_counter()
        while True:
            runs += 1
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kills < args.kills:
                delay = rng.uniform(1.0, args.max_delay)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    metrics = out / "metrics.jsonl"  # how far the killed run had logged
                    killed_at.append(len(metrics.read_text().splitlines()) if metrics.is_file() else 0)
                    continue
            else:
                proc.wait()
            if proc.returncode != 0:
                results.append({"trial": trial, "ok": False, "why": f"exit code {proc.returncode}"})
                break
            if (out / "final" / "manifest.json").is_file():
                break
        if len(results) == trial:  # not already failed
            steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            ok = steps == list(range(1, args.steps + 1)) and (out / "final" / "model.safetensors").is_file()
            results.append({"trial": trial, "ok": ok, "kills": kills, "killed_after_steps": killed_at, "runs": runs,
                            "seconds": round(time.perf_counter() - start, 1),
                            **({} if ok else {"why": f"metrics steps {steps}"})})
        print(json.dumps(results[-1]), flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
