"""Data stage: parsing, binarisation, splits, outputs and every bad-input case."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from alignment import data as D
from alignment.data import (
    BadRowsError,
    DataConfig,
    DataError,
    RawResponse,
    binarise,
    parse_hh_transcript,
    prompt_to_messages,
    run_data_stage,
    split_by_prompt,
)
from alignment.io import sha256_file
from tests.conftest import raw_row, write_jsonl

USER = lambda text: [{"role": "user", "content": text}]  # noqa: E731


def raw(prompt, score, row, response=None):
    return RawResponse(USER(prompt), response or f"answer {row}", score, row, prompt)


# ---------------------------------------------------------------------------------------------
# Binarisation
# ---------------------------------------------------------------------------------------------
def test_binarise_two_responses_higher_mean_is_chosen():
    pairs, stats = binarise([raw("q", 1.6, 1, "bad"), raw("q", 3.4, 2, "good")])
    assert [(p.chosen, p.rejected, p.chosen_rating, p.rejected_rating) for p in pairs] == [("good", "bad", 3.4, 1.6)]
    assert (stats.n_prompts, stats.n_pairs, stats.n_ties_dropped) == (1, 1, 0)
    assert pairs[0].source_rows == (2, 1)


def test_binarise_groups_by_the_exact_prompt_string(tmp_path):
    """As in esfrankel17/HelpSteer2_binarized: prompts that differ only in whitespace are different prompts."""
    rows = [raw_row("What is 2+2?", "4", 4, 4, 4, 2, 2), raw_row("What is 2+2?", "5", 1, 0, 2, 1, 1),
            raw_row("What is 2+2? ", "four", 3, 3, 3, 2, 2), raw_row("What is 2+2? ", "22", 0, 0, 1, 0, 0),
            raw_row("Name a colour.", "red", 4, 4, 4, 1, 1), raw_row("Name a colour.", "7", 0, 0, 0, 0, 0)]
    res = run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows)), validation_fraction=0.5),
                         tmp_path / "out")
    assert (res.summary["n_prompts"], res.summary["n_pairs"]) == (3, 3)  # grouped by stripped text: 2 and 2
    splits = {s: pq.read_table(tmp_path / "out" / f"{s}.parquet").to_pylist() for s in ("train", "validation")}
    assert sorted((p["chosen"], p["rejected"]) for rows in splits.values() for p in rows) == [
        ("4", "5"), ("four", "22"), ("red", "7")]
    # The two 2+2 pairs read the same once stripped, so the split keeps them on one side.
    sides = {s for s, rows in splits.items() for p in rows if p["chosen"] in ("4", "four")}
    assert len(sides) == 1


def test_gold_answers_travel_with_their_prompt(tmp_path):
    rows = [{**raw_row("What is 2+2?", "4", 4, 4, 4, 2, 2), "gold_answer": "4", "gold_checker": "number"},
            {**raw_row("What is 2+2?", "5", 1, 0, 2, 1, 1), "gold_answer": "4", "gold_checker": "number"},
            raw_row("Tell me a joke.", "A pun.", 3, 3, 3, 2, 2), raw_row("Tell me a joke.", "No.", 0, 0, 1, 0, 0)]
    res = run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows)), validation_fraction=0.5),
                         tmp_path / "out")
    assert sum(res.summary["n_gold_prompts"].values()) == 1
    items = D.PairData.concat([D.PairData.load(tmp_path / "out" / f"{s}.parquet") for s in ("train", "validation")]
                              ).prompt_items()
    gold = {item.messages[-1]["content"]: (item.gold_answer, item.gold_checker) for item in items}
    assert gold == {"What is 2+2?": ("4", "number"), "Tell me a joke.": (None, None)}


@pytest.mark.parametrize("extra, field, reason", [
    ({"gold_answer": "4"}, "gold_checker", "gold_checker is missing"),
    ({"gold_checker": "number"}, "gold_answer", "gold_answer is missing"),
    ({"gold_answer": "four", "gold_checker": "number"}, "gold_answer", "'four' is not a number"),
    ({"gold_answer": "4", "gold_checker": "regex"}, "gold_checker", "unknown gold checker 'regex'"),
])
def test_bad_gold_answers_name_row_and_field(tmp_path, extra, field, reason):
    rows = [raw_row("q1", "a", 4, 4, 4, 2, 2), {**raw_row("q1", "b", 0, 0, 0, 0, 0), **extra},
            raw_row("q2", "c", 4, 4, 4, 2, 2), raw_row("q2", "d", 0, 0, 0, 0, 0)]
    with pytest.raises(D.BadRowsError) as err:
        run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), tmp_path / "out")
    assert f"row 2, field '{field}'" in str(err.value) and reason in str(err.value)


def test_binarise_drops_ties_and_counts_them():
    pairs, stats = binarise([raw("a", 2.0, 1), raw("a", 2.0, 2), raw("b", 1.0, 3), raw("b", 3.0, 4), raw("c", 1.0, 5)])
    assert len(pairs) == 1 and pairs[0].prompt == USER("b")
    assert (stats.n_prompts, stats.n_pairs, stats.n_ties_dropped, stats.n_prompts_unpaired) == (3, 1, 1, 1)


def test_binarise_three_responses_best_worst_and_all_pairs():
    group = [raw("q", 2.0, 1, "mid"), raw("q", 3.0, 2, "best"), raw("q", 2.0, 3, "mid2"), raw("q", 0.5, 4, "worst")]
    pairs, stats = binarise(group, "best_worst")
    assert [(p.chosen, p.rejected) for p in pairs] == [("best", "worst")]
    pairs, stats = binarise(group, "all_pairs")
    # 6 candidate pairs; mid == mid2 is the one tie.
    assert stats.n_ties_dropped == 1 and stats.n_pairs == 5
    assert {(p.chosen, p.rejected) for p in pairs} == {
        ("best", "mid"), ("mid", "worst"), ("best", "mid2"), ("best", "worst"), ("mid2", "worst")}


def _stage(tmp_path, rows, name="in.jsonl", **cfg):
    src = write_jsonl(tmp_path / name, rows)
    return run_data_stage(DataConfig(source=str(src), **cfg), tmp_path / "out")


def test_score_choice_changes_the_winner(tmp_path):
    # A: very helpful but wrong (mean 1.6); B: middling everywhere (mean 2.0).
    rows = [raw_row("q1", "A", 4, 0, 2, 1, 1), raw_row("q1", "B", 2, 2, 2, 2, 2),
            raw_row("q2", "C", 3, 3, 3, 3, 3), raw_row("q2", "D", 1, 1, 1, 1, 1)]

    def chosen(sub, **cfg):
        (tmp_path / sub).mkdir()
        return {r["chosen"] for r in _all_rows(_stage(tmp_path / sub, rows, **cfg))}

    assert chosen("avg") == {"B", "C"}
    assert chosen("help", score="helpfulness") == {"A", "C"}
    # weighted (3 helpfulness + 1 correctness) / 4: A = 3.0, B = 2.0
    assert chosen("w", score="weighted", score_weights={"helpfulness": 3, "correctness": 1}) == {"A", "C"}


D_FILES = ("train.parquet", "validation.parquet")


def _all_rows(result):
    return [r for f in D_FILES for r in pq.read_table(result.out_dir / f).to_pylist()]


def test_ratings_and_distributions_written_for_both_sides(tmp_path):
    rows = [raw_row("q1", "good", 4, 4, 4, 3, 2), raw_row("q1", "bad", 2, 2, 2, 1, 1),
            raw_row("q2", "x", 4, 4, 4, 4, 4), raw_row("q2", "y", 0, 0, 0, 0, 0)]
    res = _stage(tmp_path, rows)
    by_chosen = {r["chosen"]: r for r in _all_rows(res)}
    r = by_chosen["good"]
    assert r["chosen_rating"] == pytest.approx(3.4) and r["rejected_rating"] == pytest.approx(1.6)
    np.testing.assert_allclose(r["chosen_dist"], [0, 0, 0, 0, 0, 0, 0, 0.35, 0.65, 0], atol=1e-12)
    # 1.6 -> f = 4.6 -> 0.4 on 4, 0.6 on 5
    np.testing.assert_allclose(r["rejected_dist"], [0, 0, 0, 0.4, 0.6, 0, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(by_chosen["x"]["chosen_dist"], [0] * 9 + [1])
    np.testing.assert_allclose(by_chosen["x"]["rejected_dist"], [1] + [0] * 9)


# ---------------------------------------------------------------------------------------------
# Prompt forms
# ---------------------------------------------------------------------------------------------
def test_helpsteer2_turn_markers_become_messages():
    text = "Tell me a joke\n<extra_id_1>Assistant\nWhy did the chicken...\n<extra_id_1>User\nAnother one"
    assert prompt_to_messages(text) == [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken..."},
        {"role": "user", "content": "Another one"},
    ]
    assert prompt_to_messages("  plain question ") == USER("plain question")


def test_hh_transcript_prompt_is_everything_before_last_assistant_turn():
    t = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    prompt, response = parse_hh_transcript(t, "chosen")
    assert response == "It is 4."
    assert prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"}]


def test_hh_file_end_to_end(tmp_path):
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: good answer {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: bad answer {i}"} for i in range(10)]
    res = _stage(tmp_path, rows)
    assert res.summary["format"] == "hh" and res.summary["n_pairs"] == 10
    row = _all_rows(res)[0]
    assert row["prompt"][0]["content"].startswith("question") and row["chosen"].startswith("good")
    assert row["chosen_dist"] is None and res.summary["has_ratings"] is False


def test_pairs_with_message_lists_and_ratings(tmp_path):
    # The esfrankel17/HelpSteer2_binarized shape: prompt string, chosen/rejected as conversations.
    rows = [{"prompt": f"q{i}",
             "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"good {i}"}],
             "chosen_rating": 3.0,
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
             "rejected_rating": 1.0} for i in range(5)]
    res = _stage(tmp_path, rows)
    m = res.summary
    assert (m["format"], m["n_pairs"], m["has_ratings"]) == ("pairs", 5, True)
    row = _all_rows(res)[0]
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert row["chosen"].startswith("good") and row["chosen_rating"] == 3.0


def test_pairs_prompt_taken_from_conversation_when_no_prompt_column(tmp_path):
    conv = lambda i, a: [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [{"chosen": conv(i, "yes"), "rejected": conv(i, "no")} for i in range(4)]
    res = _stage(tmp_path, rows)
    assert res.summary["format"] == "pairs"
    assert {r["prompt"][0]["content"] for r in _all_rows(res)} == {"q0", "q1", "q2", "q3"}


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_other_file_types(tmp_path, ext):
    rows = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_rating": 3, "rejected_rating": 1}
            for i in range(6)]
    path = tmp_path / f"in.{ext}"
    frame = pd.DataFrame(rows)
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path),
     "json": lambda: path.write_text(json.dumps(rows))}[ext]()
    res = run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    assert res.summary["n_pairs"] == 6 and res.summary["has_ratings"]


def test_column_map_renames_misnamed_columns(tmp_path):
    rows = [{"question": f"q{i}", "good": f"c{i}", "bad": f"r{i}"} for i in range(4)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = DataConfig(source=str(src), column_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert run_data_stage(cfg, tmp_path / "out").summary["n_pairs"] == 4


# ---------------------------------------------------------------------------------------------
# Split, manifest, reuse, atomic output
# ---------------------------------------------------------------------------------------------
def _many_pairs(n_prompts=50, per_prompt=2):
    return [D.PreferencePair(USER(f"q{i}"), f"c{i}-{k}", f"r{i}-{k}") for i in range(n_prompts) for k in range(per_prompt)]


def test_split_is_grouped_by_prompt_seeded_and_deterministic():
    pairs = _many_pairs()
    train, val = split_by_prompt(pairs, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(pairs)))
    assert not {pairs[i].prompt_key for i in train} & {pairs[i].prompt_key for i in val}
    assert len({pairs[i].prompt_key for i in val}) == 10  # 20% of 50 prompts
    assert split_by_prompt(pairs, 0.2, seed=0) == (train, val)
    assert split_by_prompt(pairs, 0.2, seed=1) != (train, val)


def test_split_needs_two_prompts():
    with pytest.raises(DataError, match="at least 2 distinct prompts"):
        split_by_prompt(_many_pairs(1), 0.2, 0)


def test_manifest_counts_and_file_hashes(tmp_path):
    rows = [raw_row(f"q{i}", "good", 4, 4, 4, 2, 2) for i in range(20)]
    rows += [raw_row(f"q{i}", "bad", 1, 1, 1, 1, 1) for i in range(18)]
    rows += [raw_row("q18", "same", 4, 4, 4, 2, 2)]  # q18: tie with its good answer; q19: one answer
    res = _stage(tmp_path, rows)
    m = res.summary
    assert (m["n_rows_read"], m["n_prompts"], m["n_pairs"], m["n_ties_dropped"], m["n_prompts_unpaired"]) == (
        39, 20, 18, 1, 1)
    assert m["n_train"] + m["n_validation"] == 18 and m["n_validation"] == 4  # round(18 prompts * 0.2)
    assert m["n_rows_rejected"] == 0 and m["source"].endswith("in.jsonl")
    for name, meta in m["files"].items():
        assert sha256_file(res.out_dir / name) == meta["sha256"]
        assert pq.read_table(res.out_dir / name).num_rows == meta["rows"]
    assert json.loads((res.out_dir / "manifest.json").read_text())["stage_key"] == m["stage_key"]


def test_same_input_same_bytes_and_reuse(tmp_path):
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    a = run_data_stage(DataConfig(source=str(src)), tmp_path / "a")
    b = run_data_stage(DataConfig(source=str(src)), tmp_path / "b")
    assert a.summary["files"] == b.summary["files"]
    again = run_data_stage(DataConfig(source=str(src)), tmp_path / "a")
    assert again.reused
    with pytest.raises(DataError, match="already holds a different output of this stage"):
        run_data_stage(DataConfig(source=str(src), seed=5), tmp_path / "a")
    replaced = run_data_stage(DataConfig(source=str(src), seed=5), tmp_path / "a", overwrite=True)
    assert not replaced.reused and replaced.summary["config"]["seed"] == 5


def test_default_out_dir_is_deterministic(tmp_path):
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    src = write_jsonl(tmp_path / "prefs.jsonl", rows)
    a = run_data_stage(DataConfig(source=str(src)), runs_root=tmp_path / "runs")
    b = run_data_stage(DataConfig(source=str(src)), runs_root=tmp_path / "runs")
    c = run_data_stage(DataConfig(source=str(src), seed=1), runs_root=tmp_path / "runs")
    assert a.out_dir == b.out_dir and b.reused and a.out_dir.name.startswith("prefs-")
    assert c.out_dir != a.out_dir


def test_a_crash_while_writing_leaves_no_output(tmp_path, monkeypatch):
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(D, "write_json", boom)  # the manifest is written last
    with pytest.raises(OSError, match="disk full"):
        run_data_stage(DataConfig(source=str(src)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # no temporary folder left either (the stage lock's file stays: an empty file, see alignment.stage)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".out.lock"] == ["in.jsonl"]


def test_a_crash_keeps_the_previous_output(tmp_path, monkeypatch):
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    first = run_data_stage(DataConfig(source=str(src)), tmp_path / "out")
    monkeypatch.setattr(D, "write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run_data_stage(DataConfig(source=str(src), seed=3), tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["stage_key"] == first.summary["stage_key"]


def test_max_pairs_takes_a_seeded_subset(tmp_path):
    rows = [raw_row(f"q{i}", a, *s) for i in range(30) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    res = _stage(tmp_path, rows, max_pairs=12)
    assert res.summary["n_pairs"] == 12 and res.summary["n_pairs_before_limit"] == 30


# ---------------------------------------------------------------------------------------------
# Bad input: every case names file, row and field; skip mode drops and counts
# ---------------------------------------------------------------------------------------------
GOOD_PAIR = {"prompt": "q", "chosen": "yes", "rejected": "no", "chosen_rating": 3, "rejected_rating": 1}
BAD_ROWS = {
    "wrong type": ({"chosen": 42}, "chosen", "expected text, got int"),
    "NaN rating": ({"chosen_rating": float("nan")}, "chosen_rating", "NaN"),
    "out-of-range rating": ({"rejected_rating": 7}, "rejected_rating", "outside [0, 4]"),
    "string rating": ({"chosen_rating": "high"}, "chosen_rating", "must be a number"),
    "empty text": ({"rejected": "   "}, "rejected", "empty text"),
    "missing value": ({"prompt": None}, "prompt", "missing value"),
    "chosen == rejected": ({"rejected": "yes"}, "rejected", "same text"),
    "bad message role": ({"prompt": [{"role": "robot", "content": "hi"}]}, "prompt", "role 'robot'"),
}


def _pairs_file(tmp_path, bad_fields):
    rows = [dict(GOOD_PAIR, prompt=f"q{i}") for i in range(6)]
    rows[3] = dict(rows[3], **bad_fields)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_names_file_row_and_field(tmp_path, case):
    fields, field, message = BAD_ROWS[case]
    path = _pairs_file(tmp_path, fields)
    with pytest.raises(BadRowsError) as err:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    issue = err.value.issues[0]
    assert (issue.file, issue.row, issue.field) == (str(path), 4, field)
    assert message in issue.message
    assert f"{path}, row 4, field '{field}'" in str(err.value) and "--on-bad-rows skip" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_skip_mode_counts_it(tmp_path, case):
    path = _pairs_file(tmp_path, BAD_ROWS[case][0])
    res = run_data_stage(DataConfig(source=str(path), on_bad_rows="skip"), tmp_path / "out")
    assert res.summary["n_rows_rejected"] == 1 and res.summary["n_pairs"] == 5
    rejected = [json.loads(line) for line in (res.out_dir / "rejected_rows.jsonl").read_text().splitlines()]
    assert rejected[0]["row"] == 4 and rejected[0]["field"] == BAD_ROWS[case][1]


def test_duplicate_pairs_are_rejected_after_the_first(tmp_path):
    rows = [dict(GOOD_PAIR, prompt=f"q{i}") for i in range(5)] + [dict(GOOD_PAIR, prompt="q2")]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(BadRowsError, match=r"row 6: duplicate pair \(first seen at row 3\)"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    res = run_data_stage(DataConfig(source=str(path), on_bad_rows="skip"), tmp_path / "out")
    assert res.summary["rejected_by_reason"] == {"duplicate": 1}


def test_duplicate_raw_responses_are_rejected(tmp_path):
    rows = [raw_row("q", "a", 4, 4, 4, 4, 4), raw_row("q", "b", 1, 1, 1, 1, 1), raw_row("q", "a", 4, 4, 4, 4, 4)]
    with pytest.raises(BadRowsError, match="row 3: duplicate response to the same prompt"):
        _stage(tmp_path, rows)


def test_raw_nan_and_out_of_range_attribute(tmp_path):
    rows = [raw_row(f"q{i}", a, *s) for i in range(4) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    rows[2]["coherence"] = float("nan")
    rows[5]["verbosity"] = 5
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN
    with pytest.raises(BadRowsError) as err:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    assert [(i.row, i.field) for i in err.value.issues] == [(3, "coherence"), (6, "verbosity")]


def test_undecodable_bytes_jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps(dict(GOOD_PAIR, prompt=f"q{i}")).encode() for i in range(4)]
    lines[1] = lines[1].replace(b'"yes"', b'"y\xff\xfes"')
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRowsError, match=r"row 2: undecodable bytes"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    assert run_data_stage(DataConfig(source=str(path), on_bad_rows="skip"), tmp_path / "o2").summary[
        "n_rows_rejected"] == 1


def test_undecodable_bytes_csv_names_the_field(tmp_path):
    path = tmp_path / "in.csv"
    body = "prompt,chosen,rejected\n" + "".join(f"q{i},yes,no\n" for i in range(4))
    path.write_bytes(body.encode().replace(b"q2,yes", b"q2,y\xe9s"))
    with pytest.raises(BadRowsError) as err:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    assert (err.value.issues[0].row, err.value.issues[0].field) == (3, "chosen")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "in.jsonl"
    good = [json.dumps(dict(GOOD_PAIR, prompt=f"q{i}")) for i in range(4)]
    path.write_text("\n".join([*good[:2], '{"prompt": "q", "chosen":', *good[2:]]) + "\n")
    with pytest.raises(BadRowsError, match="row 3: invalid JSON"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match="in.jsonl: the file is empty"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")


def test_missing_and_misnamed_columns_are_named_with_a_hint(tmp_path):
    rows = [{"prompt": f"q{i}", "choosen": "a", "rejected": "b"} for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError) as err:
        run_data_stage(DataConfig(source=str(path), format="pairs"), tmp_path / "out")
    msg = str(err.value)
    assert "missing column(s) ['chosen']" in msg and "column_map.chosen=choosen" in msg and str(path) in msg


def test_unrecognised_columns(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")


def test_column_map_naming_a_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [dict(GOOD_PAIR)])
    with pytest.raises(DataError, match="column_map.prompt names column 'question', which does not exist"):
        run_data_stage(DataConfig(source=str(path), column_map={"prompt": "question"}), tmp_path / "out")


def test_missing_source_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="no such file|neither an existing file"):
        run_data_stage(DataConfig(source=str(tmp_path / "nope.jsonl")), tmp_path / "out")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type .txt"):
        run_data_stage(DataConfig(source=str(tmp_path / "x.txt")), tmp_path / "out")


def test_hub_source_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    import time

    from alignment import hub

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # reserved name: never resolves
    hub._reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub.*--source"):
        run_data_stage(DataConfig(source="esfrankel17/HelpSteer2_binarized"), tmp_path / "out")
    assert time.perf_counter() - start < 10


def test_config_validation_names_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="validation_fraction"):
        DataConfig(validation_fraction=1.5)
    with pytest.raises(ValidationError, match="unknown attribute"):
        DataConfig(score="weighted", score_weights={"helpfullness": 1})
    with pytest.raises(ValidationError, match="positive sum"):
        DataConfig(score="weighted")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DataConfig(sorce="x")
