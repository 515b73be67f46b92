"""Reward models: losses against hand-computed values, tokenisation, the scorer, training on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignment.rewards.model import (
    RewardModelConfig,
    RewardModelError,
    RewardScorer,
    bradley_terry_loss,
    distribution_kl_loss,
    distribution_moments,
    encode_conversations,
    expected_calibration_error,
    log_preference_probability,
    pairwise_distribution_loss,
    render_conversation,
    run_reward_stage,
)
from tests.tiny import tiny_tokenizer

USER = [{"role": "user", "content": "What is 2 plus 2?"}]


# ---------------------------------------------------------------------------------------------
# Losses, hand-computed
# ---------------------------------------------------------------------------------------------
def test_bradley_terry_hand_values():
    rw, rl = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = 0.313262, -log sigmoid(-2) = 2.126928 -> mean 1.220095
    assert bradley_terry_loss(rw, rl).item() == pytest.approx(1.220095, abs=1e-5)
    # margin 0.5 on the first pair: -log sigmoid(0.5) = 0.474077 -> mean 1.300503
    assert bradley_terry_loss(rw, rl, margin=torch.tensor([0.5, 0.0])).item() == pytest.approx(1.300503, abs=1e-5)
    # centring 0.01 * mean((1+0)^2, (0+2)^2) = 0.01 * 2.5 = 0.025
    assert bradley_terry_loss(rw, rl, center_coef=0.01).item() == pytest.approx(1.245095, abs=1e-5)


def test_trl_reward_trainer_loss_is_our_bradley_terry(tiny_model):
    """The scalar model trains with TRL's compute_loss: check it is the loss we document."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from alignment.models import load_sequence_classifier

    model, tok = load_sequence_classifier(str(tiny_model), 1)
    ds = Dataset.from_dict({"chosen_ids": [[5, 6, 7, 2], [8, 9, 2]], "rejected_ids": [[5, 6, 2], [10, 11, 12, 2]]})
    args = RewardConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, bf16=False,
                        center_rewards_coefficient=0.01, max_length=64)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[0], ds[1]])
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    expected = bradley_terry_loss(r[:2], r[2:], center_coef=0.01)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_kl_loss_hand_values():
    # predicted uniform over 10 bins; target 0.5/0.5 on two bins: KL = 2 * 0.5 * log(0.5 / 0.1) = log 5
    target = torch.zeros(1, 10)
    target[0, 4:6] = 0.5
    assert distribution_kl_loss(torch.zeros(1, 10), target).item() == pytest.approx(math.log(5), abs=1e-6)
    # one-hot target: KL = -log p(target bin); logits with p = softmax([log 3, 0, ...]) -> p0 = 3 / 12
    logits = torch.zeros(1, 10)
    logits[0, 0] = math.log(3)
    assert distribution_kl_loss(logits, torch.eye(10)[:1]).item() == pytest.approx(-math.log(0.25), abs=1e-6)
    assert distribution_kl_loss(logits, torch.softmax(logits, -1)).item() == pytest.approx(0.0, abs=1e-6)


def test_preference_probability_hand_values():
    big = 30.0  # effectively one-hot distributions
    onehot = lambda i: torch.full((1, 10), -big).index_fill(1, torch.tensor([i]), big)  # noqa: E731
    assert log_preference_probability(onehot(7), onehot(3)).exp().item() == pytest.approx(1.0, abs=1e-6)
    assert log_preference_probability(onehot(3), onehot(7)).exp().item() == pytest.approx(0.0, abs=1e-6)
    assert log_preference_probability(onehot(5), onehot(5)).exp().item() == pytest.approx(0.0, abs=1e-6)  # tie
    # uniform vs uniform: P(i > j) = 45 / 100
    u = torch.zeros(1, 10)
    assert log_preference_probability(u, u).exp().item() == pytest.approx(0.45, abs=1e-6)
    assert pairwise_distribution_loss(u, u).item() == pytest.approx(-math.log(0.45), abs=1e-6)
    # w: 0.5 on 6, 0.5 on 8; l: 0.5 on 7, 0.5 on 9 -> only (8 > 7) counts: 0.25
    w = torch.full((1, 10), -big)
    w[0, [5, 7]] = 0.0
    loser = torch.full((1, 10), -big)
    loser[0, [6, 8]] = 0.0
    assert log_preference_probability(w, loser).exp().item() == pytest.approx(0.25, abs=1e-6)


