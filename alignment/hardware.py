"""Device, thread and precision choices that depend on the machine.

Threads. Torch's OpenMP threads default to every core; beside one other busy process on a 2-core
machine two threads ran a decode step 5-9x slower than one (301 ms against 1,489-2,758 ms: the threads
wait for each other at every barrier while one of them is descheduled). :func:`apply_threads` sets
this process's thread count once, from the cores it may use (``os.sched_getaffinity``), the processes
launched beside it on this machine (data-parallel workers) and the cores other processes keep busy
when it starts; :func:`choose_threads` is the rule, :func:`thread_env` the environment for the
processes this one launches (``align compare``, ``accelerate launch``). ``ALIGN_THREADS`` wins.

Precision. bf16 autocast pays only where bf16 matmuls outrun fp32 ones: on an AMD EPYC with
AVX512-BF16 bf16 ran 850 GFLOP/s against 193 for fp32, but an Intel Xeon with AVX512-BF16 and no AMX
ran bf16 at 171 against 333 for fp32 (decode shape: 75 against 128), and on AVX2-only CPUs bf16 falls
back to slow paths (1-20 GFLOP/s). So CPU flags are only a prefilter (no bf16 instructions: fp32
without measuring); otherwise ``bf16: auto`` is decided by a short matmul benchmark at the model's
shapes (:data:`BF16_SHAPES`), cached per machine (:func:`precision_cache_dir`). CUDA: bf16 where the
device supports it, as before.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not available, or a machine setting (ALIGN_THREADS) is not usable."""


@functools.lru_cache(maxsize=1)
def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The first core's model name and instruction flags from /proc/cpuinfo ({"model_name": "", "flags":
    frozenset()} where there is none: not Linux)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        lines = []
    field: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())  # the first core's
    return {"model_name": field.get("model name", ""), "flags": frozenset(field.get("flags", "").split())}


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_fast_bf16() -> bool:
    """The CPU has bf16 instructions (AVX512-BF16 or AMX): the prefilter of the measured choice. Having
    them does not make bf16 faster (see the module docstring); :func:`bf16_enabled` measures."""
    return not cpu_info()["flags"].isdisjoint(BF16_FLAGS)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


# What this process chose: threads (process-wide) and, per stage, the precision (alignment.footprint
# records them in the stage's footprint.json: it forgets the stage's entries when a stage starts).
_CHOICES: dict[str, dict[str, Any]] = {}
_PROCESS_WIDE = ("threads",)


def forget_stage_choices() -> None:
    """Drop the precision choices of the previous stage (the thread choice is the process's)."""
    for name in [k for k in _CHOICES if k not in _PROCESS_WIDE]:
        del _CHOICES[name]


def stage_choices() -> dict[str, dict[str, Any]]:
    """The choices made so far in this stage (and this process's thread choice), for its footprint."""
    return {k: dict(v) for k, v in _CHOICES.items()}


# --- threads -----------------------------------------------------------------------------------------

THREADS_ENV = "ALIGN_THREADS"
THREADS_REASON_ENV = "ALIGN_THREADS_REASON"  # why the launching process chose ALIGN_THREADS for its child


