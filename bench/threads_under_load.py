"""Torch threads beside a busy process: a decode-shaped step with 1 and 2 threads, on an idle machine and
beside one CPU-bound process that this bench starts (and stops: it also ends by itself after its time).

The step is SmolLM2-135M's decoding step at 8 sequences without attention: 30 layers of its Linear shapes
(q, k, v, o: 576->576/192/192/576; gate, up, down: 576->1536, 1536->576, with SiLU) and the LM head
(576->49152), fp32 (``--bf16``: bf16 weights under autocast). On a 2-core machine beside one busy process,
2 threads ran the real decode step 5-9x slower than 1 (the issue's figures: 301 ms with 1 thread, 1,489-2,758
with 2): OpenMP's threads meet at a barrier after every op and one of them keeps being descheduled. Each
condition also prints what ``alignment.hardware`` would choose there (measured just before it is timed).

    python bench/threads_under_load.py                            # ~10 s per figure at most
    python bench/threads_under_load.py --seconds 2 --steps 3      # a smoke run
    python bench/threads_under_load.py --threads 1,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import hardware  # noqa: E402

LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
LAYERS, VOCAB, ROWS = 30, 49152, 8
BUSY = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def decode_weights(bf16: bool) -> list[list[torch.Tensor]]:
    dtype = torch.bfloat16 if bf16 else torch.float32
    layers = [[torch.randn(out, inner, dtype=dtype) * 0.02 for inner, out in LAYER] for _ in range(LAYERS)]
    return [*layers, [torch.randn(VOCAB, 576, dtype=dtype) * 0.02]]


def decode_step(weights: list[list[torch.Tensor]], bf16: bool) -> None:
    """One decoding step's matmuls for ``ROWS`` sequences (a residual stream, as in the model)."""
    linear = torch.nn.functional.linear
    h = torch.randn(ROWS, 576)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for q, k, v, o, gate, up, down in weights[:-1]:
            linear(h, k), linear(h, v)
            h = h + linear(linear(h, q), o)
            h = h + linear(torch.nn.functional.silu(linear(h, gate)) * linear(h, up), down)
        linear(h, weights[-1][0]).argmax(-1)


def time_steps(weights, bf16: bool, threads: int, steps: int, seconds: float) -> dict:
    """ms per step with ``threads`` torch threads: the median (and min, max) of up to ``steps`` steps within
    ``seconds`` (at least 2), after one warm-up step."""
    torch.set_num_threads(threads)
    decode_step(weights, bf16)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < steps and (len(times) < 2 or time.perf_counter() < deadline):
        start = time.perf_counter()
        decode_step(weights, bf16)
        times.append((time.perf_counter() - start) * 1000)
    return {"threads": threads, "ms_median": round(statistics.median(times), 1), "ms_min": round(min(times), 1),
            "ms_max": round(max(times), 1), "steps": len(times)}


def condition(name: str, weights, args, thread_counts: list[int]) -> dict:
    busy, how = hardware.busy_cores()
    chosen, why = hardware.choose_threads(hardware.usable_cores(), 1, busy)
    rows = [time_steps(weights, args.bf16, t, args.steps, args.seconds) for t in thread_counts]
    print(f"\n{name}: {busy:.2f} cores busy with other processes ({how}); the project would choose {chosen} "
          f"thread(s) ({why})")
    print("| threads | ms/step median | min | max | steps |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['threads']} | {r['ms_median']} | {r['ms_min']} | {r['ms_max']} | {r['steps']} |")
    return {"busy_cores": round(busy, 2), "chosen_threads": chosen, "reason": why, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="thread counts to time, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure (at most)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per figure (at most; at least 2 steps)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights under autocast (default fp32)")
    parser.add_argument("--no-idle", action="store_true", help="only the loaded condition")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    info = hardware.cpu_info()
    print(f"CPU: {info['model_name'] or 'not named'}; {hardware.usable_cores()} usable cores; torch {torch.__version__}; "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; decode step: {LAYERS} layers + LM head, {ROWS} rows")
    weights = decode_weights(args.bf16)
    out = {"cpu": info["model_name"], "cores": hardware.usable_cores(), "torch": torch.__version__,
           "precision": "bf16" if args.bf16 else "fp32"}
    if not args.no_idle:
        out["idle"] = condition("idle (nothing started by this bench)", weights, args, thread_counts)
    # the busy process ends by itself after the longest the loaded condition can take, if not stopped first
    lifetime = 30 + len(thread_counts) * (args.seconds + 5) * 2
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(lifetime)])
    try:
        time.sleep(1.0)  # let it be scheduled before measuring
        out["beside_one_busy_process"] = condition("beside one CPU-bound process", weights, args, thread_counts)
    finally:
        busy.terminate()
        try:
            busy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            busy.kill()
            busy.wait()
    if "idle" in out:
        for idle, loaded in zip(out["idle"]["rows"], out["beside_one_busy_process"]["rows"], strict=True):
            print(f"{idle['threads']} thread(s): {loaded['ms_median'] / idle['ms_median']:.2f}x the idle time "
                  "beside the busy process")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
