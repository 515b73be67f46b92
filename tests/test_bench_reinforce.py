"""bench/reinforce_step.py's bookkeeping (no model runs): the summaries over repeats, the per-repeat
ratios, the weight bytes of the decode bound, the machine figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_reinforce_step", ROOT / "bench" / "reinforce_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rep(step_s: float, samples: int = 8, **extra) -> dict:
    return {"phases": dict.fromkeys(["generate", "reward", "reference", "forward_backward", "optimizer"], step_s / 5),
            "step_s": step_s, "prompt_tokens": 100, "completion_tokens": 50, "samples": samples, "kl": True,
            "mean_length": 6.0, "layout": "8 prompts x 1 samples", "load_average": [0.5, 1.5], **extra}


def test_summary_means_over_repeats_with_min_max(bench):
    row = bench.summarise([_rep(2.0, repeat=0), _rep(4.0, repeat=1)], n_policy=10, n_rm=5, peak=1e3)
    assert row["samples"] == 8 and row["step_s"] == 3.0 and row["phases"]["generate"] == pytest.approx(0.6)
    assert row["samples_per_s"] == pytest.approx((4 + 2) / 2)  # the mean of the repeats' samples/s
    assert (row["samples_per_s_min"], row["samples_per_s_max"]) == (2.0, 4.0)
    assert row["fraction_of_peak"] == pytest.approx(row["flops_per_s"] / 1e3)
    assert "repeat" not in row and len(row["repeats"]) == 2


def test_ratios_per_repeat_and_only_where_both_rows_ran(bench):
    results = {"ours bf16": [{"samples_per_s": 2.0}, {"samples_per_s": 3.0}],
               "TRL RLOOTrainer bf16": [{"samples_per_s": 1.0}, {"samples_per_s": 2.0}]}
    out = bench.ratios(bench.ratio_pairs("bf16", 4), results)
    assert set(out) == {"ours_vs_trl"}
    assert out["ours_vs_trl"]["per_repeat"] == [2.0, 1.5]
    assert (out["ours_vs_trl"]["min"], out["ours_vs_trl"]["max"]) == (1.5, 2.0)
    assert out["ours_vs_trl"]["mean"] == pytest.approx(1.75)
    assert "ours_int8_vs_fp32" not in bench.ratios(bench.ratio_pairs("bf16", 4), {"ours fp32 int8 rollouts": [],
                                                                                  "ours fp32": []})


def test_linear_weight_bytes_per_precision(bench):
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    assert bench.linear_weight_bytes(fp32, autocast=False) == (32 + 8) * 4  # norms and biases not counted
    assert bench.linear_weight_bytes(fp32, autocast=True) == (32 + 8) * 2  # trainable: cast once per generate
    frozen = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)).requires_grad_(False)
    assert bench.linear_weight_bytes(frozen, autocast=True) == 32 * (4 + 2 + 2)  # re-cast at every step
    assert bench.linear_weight_bytes(fp32.to(torch.bfloat16), autocast=True) == (32 + 8) * 2
    int8 = torch.ao.quantization.quantize_dynamic(fp32.float(), {torch.nn.Linear}, dtype=torch.qint8)
    assert bench.linear_weight_bytes(int8, autocast=False) == 32 + 8


def test_machine_figures(bench):
    cpu = bench.cpu_info()
    assert cpu["model_name"] and set(cpu["flags"]) == {"avx2", "avx512_bf16", "amx_tile"}
    bandwidth = bench.memory_bandwidth(mib=4, repeats=2)
    assert bandwidth["bytes"] == 4 * 2**20 and bandwidth["copy"] > 0 and bandwidth["read"] > 0


def test_cpu_flags_read_from_the_first_core(bench, tmp_path, monkeypatch):
    """hardware.cpu_info parses /proc/cpuinfo's first core; the bf16 choice and the bench read its flags."""
    from alignment import hardware

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    info = hardware.cpu_info(str(cpuinfo))
    assert info == {"model_name": "Test CPU", "flags": frozenset({"fpu", "avx2", "avx512_bf16"})}
    assert hardware.cpu_info(str(tmp_path / "absent")) == {"model_name": "", "flags": frozenset()}
    for flags, fast in (("fpu avx2", False), ("avx2 avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        monkeypatch.setattr(hardware, "cpu_info", lambda flags=flags: {"model_name": "X",
                                                                       "flags": frozenset(flags.split())})
        assert hardware.cpu_has_fast_bf16() is fast
    assert bench.cpu_info() == {"model_name": "X", "flags": {"avx2": False, "avx512_bf16": False, "amx_tile": True}}
