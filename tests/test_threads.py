"""Torch threads per process: the rule (cores, processes launched side by side, cores other processes keep
busy, an override) against hand-computed cases, the /proc/stat reading, applying it once, the environment
handed to launched children, and an unusable ALIGN_THREADS as one line and exit 2."""

from __future__ import annotations

import pytest
import torch

from alignment import hardware
from alignment.hardware import DeviceError, busy_between, choose_threads, cpu_times


@pytest.mark.parametrize("cores, processes, busy, threads", [
    (2, 1, 0.0, 2),     # idle 2-core machine: both cores
    (2, 1, 1.0, 1),     # one other busy process: the free core only
    (2, 1, 0.4, 2),     # a little background noise rounds away
    (2, 1, 0.5, 1),     # half a core busy rounds up (not Python's round-half-even: round(0.5) == 0)
    (2, 1, 3.0, 1),     # overloaded: still one
    (2, 2, 0.0, 1),     # two data-parallel workers on 2 cores: one each
    (2, 2, 1.0, 1),
    (1, 1, 0.0, 1),     # affinity to 1 core
    (1, 2, 0.0, 1),
    (16, 1, 0.0, 16),
    (16, 2, 0.0, 8),    # 16 cores over 2 workers
    (16, 2, 4.0, 6),    # 4 busy: (16 - 4) // 2
    (16, 1, 3.4, 13),
    (16, 3, 0.0, 5),    # 16 // 3
])
def test_thread_rule(cores, processes, busy, threads):
    assert choose_threads(cores, processes, busy)[0] == threads


def test_thread_rule_reasons_and_override():
    assert choose_threads(2, 1, 0.0) == (2, "2 cores")
    assert choose_threads(2, 1, 1.2) == (1, "2 cores, 1 busy with other processes")
    assert choose_threads(16, 2, 4.0) == (6, "16 cores, 4 busy with other processes, shared by 2 processes")
    assert choose_threads(1, 1, 0.0) == (1, "1 core")
    assert choose_threads(2, 2, 1.0, override=5) == (5, "ALIGN_THREADS=5")  # the override wins


def test_busy_cores_from_proc_stat(tmp_path):
    """cpu lines of the affinity's cpus: busy = total - idle - iowait over the first 8 fields."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  30 0 10 100 0 0 0 0 0 0\n"
                    "cpu0 10 0 5 50 5 0 0 0 0 0\n"
                    "cpu1 20 0 5 50 0 0 0 0 0 0\n"
                    "cpu2 0 0 0 99 0 0 0 0 0 0\nintr 123\n")
    before = cpu_times({0, 1}, str(stat))
    assert before == {0: (15, 70), 1: (25, 75)}
    stat.write_text("cpu0 40 0 5 70 5 0 0 0 0 0\n"  # +30 busy of +50
                    "cpu1 20 0 5 150 0 0 0 0 0 0\n")  # +0 busy of +100
    after = cpu_times({0, 1}, str(stat))
    assert busy_between(before, after) == pytest.approx(0.6)
    assert cpu_times({0}, str(tmp_path / "absent")) == {}


@pytest.fixture
def machine(monkeypatch):
    """A fresh process's thread state on a stubbed machine; torch's own thread count is left alone."""
    for var in ("ALIGN_THREADS", "ALIGN_THREADS_REASON", "OMP_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hardware, "_CHOICES", {})
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    state = {"cores": 2, "busy": 0.0, "measured": 0, "set": set_to}

    def busy(seconds: float = 0.25):
        state["measured"] += 1
        return state["busy"], "stub"

    monkeypatch.setattr(hardware, "usable_cores", lambda: state["cores"])
    monkeypatch.setattr(hardware, "busy_cores", busy)
    return state


def test_applied_once_with_its_reason(machine):
    machine["busy"] = 1.0
    first = hardware.apply_threads()
    assert first["threads"] == 1 and first["reason"] == "2 cores, 1 busy with other processes"
    assert machine["set"] == [1] and machine["measured"] == 1
    machine["busy"] = 0.0
    assert hardware.apply_threads() is first  # decided once per process
    assert machine["set"] == [1] and machine["measured"] == 1
    assert hardware.stage_choices()["threads"]["threads"] == 1
    hardware.forget_stage_choices()  # a new stage keeps the process's thread choice
    assert hardware.stage_choices()["threads"]["threads"] == 1


def test_data_parallel_workers_share_the_cores(machine, monkeypatch):
    """Under a launcher (which sets OMP_NUM_THREADS=1 itself) each of N local workers gets cores // N."""
    machine["cores"] = 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 of the 4 on this machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = hardware.apply_threads()
    assert (choice["threads"], choice["processes"]) == (8, 2) and machine["set"] == [8]


