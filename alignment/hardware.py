"""Device and precision choices that depend on the machine.

bf16 autocast is only a win on CPUs with bf16 instructions (AVX512-BF16 or AMX): there it runs
2.5-4x faster than fp32. On AVX2-only CPUs (such as the AMD EPYC development machines here) bf16
matmuls fall back to slow paths, about 1-20 GFLOP/s against ~150 for fp32, so "auto" picks fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


class DeviceError(RuntimeError):
    """The requested device is not available."""


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


def cpu_has_fast_bf16() -> bool:
    return not cpu_info()["flags"].isdisjoint({"avx512_bf16", "amx_bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


def bf16_enabled(flag: bool | None, device: torch.device) -> bool:
    """An explicit flag wins; otherwise bf16 where the hardware runs it fast."""
    if flag is not None:
        return flag
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()
