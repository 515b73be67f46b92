"""The embedded demo set: reproducible from its script, large enough, and with real quality signal."""

from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq

from alignment.data import DataConfig, _builtin_path, run_data_stage
from tests.conftest import ROOT


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_file_is_exactly_what_the_script_writes():
    rows = _load_script().build()
    shipped = _builtin_path("demo").read_text(encoding="utf-8").splitlines()
    assert [json.dumps(r, ensure_ascii=False) for r in rows] == shipped


def test_demo_binarises_to_at_least_200_pairs_with_ties_and_multi_turn(tmp_path):
    res = run_data_stage(DataConfig(source="demo"), tmp_path / "out")
    m = res.summary
    assert m["format"] == "raw" and m["n_pairs"] >= 200 and m["n_ties_dropped"] == 10 and m["n_rows_rejected"] == 0
    rows = [r for f in ("train.parquet", "validation.parquet") for r in pq.read_table(res.out_dir / f).to_pylist()]
    assert any(len(r["prompt"]) == 3 for r in rows)  # <extra_id_1> multi-turn prompts became 3 messages
    assert all(r["chosen_rating"] > r["rejected_rating"] for r in rows)


def test_demo_pairs_carry_a_learnable_signal(tmp_path):
    """Chosen answers are the correct ones; the collapse mode (repeated symbols) is always rejected."""
    res = run_data_stage(DataConfig(source="demo"), tmp_path / "out")
    rows = [r for f in ("train.parquet", "validation.parquet") for r in pq.read_table(res.out_dir / f).to_pylist()]

    def degenerate(text):
        return len(set(text)) <= 3 and len(text) >= 20

    assert not any(degenerate(r["chosen"]) for r in rows)
    assert sum(degenerate(r["rejected"]) for r in rows) >= 20
    arithmetic = [r for r in rows if len(r["prompt"]) == 1 and " = " in r["chosen"]]
    assert len(arithmetic) >= 40
    for r in arithmetic:
        expr, _, value = r["chosen"].split(" (")[0].rstrip(".").partition(" = ")
        if value.lstrip("-").isdigit():
            assert eval(expr) == int(value), r["chosen"]  # noqa: S307 - our own generated arithmetic


def test_demo_gold_answers_check_the_chosen_answers(tmp_path):
    """Every computed or known answer carries its gold answer; the chosen (correct) answers pass their
    checks and the wrong rejected ones mostly fail them."""
    from alignment.evaluation.gold import check_answer

    res = run_data_stage(DataConfig(source="demo"), tmp_path / "out")
    rows = [r for f in ("train.parquet", "validation.parquet") for r in pq.read_table(res.out_dir / f).to_pylist()]
    gold = [r for r in rows if r["gold_answer"] is not None]
    assert len(gold) >= 180 and {r["gold_checker"] for r in gold} == {"number", "exact", "contains"}
    assert sum(res.summary["n_gold_prompts"].values()) == len({json.dumps(r["prompt"]) for r in gold})
    for r in gold:
        assert check_answer(r["chosen"], r["gold_answer"], r["gold_checker"], prompt=r["prompt"][-1]["content"]), r
    wrong = sum(check_answer(r["rejected"], r["gold_answer"], r["gold_checker"], prompt=r["prompt"][-1]["content"])
                for r in gold)
    assert wrong <= len(gold) // 10, wrong  # a rejected answer is right only by accident (e.g. an evasion)