@pytest.mark.parametrize("env, launched, threads, reason", [
    ({"ALIGN_THREADS": "3"}, False, 3, "ALIGN_THREADS=3 in the environment"),
    ({"ALIGN_THREADS": "3", "OMP_NUM_THREADS": "7"}, False, 3, "ALIGN_THREADS=3 in the environment"),
    ({"OMP_NUM_THREADS": "7"}, False, 7, "OMP_NUM_THREADS=7 in the environment"),
    ({"ALIGN_THREADS": "2", "ALIGN_THREADS_REASON": "chosen by the launching process: 2 cores"}, True, 2,
     "chosen by the launching process: 2 cores"),
])
def test_overrides(machine, monkeypatch, env, launched, threads, reason):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if launched:
        monkeypatch.setenv("WORLD_SIZE", "2")
    choice = hardware.apply_threads()
    assert (choice["threads"], choice["reason"]) == (threads, reason)
    assert machine["measured"] == 0  # an override needs no measurement


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_unusable_override_is_named(machine, monkeypatch, value):
    monkeypatch.setenv("ALIGN_THREADS", value)
    with pytest.raises(DeviceError, match=f"ALIGN_THREADS='{value}' in the environment"):
        hardware.apply_threads()
    assert machine["set"] == []


def test_unusable_override_is_one_line_and_exit_2(machine, monkeypatch, tmp_path, capsys):
    from cli.main import main

    monkeypatch.setenv("ALIGN_THREADS", "many")
    assert main(["data", "--out", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["align data: error: ALIGN_THREADS='many' in the environment: a whole number of threads, "
                   "at least 1, was expected"]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("cores, busy, processes, threads", [(2, 0.0, 1, 2), (2, 1.0, 1, 1), (16, 0.0, 2, 8),
                                                             (16, 4.0, 2, 6), (2, 0.0, 2, 1)])
def test_children_env_carries_the_thread_count(machine, cores, busy, processes, threads):
    machine["cores"], machine["busy"] = cores, busy
    env = hardware.thread_env(processes)
    n = str(threads)
    assert (env["ALIGN_THREADS"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == (n, n, n)
    assert env["ALIGN_THREADS_REASON"].startswith("chosen by the launching process: ")
    assert machine["measured"] == 1  # measured at the launch, not at this process's start


def test_child_takes_the_launching_process_choice(machine, monkeypatch):
    machine["cores"], machine["busy"] = 16, 4.0
    env = hardware.thread_env(2)
    for k, v in env.items():  # the child's environment, in a fresh process
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    machine["measured"], machine["busy"] = 0, 0.0
    choice = hardware.apply_threads()
    assert choice["threads"] == 6 and machine["set"] == [6] and machine["measured"] == 0
    assert choice["reason"] == "chosen by the launching process: 16 cores, 4 busy with other processes, shared by " \
                               "2 processes"


def test_an_explicit_choice_is_passed_on(machine, monkeypatch):
    monkeypatch.setenv("ALIGN_THREADS", "3")
    env = hardware.thread_env(2)
    assert (env["ALIGN_THREADS"], env["OMP_NUM_THREADS"]) == ("3", "3") and machine["measured"] == 0