def test_moments_and_distribution_sum_to_one():
    logits = torch.randn(5, 10)
    mean, var, p = distribution_moments(logits)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    r = torch.arange(1, 11.0)
    torch.testing.assert_close(mean, (p * r).sum(-1))
    torch.testing.assert_close(var, (p * (r - mean[:, None]) ** 2).sum(-1), atol=1e-5, rtol=1e-5)
    mean, var, _ = distribution_moments(torch.zeros(1, 10))
    assert mean.item() == pytest.approx(5.5) and var.item() == pytest.approx(8.25)


def test_ece_hand_values():
    conf = np.array([0.9, 0.9, 0.1, 0.1])
    outcome = np.array([1, 0, 0, 0])
    ece, table = expected_calibration_error(conf, outcome)
    # bin 9: conf .9, freq .5 -> |.4| * .5 ; bin 1: conf .1, freq 0 -> .1 * .5  => 0.25
    assert ece == pytest.approx(0.25) and [t["n"] for t in table] == [2, 2]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------
def test_conversation_ends_at_eos_and_prompt_is_cut_from_the_left():
    tok = tiny_tokenizer()
    text, prompt_chars = render_conversation(tok, USER, "It is 4.")
    assert text.endswith("It is 4.<|im_end|>") and text[:prompt_chars].endswith("<|im_start|>assistant\n")
    full = encode_conversations(tok, [USER], ["It is 4."], max_length=512)[0]
    assert full[-1] == tok.eos_token_id
    long_prompt = [{"role": "user", "content": "word " * 300}]
    ids = encode_conversations(tok, [long_prompt], ["It is 4."], max_length=64)[0]
    assert len(ids) == 64 and tok.decode(ids).endswith("assistant\nIt is 4.<|im_end|>")
    long_answer = encode_conversations(tok, [USER], ["four " * 300], max_length=64)[0]
    assert len(long_answer) == 64 and long_answer[-1] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------
# Training and scoring on the tiny model
# ---------------------------------------------------------------------------------------------
def _toy_data(tmp_path):
    """A learnable toy set: correct sums are chosen, wrong ones rejected (with ratings)."""
    from alignment.data import DataConfig, run_data_stage
    from tests.conftest import raw_row, write_jsonl

    rows = []
    for a in range(2, 42):
        rows.append(raw_row(f"What is {a} plus 1?", f"{a} plus 1 is {a + 1}.", 4, 4, 4, 2, 2))
        rows.append(raw_row(f"What is {a} plus 1?", "!!!!!!!!!!!!!!!!!!!!!!!!", 0, 0, 0, 0, 4))
    src = write_jsonl(tmp_path / "toy.jsonl", rows)
    return run_data_stage(DataConfig(source=str(src)), tmp_path / "data").out_dir


@pytest.mark.parametrize("kind", ["scalar", "distributional"])
def test_training_changes_parameters_lowers_loss_and_learns(tmp_path, tiny_model, kind):
    data = _toy_data(tmp_path)
    config = RewardModelConfig(kind=kind, model=str(tiny_model), data=str(data), max_length=96, epochs=3,
                               batch_size=8, learning_rate=2e-3, logging_steps=2, seed=0)
    result = run_reward_stage(config, tmp_path / "rm")
    m = result.summary
    assert m["train"]["final_loss"] < m["train"]["first_loss"]
    assert m["accuracy"] >= 0.9, m  # the toy signal is trivially learnable
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(result.out_dir / "model.safetensors")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["alignment_reward_kind"] == kind and len(cfg["id2label"]) == config.num_labels
    assert (result.out_dir / "reward_eval.png").stat().st_size > 1000
    if kind == "distributional":
        assert {"accuracy_prob", "ece", "kl_to_ratings", "nll_ratings"} <= set(m)
    # Same config again: reused, not retrained.
    assert run_reward_stage(config, tmp_path / "rm").reused