def choose_threads(cores: int, processes: int = 1, busy: float = 0.0, override: int | None = None
                   ) -> tuple[int, str]:
    """(threads per process, why): the ``cores`` this process may use less the ones other processes keep
    ``busy`` (rounded half up), shared among the ``processes`` launched side by side; at least 1. An
    ``override`` wins. Pure: the measurements are the caller's (:func:`apply_threads`, :func:`thread_env`)."""
    if override is not None:
        return override, f"{THREADS_ENV}={override}"
    processes, others = max(1, processes), max(0, int(busy + 0.5))
    threads = max(1, (cores - others) // processes)
    reason = f"{cores} core{'s' * (cores != 1)}"
    if others:
        reason += f", {others} busy with other processes"
    if processes > 1:
        reason += f", shared by {processes} processes"
    return threads, reason


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; every core where there is no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DeviceError(f"{name}={value!r} in the environment: a whole number of threads, at least 1, was expected")
    return number


def threads_override(launched: bool) -> tuple[int, str] | None:
    """(threads, why) set in the environment: ``ALIGN_THREADS`` (a launching process's choice comes with
    its reason), else ``OMP_NUM_THREADS`` in a plain process (launchers set it to 1 for their workers, so
    there it is not taken as a choice); None when neither."""
    if os.environ.get(THREADS_ENV):
        n = _positive_int(THREADS_ENV, os.environ[THREADS_ENV])
        return n, os.environ.get(THREADS_REASON_ENV) or f"{THREADS_ENV}={n} in the environment"
    if not launched and os.environ.get("OMP_NUM_THREADS"):
        n = _positive_int("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
        return n, f"OMP_NUM_THREADS={n} in the environment"
    return None


def cpu_times(cpus: set[int], stat: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """cpu -> (busy, total) clock ticks since boot for the given cpus, from /proc/stat ({} where absent)."""
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """Busy cores between two :func:`cpu_times` readings: the sum over cpus of each one's busy share."""
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def busy_cores(seconds: float = 0.25) -> tuple[float, str]:
    """(cores of this process's affinity that other processes keep busy, how it was measured): the
    cores' busy time over a short window less this process's own CPU time in it, from /proc/stat; where
    there is none, the 1-minute load average (a minute's memory: it still counts a process that just ended)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set()
    before, mine = cpu_times(cpus), resource.getrusage(resource.RUSAGE_SELF)
    if not before:
        try:
            return max(0.0, os.getloadavg()[0]), "1-minute load average"
        except OSError:
            return 0.0, "not measurable here"
    start = time.perf_counter()
    time.sleep(seconds)
    after, now = cpu_times(cpus), resource.getrusage(resource.RUSAGE_SELF)
    own = (now.ru_utime + now.ru_stime - mine.ru_utime - mine.ru_stime) / (time.perf_counter() - start)
    return max(0.0, busy_between(before, after) - own), f"/proc/stat over {seconds:g} s"


def apply_threads() -> dict[str, Any]:
    """Decide and set this process's torch threads once (later calls return the first choice), and log
    the choice with its reason. Raises DeviceError for an unusable ALIGN_THREADS / OMP_NUM_THREADS."""
    if "threads" in _CHOICES:
        return _CHOICES["threads"]
    from alignment.parallel import launched_world_size, local_world_size

    processes, cores = local_world_size(), usable_cores()
    override = threads_override(launched=launched_world_size() > 1)
    busy, measured = (0.0, "not measured") if override else busy_cores()
    threads, reason = override or choose_threads(cores, processes, busy)
    torch.set_num_threads(threads)
    _CHOICES["threads"] = {"threads": threads, "reason": reason, "cores": cores, "processes": processes,
                           "busy": round(busy, 2), "busy_measured_by": measured}
    log.info("torch threads: %d (%s)", threads, reason)
    return _CHOICES["threads"]


def thread_env(processes: int = 1) -> dict[str, str]:
    """The environment for ``processes`` children this process launches side by side (it waits meanwhile):
    each one's thread count, measured now (an earlier child's load is gone), as ``ALIGN_THREADS`` with
    its reason, and as ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for what they start themselves. An
    choice set here (``ALIGN_THREADS``; ``OMP_NUM_THREADS`` in a plain process) is passed on as it is."""
    from alignment.parallel import launched_world_size

    override = threads_override(launched=launched_world_size() > 1)
    if override:
        threads, reason = override
    else:
        busy, _ = busy_cores()
        threads, why = choose_threads(usable_cores(), processes, busy)
        reason = f"chosen by the launching process: {why}"
    n = str(threads)
    return {THREADS_ENV: n, THREADS_REASON_ENV: reason, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# --- precision ---------------------------------------------------------------------------------------

# (rows, in, out) of a Linear at SmolLM2-135M's MLP width: a training micro-batch and a decoding step.
BF16_SHAPES = {"train": (512, 576, 1536), "decode": (8, 576, 1536)}
# bf16 must beat fp32 by this much at the matmul: autocast's per-op casts and the fp32 ops between the
# matmuls are not in the measurement (a margin chosen, not measured).
BF16_MIN_SPEEDUP = 1.2
PRECISION_SCHEMA = 1


def matmul_gflops(rows: int, inner: int, out: int, *, reps: int = 5, budget_s: float = 0.3) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} of ``linear(x (rows, inner), w (out, inner))``: fp32, and under bf16
    autocast with the weight held in bf16 (the input cast at each call, as in training and rollouts). Each
    is the median of ``reps`` timed repeats of ~10 ms of calls (at least 3 once ``budget_s`` has passed),
    after two warm-up calls; the two precisions' repeats alternate, so a change of load hits both."""
    x = torch.randn(rows, inner)
    weights = {"fp32": torch.randn(out, inner)}
    weights["bf16"] = weights["fp32"].bfloat16()
    calls, times = {}, {p: [] for p in weights}

    def timed(p: str, n: int) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
            start = time.perf_counter()
            for _ in range(n):
                torch.nn.functional.linear(x, weights[p])
            return (time.perf_counter() - start) / n

    for p in weights:
        timed(p, 1)
        calls[p] = max(1, min(1000, int(0.01 / max(timed(p, 1), 1e-6))))
    deadline = time.perf_counter() + budget_s
    while len(times["fp32"]) < reps and (len(times["fp32"]) < 3 or time.perf_counter() < deadline):
        for p in weights:
            times[p].append(timed(p, calls[p]))
    return {p: float(f"{2 * rows * inner * out / statistics.median(t) / 1e9:.4g}") for p, t in times.items()}


def measure_bf16() -> dict[str, dict[str, float]]:
    """shape name -> {"fp32": GFLOP/s, "bf16": GFLOP/s} at :data:`BF16_SHAPES` (a fraction of a second)."""
    return {name: matmul_gflops(*shape) for name, shape in BF16_SHAPES.items()}


def precision_cache_dir() -> Path:
    """Where measured precision figures are kept: ``<cache>/precision``, the cache being the project's
    (``ALIGNMENT_CACHE_DIR``, else ~/.cache/alignment)."""
    from alignment.models import cache_root

    return cache_root() / "precision"


def precision_key() -> dict[str, Any]:
    """What the figures depend on: CPU model, its flags, torch version, threads (and the shapes)."""
    info = cpu_info()
    return {"cpu": info["model_name"], "flags": sorted(info["flags"]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "shapes": {k: list(v) for k, v in BF16_SHAPES.items()},
            "schema": PRECISION_SCHEMA}


_MEASURED: dict[str, dict[str, Any]] = {}  # cache file -> its record, once per process
_LOGGED: set[tuple[str, str]] = set()  # (cache file, shape) whose choice was logged


def bf16_figures() -> dict[str, Any]:
    """This machine's record {"key", "figures", "source", "file", ...}: read from the cache when its key
    matches, else measured now and cached (:func:`_cache_record` says when not)."""
    from alignment.io import sha256_text

    key = precision_key()
    path = precision_cache_dir() / f"bf16-{sha256_text(repr(sorted(key.items())))[:16]}.json"
    if str(path) in _MEASURED:
        return _MEASURED[str(path)]
    stored = _read_record(path)
    if stored is not None and stored.get("key") == key and _valid_figures(stored.get("figures")):
        record = {**stored, "source": "cached"}
    else:
        busy, _ = busy_cores()
        record = {"key": key, "figures": measure_bf16(), "measured_at": datetime.now(UTC).isoformat(
            timespec="seconds"), "busy_cores": round(busy, 2)}
        record["source"] = "measured now" + _cache_record(path, record, stored is not None)
    _MEASURED[str(path)] = record = {**record, "file": str(path)}
    return record


def _cache_record(path: Path, record: dict[str, Any], ours: bool) -> str:
    """Write a fresh record at ``path``; '' when written, else ", not cached: <why>": when its threads did
    not have their cores to themselves (other processes kept cores busy: the figures are used, measured
    again next time), or ``path`` holds something that is not one of our records (left alone)."""
    from alignment.io import write_json

    threads, busy, cores = record["key"]["threads"], record["busy_cores"], usable_cores()
    if threads + int(busy + 0.5) > cores:
        return f", not cached: threads={threads} beside {busy:.1f} busy cores of {cores}"
    if path.exists() and not ours:
        return f", not cached: {path} is not a precision record of this project (left alone)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {k: v for k, v in record.items() if k != "source"})
    except OSError as exc:
        return f", not cached: {exc}"
    return ""


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON record at ``path`` if it is one of ours (a dict with a "key"); None otherwise or when absent."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data else None


def _valid_figures(figures: Any) -> bool:
    return isinstance(figures, dict) and all(
        isinstance(figures.get(name), dict) and all(isinstance(figures[name].get(p), (int, float)) and
                                                     figures[name][p] > 0 for p in ("fp32", "bf16"))
        for name in BF16_SHAPES)


def bf16_pays(shape: str = "train") -> tuple[bool, str, dict[str, Any]]:
    """(bf16 at ``shape`` is faster on this CPU, why, the figures): no bf16 instructions -> False without
    measuring; else the measured bf16/fp32 ratio against :data:`BF16_MIN_SPEEDUP`."""
    if not cpu_has_fast_bf16():
        return False, "no bf16 instructions (avx512_bf16, amx_bf16) on this CPU: fp32, not measured", {}
    record = bf16_figures()
    fig = record["figures"][shape]
    ratio = fig["bf16"] / fig["fp32"]
    verdict = ratio >= BF16_MIN_SPEEDUP
    why = (f"{shape}-shape matmul {'x'.join(map(str, BF16_SHAPES[shape]))} bf16 {fig['bf16']:.1f} vs fp32 "
           f"{fig['fp32']:.1f} GFLOP/s ({ratio:.2f}x; bf16 from {BF16_MIN_SPEEDUP}x), {record['source']}")
    if (record["file"], shape) not in _LOGGED:  # once per process
        _LOGGED.add((record["file"], shape))
        log.info("bf16 at the %s shape: %s (%s) on %s, threads=%d (%s)", shape, "yes" if verdict else "no, fp32", why,
                 record["key"]["cpu"] or "an unnamed CPU", record["key"]["threads"], record["file"])
    return verdict, why, {"figures": record["figures"], "file": record["file"], "threads": record["key"]["threads"]}


def bf16_enabled(flag: bool | None, device: torch.device) -> bool:
    """An explicit flag wins; otherwise bf16 where it is measured faster (CPU) or supported (CUDA). The
    choice is recorded for the stage's footprint."""
    if flag is not None:
        chosen, why, extra = flag, "set in the config", {}
    elif device.type == "cuda":
        chosen, why, extra = torch.cuda.is_bf16_supported(), "CUDA device's bf16 support", {}
    else:
        chosen, why, extra = bf16_pays("train")
    _CHOICES["bf16"] = {"bf16": chosen, "reason": why, **extra}
    return chosen


def bf16_rollouts_pay(device: torch.device) -> bool:
    """Whether the bf16 rollout copy pays by default here: on CUDA yes; on a CPU where bf16 is measured
    faster at the decode shape (on the Xeon above the copy ran 0.72x of sampling without it). Recorded
    for the stage's footprint."""
    if device.type == "cuda":
        chosen, why, extra = True, "CUDA device", {}
    else:
        chosen, why, extra = bf16_pays("decode")
    _CHOICES["bf16_rollouts"] = {"bf16_rollouts": chosen, "reason": why, **extra}
    return chosen
