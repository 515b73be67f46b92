"""reasoning-gym tasks as a prompts source (alignment/tasks_gym.py): disjoint train and held-out seeds, the
deny-list, the scorer wrapper, answer extraction, and the gold checker the data stage and rewards use."""

from __future__ import annotations

import functools
import json

import pyarrow.parquet as pq
import pytest
import reasoning_gym

from alignment import tasks_gym
from alignment.data import DataConfig, DataError, PairData, read_source
from alignment.evaluation.gold import CHECKERS, GoldCheckError, check_answer, validate_reference
from alignment.rewards.components import GoldComponent
from cli.main import main


def _ref(task: str, index: int = 0, seed: int = 0, size: int = 4, **settings) -> str:
    return json.dumps({"task": task, "settings": settings, "seed": seed, "size": size, "index": index,
                       "version": tasks_gym.library_version()})


def _split(records, split):
    return [r for r in records if r["split"] == split]


# ---------------------------------------------------------------------------------------------
# Items: disjoint seeds, the overlap check
# ---------------------------------------------------------------------------------------------
def test_train_and_held_out_come_from_disjoint_seeds_and_share_no_question():
    records = tasks_gym.build_items(tasks_gym.parse_spec("gym:chain_sum:20,letter_counting:10"), 7, 0.2)
    for task, n_train, n_val in (("chain_sum", 16, 4), ("letter_counting", 8, 2)):
        train = [r for r in _split(records, "train") if r["task"] == task]
        val = [r for r in _split(records, "validation") if r["task"] == task]
        assert (len(train), len(val)) == (n_train, n_val)
        assert {json.loads(r["gold_answer"])["seed"] for r in train} == {7}
        assert {json.loads(r["gold_answer"])["seed"] for r in val} == {7 + 1_000_003}
        assert not {r["question"] for r in train} & {r["question"] for r in val}
    first = _split(records, "train")[0]
    assert first["question"] == reasoning_gym.create_dataset("chain_sum", size=16, seed=7)[0]["question"]
    assert first["prompt"] == first["question"] + tasks_gym.ANSWER_INSTRUCTION
    assert "<answer></answer>" in first["prompt"] and first["gold_checker"] == "reasoning_gym"


def test_a_training_question_that_is_also_held_out_is_dropped():
    # basic_arithmetic, seed 0, 50 + 50 items: the library draws one question in both (checked here).
    train = [e["question"] for e in reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=0)]
    held = [e["question"] for e in reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=1_000_003)]
    assert len(set(train)) == 50 and len(set(train) & set(held)) == 1
    records = tasks_gym.build_items(tasks_gym.parse_spec("gym:basic_arithmetic:100"), 0, 0.5)
    assert len(_split(records, "train")) == 49 and len(_split(records, "validation")) == 50
    assert not {r["question"] for r in _split(records, "train")} & set(held)


def test_the_overlap_check_names_the_task_and_question_in_one_line():
    records = tasks_gym.build_items(tasks_gym.parse_spec("gym:chain_sum:6"), 0, 0.5)
    leaked = {**_split(records, "train")[1], "split": "validation"}
    with pytest.raises(tasks_gym.GymError) as err:
        tasks_gym.check_disjoint([*records, leaked])
    msg = str(err.value)
    assert "\n" not in msg and "'chain_sum'" in msg and json.dumps(leaked["question"]) in msg
    tasks_gym.check_disjoint(records)  # the built items themselves pass


# ---------------------------------------------------------------------------------------------
# The source spec and its refusals
# ---------------------------------------------------------------------------------------------
def test_spec_sizes_and_settings():
    tasks = tasks_gym.parse_spec("gym:chain_sum:30, letter_counting", {"chain_sum": {"max_terms": 3}})
    assert tasks == [tasks_gym.GymTask("chain_sum", 30, (("max_terms", 3),)),
                     tasks_gym.GymTask("letter_counting", tasks_gym.DEFAULT_SIZE)]
    records = tasks_gym.build_items(tasks[:1], 0, 0.2)
    assert all(r["question"].count("+") + r["question"].count("-") <= 2 for r in records)  # at most 3 terms


