"""IFEval's instruction checkers (lm-eval 0.4.13) as the ``ifeval`` gold checker (alignment/ifeval.py), and
the ``ifeval:N`` prompts source (alignment/tasks_ifeval.py): every kind the prompts use both ways, the
offline import guard, the gold checker through check_answer and the gold reward component, disjoint topics,
the overlap check, sizes and bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alignment import ifeval, tasks_ifeval
from alignment.data import DataConfig, DataError, PairData, read_source
from alignment.evaluation.gold import CHECKERS, GoldCheckError, check_answer, validate_reference
from alignment.rewards.components import GoldComponent
from cli.main import main

ROOT = Path(__file__).resolve().parents[1]
WORDS = "length_constraints:number_words"

# (kind, kwargs, a completion that follows it, one that does not), each checked by hand against lm-eval's code
KIND_CASES = [
    ("punctuation:no_comma", {}, "The sea is deep and blue.", "The sea is deep, and blue."),
    ("change_case:english_lowercase", {}, "the farm is vast and green.", "The farm is vast and green."),
    ("change_case:english_capital", {}, "THE FARM IS VAST AND GREEN.", "THE FARM IS VAST and GREEN."),
    ("startend:quotation", {}, '"The sea is deep."', 'The sea is "deep."'),
    ("detectable_format:json_format", {}, '```json\n{"topic": "the sea"}\n```', 'Here: {"topic": "the sea"}'),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Facts:\n* deep\n* blue\n* cold",
     "Facts:\n* deep\n* blue\n* cold\n* salty"),
    ("detectable_format:title", {}, "<<The Sea>>\nIt is deep.", "<The Sea>\nIt is deep."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "The sea is deep. any other questions?",
     "Any other questions? The sea is deep."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "The sea is deep.\n***\nIt is also blue.",
     "The sea is deep.\n\nIt is also blue."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "The sea is *deep* and *blue*.",
     "The sea is *deep* and blue."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], meet me at [place].",
     "Dear [name], meet me at the harbour."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe sea is deep.\nSection 2\nIt is blue.", "Section 1\nThe sea is deep. It is blue."),
    (WORDS, {"num_words": 5, "relation": "at least"}, "The sea is very deep.", "The sea is deep."),
    (WORDS, {"num_words": 5, "relation": "less than"}, "The sea is deep.", "The sea is very deep."),
]


@pytest.mark.parametrize(("kind", "kwargs", "good", "bad"), KIND_CASES)
def test_each_used_kind_passes_and_fails_by_hand(kind, kwargs, good, bad):
    assert ifeval.check_instructions(good, [kind], [kwargs]) == {kind: True}
    assert ifeval.check_instructions(bad, [kind], [kwargs]) == {kind: False}
    assert ifeval.check_instructions("   \n", [kind], [kwargs]) == {kind: False}  # strict: empty follows nothing


def test_the_cases_cover_every_kind_the_prompts_use():
    assert {kind for kind, *_ in KIND_CASES} == set(tasks_ifeval.USED_KINDS)


def test_registry_usable_and_left_out_kinds():
    kinds = ifeval.registry()
    assert len(kinds) == 25 and len(ifeval.usable_kinds()) == 23
    assert set(ifeval.LEFT_OUT) == {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
    assert set(ifeval.usable_kinds()) == set(kinds) - set(ifeval.LEFT_OUT)
    # every registry kind is used by the prompts or left out with a reason, never both
    assert set(tasks_ifeval.INSTRUCTIONS) | set(tasks_ifeval.LEFT_OUT) == set(kinds)
    assert not set(tasks_ifeval.INSTRUCTIONS) & set(tasks_ifeval.LEFT_OUT)


def test_several_instructions_give_a_breakdown_in_order():
    ids = ["punctuation:no_comma", WORDS, "change_case:english_lowercase"]
    kwargs = [{}, {"num_words": 3, "relation": "at least", "keyword": None}, {}]  # None values are dropped
    assert ifeval.check_instructions("the farm is vast, and green.", ids, kwargs) == {
        "punctuation:no_comma": False, WORDS: True, "change_case:english_lowercase": True}


@pytest.mark.parametrize(("ids", "kwargs", "needle"), [
    (["keywords:nonsense"], [{}], "ifeval instruction 'keywords:nonsense': unknown kind"),
    (["length_constraints:number_sentences"], [{"num_sentences": 2, "relation": "less than"}],
     "'length_constraints:number_sentences': left out: counts sentences with nltk"),
    ([WORDS], [{"num_words": 5}], f"'{WORDS}': missing key 'relation' (lm-eval would draw a random value)"),
    ([WORDS], [{"num_words": 0, "relation": "at least"}], "key 'num_words' must be a whole number >= 1, got 0"),
    ([WORDS], [{"num_words": "5", "relation": "at least"}], "key 'num_words' must be a whole number >= 1"),
    ([WORDS], [{"num_words": 5, "relation": "at most"}], "but at most is given"),
    (["punctuation:no_comma"], [{"num_words": 5}], "unknown key 'num_words'; it takes no keys"),
    (["keywords:existence"], [{"keywords": ["a("]}], "key 'keywords': 'a(' is not a valid regular expression"),
    (["keywords:existence"], [{"keywords": []}], "key 'keywords' must be a non-empty list of words"),
    (["punctuation:no_comma"], [], "1 instruction ids but 0 kwargs"),
    (["punctuation:no_comma", "punctuation:no_comma"], [{}, {}], "an instruction id repeats"),
])
def test_bad_instructions_are_one_line_errors_naming_kind_and_key(ids, kwargs, needle):
    with pytest.raises(ifeval.IfevalError) as err:
        ifeval.check_instructions("The sea.", ids, kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------------
# The offline import guard
# ---------------------------------------------------------------------------------------------
_PROBE = """
import sys, nltk
nltk.data.path[:] = [sys.argv[1]]  # an empty folder: punkt_tab is missing, so the import wants to download it
sentinel = lambda *args, **kwargs: print("DOWNLOAD", *args)  # stands for the network: must not be called
nltk.download = sentinel
{body}
"""


def _probe(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"} | {"PYTHONPATH": str(ROOT)}
    (tmp_path / "nltk").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", _PROBE.format(body=body), str(tmp_path / "nltk")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_loading_the_registry_prints_and_fetches_nothing(tmp_path):
    plain = _probe("import lm_eval.tasks.ifeval.instructions_registry", tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "DOWNLOAD punkt_tab" in plain.stdout and "Downloaded punkt_tab on rank 0" in plain.stdout  # lm-eval's own
    guarded = _probe("from alignment import ifeval\nassert len(ifeval.registry()) == 25\n"
                     "assert nltk.download is sentinel, 'nltk.download not restored'", tmp_path)
    assert (guarded.returncode, guarded.stdout, guarded.stderr) == (0, "", "")


def test_registry_in_process_writes_nothing(capfd, monkeypatch, tmp_path):
    import nltk

    calls = []
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # punkt_tab missing: lm-eval's import wants it
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: calls.append(args))
    for name in [n for n in sys.modules if n.startswith("lm_eval.tasks.ifeval")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh below; restored afterwards
    ifeval.registry.cache_clear()
    try:
        assert len(ifeval.registry()) == 25
    finally:
        ifeval.registry.cache_clear()
    assert capfd.readouterr() == ("", "") and calls == []


# ---------------------------------------------------------------------------------------------
# The ifeval gold checker
# ---------------------------------------------------------------------------------------------
ROW = {"instruction_id_list": ["punctuation:no_comma", WORDS], "kwargs": [{}, {"num_words": 6, "relation": "at least"}]}


def test_gold_checker_is_right_when_every_instruction_holds():
    assert "ifeval" in CHECKERS
    reference = json.dumps(ROW)
    validate_reference(reference, "ifeval")
    assert check_answer("The sea is deep and very blue.", reference, "ifeval") is True
    assert check_answer("The sea is deep, and very blue.", reference, "ifeval") is False  # a comma
    assert check_answer("The sea is deep.", reference, "ifeval") is False  # 4 words
    assert check_answer("", reference, "ifeval") is False


@pytest.mark.parametrize(("reference", "needle"), [
    ("not json", "is not JSON"),
    (json.dumps({"instruction_id_list": ["punctuation:no_comma"]}), "exactly the keys instruction_id_list, kwargs"),
    (json.dumps({"instruction_id_list": [], "kwargs": []}), "instruction_id_list must be a non-empty list"),
    (json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": {}}), "kwargs must be a list"),
    (json.dumps({"instruction_id_list": ["nope"], "kwargs": [{}]}), "ifeval instruction 'nope': unknown kind"),
    (json.dumps({"instruction_id_list": [WORDS], "kwargs": [{"num_words": 3}]}), "missing key 'relation'"),
])
def test_bad_references_are_gold_check_errors(reference, needle):
    for call in (lambda: validate_reference(reference, "ifeval"), lambda: check_answer("x", reference, "ifeval")):
        with pytest.raises(GoldCheckError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The ifeval: source
# ---------------------------------------------------------------------------------------------
def test_train_and_held_out_prompts_are_about_disjoint_topics():
    records = tasks_ifeval.build_items(200, 3, 0.2)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    assert (len(train), len(val)) == (160, 40)
    topics = tasks_ifeval.split_topics(3, 0.2)
    assert len(topics["validation"]) == 12 and len(topics["train"]) == 48  # round(60 * 0.2)
    assert {r["topic"] for r in train} <= set(topics["train"]) and {r["topic"] for r in val} <= set(topics["validation"])
    assert not {r["topic"] for r in train} & {r["topic"] for r in val}
    assert len({r["prompt"] for r in records}) == 200
    assert len(tasks_ifeval.TOPICS) == len(set(tasks_ifeval.TOPICS)) == 60
    # the kinds take turns: 160 train prompts over 12 kinds is 13 or 14 each
    assert set(Counter(r["task"] for r in train).values()) <= {13, 14}
    assert records == tasks_ifeval.build_items(200, 3, 0.2)  # seeded
    assert tasks_ifeval.build_items(200, 4, 0.2) != records


def test_each_record_states_its_instructions_and_a_copy_of_the_prompt_fails_them():
    for r in tasks_ifeval.build_items(120, 0, 0.5):
        ids, kwargs = ifeval.parse_reference(r["gold_answer"])
        assert r["gold_checker"] == "ifeval" and ids[0] == r["task"] and r["task"] in tasks_ifeval.INSTRUCTIONS
        assert r["prompt"].startswith(r["question"]) and r["topic"] in r["question"]
        assert not all(ifeval.check_reference(r["prompt"], r["gold_answer"], r["prompt"]).values()), r["prompt"]
    first = tasks_ifeval.build_items(2, 0, 0.5)[0]
    assert set(first) == {"prompt", "gold_answer", "gold_checker", "task", "split", "question", "topic"}


def test_the_overlap_check_refuses_a_shared_topic():
    records = tasks_ifeval.build_items(10, 0, 0.2)
    tasks_ifeval.check_disjoint(records)
    leaked = dict(records[-1], split="train")
    with pytest.raises(tasks_ifeval.IfevalSourceError) as err:
        tasks_ifeval.check_disjoint([leaked, *records])
    assert f"the held-out topic {records[-1]['topic']!r} also occurs" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("spec", "needle"), [
    ("ifeval:", "expected ifeval:N"),
    ("ifeval:x", "expected ifeval:N"),
    ("ifeval:-3", "expected ifeval:N"),
    ("ifeval:1", "needs at least 2 prompts"),
    ("ifeval:100000", "ask for fewer prompts"),
])
def test_bad_specs_are_one_line_data_errors(spec, needle):
    with pytest.raises(DataError) as err:
        read_source(DataConfig(source=spec))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_data_stage_builds_ifeval_prompts_that_the_gold_component_checks(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--source", "ifeval:40", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n_train"], manifest["n_validation"], manifest["source_kind"]) == (32, 8, "ifeval")
    assert manifest["extra_columns"] == ["question", "split", "task", "topic"]
    assert set(pq.read_table(out / "validation.parquet").column("gold_checker").to_pylist()) == {"ifeval"}
    items = PairData.load(out / "train.parquet", prompts_ok=True).prompt_items()
    held_out = PairData.load(out / "validation.parquet", prompts_ok=True).prompt_items()
    assert not {i.extra["topic"] for i in items} & {i.extra["topic"] for i in held_out}
    item = next(i for i in items if i.extra["task"] == "punctuation:no_comma")
    words = json.loads(item.gold_answer)["kwargs"][1]["num_words"]
    good = " ".join(["the sea is deep"] * words)
    bad = good.replace("deep", "deep,", 1)
    assert GoldComponent({"kind": "gold"}).score([item, item], [good, bad]).values == [1.0, 0.0]
    # no final answer to state: format_credit never applies to an instruction prompt
    assert GoldComponent({"kind": "gold", "format_credit": 0.1}).score([item], [bad]).values == [0.0]
    assert main(["data", "--source", "ifeval:1", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs at least 2 prompts" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
