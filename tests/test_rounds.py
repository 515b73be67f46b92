"""Rounds: on-policy pairs, the labeller chain, the preference store, the data stage reading it, and the
alignment-rounds flow (ticks under Prefect's harness, inbox pairs picked up, past max_rounds everything Cached,
a round resumed after a kill)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from alignment.rounds.onpolicy import STORE_SCHEMA, LabelsConfig, assign_labellers, choose_pair, gold_label
from alignment.rounds.store import PreferenceStore, StoreError
from tests.conftest import ROOT, tiny_pipeline_config
from tests.fake_gemini import FakeGemini

KEY = "test-key-rounds-0123456789"


def _row(prompt: str, chosen: str, rejected: str, n: int = 1) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected, "round": n,
            "policy": "stage:abc", "labeller": "gold", "label_detail": "{}", "chars_chosen": len(chosen),
            "chars_rejected": len(rejected), "tokens_chosen": 3, "tokens_rejected": 4, "reward_chosen": 0.5,
            "reward_rejected": 0.1}


def _labels_file(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=STORE_SCHEMA), path)
    return path


# --------------------------------------------------------------------------------------------
# Pairing and labelling, by hand
# --------------------------------------------------------------------------------------------
def test_choose_pair_by_hand():
    texts, scores, lengths = ["a", "bb", "a", "dddd"], [0.1, 0.9, 0.5, -0.3], [1, 2, 1, 4]
    # best_worst: the highest (1: 0.9) and the lowest (3: -0.3); the duplicate "a" (index 2) does not count.
    assert choose_pair(texts, scores, lengths, "best_worst", random.Random(0)) == (1, 3)
    # closest_length among distinct answers 0 (1), 1 (2), 3 (4): |1-2| = 1 is the smallest.
    assert choose_pair(texts, scores, lengths, "closest_length", random.Random(0)) == (0, 1)
    a, b = choose_pair(texts, scores, lengths, "random", random.Random(0))
    assert a != b and {a, b} <= {0, 1, 3}
    assert choose_pair(["x", "x"], [1.0, 2.0], [1, 1], "random", random.Random(0)) is None  # nothing to compare
    from alignment.rounds.onpolicy import RoundsError

    with pytest.raises(RoundsError, match="best_worst"):
        choose_pair(texts, None, lengths, "best_worst", random.Random(0))


def test_gold_label_and_labeller_chain():
    pair = {"prompt": [{"role": "user", "content": "What is 2 + 2? Answer with a number."}], "gold_answer": "4",
            "gold_checker": "number", "answer_a": "The answer is 4.", "answer_b": "It is 5."}
    assert gold_label(pair)[0] == "a"
    assert gold_label({**pair, "answer_a": "5", "answer_b": "4"})[0] == "b"
    assert gold_label({**pair, "answer_b": "4"})[0] == "tie"  # both right: no preference, dropped
    no_gold = {**pair, "gold_answer": None, "gold_checker": None}
    chain = LabelsConfig(labellers=["gold", "gemini", "reward_models", "local"])
    assert assign_labellers([pair, no_gold], chain) == ["gold", "local"]
    assert assign_labellers([pair, no_gold], chain.model_copy(update={"gemini": True})) == ["gold", "gemini"]
    with_rms = chain.model_copy(update={"reward_models": {"distributional": "rm"}})
    assert assign_labellers([no_gold], with_rms) == ["reward_models"]
    from alignment.rounds.onpolicy import RoundsError

    with pytest.raises(RoundsError, match="no labeller"):
        assign_labellers([no_gold], LabelsConfig(labellers=["gold"]))


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------
def test_store_append_is_idempotent_and_keeps_provenance(tmp_path):
    store = PreferenceStore(tmp_path / "store", "rounds-x")
    store.open({"note": "test"})
    src = _labels_file(tmp_path / "labels" / "pairs.parquet", [_row("q1", "good", "bad")])
    assert store.append_round(1, src) is True
    first = store.round_file(1).read_bytes()
    assert store.append_round(1, src) is False and store.round_file(1).read_bytes() == first  # same again: nothing
    table = pq.read_table(store.round_file(1)).to_pylist()
    assert table[0]["round"] == 1 and table[0]["labeller"] == "gold" and table[0]["policy"] == "stage:abc"
    changed = _labels_file(tmp_path / "labels2" / "pairs.parquet", [_row("q1", "better", "bad")])
    assert store.append_round(1, changed) is True  # the round re-ran: its file is replaced
    assert pq.read_table(store.round_file(1)).to_pylist()[0]["chosen"] == "better"
    # Never over a file the store did not write, never from one that is not a labels file.
    foreign = store.round_file(2)
    foreign.write_text("mine")
    with pytest.raises(StoreError, match="not a round file"):
        store.append_round(2, src)
    assert foreign.read_text() == "mine"
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}), plain)
    with pytest.raises(StoreError, match="no store mark"):
        store.append_round(3, plain)


def test_inbox_is_claimed_once_by_the_next_round(tmp_path):
    store = PreferenceStore(tmp_path / "store", "rounds-x")
    store.open({})
    _labels_file(tmp_path / "l1.parquet", [_row("q1", "good", "bad")])
    store.append_round(1, tmp_path / "l1.parquet")
    dropped = store.inbox / "human.jsonl"
    dropped.write_text(json.dumps({"prompt": "q9", "chosen": "yes", "rejected": "no"}) + "\n")
    (store.inbox / "notes.txt").write_text("not pairs")  # not a data file: left alone
    assert store.unclaimed_inbox() == [dropped]
    claimed = store.claim_inbox(1)
    assert [p.name for p in claimed] == ["human.jsonl"] and claimed[0].read_text() == dropped.read_text()
    assert store.claim_inbox(1) == claimed  # the same round again: the same claims, nothing new
    assert store.claim_inbox(2) == [] and store.unclaimed_inbox() == []
    assert dropped.is_file()  # the original stays where the person put it
    later = store.inbox / "ai.jsonl"
    later.write_text(json.dumps({"prompt": "q8", "chosen": "a", "rejected": "b"}) + "\n")
    assert [p.name for p in store.claim_inbox(2)] == ["ai.jsonl"]
    assert store.train_files(1) == [str(store.round_file(1)), str(claimed[0])]
    assert len(store.train_files(2)) == 3 and store.train_files(2)[-1].endswith("ai.jsonl")


def test_data_stage_reads_the_store_into_train_only(tmp_path):
    from alignment.data import DataConfig, PairData, plan_data, run_data_stage

    base = run_data_stage(DataConfig(), tmp_path / "base")
    validation = PairData.load(base.out_dir / "validation.parquet")
    held_out = validation.prompts[0][-1]["content"]
    store_file = _labels_file(tmp_path / "store" / "round-001.parquet", [
        _row("A brand-new question?", "a careful answer", "noise"), _row("Another new one?", "yes, because", "no"),
        _row(held_out, "x", "y")])  # a held-out prompt: never trained on
    config = DataConfig(extra_train=[str(store_file)])
    result = run_data_stage(config, tmp_path / "with-store")
    m = result.summary
    assert m["n_train"] == base.summary["n_train"] + 2 and m["n_validation"] == base.summary["n_validation"]
    assert m["extra_train"][0]["n_pairs"] == 2 and m["extra_train"][0]["n_dropped_validation_prompt"] == 1
    train = PairData.load(result.out_dir / "train.parquet")
    assert "a careful answer" in train.chosen and "x" not in train.chosen
    # The store file's content is part of the key: a changed round is a new data stage; none is the old key.
    key = plan_data(config, tmp_path).key
    _labels_file(store_file, [_row("A brand-new question?", "a different answer", "noise")])
    assert plan_data(config, tmp_path).key != key
    assert plan_data(DataConfig(), tmp_path).key == base.summary["stage_key"]
    from alignment.data import DataError

    with pytest.raises(DataError, match=r"extra_train\[0\]"):
        plan_data(DataConfig(extra_train=[str(tmp_path / "missing.parquet")]), tmp_path)


# --------------------------------------------------------------------------------------------
# The stages on the tiny model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples_dir(tiny_stack, tmp_path_factory):
    from alignment.rounds.onpolicy import SamplesConfig, run_samples_stage

    policy, rm, data = tiny_stack
    config = SamplesConfig(policy=str(policy), reward_model=str(rm), data=str(data), round=1, n_prompts=6,
                           samples_per_prompt=3, max_new_tokens=12, pairing="best_worst", seed=1)
    result = run_samples_stage(config, tmp_path_factory.mktemp("samples") / "s")
    return result


def test_samples_stage_pairs_the_current_rms_extremes(samples_dir):
    s = samples_dir.summary
    assert s["n_prompts"] == 6 and s["n_answers"] == 18 and s["n_pairs"] + s["n_prompts_without_pair"] == 6
    rows = [json.loads(line) for line in (samples_dir.out_dir / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (samples_dir.out_dir / "pairs.jsonl").read_text().splitlines()]
    for row, pair in zip((r for r in rows if len({a["text"] for a in r["answers"]}) > 1), pairs, strict=True):
        rewards = {a["text"]: a["reward"] for a in row["answers"]}
        assert pair["reward_a"] == max(rewards.values()) and pair["reward_b"] == min(rewards.values())


def test_labels_stage_with_gemini_through_the_fake_server(samples_dir, tiny_stack, tmp_path, monkeypatch):
    from alignment.evaluation.judge import JudgeConfig
    from alignment.rounds.onpolicy import run_labels_stage

    _, rm, _ = tiny_stack
    judge = JudgeConfig(backend="gemini", gemini_model="gemini-test-flash", initial_backoff_s=0.01, max_backoff_s=0.05,
                        timeout_s=2.0)
    config = LabelsConfig(samples=str(samples_dir.out_dir), labellers=["gemini", "local"], gemini=True, judge=judge,
                          evaluate={"round0": str(rm)})
    with FakeGemini() as fake:
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fake.url)
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        result = run_labels_stage(config, tmp_path / "labels")
    s = result.summary
    n_pairs = samples_dir.summary["n_pairs"]
    assert len(fake.requests) == 2 * n_pairs  # both orders of every pair
    assert s["labellers"]["gemini"]["pairs"] == n_pairs  # first in the chain: every pair
    rows = pq.read_table(result.out_dir / "pairs.parquet").to_pylist()
    assert len(rows) == s["n_labelled"] == n_pairs - s["n_ties_dropped"]
    # The fake judge prefers the longer answer, equal lengths tie: every kept pair's chosen is the longer one.
    assert all(r["chars_chosen"] > r["chars_rejected"] and r["labeller"] == "gemini" and r["round"] == 1 for r in rows)
    if rows:
        assert s["length"]["share_longer_preferred"] == 1.0
        acc = s["reward_model_accuracy"]["round0"]
        assert acc["n"] == len(rows) and 0.0 <= acc["accuracy"] <= 1.0 and "length_split" in acc
    for path in result.out_dir.rglob("*"):  # the key reaches no file
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()
    # Complete: reused, no new call.
    with FakeGemini() as again:
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", again.url)
        assert run_labels_stage(config, tmp_path / "labels").reused and not again.requests


# --------------------------------------------------------------------------------------------
# The flow: ticks, the inbox, max_rounds, resume after a kill
# --------------------------------------------------------------------------------------------
def _tiny_rounds(tiny_model: Path, runs: Path, **rounds):
    from alignment.data import DataConfig
    from alignment.rounds.config import RoundsConfig

    config = tiny_pipeline_config(tiny_model, runs, prompts=DataConfig(source="demo-verifiable"), rounds=RoundsConfig(
        **{"max_rounds": 2, "n_prompts": 4, "samples_per_prompt": 2, "labellers": ["reward_models"],
           "rm_tie_margin": 0.0, **rounds}))
    return config


def test_schedule_ticks_run_the_next_round_then_complete_from_cache(prefect_harness, tiny_model, tmp_path):
    from flows.rounds import run_rounds

    config = _tiny_rounds(tiny_model, tmp_path / "runs")
    first = run_rounds(config, 1)  # tick 1: round 0 (the pipeline) and round 1
    assert first["rounds_complete"] == [0, 1] and first["new_rounds"] == 1
    assert {k: v["state"] for k, v in first["stages"].items() if k.startswith("r1.")} == dict.fromkeys(
        ["r1.samples", "r1.labels", "r1.data", "r1.rm_scalar", "r1.reinforce", "r1.score", "r1.judge"], "Completed")
    store = Path(first["store"])
    assert (store / "round-001.parquet").is_file() and (store / "rounds" / "round-001.json").is_file()
    r1 = json.loads((store / "rounds" / "round-001.json").read_text())
    # round 1 started from round 0's policy, its RM trained on data + round 1's pairs, scored against round 0's start
    rl1 = json.loads((Path(first["stages"]["r1.reinforce"]["path"]) / "summary.json").read_text())
    data1 = json.loads((Path(first["stages"]["r1.data"]["path"]) / "manifest.json").read_text())
    assert data1["extra_train"][0]["source"].endswith("round-001.parquet")
    assert r1["labels"]["reward_model_accuracy"]["round0"]["n"] == r1["labels"]["n_labelled"]
    assert rl1 is not None and first["stages"]["r0.reinforce"]["path"] != first["stages"]["r1.reinforce"]["path"]

    # Pairs dropped into the inbox between ticks are picked up by the next round.
    inbox = store.parent / "inbox"
    (inbox / "human.jsonl").write_text("".join(json.dumps({"prompt": f"Inbox question {i}?", "chosen": f"answer {i}",
                                                           "rejected": "no"}) + "\n" for i in range(3)))
    second = run_rounds(config, 1)  # tick 2: rounds 0-1 from cache, round 2 new
    assert second["rounds_complete"] == [0, 1, 2] and second["new_rounds"] == 1
    states = {k: v["state"] for k, v in second["stages"].items()}
    assert all(v == "Cached" for k, v in states.items() if k.startswith(("r0.", "r1."))), {k: v for k, v in states.items() if v != "Cached"}
    data2 = json.loads((Path(second["stages"]["r2.data"]["path"]) / "manifest.json").read_text())
    inbox_entry = next(e for e in data2["extra_train"] if e["source"].endswith("human.jsonl"))
    assert inbox_entry["n_pairs"] == 3

    third = run_rounds(config, 1)  # tick 3: past max_rounds, nothing new, everything from cache
    assert third["new_rounds"] == 0 and third["rounds_complete"] == [0, 1, 2]
    assert {v["state"] for v in third["stages"].values()} == {"Cached"}
    assert any("max_rounds=2 reached" in n for n in third["notes"])
    report = Path(third["report"]).read_text()
    assert "Not independent from round 1 on" in report  # the reward_models labeller used the independent RM
    assert "| 2 |" in report and "keep up with the policy" in report and (Path(third["report"]).parent / "rounds.png").is_file()


def test_the_retrain_deployment_runs_the_next_round_on_its_schedule():
    from deployments.serve import build_deployments

    deployments = {(d.flow_name, d.name): d for d in build_deployments(cron="0 4 * * 2", runs_dir="runs-x")}
    retrain = deployments[("alignment-rounds", "retrain")]
    assert retrain.parameters["new_rounds"] == 1 and retrain.parameters["pipeline"]["options"]["runs_dir"] == "runs-x"
    assert retrain.parameters["pipeline"]["rounds"]["max_rounds"] == 3  # the demo-rounds preset
    assert [s.schedule.cron for s in retrain.schedules] == ["0 4 * * 2"]
    assert retrain.entrypoint == "flows/rounds.py:alignment_rounds"
    assert ("alignment-rounds", "manual") in deployments and ("alignment-pipeline", "demo") in deployments
    prefect_yaml = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entry = next(d for d in prefect_yaml["deployments"] if d["name"] == "retrain")
    assert entry["entrypoint"] == "flows/rounds.py:alignment_rounds" and entry["parameters"] == {"new_rounds": 1}


@pytest.mark.slow
def test_a_round_killed_mid_way_resumes_where_it_stopped(tiny_model, tmp_path):
    """`align round` killed (SIGKILL) while round 1's RL stage runs; the same command again takes round 0 and
    round 1's samples, labels, data and RM from cache and finishes the round."""
    config = _tiny_rounds(tiny_model, tmp_path / "runs", max_rounds=1)
    config.reinforce.steps = 6
    cfg_file = tmp_path / "rounds.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"section"})))
    env = {**os.environ, "ALIGNMENT_TRACKING": "none", "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "cli", "round", "--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    deadline = time.time() + 400
    try:
        for line in proc.stdout:
            seen.append(line)
            if "stage r1.reinforce: started" in line:
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(seen[-20:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("stage r1.reinforce: started" in line for line in seen), "".join(seen[-30:])
    assert not list((tmp_path / "runs").glob("preference-store/*/rounds/round-001.json"))  # round 1 did not finish
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    for stage in ("r0.reinforce", "r1.samples", "r1.labels", "r1.data", "r1.rm_scalar"):
        assert f"stage {stage}: Cached" in out, (stage, out[-3000:])
    assert "stage r1.reinforce: Completed" in out and "complete: 0, 1" in out


def test_round_metrics_for_the_tracker():
    from flows.rounds import _round_metrics

    record = {"round": 2, "proxy": {"value": 0.3}, "judge": {"value": 0.55},
              "independent": {"independent RM 'distributional'": {"value": -0.1}},
              "gold": {"paired_diff": 0.1, "accuracy": 0.4}, "kl": 1.5, "degenerate_share": 0.0, "distinct2": 0.7,
              "labels": {"reward_model_accuracy": {"round1": {"accuracy": 0.6}, "round0": {"accuracy": 0.5},
                                                   "empty": {"accuracy": None}}}}
    assert _round_metrics(record) == {
        "proxy": 0.3, "judge": 0.55, "independent_0": -0.1, "gold_gain": 0.1, "gold_accuracy": 0.4, "kl": 1.5,
        "degenerate_share": 0.0, "distinct2": 0.7, "rm_on_policy_accuracy/previous": 0.6,
        "rm_on_policy_accuracy/round0": 0.5}


def test_degenerate_answers_by_hand():
    from alignment.rounds.report import is_degenerate

    assert is_degenerate("") and is_degenerate("   ")
    assert is_degenerate("!!!!!!!!!! ok")  # one symbol is 10 of 12 characters
    assert is_degenerate("the cat the cat the cat the cat the cat")  # 9 words, bigrams: 2 distinct of 8
    assert not is_degenerate("Paris is the capital of France, on the Seine.")
    assert not is_degenerate("4")
