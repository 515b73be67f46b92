"""Reward components (alignment.rewards): hand-computed values for every kind, every error naming its
component, combine() with None, keys, the reward_model shorthand, and real tiny reward-model folders."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from alignment.rewards import (
    REWARD_KINDS,
    ComponentScores,
    EnsembleComponent,
    GoldComponent,
    LengthComponent,
    PythonComponent,
    RewardComponentError,
    RewardModelComponent,
    combine,
    combined_variance,
    components_from,
    parse_reward_configs,
    register_reward_kind,
    rewards_key,
    score_components,
)
from alignment.rewards.components import (
    aggregate_ensemble,
    overlong_penalty,
    prompt_rows,
    states_final_answer,
)
from alignment.rewards.model import RewardScores

ADD = [{"role": "user", "content": "What is 13 + 13?"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
REVERSE = [{"role": "user", "content": "Reverse the word 'stressed'."}]
POEM = [{"role": "user", "content": "Write a poem about rain."}]


def row(prompt, answer=None, checker=None, **extra):
    return {"prompt": prompt, "gold_answer": answer, "gold_checker": checker, **extra}


# --------------------------------------------------------------------------------------------
# gold
# --------------------------------------------------------------------------------------------
GOLD_ROWS = [
    row(ADD, "26", "number"),
    row(ADD, "26", "number"),
    row(ADD, "26", "number"),
    row(POEM),  # no gold answer: no opinion
    row(REVERSE, "desserts", "exact"),
    row(FRANCE, "Paris", "contains"),
    row("What is 2 + 2?", "4", "number"),  # a plain-text prompt
    row(FRANCE, "Paris", "contains"),
    row(REVERSE, "desserts", "exact"),
    row(POEM, float("nan"), None),  # a missing value read from a data frame
]
GOLD_TEXTS = [
    "13 + 13 = 26.",  # right
    "The answer is 25.",  # wrong, clearly stated
    "I think it might be 25 or so",  # wrong, not stated as the answer
    "Rain falls softly.",
    "The reversed word is desserts.",  # right
    "It is not Paris, it is Lyon.",  # wrong (negated), not stated as the answer
    "\\boxed{4}",  # right
    "Final answer: Lyon",  # wrong, clearly stated
    "The answer is: dessert",  # wrong, clearly stated
    "Drops on the window.",
]


def test_gold_scores_right_wrong_and_none():
    scores = GoldComponent({"kind": "gold"}).score(GOLD_ROWS, GOLD_TEXTS)
    assert scores.values == [1.0, 0.0, 0.0, None, 1.0, 0.0, 1.0, 0.0, 0.0, None]
    assert scores.variance is None


def test_gold_format_credit_goes_to_clearly_stated_wrong_answers_only():
    scores = GoldComponent({"kind": "gold", "format_credit": 0.1}).score(GOLD_ROWS, GOLD_TEXTS)
    assert scores.values == [1.0, 0.1, 0.0, None, 1.0, 0.0, 1.0, 0.1, 0.1, None]


@pytest.mark.parametrize("text, checker, stated", [
    ("The answer is 25.", "number", True),
    ("Final answer: 7", "number", True),
    ("#### 42", "number", True),
    ("So 7 is the answer.", "number", True),
    ("The result = 12", "number", True),
    ("\\boxed{12}", "number", True),
    ("\\boxed{}", "number", False),
    ("The answer is not clear to me.", "contains", False),
    ("I guess 7", "number", False),
    ("The answer is: many", "number", False),  # stated, but no number for the number checker
    ("The answer is: Lyon", "exact", True),
])
def test_states_final_answer(text, checker, stated):
    assert states_final_answer(text, checker) is stated


def test_gold_errors_name_the_component_and_row():
    gold = GoldComponent({"name": "truth", "kind": "gold"})
    with pytest.raises(RewardComponentError, match=r"reward component 'truth' \(gold\): row 1: unknown gold checker"):
        gold.score([row(ADD, "26", "number"), row(ADD, "26", "regex")], ["26", "26"])
    with pytest.raises(RewardComponentError, match="'truth'.*1 prompt rows for 2 completions"):
        gold.score([row(ADD, "26", "number")], ["26", "26"])


def test_prompt_items_are_accepted_as_rows():
    from alignment.data import PromptItem

    items = [PromptItem(ADD, "26", "number"), PromptItem(POEM)]
    assert prompt_rows(items)[0] == row(ADD, "26", "number")
    assert GoldComponent({"kind": "gold"}).score(items, ["It is 26.", "Rain."]).values == [1.0, None]
    with pytest.raises(RewardComponentError, match="prompt row 0 has no 'prompt' column"):
        prompt_rows([{"text": "x"}])


# --------------------------------------------------------------------------------------------
# length
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, expected", [
    (1, 0.0), (6, 0.0),  # inside [0, max - buffer] = [0, 6]
    (7, -0.25), (8, -0.5), (9, -0.75), (10, -1.0),  # linear over the buffer: (6 - L) / 4
    (11, -1.0), (50, -1.0),  # beyond max
])
def test_overlong_penalty_hand_values(length, expected):
    assert overlong_penalty(length, max_tokens=10, buffer=4) == pytest.approx(expected)


@pytest.mark.parametrize("length, expected", [
    (6, 0.0), (4, 0.0),  # min_tokens = 4 is inside
    (3, -0.5), (2, -1.0), (1, -1.0),  # (L - 4) / 2 down to -1 at 2, -1 below
])
def test_lower_band_hand_values(length, expected):
    assert overlong_penalty(length, 10, 4, min_tokens=4, min_buffer=2) == pytest.approx(expected)


def test_length_component_reads_lengths_or_token_ids():
    c = LengthComponent({"kind": "length", "max_tokens": 10, "buffer": 4, "min_tokens": 3})
    rows, texts = [row(POEM)] * 4, ["a", "b", "c", "d"]
    assert c.score(rows, texts, lengths=torch.tensor([2, 5, 8, 12])).values == [-1.0, 0.0, -0.5, -1.0]
    assert c.score(rows, texts, token_ids=[[1] * 2, [1] * 5, [1] * 8, [1] * 12]).values == [-1.0, 0.0, -0.5, -1.0]
    with pytest.raises(RewardComponentError, match=r"'length' \(length\): needs the completions' token counts"):
        c.score(rows, texts)
    with pytest.raises(RewardComponentError, match="3 token counts for 4 completions"):
        c.score(rows, texts, lengths=[1, 2, 3])


@pytest.mark.parametrize("fields, message", [
    ({"max_tokens": 4, "buffer": 4}, "buffer=4 must be below max_tokens=4"),
    ({"max_tokens": 10, "buffer": 4, "min_tokens": 7}, "min_tokens=7 is above"),
    ({"max_tokens": 10, "min_tokens": 3, "min_buffer": 3}, "min_buffer=3 must be below min_tokens=3"),
    ({"max_tokens": 10, "min_buffer": 2}, "min_buffer needs min_tokens"),
])
def test_length_config_errors(fields, message):
    with pytest.raises(RewardComponentError, match=message):
        parse_reward_configs([{"kind": "length", **fields}])


# --------------------------------------------------------------------------------------------
# python
# --------------------------------------------------------------------------------------------
REWARD_FILE = '''
def on_topic(prompts, completions, topic, gold_answer, **kwargs):
    """1 when the completion names the row's topic, None on rows without one."""
    assert len(prompts) == len(completions) == len(topic) == len(gold_answer)
    return [None if t is None else float(t in c) for c, t in zip(completions, topic)]

