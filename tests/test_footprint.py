"""Per-stage cost records: the peak is the stage's own (reset between stages), written beside the output."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from alignment.footprint import FOOTPRINT, Footprint, read_footprint, records_footprint, tune_allocator
from alignment.stage import StageResult

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_each_footprint_sees_its_own_peak():
    with Footprint() as big:
        x = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
        del x
    with Footprint() as small:
        y = torch.ones(20 * 2**20 // 4)
        del y
    assert big.record["peak_scope"] == small.record["peak_scope"] == "stage"
    assert big.record["peak_rss_mb"] - big.record["rss_before_mb"] >= 250
    # the second one does not inherit the first one's peak (the high-water mark was reset)
    assert small.record["peak_rss_mb"] < big.record["peak_rss_mb"] - 200


def test_stage_decorator_writes_the_record_once_and_keeps_it_on_reuse(tmp_path):
    calls = []

    @records_footprint
    def stage(out, reused=False):
        calls.append(out)
        out.mkdir(exist_ok=True)
        return StageResult(out, {"ok": True}, reused=reused)

    first = stage(tmp_path / "a")
    record = json.loads((tmp_path / "a" / FOOTPRINT).read_text())
    assert first.footprint == record and record["seconds"] >= 0 and record["peak_rss_mb"] > 0
    (tmp_path / "a" / FOOTPRINT).write_text(json.dumps({**record, "seconds": 123.0}))
    again = stage(tmp_path / "a", reused=True)  # a reused output keeps the cost of the run that made it
    assert again.footprint["seconds"] == 123.0 and read_footprint(tmp_path / "a" / "final") == again.footprint


@linux
def test_allocator_tuning_is_accepted_and_respects_the_environment(monkeypatch):
    assert tune_allocator() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert tune_allocator() is False