@pytest.fixture(scope="module")
def trained_scalar(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("scalar")
    config = RewardModelConfig(kind="scalar", model=str(tiny_model), data=str(_toy_data(tmp)), max_length=96,
                               epochs=1, batch_size=8, learning_rate=1e-3)
    return run_reward_stage(config, tmp / "rm").out_dir


def test_scorer_reads_the_last_real_token(trained_scalar):
    scorer = RewardScorer.from_pretrained(trained_scalar, batch_size=4, bf16=False)
    prompts = [USER, USER, [{"role": "user", "content": "Say hi"}]]
    completions = ["It is 4.", "It is 4. " + "Extra words here. " * 5, "hi"]
    together = scorer.score(prompts, completions).mean
    alone = torch.cat([scorer.score([p], [c]).mean for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # padding in the batch changes nothing
    # More right padding than needed gives the same score.
    ids = encode_conversations(scorer.tokenizer, [USER], ["It is 4."], 96)[0]
    pad = scorer.tokenizer.pad_token_id
    with torch.no_grad():
        a = scorer.model(input_ids=torch.tensor([ids])).logits
        b = scorer.model(input_ids=torch.tensor([ids + [pad] * 9]),
                         attention_mask=torch.tensor([[1] * len(ids) + [0] * 9])).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert scorer.score(prompts, completions).var.abs().sum() == 0


def test_k_samples_of_a_prompt_are_scored_on_one_prompt_pass(trained_scalar, monkeypatch):
    """The k completions of a prompt: its prompt runs once (cache expanded k times, the completions on
    top) and the scores equal scoring each conversation in full, padded in a batch; prompts seen once,
    and a lone prompt, go through the plain batches."""
    scorer = RewardScorer.from_pretrained(trained_scalar, batch_size=4, bf16=False)
    other = [{"role": "user", "content": "Say hi"}]
    prompts = [USER] * 3 + [other] * 2 + [[{"role": "user", "content": "Name a colour."}]]
    completions = ["It is 4.", "Four. " * 7, "4", "hi", "Hello there, friend!", "Blue."]
    calls = []
    original = RewardScorer._shared_prompt_logits
    monkeypatch.setattr(RewardScorer, "_shared_prompt_logits",
                        lambda self, ids, n: (calls.append(len(ids)), original(self, ids, n))[1])
    shared = scorer.logits(prompts, completions)
    assert sorted(calls) == [2, 3]
    ids = encode_conversations(scorer.tokenizer, prompts, completions, scorer.max_length)
    full = torch.empty_like(shared)
    scorer._batched_logits(ids, list(range(len(ids))), full, progress=False)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert shared[:3].std() > 0  # different completions, different scores


def test_a_saved_reward_model_carries_its_max_length(trained_scalar):
    """Trained at 96 tokens -> scored at 96 unless told otherwise; the cut is where training cut."""
    config = json.loads((trained_scalar / "config.json").read_text())
    assert config["alignment_max_length"] == 96 and config["alignment_reward_kind"] == "scalar"
    assert RewardScorer.from_pretrained(trained_scalar).max_length == 96
    assert RewardScorer.from_pretrained(trained_scalar, max_length=300).max_length == 300
    long_prompt = [{"role": "user", "content": "word " * 200}]
    scorer = RewardScorer.from_pretrained(trained_scalar, bf16=False)
    cut = encode_conversations(scorer.tokenizer, [long_prompt], ["It is 4."], 96)[0]
    assert len(cut) == 96
    with torch.no_grad():
        by_hand = scorer.model(input_ids=torch.tensor([cut])).logits[0, 0]
    assert scorer.score([long_prompt], ["It is 4."]).mean[0].item() == pytest.approx(by_hand.item(), abs=1e-5)
    # A folder from before the length was recorded falls back to 1024.
    del config["alignment_max_length"]
    (trained_scalar / "config.json").write_text(json.dumps(config))
    try:
        assert RewardScorer.from_pretrained(trained_scalar).max_length == 1024
    finally:
        config["alignment_max_length"] = 96
        (trained_scalar / "config.json").write_text(json.dumps(config))


def test_scorer_refuses_wrong_kind_and_mismatched_tokenizer(trained_scalar, tmp_path):
    with pytest.raises(RewardModelError, match="holds a scalar reward model, but a distributional one"):
        RewardScorer.from_pretrained(trained_scalar, expect_kind="distributional")
    other = tiny_tokenizer(vocab_size=500)
    with pytest.raises(RewardModelError, match="tokenizer does not match"):
        RewardScorer.from_pretrained(trained_scalar, tokenizer=other)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(RewardModelError, match="not a reward model written by this project"):
        RewardScorer.from_pretrained(tmp_path / "plain")


def test_bad_config_and_data_fail_clearly(tmp_path, tiny_model):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kind"):
        RewardModelConfig(kind="ordinal")
    with pytest.raises(RewardModelError, match="not a completed data stage output"):
        run_reward_stage(RewardModelConfig(model=str(tiny_model), data=str(tmp_path)), tmp_path / "rm")
    # Data without ratings cannot train the KL loss.
    from alignment.data import DataConfig, run_data_stage
    from tests.conftest import write_jsonl

    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    data = run_data_stage(DataConfig(source=str(write_jsonl(tmp_path / "p.jsonl", rows))), tmp_path / "d").out_dir
    cfg = RewardModelConfig(kind="distributional", loss="kl", model=str(tiny_model), data=str(data))
    with pytest.raises(RewardModelError, match="use loss=pairwise"):
        run_reward_stage(cfg, tmp_path / "rm2")
    assert not (tmp_path / "rm2").exists()


def test_lora_training_merges_into_a_plain_model(tmp_path, tiny_model):
    data = _toy_data(tmp_path)
    config = RewardModelConfig(kind="scalar", model=str(tiny_model), data=str(data), max_length=96, epochs=1,
                               batch_size=8, learning_rate=5e-3, lora=True, lora_r=4, lora_alpha=8)
    result = run_reward_stage(config, tmp_path / "rm")
    assert not any("lora" in k for k in load_file(result.out_dir / "model.safetensors"))
    scorer = RewardScorer.from_pretrained(result.out_dir, expect_kind="scalar")
    assert scorer.score([USER], ["It is 4."]).mean.shape == (1,)


def test_cli_rm_and_rm_eval(tmp_path, tiny_model, capsys):
    from cli.main import main

    data = _toy_data(tmp_path)
    out = tmp_path / "rm"
    assert main(["-q", "rm", "--kind", "distributional", "--data", str(data), "--model", str(tiny_model),
                 "--out", str(out), "max_length=96", "epochs=1", "learning_rate=1e-3", "loss=pairwise"]) == 0
    text = capsys.readouterr().out
    assert f"reward model trained: {out}" in text and "P(w > l) > 0.5" in text
    assert main(["rm-eval", str(out), "--data", str(data), "--split", "all", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["kind"] == "distributional" and metrics["n_pairs"] == 40


def test_cli_rm_rejects_unknown_kind(capsys):
    from cli.main import main

    with pytest.raises(SystemExit):
        main(["rm", "--kind", "ordinal"])
    assert "invalid choice: 'ordinal'" in capsys.readouterr().err
    assert main(["rm", "kind=ordinal"]) == 2
    assert "rm.kind: Input should be 'scalar' or 'distributional'" in capsys.readouterr().err