@pytest.mark.parametrize("spec, settings, needle", [
    ("gym:game_of_life_halting", {}, "is refused: its score_answer gives 1.0 to any non-empty answer"),
    ("gym:chain_sun", {}, "unknown reasoning-gym task 'chain_sun' (did you mean 'chain_sum'?)"),
    ("gym:chain_sum:1", {}, "needs a size of at least 2"),
    ("gym:chain_sum:x", {}, "'chain_sum:x' is not NAME or NAME:SIZE"),
    ("gym:chain_sum,chain_sum", {}, "task 'chain_sum' is named twice"),
    ("gym:chain_sum", {"letter_counting": {}}, "gym_settings names task(s) ['letter_counting']"),
    ("gym:chain_sum:4", {"chain_sum": {"bogus": 1}}, "gym task 'chain_sum': settings {'bogus': 1} are not accepted"),
])
def test_bad_sources_are_one_line_data_errors(spec, settings, needle):
    with pytest.raises(DataError) as err:
        read_source(DataConfig(source=spec, gym_settings=settings))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_the_denied_task_with_its_reason(tmp_path, capsys):
    assert main(["data", "--source", "gym:game_of_life_halting", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "game_of_life_halting" in err and "any non-empty answer" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_settings_without_a_gym_source_are_refused():
    with pytest.raises(ValueError, match="gym_settings apply to a 'gym:' source only"):
        DataConfig(source="demo", gym_settings={"chain_sum": {}})


# ---------------------------------------------------------------------------------------------
# Answers: extraction, format reward, the scorer wrapper
# ---------------------------------------------------------------------------------------------
def test_extract_answer_takes_the_last_tag_else_the_last_line():
    assert tasks_gym.extract_answer("I think 3.\n<answer> 5 </answer>\nthen <answer>7</answer>") == "7"
    assert tasks_gym.extract_answer("Let me add.\n2 + 2 = 4\n\n  4  \n\n") == "4"
    assert tasks_gym.extract_answer("<answer>\nline one\nline two\n</answer>") == "line one\nline two"
    assert tasks_gym.extract_answer("") is None and tasks_gym.extract_answer(" \n ") is None


@pytest.mark.parametrize("text, value", [
    ("Sum is 9. <answer>9</answer>", 1.0),
    ("<answer>9</answer> or <answer>8</answer>", 0.0),  # two answers
    ("<answer>  </answer>", 0.0),  # blank
    ("</answer>9<answer>", 0.0),  # wrong order
    ("<answer>9", 0.0),  # unclosed
    ("9", 0.0),
])
def test_format_reward(text, value):
    assert tasks_gym.format_reward(text) == value


def test_chain_sum_gold_scores_one_and_a_wrong_answer_zero():
    entry = reasoning_gym.create_dataset("chain_sum", size=4, seed=0)[2]
    ref = _ref("chain_sum", index=2)
    gold = entry["answer"]
    assert tasks_gym.score(f"Adding up.\n<answer>{gold}</answer>", ref) == 1.0
    assert tasks_gym.score(f"Adding up.\n{gold}", ref) == 1.0  # the final line
    assert tasks_gym.score(f"<answer>{int(gold) + 1}</answer>", ref) == 0.0
    assert check_answer(f"<answer>{gold}</answer>", ref, "reasoning_gym") is True
    assert check_answer(f"<answer>{int(gold) + 1}</answer>", ref, "reasoning_gym") is False


def test_lenient_check_reads_a_stated_number_but_not_a_copy_of_the_question():
    entry = reasoning_gym.create_dataset("chain_sum", size=4, seed=0)[2]
    ref, gold = _ref("chain_sum", index=2), entry["answer"]
    expression = entry["question"].rsplit(":", 1)[1].strip()  # e.g. "4 - 1 - 7 =", the question's own sum
    prompt = entry["question"] + tasks_gym.ANSWER_INSTRUCTION
    assert tasks_gym.reference_answer(ref) == gold
    lenient = functools.partial(check_answer, reference=ref, checker="reasoning_gym", prompt=prompt, lenient=True)
    worded = f"The sum is {gold}."
    assert tasks_gym.score(worded, ref) < 1.0 and not check_answer(worded, ref, "reasoning_gym", prompt=prompt)
    assert lenient(worded) and lenient(f"<answer>{gold}</answer>") and lenient(f"{expression} {gold}")
    assert not lenient(f"The sum is {int(gold) + 1}.")
    assert not lenient(f"{gold} was my guess\nthen I stopped")  # the last line only
    # the reward hack a GRPO run found: echo the question's expression, which math-verify would evaluate to
    # the gold answer; the prompt's expressions are masked, so it states nothing
    assert not lenient(expression) and not lenient(f"<answer>{expression}</answer>")
    # a non-numeric gold answer (spell_backward) is checked strictly only
    word = reasoning_gym.create_dataset("spell_backward", size=2, seed=0)[0]["answer"]
    assert not check_answer(f"It is {word}", _ref("spell_backward", size=2), "reasoning_gym", lenient=True)
    assert check_answer(word, _ref("spell_backward", size=2), "reasoning_gym", lenient=True)


def test_a_scorer_that_raises_scores_zero_and_is_counted():
    ds = reasoning_gym.create_dataset("prime_factorization", size=2, seed=0)
    with pytest.raises(ValueError):  # the library's own scorer, called directly, raises
        ds.score_answer("banana", ds[0])
    before = tasks_gym.scorer_errors["prime_factorization"]
    assert tasks_gym.score("<answer>banana</answer>", _ref("prime_factorization", size=2)) == 0.0
    assert tasks_gym.scorer_errors["prime_factorization"] == before + 1


@pytest.mark.parametrize("ref, needle", [
    ("not json", "is not JSON"),
    (json.dumps({"task": "chain_sum"}), "needs task, settings, seed, size, index, version"),
    (_ref("game_of_life_halting"), "is refused"),
    (_ref("chain_sum", index=4), "index 4 is outside its size 4"),
    (_ref("chain_sum").replace(tasks_gym.library_version(), "0.0.1"), "built with reasoning-gym 0.0.1"),
])
def test_bad_references_are_gold_check_errors(ref, needle):
    with pytest.raises(GoldCheckError) as err:
        validate_reference(ref, "reasoning_gym")
    assert needle in str(err.value)


# ---------------------------------------------------------------------------------------------
# Through the data stage and the gold reward component
# ---------------------------------------------------------------------------------------------
def test_data_stage_builds_gym_prompts_that_the_gold_component_checks(tmp_path):
    assert "reasoning_gym" in CHECKERS
    out = tmp_path / "d"
    assert main(["data", "--source", "gym:chain_sum:10", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n_train"], manifest["n_validation"], manifest["source_kind"]) == (8, 2, "gym")
    assert manifest["extra_columns"] == ["question", "split", "task"]
    assert set(pq.read_table(out / "validation.parquet").column("gold_checker").to_pylist()) == {"reasoning_gym"}
    items = PairData.load(out / "train.parquet", prompts_ok=True).prompt_items()
    golds = [reasoning_gym.create_dataset("chain_sum", size=8, seed=0)[json.loads(i.gold_answer)["index"]]["answer"]
             for i in items[:3]]
    texts = [f"<answer>{golds[0]}</answer>", f"<answer>{int(golds[1]) + 1}</answer>", f"{int(golds[2]) + 1}"]
    assert GoldComponent({"kind": "gold"}).score(items[:3], texts).values == [1.0, 0.0, 0.0]
    # format_credit: a wrong answer inside a well-formed tag earns it; a bare wrong line does not
    assert GoldComponent({"kind": "gold", "format_credit": 0.1}).score(items[:3], texts).values == [1.0, 0.1, 0.0]


def test_list_settings_are_hashable_and_round_trip_through_the_reference():
    """A generator setting given as a list (YAML: operators: [+, -]) builds, and its JSON reference (a list
    again) rebuilds the same item."""
    tasks = tasks_gym.parse_spec("gym:basic_arithmetic:8", {"basic_arithmetic": {"operators": ["+", "-"]}})
    assert tasks[0].settings == (("operators", ("+", "-")),)
    record = tasks_gym.build_items(tasks, 0, 0.25)[0]
    assert json.loads(record["gold_answer"])["settings"] == {"operators": ["+", "-"]}
    expected = reasoning_gym.create_dataset("basic_arithmetic", size=6, seed=0, operators=("+", "-"))[0]["answer"]
    assert tasks_gym.reference_answer(record["gold_answer"]) == expected
    assert tasks_gym.score(f"<answer>{expected}</answer>", record["gold_answer"]) == 1.0