def ids_seen(prompts, completions, completion_ids, **kwargs):
    return [len(ids) for ids in completion_ids]

def raises(prompts, completions, **kwargs):
    return 1 / 0

def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def inf(prompts, completions, **kwargs):
    return [float("inf")] * len(completions)

def text(prompts, completions, **kwargs):
    return ["high"] * len(completions)

def scalar(prompts, completions, **kwargs):
    return 3.0

def flags(prompts, completions, **kwargs):
    return [c.startswith("y") for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def python_component(path: Path, name: str) -> PythonComponent:
    return PythonComponent({"name": "mine", "kind": "python", "function": f"{path}:{name}"})


def test_python_function_gets_every_column(reward_file):
    rows = [row(POEM, topic="rain"), row(POEM, topic="snow"), row(POEM, topic=None)]
    scores = python_component(reward_file, "on_topic").score(rows, ["the rain", "the rain", "x"])
    assert scores.values == [1.0, 0.0, None]
    ids = python_component(reward_file, "ids_seen").score(rows, ["a", "b", "c"], token_ids=[[1], [1, 2], []])
    assert ids.values == [1.0, 2.0, 0.0]
    assert python_component(reward_file, "flags").score(rows[:2], ["yes", "no"]).values == [1.0, 0.0]


@pytest.mark.parametrize("name, message", [
    ("raises", r"raises\(\) raised ZeroDivisionError: division by zero"),
    ("short", r"short\(\) returned 1 values for 2 completions"),
    ("nan", r"nan\(\) returned nan for completion 0 \(NaN or infinite\)"),
    ("inf", r"inf\(\) returned inf for completion 0 \(NaN or infinite\)"),
    ("text", r"text\(\) returned 'high' \(str\) for completion 0, not a number or None"),
    ("scalar", r"scalar\(\) returned a float, not a list of 2 numbers"),
    ("missing", r"my_rewards.py defines no 'missing'"),
    ("NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is not callable \(int\)"),
])
def test_python_errors_name_the_component(reward_file, name, message):
    c = python_component(reward_file, name)
    with pytest.raises(RewardComponentError, match=r"reward component 'mine' \(python\): .*" + message):
        c.score([row(POEM), row(POEM)], ["a", "b"])


def test_python_missing_file_and_broken_module(tmp_path):
    with pytest.raises(RewardComponentError, match=r"'mine' \(python\): file .*absent.py does not exist"):
        python_component(tmp_path / "absent.py", "f").setup()
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(RewardComponentError, match="'mine'.*importing .*broken.py failed: ModuleNotFoundError"):
        python_component(broken, "f").setup()
    with pytest.raises(RewardComponentError, match="not of the form 'path/to/file.py:function_name'"):
        parse_reward_configs([{"kind": "python", "function": "my_rewards.py"}])


def test_python_key_follows_the_file_content_not_its_place(reward_file, tmp_path):
    key = python_component(reward_file, "on_topic").key()
    assert key["sha256"] and key["function"] == "on_topic" and key["weight"] == 1.0
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(reward_file, elsewhere / reward_file.name)
    assert python_component(elsewhere / reward_file.name, "on_topic").key() == key
    (elsewhere / reward_file.name).write_text(REWARD_FILE + "\n# changed\n")
    assert python_component(elsewhere / reward_file.name, "on_topic").key() != key


# --------------------------------------------------------------------------------------------
# ensemble arithmetic (fake member scorers)
# --------------------------------------------------------------------------------------------
class FakeScorer:
    def __init__(self, mean, var=None):
        self.mean = torch.tensor(mean)
        self.var = torch.zeros_like(self.mean) if var is None else torch.tensor(var)
        self.seen = None

    def score(self, prompts, completions):
        self.seen = (prompts, completions)
        return RewardScores(self.mean, self.var)


def ensemble(aggregate: str, members, k: float = 1.0, var_lambda: float = 0.1) -> EnsembleComponent:
    cfg = {"name": "ens", "kind": "ensemble", "members": [f"m{i}" for i in range(len(members))],
           "aggregate": aggregate, "k": k, "var_lambda": var_lambda}
    return EnsembleComponent(cfg, scorers=members)


@pytest.mark.parametrize("aggregate, k, expected", [
    ("mean", 1.0, [2.0, 3.0]),
    # column 0: (1, 3, 2): mean 2, population var 2/3; column 1: (2, 2, 5): mean 3, var 2
    ("mean_minus_std", 1.0, [2 - math.sqrt(2 / 3), 3 - math.sqrt(2)]),
    ("mean_minus_std", 2.0, [2 - 2 * math.sqrt(2 / 3), 3 - 2 * math.sqrt(2)]),
    ("min", 1.0, [1.0, 2.0]),
])
def test_ensemble_aggregations_hand_values(aggregate, k, expected):
    members = [FakeScorer([1.0, 2.0]), FakeScorer([3.0, 2.0]), FakeScorer([2.0, 5.0])]
    scores = ensemble(aggregate, members, k).score([row(POEM), row("Plain text prompt")], ["a", "b"])
    assert scores.values == pytest.approx(expected, abs=1e-6)
    # every member saw chat messages, the text prompt turned into one user message
    assert members[0].seen[0][1] == [{"role": "user", "content": "Plain text prompt"}]


def test_ensemble_members_are_e_minus_lambda_var():
    members = [FakeScorer([4.0, 4.0], [2.0, 0.0]), FakeScorer([1.0, 3.0])]
    # member 0: 4 - 0.5 * 2 = 3, 4; member 1: 1, 3 -> mean 2, 3.5
    assert ensemble("mean", members, var_lambda=0.5).score([row(POEM)] * 2, ["a", "b"]).values == [2.0, 3.5]
    assert aggregate_ensemble(torch.tensor([[1.0], [3.0]]), "mean_minus_std", 0.5).item() == pytest.approx(1.5)


def test_ensemble_config_errors():
    with pytest.raises(RewardComponentError, match="members"):
        parse_reward_configs([{"kind": "ensemble", "members": ["only-one"]}])
    with pytest.raises(RewardComponentError, match="'ens' \\(ensemble\\): 1 scorers for 2 members"):
        EnsembleComponent({"name": "ens", "kind": "ensemble", "members": ["a", "b"]}, scorers=[FakeScorer([1.0])])
    with pytest.raises(RewardComponentError, match="not loaded: call setup"):
        EnsembleComponent({"kind": "ensemble", "members": ["a", "b"]}).score([row(POEM)], ["a"])


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------
def test_combine_treats_none_as_zero_and_reports_each_component():
    gold = GoldComponent({"kind": "gold", "weight": 1.0})
    length = LengthComponent({"kind": "length", "max_tokens": 10, "weight": 0.5})
    extra = GoldComponent({"name": "judge", "kind": "gold", "weight": 2.0})
    scores = {
        "gold": ComponentScores([1.0, None, 0.0, None]),
        "length": ComponentScores([0.0, -1.0, -0.5, 0.0]),
        "judge": ComponentScores([None, None, None, None]),
    }
    total, metrics = combine([gold, length, extra], scores)
    # 1 + 0.5 * 0 | 0 + 0.5 * -1 | 0 + 0.5 * -0.5 | 0 + 0
    assert total.dtype == torch.float32
    assert total.tolist() == [1.0, -0.5, -0.25, 0.0]
    assert metrics == {
        "rewards/gold/mean": 0.5, "rewards/gold/none_share": 0.5,
        "rewards/length/mean": pytest.approx(-0.375), "rewards/length/none_share": 0.0,
        "rewards/judge/mean": None, "rewards/judge/none_share": 1.0,
    }
    # the same from a list in the components' order
    assert combine([gold, length, extra], [scores["gold"], scores["length"], scores["judge"]])[0].tolist() == \
        total.tolist()
    with pytest.raises(RewardComponentError, match="no scores for reward component"):
        combine([gold, length], {"gold": scores["gold"]})
    with pytest.raises(RewardComponentError, match="'length' \\(length\\): 3 values, other components gave 4"):
        combine([gold, length], {"gold": scores["gold"], "length": ComponentScores([0.0, 0.0, 0.0])})


def test_combined_variance_weights_squared():
    a = GoldComponent({"name": "a", "kind": "gold", "weight": 2.0})
    b = GoldComponent({"name": "b", "kind": "gold", "weight": 1.0})
    c = GoldComponent({"name": "c", "kind": "gold"})
    var = combined_variance([a, b, c], {"a": ComponentScores([0.0, 0.0], [1.0, 0.5]),
                                        "b": ComponentScores([0.0, 0.0], [0.25, 0.0]),
                                        "c": ComponentScores([1.0, 1.0])})
    assert var.tolist() == [4.25, 2.0]
    assert combined_variance([c], {"c": ComponentScores([1.0])}) is None


def test_score_components_runs_every_component(reward_file):
    comps = components_from(None, [
        {"kind": "gold"},
        {"kind": "length", "max_tokens": 3, "weight": 0.5},
        {"name": "topic", "kind": "python", "function": f"{reward_file}:on_topic", "weight": 2.0},
    ])
    rows = [row(ADD, "26", "number", topic="26"), row(POEM, topic=None)]
    scores = score_components(comps, rows, ["It is 26.", "Rain rain rain rain"], lengths=[3, 5])
    assert {k: s.values for k, s in scores.items()} == {"gold": [1.0, None], "length": [0.0, -1.0],
                                                        "topic": [1.0, None]}
    total, _ = combine(comps, scores)
    assert total.tolist() == [3.0, -0.5]


# --------------------------------------------------------------------------------------------
# configs, registry, shorthand and keys
# --------------------------------------------------------------------------------------------
def test_format_component_rewards_the_answer_format_right_or_wrong():
    from alignment.rewards.components import FormatComponent

    rows = [{"prompt": "q", "gold_answer": '{"task": "chain_sum"}', "gold_checker": "reasoning_gym"}] * 4 + \
        [{"prompt": "q", "gold_answer": None, "gold_checker": None}]
    texts = ["<answer>7</answer>", "So <answer>8</answer>", "7", "<answer></answer>", "<answer>7</answer>"]
    assert FormatComponent({"kind": "format"}).score(rows, texts).values == [1.0, 1.0, 0.0, 0.0, None]


def test_registry_and_config_union():
    assert set(REWARD_KINDS) == {"reward_model", "gold", "length", "python", "ensemble", "format"}
    configs = parse_reward_configs([{"kind": "gold", "weight": 0.5}, {"name": "len", "kind": "length", "max_tokens": 9}])
    assert [(c.name, c.kind, c.weight) for c in configs] == [("gold", "gold", 0.5), ("len", "length", 1.0)]
    with pytest.raises(RewardComponentError, match="rewards\\[0\\].*does not match any of the expected tags"):
        parse_reward_configs([{"kind": "nope"}])
    with pytest.raises(RewardComponentError, match="rewards\\[0.gold.colour\\]: Extra inputs are not permitted"):
        parse_reward_configs([{"kind": "gold", "colour": "red"}])
    with pytest.raises(RewardComponentError, match="two reward components are named 'gold'"):
        parse_reward_configs([{"kind": "gold"}, {"kind": "gold", "format_credit": 0.1}])
    with pytest.raises(RewardComponentError, match="rewards is empty"):
        parse_reward_configs([])
    with pytest.raises(RewardComponentError, match="name"):
        parse_reward_configs([{"name": "a/b", "kind": "gold"}])  # '/' would break the metric names

    with pytest.raises(ValueError, match="has kind='gold', registered as 'other'"):
        register_reward_kind("other")(GoldComponent)


def test_shorthand_and_its_errors():
    (rm,) = components_from("runs/rm/x", None, var_lambda=0.3)
    assert isinstance(rm, RewardModelComponent)
    assert (rm.name, rm.weight, rm.config.folder, rm.config.var_lambda) == ("rm", 1.0, "runs/rm/x", 0.3)
    with pytest.raises(RewardComponentError, match="not both"):
        components_from("runs/rm/x", [{"kind": "gold"}])
    with pytest.raises(RewardComponentError, match="no reward"):
        components_from(None, None)
    assert rewards_key("runs/rm/x", None) is None  # the caller keeps its old stage key


def test_rewards_key_changes_with_what_is_computed():
    base = rewards_key(None, [{"kind": "gold"}, {"kind": "length", "max_tokens": 10}])
    assert base == rewards_key(None, [{"kind": "gold"}, {"kind": "length", "max_tokens": 10}])
    assert base != rewards_key(None, [{"kind": "gold", "weight": 2.0}, {"kind": "length", "max_tokens": 10}])
    assert base != rewards_key(None, [{"kind": "gold"}, {"kind": "length", "max_tokens": 11}])
    assert GoldComponent({"name": "a", "kind": "gold"}).key() == GoldComponent({"name": "b", "kind": "gold"}).key()


# --------------------------------------------------------------------------------------------
# real tiny reward-model folders
# --------------------------------------------------------------------------------------------
def save_reward_model(folder: Path, tiny_model: Path, kind: str, stage_key: str, seed: int = 0) -> Path:
    """A folder in the reward-model stage's format (weights, tokenizer, tagged config, manifest) with an
    untrained score head: what scoring reads, without training."""
    from alignment.io import write_json
    from alignment.models import load_sequence_classifier
    from alignment.rewards.model import tag_reward_model

    torch.manual_seed(seed)
    model, tok = load_sequence_classifier(str(tiny_model), 1 if kind == "scalar" else 10)
    tag_reward_model(model.config, kind, tok, 128)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json(folder / "manifest.json", {"stage": "reward_model", "kind": kind, "stage_key": stage_key,
                                          "config": {"model": str(tiny_model), "kind": kind}})
    return folder


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rms")
    return {"scalar": save_reward_model(tmp / "scalar", tiny_model, "scalar", "key-scalar", seed=0),
            "scalar2": save_reward_model(tmp / "scalar2", tiny_model, "scalar", "key-scalar2", seed=1),
            "distributional": save_reward_model(tmp / "dist", tiny_model, "distributional", "key-dist", seed=2)}


RM_ROWS = [row(ADD, "26", "number"), row(POEM), row("Say hi.")]
RM_TEXTS = ["13 + 13 = 26.", "Rain on the roof.", "Hi!"]


def test_reward_model_component_scores_as_the_scorer(reward_models):
    from alignment.rewards.model import RewardScorer

    folder = reward_models["distributional"]
    (rm,) = components_from(str(folder), None, var_lambda=0.1)
    assert rm.scorer is None  # nothing loaded before setup
    rm.setup("cpu", bf16=False)
    scores = rm.score(RM_ROWS, RM_TEXTS)
    prompts = [ADD, POEM, [{"role": "user", "content": "Say hi."}]]
    ref = RewardScorer.from_pretrained(folder, device="cpu", bf16=False).score(prompts, RM_TEXTS)
    # the shorthand's total is exactly what the online loop computes today: E[r] - lambda Var[r]
    total, metrics = combine([rm], {"rm": scores})
    assert torch.equal(total, ref.mean - 0.1 * ref.var)
    assert torch.equal(combined_variance([rm], {"rm": scores}), ref.var)
    assert metrics["rewards/rm/none_share"] == 0.0
    assert rm.key() == {"kind": "reward_model", "weight": 1.0, "var_lambda": 0.1, "rm": {"stage_key": "key-dist"}}


def test_reward_model_key_survives_a_move_and_kind_errors(reward_models, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(reward_models["scalar"], moved)
    key = RewardModelComponent({"kind": "reward_model", "folder": str(reward_models["scalar"])}).key()
    assert RewardModelComponent({"kind": "reward_model", "folder": str(moved)}).key() == key
    with pytest.raises(RewardComponentError, match=r"'rm' \(reward_model\): .*not a saved reward model"):
        RewardModelComponent({"name": "rm", "kind": "reward_model", "folder": str(tmp_path / "nothing")}).setup()
    with pytest.raises(RewardComponentError, match="not loaded: call setup"):
        RewardModelComponent({"kind": "reward_model", "folder": str(moved)}).score(RM_ROWS, RM_TEXTS)


def test_real_ensemble_loads_its_members(reward_models):
    from alignment.rewards.model import RewardScorer

    members = [str(reward_models["scalar"]), str(reward_models["scalar2"])]
    ens = EnsembleComponent({"kind": "ensemble", "members": members, "aggregate": "min"})
    ens.setup("cpu", bf16=False)
    prompts = [ADD, POEM, [{"role": "user", "content": "Say hi."}]]
    each = torch.stack([RewardScorer.from_pretrained(m, device="cpu", bf16=False).score(prompts, RM_TEXTS).mean
                        for m in members])
    assert ens.score(RM_ROWS, RM_TEXTS).values == pytest.approx(each.min(0).values.tolist())
    assert ens.key()["members"] == [{"stage_key": "key-scalar"}, {"stage_key": "key-scalar2"}]


def test_ensemble_refuses_members_with_another_tokenizer(reward_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(reward_models["scalar2"], other)
    config = json.loads((other / "config.json").read_text())
    config["alignment_tokenizer_sha"] = "0123456789abcdef"
    (other / "config.json").write_text(json.dumps(config))
    ens = EnsembleComponent({"name": "ens", "kind": "ensemble", "members": [str(reward_models["scalar"]), str(other)]})
    with pytest.raises(RewardComponentError, match=rf"'ens' \(ensemble\): member 1 \({other}\) was trained with "
                                                   r"another tokenizer .*vocabulary fingerprint 0123456789abcdef"):
        ens.setup("cpu")
    # without fingerprints the manifests' base models are compared
    for folder in (other, tmp_path / "first"):
        if not folder.exists():
            shutil.copytree(reward_models["scalar"], folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("alignment_tokenizer_sha")
        (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["model"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    (other / "manifest.json").write_text(json.dumps(manifest))
    ens = EnsembleComponent({"name": "ens", "kind": "ensemble", "members": [str(tmp_path / "first"), str(other)]})
    with pytest.raises(RewardComponentError, match="member 1 .* base model HuggingFaceTB/SmolLM2-360M-Instruct"):
        ens.check()
    (other / "manifest.json").unlink()
    with pytest.raises(RewardComponentError, match="cannot tell whether member 1"):
        ens.check()


# --------------------------------------------------------------------------------------------
# python: a file that exits, a function that is always None
# --------------------------------------------------------------------------------------------
EXITS_ON_IMPORT = "import sys\nsys.exit(0)\ndef f(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n"
EXITS_WHEN_CALLED = "import sys\ndef f(prompts, completions, **kwargs):\n    sys.exit(3)\n"
ALWAYS_NONE = "def f(prompts, completions, **kwargs):\n    return [None] * len(completions)\n"
NONE_AT_FIRST = ("calls = []\ndef f(prompts, completions, **kwargs):\n    calls.append(1)\n"
                 "    return [None] * len(completions) if len(calls) % 2 else [0.5] * len(completions)\n")
INTERRUPTED = "def f(prompts, completions, **kwargs):\n    raise KeyboardInterrupt\n"


def _python_file(tmp_path: Path, text: str, name: str = "rewards_file.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_python_sys_exit_is_an_error_naming_the_file(tmp_path):
    """SystemExit from the user's file (on import or in the call) is an error naming the file, not an exit."""
    on_import = _python_file(tmp_path, EXITS_ON_IMPORT, "exits_on_import.py")
    with pytest.raises(RewardComponentError, match=r"'mine' \(python\): importing .*exits_on_import.py failed: "
                       r"SystemExit: sys.exit\(0\) was called"):
        python_component(on_import, "f").setup()
    when_called = _python_file(tmp_path, EXITS_WHEN_CALLED, "exits_when_called.py")
    with pytest.raises(RewardComponentError, match=r"'mine' \(python\): .*exits_when_called.py: f\(\) raised "
                       r"SystemExit: sys.exit\(3\) was called"):
        python_component(when_called, "f").score([row(POEM)], ["a"])
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the run
        python_component(_python_file(tmp_path, INTERRUPTED, "interrupted.py"), "f").score([row(POEM)], ["a"])


def test_python_always_none_is_refused_after_its_first_calls(tmp_path, caplog):
    c = python_component(_python_file(tmp_path, ALWAYS_NONE), "f")
    rows, texts = [row(POEM), row(POEM)], ["a", "b"]
    with caplog.at_level("WARNING", logger="alignment.rewards.components"):
        for _ in range(PythonComponent.ALWAYS_NONE_CALLS - 1):  # counted and warned about (once), not yet refused
            assert c.score(rows, texts).values == [None, None]
    assert caplog.text.count("returned None for all 2 completions of a batch") == 1
    with pytest.raises(RewardComponentError, match=r"'mine' \(python\): .*rewards_file.py: f\(\) returned None "
                       r"for every completion of its first 3 calls: an always-None reward cannot train"):
        c.score(rows, texts)


def test_python_none_batches_after_a_value_are_counted_not_refused(tmp_path):
    c = python_component(_python_file(tmp_path, NONE_AT_FIRST), "f")
    values = [c.score([row(POEM)], ["a"]).values for _ in range(6)]  # None, 0.5, None, 0.5, None, 0.5
    assert values == [[None], [0.5]] * 3
    total, metrics = combine([c], [ComponentScores([None, None, 0.5, 1.0])])
    assert metrics["rewards/mine/none_share"] == 0.5 and metrics["rewards/mine/mean"] == 0.75


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from alignment.data import DataConfig, run_data_stage

    return run_data_stage(DataConfig(), tmp_path_factory.mktemp("data") / "data").out_dir


@pytest.mark.parametrize("text, message", [
    (EXITS_ON_IMPORT, r"importing .*bad_reward.py failed: SystemExit: sys.exit\(0\) was called"),
    (ALWAYS_NONE, r"bad_reward.py: f\(\) returned None for every completion of its first 3 calls"),
])
def test_align_reinforce_stops_with_one_line_on_a_bad_python_reward(tmp_path, tiny_model, demo_data, capsys, text,
                                                                     message):
    """Through the command: exit 2 and one line naming the file (it used to exit 0 silently, or train on 0)."""
    import re

    from cli.main import main

    reward = _python_file(tmp_path, text, "bad_reward.py")
    argv = ["-q", "reinforce", "--data", str(demo_data), "--policy", str(tiny_model), "--out", str(tmp_path / "run"),
            f"rewards=[{{kind: python, function: '{reward}:f'}}]", "steps=4", "batch_size=2", "max_new_tokens=4",
            "eval_prompts=0", "bf16=false"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(message, err[0]) and err[0].startswith("align reinforce: error: "), err
    assert "Traceback" not in captured.err + captured.out
