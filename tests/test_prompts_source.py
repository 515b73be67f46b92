"""A prompts source (no pairs): the embedded demo-verifiable set and any prompt file with gold answers and
extra columns become a data folder the online stages train on and the pair stages refuse."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment.data import (
    BadRowsError,
    DataConfig,
    DataError,
    PairData,
    PromptsOnlyError,
    _builtin_path,
    run_data_stage,
)
from alignment.evaluation.gold import check_constraints, parse_constraints
from tests.conftest import ROOT, write_jsonl


def _script():
    spec = importlib.util.spec_from_file_location("make_demo_verifiable", ROOT / "scripts" / "make_demo_verifiable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def verifiable(tmp_path_factory):
    return run_data_stage(DataConfig(source="demo-verifiable"), tmp_path_factory.mktemp("dv") / "data")


def _items(folder, split):
    return PairData.load(folder / f"{split}.parquet", prompts_ok=True).prompt_items()


# ---------------------------------------------------------------------------------------------
# The embedded set
# ---------------------------------------------------------------------------------------------
def test_shipped_file_is_exactly_what_the_script_writes():
    shipped = _builtin_path("demo-verifiable").read_text(encoding="utf-8").splitlines()
    assert [json.dumps(r, ensure_ascii=False) for r in _script().build()] == shipped


def test_the_set_mixes_constraint_kinds_and_answer_first_questions():
    rows = _script().build()
    assert 140 <= len(rows) <= 170
    tasks = Counter(r["task"] for r in rows)
    assert tasks["constraints"] >= 100 and tasks["arithmetic"] >= 10 and tasks["capital"] >= 5
    kinds = Counter(k for r in rows if r["gold_checker"] == "constraints" for k in parse_constraints(r["gold_answer"]))
    assert set(kinds) == {"min_words", "max_words", "max_sentences", "lowercase", "uppercase", "no_commas",
                          "must_include", "must_exclude", "starts_with", "ends_with", "json", "bullets"}
    assert Counter(r["level"] for r in rows if r["task"] == "constraints").keys() == {"easy", "medium", "hard"}
    for r in rows:
        if r["task"] != "constraints":
            assert r["prompt"].endswith(("Answer with the number only.", "Answer with the city name only."))


def test_each_prompt_states_its_constraints_and_a_compliant_answer_passes():
    """The spec is what the prompt asks in words: hand-made answers that follow the words pass the checker."""
    answers = {
        '{"max_words": 30}': "It is vast.", '{"lowercase": true}': "it is vast.", '{"no_commas": true}': "It is vast.",
        '{"max_sentences": 2}': "It is vast.", '{"starts_with": "Sure"}': "Sure. It is vast.",
        '{"uppercase": true}': "IT IS VAST.", '{"bullets": 3}': "- a\n- b\n- c",
        '{"ends_with": "Is there anything else?"}': "It is vast. Is there anything else?",
    }
    rows = {r["gold_answer"]: r["prompt"] for r in _script().build() if r["gold_checker"] == "constraints"}
    for spec, answer in answers.items():
        assert all(check_constraints(answer, spec).values()), (rows[spec], answer)
    assert any("at most 30 words" in p for s, p in rows.items() if s == '{"max_words": 30}')
    assert all("exactly 3 bullet points" in p for s, p in rows.items() if s == '{"bullets": 3}')


def test_data_stage_writes_prompt_items_with_constraint_specs(verifiable):
    m = verifiable.summary
    assert m["format"] == "prompts" and m["prompts_only"] is True and m["n_pairs"] == 0
    assert m["n_prompts"] == 150 and m["n_train"] + m["n_validation"] == 150 and m["n_validation"] == 30
    assert m["n_gold_prompts"] == {"train": m["n_train"], "validation": m["n_validation"]}
    assert m["extra_columns"] == ["level", "task"]
    for split in ("train", "validation"):
        items = _items(verifiable.out_dir, split)
        assert len(items) == m[f"n_{split}"]
        constrained = [i for i in items if i.gold_checker == "constraints"]
        assert constrained and all(parse_constraints(i.gold_answer) for i in constrained)
        assert {i.extra["task"] for i in items} >= {"constraints"}
        assert all(i.messages[-1]["role"] == "user" and i.extra.keys() == {"level", "task"} for i in items)
    train = {json.dumps(i.messages) for i in _items(verifiable.out_dir, "train")}
    assert not train & {json.dumps(i.messages) for i in _items(verifiable.out_dir, "validation")}
    table = pq.read_table(verifiable.out_dir / "train.parquet")
    assert table.column("chosen").null_count == table.num_rows  # empty pair columns


def test_the_split_is_seeded_by_prompt(tmp_path, verifiable):
    def val(folder):
        return sorted(json.dumps(i.messages) for i in _items(folder, "validation"))

    again = run_data_stage(DataConfig(source="demo-verifiable"), tmp_path / "again")
    other = run_data_stage(DataConfig(source="demo-verifiable", seed=1), tmp_path / "other")
    assert val(again.out_dir) == val(verifiable.out_dir) != val(other.out_dir)
    assert again.summary["stage_key"] == verifiable.summary["stage_key"] != other.summary["stage_key"]


def test_pair_formats_keep_their_schema(tmp_path):
    out = run_data_stage(DataConfig(source="demo"), tmp_path / "demo").out_dir
    table = pq.read_table(out / "train.parquet")
    assert "extra" not in table.column_names and table.column("chosen").null_count == 0
    assert not PairData.load(out / "train.parquet").prompts_only


# ---------------------------------------------------------------------------------------------
# Stages that need pairs refuse the folder
# ---------------------------------------------------------------------------------------------
def test_reward_model_stage_refuses_a_prompts_only_folder(tmp_path, verifiable, tiny_model):
    from alignment.rewards.model import RewardModelConfig, run_reward_stage

    with pytest.raises(PromptsOnlyError) as info:
        run_reward_stage(RewardModelConfig(model=str(tiny_model), data=str(verifiable.out_dir)), tmp_path / "rm")
    message = str(info.value)
    assert "\n" not in message and str(verifiable.out_dir) in message and "prompts-only" in message
    assert "needs preference pairs" in message
    assert not (tmp_path / "rm").exists()


def test_dpo_stage_refuses_a_prompts_only_folder(tmp_path, verifiable, tiny_model):
    from alignment.algorithms.dpo import DPOStageConfig, run_dpo_stage

    with pytest.raises(PromptsOnlyError, match="prompts-only data folder"):
        run_dpo_stage(DPOStageConfig(policy=str(tiny_model), data=str(verifiable.out_dir), bf16=False),
                      tmp_path / "dpo")


def test_cli_rm_prints_one_line(tmp_path, verifiable, tiny_model, capsys):
    from cli.main import main

    code = main(["rm", "--data", str(verifiable.out_dir), "--model", str(tiny_model), "--out", str(tmp_path / "rm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and any("prompts-only data folder" in line for line in err)


# ---------------------------------------------------------------------------------------------
# Online training on it, with the gold checker and a python component reading the extra columns
# ---------------------------------------------------------------------------------------------
def test_grpo_trains_on_the_prompts_with_gold_rewards(tmp_path, verifiable, tiny_model):
    from alignment.algorithms.grpo import GRPOConfig, train_grpo

    reward_file = tmp_path / "task_reward.py"
    reward_file.write_text(
        "def reward(prompts, completions, task, level, gold_checker, **kwargs):\n"
        "    assert all(t in ('constraints', 'arithmetic', 'capital') for t in task)\n"
        "    assert all(lv in ('easy', 'medium', 'hard') for lv in level)\n"
        "    return [1.0 if t == 'constraints' else 0.5 for t in task]\n")
    config = GRPOConfig(policy=str(tiny_model), data=str(verifiable.out_dir), steps=2, batch_size=2,
                        samples_per_prompt=2, max_new_tokens=8, learning_rate=1e-3, checkpoint_every=2,
                        eval_prompts=2, seed=0, guard_min_distinct2=0.0, guard_max_repetition=1.0, bf16=False,
                        rewards=[{"kind": "gold"},
                                 {"kind": "python", "name": "task", "function": f"{reward_file}:reward",
                                  "weight": 0.0}])
    result = train_grpo(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["rewards/gold/mean"] <= 1.0 and r["rewards/gold/none_share"] == 0.0
        assert r["rewards/task/mean"] in (0.5, 0.75, 1.0)
    assert (tmp_path / "run" / "final").is_dir() and result.summary["eval_after"]["n"] == 2


# ---------------------------------------------------------------------------------------------
# Other prompts files, and bad ones
# ---------------------------------------------------------------------------------------------
def test_a_parquet_prompts_file_with_messages_and_extra_columns(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Say hi to {n} in lowercase."}], "gold_answer": '{"lowercase": true}',
             "gold_checker": "constraints", "difficulty": i, "tags": ["a", "b"]} for i, n in enumerate(
                 ["Ann", "Bob", "Cy", "Dee", "Eve"])]
    rows.append({"prompt": [{"role": "user", "content": "No gold here."}], "gold_answer": None, "gold_checker": None,
                 "difficulty": None, "tags": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    res = run_data_stage(DataConfig(source=str(tmp_path / "prompts.parquet")), tmp_path / "out")
    assert res.summary["format"] == "prompts" and res.summary["n_prompts"] == 6
    items = _items(res.out_dir, "train") + _items(res.out_dir, "validation")
    by_text = {i.messages[0]["content"]: i for i in items}
    assert by_text["Say hi to Bob in lowercase."].extra == {"difficulty": 1, "tags": ["a", "b"]}
    assert by_text["No gold here."].gold_answer is None and by_text["No gold here."].extra["difficulty"] is None


def test_a_spec_given_as_a_json_object_and_a_forced_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Describe rain in at most 5 words.", "gold_answer": {"max_words": 5}, "gold_checker": "constraints"},
        {"prompt": "What is 2 plus 3? Answer with the number only.", "gold_answer": 5, "gold_checker": "number"},
    ])
    res = run_data_stage(DataConfig(source=str(path), format="prompts"), tmp_path / "out")
    answers = {i.gold_answer for s in ("train", "validation") for i in _items(res.out_dir, s)}
    assert answers == {'{"max_words": 5}', "5"}


def test_bad_prompts_files_name_the_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Fine. Use lowercase.", "gold_answer": '{"lowercase": true}', "gold_checker": "constraints"},
        {"prompt": None, "gold_answer": '{"lowercase": true}', "gold_checker": "constraints"},
        {"prompt": "Bad spec.", "gold_answer": '{"max_words": -1}', "gold_checker": "constraints"},
        {"prompt": "Unknown constraint.", "gold_answer": '{"shout": true}', "gold_checker": "constraints"},
        {"prompt": "Not JSON.", "gold_answer": "max 5 words", "gold_checker": "constraints"},
        {"prompt": "Unknown checker.", "gold_answer": "x", "gold_checker": "regex"},
        {"prompt": "Fine. Use lowercase.", "gold_answer": '{"lowercase": true}', "gold_checker": "constraints"},
        {"prompt": "Also fine."},
    ])
    with pytest.raises(BadRowsError) as info:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out")
    text = str(info.value)
    assert f"{path}, row 2, field 'prompt': missing value" in text
    assert f"{path}, row 3, field 'gold_answer': constraint 'max_words': expected a whole number" in text
    assert f"{path}, row 4, field 'gold_answer': constraint 'shout': unknown constraint" in text
    assert f"{path}, row 5, field 'gold_answer': gold reference 'max 5 words' is not a JSON object" in text
    assert f"{path}, row 6, field 'gold_checker': unknown gold checker 'regex'" in text
    assert f"{path}, row 7: duplicate prompt (first seen at row 1)" in text
    assert not (tmp_path / "out").exists()
    skipped = run_data_stage(DataConfig(source=str(path), on_bad_rows="skip"), tmp_path / "out")
    assert skipped.summary["n_prompts"] == 2 and skipped.summary["n_rows_rejected"] == 6


def test_a_file_without_prompts_or_with_a_near_miss_column_is_not_taken_for_prompts(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "Hi?"}, {"question": "Ho?"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        run_data_stage(DataConfig(source=str(questions)), tmp_path / "a")
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt'\] for the prompts format"):
        run_data_stage(DataConfig(source=str(questions), format="prompts"), tmp_path / "b")
    typo = write_jsonl(tmp_path / "typo.jsonl", [{"prompt": "Hi?", "respnse": "Hello"}, {"prompt": "Ho?",
                                                                                          "respnse": "Hey"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        run_data_stage(DataConfig(source=str(typo)), tmp_path / "c")
