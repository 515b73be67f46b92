"""``bf16: auto`` on a CPU: decided by a measured matmul (stubbed here: timings differ from CPU to CPU), flags
only a prefilter; the figures cached per (CPU model, flags, torch version, threads) and reused without
measuring; the bf16 rollout copy decided by the decode shape's figure; the choice in the stage footprint."""

from __future__ import annotations

import json

import pytest
import torch

from alignment import hardware
from alignment.footprint import FOOTPRINT, records_footprint
from alignment.stage import StageResult

CPU = torch.device("cpu")
FAST = {"train": {"fp32": 193.4, "bf16": 849.9}, "decode": {"fp32": 40.0, "bf16": 90.0}}  # AMD EPYC AVX512-BF16
SLOW = {"train": {"fp32": 332.5, "bf16": 170.9}, "decode": {"fp32": 128.0, "bf16": 75.0}}  # Xeon, no AMX


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fresh process on a stubbed CPU with bf16 instructions, its cache in tmp_path, the benchmark counted."""
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in (("_CHOICES", {}), ("_MEASURED", {}), ("_LOGGED", set())):
        monkeypatch.setattr(hardware, name, value)
    state = {"figures": FAST, "runs": 0, "cpu": "Test CPU", "flags": {"avx2", "avx512_bf16"}, "busy": 0.0}

    def measure():
        state["runs"] += 1
        return json.loads(json.dumps(state["figures"]))

    monkeypatch.setattr(hardware, "measure_bf16", measure)
    monkeypatch.setattr(hardware, "cpu_info", lambda: {"model_name": state["cpu"], "flags": frozenset(state["flags"])})
    monkeypatch.setattr(hardware, "busy_cores", lambda seconds=0.25: (state["busy"], "stub"))
    monkeypatch.setattr(hardware, "usable_cores", lambda: 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def new_process():
        hardware._MEASURED.clear()
        hardware._CHOICES.clear()

    state["new_process"] = new_process
    return state


def test_bf16_measured_faster_is_chosen(machine):
    assert hardware.bf16_enabled(None, CPU) is True
    choice = hardware.stage_choices()["bf16"]
    assert choice["figures"] == FAST and choice["threads"] == 2
    assert "849.9 vs fp32 193.4 GFLOP/s (4.39x" in choice["reason"]
    assert hardware.bf16_rollouts_pay(CPU) is True
    assert machine["runs"] == 1  # both shapes from one measurement


def test_bf16_measured_slower_gives_fp32_despite_the_flags(machine):
    machine["figures"] = SLOW
    assert hardware.bf16_enabled(None, CPU) is False
    assert "170.9 vs fp32 332.5 GFLOP/s (0.51x" in hardware.stage_choices()["bf16"]["reason"]
    assert hardware.bf16_rollouts_pay(CPU) is False


def test_each_shape_decides_on_its_own_and_the_margin_holds(machine):
    machine["figures"] = {"train": {"fp32": 100.0, "bf16": 119.0}, "decode": {"fp32": 50.0, "bf16": 60.0}}
    assert hardware.bf16_enabled(None, CPU) is False  # 1.19x: under the 1.2x margin
    assert hardware.bf16_rollouts_pay(CPU) is True  # 1.2x


def test_no_bf16_instructions_means_fp32_without_measuring(machine):
    machine["flags"] = {"avx2", "fma"}
    assert hardware.bf16_enabled(None, CPU) is False
    assert hardware.bf16_rollouts_pay(CPU) is False
    assert machine["runs"] == 0 and not (hardware.precision_cache_dir()).exists()
    assert "no bf16 instructions" in hardware.stage_choices()["bf16"]["reason"]


def test_explicit_flag_and_cuda_are_not_measured(machine, monkeypatch):
    assert hardware.bf16_enabled(True, CPU) is True and hardware.bf16_enabled(False, CPU) is False
    assert hardware.stage_choices()["bf16"] == {"bf16": False, "reason": "set in the config"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.bf16_enabled(None, torch.device("cuda")) is True
    assert hardware.bf16_rollouts_pay(torch.device("cuda")) is True
    assert machine["runs"] == 0


def test_cache_reused_without_measuring_and_invalidated_by_its_key(machine, monkeypatch):
    assert hardware.bf16_enabled(None, CPU) is True and machine["runs"] == 1
    files = list(hardware.precision_cache_dir().glob("bf16-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["key"]["cpu"] == "Test CPU" and stored["key"]["torch"] == torch.__version__
    assert stored["key"]["threads"] == 2 and stored["figures"] == FAST
    assert hardware.bf16_enabled(None, CPU) is True and machine["runs"] == 1  # this process: remembered
    machine["new_process"]()
    machine["figures"] = SLOW  # would say fp32 if measured again
    assert hardware.bf16_enabled(None, CPU) is True and machine["runs"] == 1  # another process: the cache
    assert hardware.stage_choices()["bf16"]["reason"].endswith("cached")
    for change in ("torch", "cpu", "threads"):
        machine["new_process"]()
        if change == "torch":
            monkeypatch.setattr(torch, "__version__", "9.9.9")
        elif change == "cpu":
            machine["cpu"] = "Other CPU"
        else:
            monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        runs = machine["runs"]
        assert hardware.bf16_enabled(None, CPU) is False and machine["runs"] == runs + 1, change
    assert len(list(hardware.precision_cache_dir().glob("bf16-*.json"))) == 4


def test_a_damaged_record_is_measured_again_and_a_foreign_file_left_alone(machine):
    hardware.bf16_enabled(None, CPU)
    (path,) = hardware.precision_cache_dir().glob("bf16-*.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "figures": {"train": {"fp32": "fast"}}}))  # ours, damaged
    machine["new_process"]()
    machine["figures"] = SLOW
    assert hardware.bf16_enabled(None, CPU) is False and machine["runs"] == 2
    assert json.loads(path.read_text())["figures"] == SLOW  # re-measured and rewritten
    path.write_text("not ours")
    machine["new_process"]()
    machine["figures"] = FAST
    assert hardware.bf16_enabled(None, CPU) is True and machine["runs"] == 3
    assert path.read_text() == "not ours"
    assert "is not a precision record of this project (left alone)" in hardware.stage_choices()["bf16"]["reason"]


def test_figures_measured_on_a_busy_machine_are_not_cached(machine):
    """2 threads beside 63 busy cores of 64: used for this process, measured again by the next."""
    machine["busy"] = 63.0
    assert hardware.bf16_enabled(None, CPU) is True
    assert "not cached: threads=2 beside 63.0 busy cores of 64" in hardware.stage_choices()["bf16"]["reason"]
    assert not hardware.precision_cache_dir().exists()
    machine["new_process"]()
    machine["busy"] = 0.0
    hardware.bf16_enabled(None, CPU)
    assert machine["runs"] == 2 and len(list(hardware.precision_cache_dir().glob("*.json"))) == 1


def test_the_choice_is_recorded_in_the_stage_footprint(machine, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_THREADS", "1")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    machine["figures"] = SLOW

    @records_footprint
    def stage(out, bf16):
        out.mkdir()
        if bf16 != "none":
            hardware.bf16_enabled(bf16, CPU)
        return StageResult(out, {})

    stage(tmp_path / "a", None)
    record = json.loads((tmp_path / "a" / FOOTPRINT).read_text())
    assert record["machine"]["bf16"]["bf16"] is False and record["machine"]["bf16"]["figures"] == SLOW
    assert record["machine"]["threads"]["threads"] == 1
    assert record["machine"]["threads"]["reason"] == "ALIGN_THREADS=1 in the environment"
    stage(tmp_path / "b", "none")  # a stage that chose no precision does not carry the previous one's
    record = json.loads((tmp_path / "b" / FOOTPRINT).read_text())
    assert "bf16" not in record["machine"] and record["machine"]["threads"]["threads"] == 1


def test_the_micro_benchmark_measures_both_precisions():
    """The real benchmark on a small shape (no timing asserted: any CPU)."""
    figures = hardware.matmul_gflops(4, 16, 8, reps=3, budget_s=0.0)
    assert set(figures) == {"fp32", "bf16"} and figures["fp32"] > 0 and figures["bf16"] > 0
