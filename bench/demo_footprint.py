"""The demo pipeline's footprint: wall-clock and peak resident memory per stage, the whole run's peak
and the time of a fully cached re-run, measured on a fresh runs folder.

    python bench/demo_footprint.py                       # align run (the demo preset), then again (cached)
    python bench/demo_footprint.py --json demo-footprint.json reinforce.lora=false

Per stage: the ``footprint.json`` each stage writes (its own peak: the kernel's high-water mark is
reset when a stage starts, see ``alignment/footprint.py``). Whole run: ``align run``'s process
sampled every 0.1 s from ``/proc`` (its resident memory, and that of the temporary Prefect server it
starts, reported apart). Targets (issue 14): every stage and the run <= 3 GB, cached re-run <= 10 s,
first run <= 4 min. Trailing ``key=value`` arguments go to ``align run`` (e.g. a config to compare).

    python bench/demo_footprint.py --background-load 1   # the same beside one CPU-bound process it starts
    ALIGN_THREADS=2 python bench/demo_footprint.py --background-load 1 --no-cached   # the old 2 threads there

``--background-load N`` starts N CPU-bound processes before the first run and stops them after it (each
also ends by itself after ``--load-limit-s``), to measure the thread policy (``alignment.hardware``) under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ["data", "rm", "reinforce", "score", "judge"]
BUSY = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``, sampling its resident memory (and its children's) until it exits."""
    peaks = {"main": 0.0, "children": 0.0}
    with open(log, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                peaks["main"] = max(peaks["main"], rss_mb(proc.pid))
                peaks["children"] = max(peaks["children"], sum(rss_mb(c) for c in children(proc.pid)))
                time.sleep(0.1)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        proc.wait()
        seconds = time.perf_counter() - start
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peaks["main"]), "children_peak_rss_mb": round(peaks["children"])}


def stage_footprints(runs: Path) -> dict[str, dict]:
    rows = {}
    for stage in STAGES:
        for path in sorted((runs / stage).glob("*/footprint.json")):
            rows[f"{stage}/{path.parent.name}"] = json.loads(path.read_text())
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", help="where to run (default: a fresh temporary folder)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="run the first (uncached) run beside N CPU-bound processes")
    parser.add_argument("--load-limit-s", type=float, default=3600, help="each background process ends by then")
    parser.add_argument("--no-cached", action="store_true", help="skip the cached re-run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for align run")
    args = parser.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-demo-"))
    cmd = [sys.executable, "-m", "cli", "run", "--runs-dir", str(runs), *args.overrides]
    os.chdir(Path(__file__).resolve().parents[1])
    load = [subprocess.Popen([sys.executable, "-c", BUSY, str(args.load_limit_s)]) for _ in range(args.background_load)]
    try:
        first = run(cmd, runs.parent / f"{runs.name}-first.log")
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    cached = None if args.no_cached else run(
        cmd, runs.parent / f"{runs.name}-cached.log")
    stages = stage_footprints(runs)

    from alignment.hardware import cpu_info

    cpu = cpu_info()["model_name"] or platform.processor() or platform.machine()
    print(f"\nalign run {' '.join(args.overrides)} in {runs}, {cpu}, {os.cpu_count()} cores, "
          f"{args.background_load} CPU-bound background process(es), ALIGN_THREADS={os.environ.get('ALIGN_THREADS', 'auto')}")
    for name, f in stages.items():
        machine = f.get("machine") or {}
        if machine:
            print(f"  {name}: {json.dumps(machine, sort_keys=True)[:300]}")
    print(f"{'stage':36s}{'seconds':>9s}{'peak GB':>9s}{'start GB':>10s}")
    for name, f in stages.items():
        print(f"{name:36s}{f['seconds']:>9.1f}{f['peak_rss_mb'] / 1024:>9.2f}{(f['rss_before_mb'] or 0) / 1024:>10.2f}")
    worst = max(f["peak_rss_mb"] for f in stages.values())
    print(f"\nfirst run: {first['seconds']:.0f} s, process peak {first['peak_rss_mb'] / 1024:.2f} GB "
          f"(largest stage {worst / 1024:.2f} GB; temporary Prefect server {first['children_peak_rss_mb'] / 1024:.2f} GB)")
    if args.no_cached:
        print("cached re-run: skipped (--no-cached)")
    else:
        print(f"cached re-run: {cached['seconds']:.1f} s, process peak {cached['peak_rss_mb'] / 1024:.2f} GB")
    print(f"targets: peak <= 3 GB {'met' if first['peak_rss_mb'] <= 3072 else 'MISSED'}, "
          f"first run <= 240 s {'met' if first['seconds'] <= 240 else 'MISSED'}"
          + ("" if args.no_cached else f", cached re-run <= 10 s {'met' if cached['seconds'] <= 10 else 'MISSED'}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(cmd), "cpu": cpu, "background_load": args.background_load,
                                               "first": first, "cached": cached, "stages": stages}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
