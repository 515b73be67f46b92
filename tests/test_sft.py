"""Summarisation SFT: the summary loaders (shared TL;DR file, malformed rows), ROUGE by hand, the
completion-only loss mask, and the stage on the tiny model (learns, resumes after an interruption)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.algorithms.sft import SFTConfig, run_sft_stage, training_records
from alignment.data import BadRowsError, DataError, read_summaries
from alignment.evaluation.evaluate import paired_rouge_gain, rouge_scores, rouge_summary
from tests.conftest import write_jsonl


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
def test_shared_tldr_summaries_load_and_split_by_post(shared_data):
    path = shared_data / "tldr-rlaif" / "summaries.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    data = read_summaries(str(path))
    assert len(data) == 1745 and all(p.endswith("TL;DR:") for p in data.prompts)
    assert all(r and o for r, o in zip(data.references, data.policy_summaries, strict=True))
    train, held = data.split(64, seed=0)
    assert len(held) == 64 and len(train) == 1745 - 64 and not set(train.ids) & set(held.ids)
    assert data.split(64, seed=0)[1].ids == held.ids  # seeded


def test_the_ai_judged_tldr_pairs_go_through_the_data_stage(shared_data, tmp_path):
    """pairs.jsonl (prompt text, chosen, rejected, explanation) is a pairs source of the data stage."""
    from alignment.data import DataConfig, PairData, run_data_stage

    path = shared_data / "tldr-rlaif" / "pairs.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    result = run_data_stage(DataConfig(source=str(path)), tmp_path / "data")
    train = PairData.load(tmp_path / "data" / "train.parquet")
    val = PairData.load(tmp_path / "data" / "validation.parquet")
    assert len(train) + len(val) == 800 and result.summary
    assert train.prompts[0][-1]["content"].endswith("TL;DR:")


_TLDR = re.compile(r"SUBREDDIT: r/(.*?)\n\nTITLE: (.*?)\n\nPOST: (.*)\n\nTL;DR:$", re.S)


def _comparison(prompt: str, summaries: list[str], choice: int) -> dict:
    """A row of the hub's openai/summarize_from_feedback 'comparisons' (its field names and nesting)."""
    subreddit, title, post = _TLDR.match(prompt).groups()
    return {"info": {"id": "t3_x", "post": post, "title": title, "subreddit": subreddit, "site": None, "article": None},
            "summaries": [{"text": " " + t, "policy": f"policy-{i}", "note": None} for i, t in enumerate(summaries)],
            "choice": choice, "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 7}}


def test_summarize_from_feedback_comparisons_read_as_the_same_pairs(shared_data, tmp_path):
    """The 800 AI-judged pairs rebuilt in the hub's nested comparisons form (info / summaries / choice),
    as JSON Lines and as parquet with nested columns: the data stage reads them into exactly the pairs
    that pairs.jsonl gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignment.data import DataConfig, PairData, run_data_stage

    folder = shared_data / "tldr-rlaif"
    if not (folder / "pairs.jsonl").is_file():
        pytest.skip(f"{folder} is absent")
    posts = {r["id"]: r for r in map(json.loads, (folder / "summaries.jsonl").read_text().splitlines())}
    rows = []
    for pair in map(json.loads, (folder / "pairs.jsonl").read_text().splitlines()):
        post = posts[pair["id"]]
        choice = 0 if pair["chosen"] == post["reference"] else 1
        rows.append(_comparison(post["prompt"], [post["reference"], post["policy_summary"]], choice))
    write_jsonl(tmp_path / "comparisons.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "comparisons.parquet")

    def pairs(source: Path, name: str) -> set:
        result = run_data_stage(DataConfig(source=str(source)), tmp_path / f"out-{name}")  # not the input itself
        data = PairData.concat([PairData.load(result.out_dir / f) for f in ("train.parquet", "validation.parquet")])
        return result.summary["format"], {(json.dumps(p), c, r) for p, c, r in
                                          zip(data.prompts, data.chosen, data.rejected, strict=True)}

    fmt, want = pairs(folder / "pairs.jsonl", "pairs")
    assert fmt == "pairs" and len(want) == 800
    for name in ("comparisons.jsonl", "comparisons.parquet"):
        fmt, got = pairs(tmp_path / name, name)
        assert fmt == "comparisons" and got == want, name


def test_malformed_comparisons_are_named_by_row_and_field(tmp_path):
    good = _comparison("SUBREDDIT: r/food\n\nTITLE: Figs\n\nPOST: I ate figs.\n\nTL;DR:", ["ate figs", "figs"], 1)
    rows = [json.loads(json.dumps(good)) for _ in range(6)]
    rows[1]["choice"] = 2
    rows[2]["summaries"] = rows[2]["summaries"][:1]
    rows[3]["summaries"][1]["text"] = None
    rows[4]["info"]["post"] = None
    rows[5]["info"] = {"title": "News", "article": "The river rose.", "post": None}  # a CNN/DM row: read
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    from alignment.data import DataConfig, run_data_stage

    with pytest.raises(BadRowsError) as err:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "data")
    text = str(err.value)
    assert "row 2, field 'choice': expected 0 or 1" in text
    assert "row 3, field 'summaries': expected a list of two summaries, got 1 item(s)" in text
    assert "row 4, field 'summaries[1].text': missing value" in text
    assert "row 5, field 'info.post': missing value" in text and "row 6" not in text
    assert not (tmp_path / "data").exists()


def test_repeated_judgments_of_a_pair_are_merged_by_majority_vote(tmp_path):
    """Several workers judged the same two summaries: one pair, chosen by the majority (in either order of
    the summaries); an even split is a tie, dropped and counted. Not errors: repeats are votes."""
    from alignment.data import DataConfig, parse_source, read_source

    post = "SUBREDDIT: r/food\n\nTITLE: Figs\n\nPOST: I ate figs.\n\nTL;DR:"
    other = "SUBREDDIT: r/food\n\nTITLE: Plums\n\nPOST: I ate plums.\n\nTL;DR:"
    rows = [_comparison(post, ["ate figs", "figs"], 0), _comparison(post, ["figs", "ate figs"], 1),  # 'ate figs'
            _comparison(post, ["ate figs", "figs"], 1),                                              # 2 : 1
            _comparison(other, ["ate plums", "plums"], 0), _comparison(other, ["ate plums", "plums"], 1),  # 1 : 1
            _comparison(other, ["plums!", "plums"], 1)]
    config = DataConfig(source=str(write_jsonl(tmp_path / "votes.jsonl", rows)))
    parsed = parse_source(read_source(config), config)
    assert not parsed.issues and parsed.stats.n_ties_dropped == 1 and parsed.stats.n_pairs == 2
    figs, plums = parsed.pairs
    assert (figs.chosen, figs.rejected, figs.source_rows) == ("ate figs", "figs", (1, 2, 3))
    assert (plums.chosen, plums.rejected, plums.source_rows) == ("plums", "plums!", (6,))


def test_the_hub_comparisons_are_read_from_their_configuration(tmp_path, monkeypatch):
    """openai/summarize_from_feedback is read from its 'comparisons' configuration (the datasets call is
    faked: the hub is out of reach here); offline it is one clear error."""
    import datasets

    import alignment.data as D

    rows = [_comparison(f"SUBREDDIT: r/food\n\nTITLE: Figs {i}\n\nPOST: I ate {i} figs.\n\nTL;DR:",
                        [f"ate {i} figs", "figs"], i % 2) for i in range(10)]
    calls = []

    def load_dataset(repo_id, name=None, split=None):
        calls.append((repo_id, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(D, "hub_status", lambda: (True, ""))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = D.read_source(D.DataConfig(source="openai/summarize_from_feedback", split="validation"))
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation")]
    assert source.name == "openai/summarize_from_feedback/comparisons[validation]"
    parsed = D.parse_source(source, D.DataConfig(source="openai/summarize_from_feedback"))
    assert parsed.format == "comparisons" and len(parsed.pairs) == 10 and not parsed.issues
    assert parsed.pairs[1].chosen == "figs" and parsed.pairs[1].rejected == "ate 1 figs"
    assert parsed.pairs[0].prompt == [{"role": "user",
                                       "content": "SUBREDDIT: r/food\n\nTITLE: Figs 0\n\nPOST: I ate 0 figs.\n\nTL;DR:"}]
    monkeypatch.setattr(D, "hub_status", lambda: (False, "huggingface.co unreachable"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub to load dataset 'openai/summarize_from"):
        D.read_source(D.DataConfig(source="openai/summarize_from_feedback"))


def _rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        fruit = ["apples", "pears", "plums", "figs"][i % 4]
        rows.append({"id": i, "prompt": f"SUBREDDIT: r/food\n\nTITLE: About {fruit} {i}\n\nPOST: I bought {i} {fruit} "
                     f"at the market today and ate them all.\n\nTL;DR:", "reference": f"I ate {i} {fruit}.",
                     "policy_summary": f"Bought {fruit}."})
    return rows


def test_malformed_summary_rows_are_named_and_can_be_skipped(tmp_path):
    rows = _rows(6)
    rows[1]["reference"] = None
    rows[3]["prompt"] = 42
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with path.open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(BadRowsError) as err:
        read_summaries(str(path))
    text = str(err.value)
    assert "row 2, field 'reference': missing value" in text and "row 4, field 'prompt': expected text" in text
    assert "row 7: invalid JSON" in text
    assert len(read_summaries(str(path), on_bad_rows="skip")) == 4
    bad = write_jsonl(tmp_path / "b.jsonl", [{"post": "x", "summary_text": "y"}])
    with pytest.raises(DataError, match="no reference column .*it has: post, summary_text"):
        read_summaries(str(bad))


def test_hub_form_columns_and_an_unreachable_hub(tmp_path, monkeypatch):
    """CarperAI/openai_summarize_tldr's columns (prompt, label) read by the same code; the hub id itself
    offline is one clear error."""
    path = write_jsonl(tmp_path / "carper.jsonl", [{"prompt": "POST: hi\n\nTL;DR:", "label": "hello"}] * 3)
    data = read_summaries(str(path))
    assert data.references == ["hello"] * 3 and data.policy_summaries == [None] * 3 and data.ids == ["1", "2", "3"]
    import alignment.data as D

    monkeypatch.setattr(D, "hub_status", lambda: (False, "huggingface.co unreachable"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub to load dataset 'CarperAI/openai_summ") as err:
        read_summaries("CarperAI/openai_summarize_tldr")
    assert "a local summaries file with --source (e.g. ../shared/data/tldr-rlaif/summaries.jsonl; in a pipeline " \
           "sft.source=FILE)" in str(err.value)


# ---------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------
def test_rouge_hand_values():
    s = rouge_scores(["the cat sat on the mat", "running dogs", "nothing alike"],
                     ["the cat is on the mat", "the dog runs", "completely different words"])
    # 1: unigrams 5 of 6 shared -> F 5/6; bigrams the-cat, on-the, the-mat of 5 each -> 3/5; LCS 5 -> 5/6
    assert s["rouge1"][0] == pytest.approx(5 / 6) and s["rouge2"][0] == pytest.approx(3 / 5)
    assert s["rougeL"][0] == pytest.approx(5 / 6)
    # 2: stemmed: run, dog | the, dog, run -> P 2/2, R 2/3, F 0.8; bigram "run dog" vs "dog run": 0
    assert s["rouge1"][1] == pytest.approx(0.8) and s["rouge2"][1] == 0.0
    assert s["rouge1"][2] == 0.0
    summary = rouge_summary(s)
    assert summary["rouge1"]["mean"] == pytest.approx((5 / 6 + 0.8) / 3) and summary["rouge1"]["n"] == 3
    low, high = summary["rouge1"]["ci95"]
    assert 0.0 <= low <= summary["rouge1"]["mean"] <= high <= 5 / 6
    gain = paired_rouge_gain(s, rouge_scores(["x", "y", "z"], ["the cat is on the mat", "the dog runs", "a b"]))
    assert gain["rouge1"]["mean"] == pytest.approx((5 / 6 + 0.8) / 3)


# ---------------------------------------------------------------------------------------------
# The loss mask and the stage on the tiny model
# ---------------------------------------------------------------------------------------------
def _config(tmp_path: Path, tiny_model: Path, **kw) -> SFTConfig:
    source = write_jsonl(tmp_path / "summaries.jsonl", _rows())
    base = dict(policy=str(tiny_model), source=str(source), eval_posts=8, max_prompt_length=64,
                max_completion_length=16, max_new_tokens=8, epochs=2, batch_size=4, learning_rate=3e-3,
                logging_steps=1, bf16=False, seed=0, checkpoint_every=4)
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_the_loss_covers_the_summary_and_eos_only(tmp_path, tiny_model, prompt_format):
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from alignment.models import load_causal_lm

    config = _config(tmp_path, tiny_model, prompt_format=prompt_format)
    model, tok = load_causal_lm(str(tiny_model), padding_side="left")
    data = read_summaries(config.source)
    records = training_records(data.subset([0, 1]), tok, config)
    trainer = SFTTrainer(model=model, args=TRLSFTConfig(output_dir=str(tmp_path / "t"), completion_only_loss=True,
                                                        report_to=[], use_cpu=True, max_length=256),
                         train_dataset=Dataset.from_list(records), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = ids[labels != -100].tolist()
        text = tok.decode(trained)
        # the summary, then EOS (the chat template adds its newline after <|im_end|>)
        assert text.strip().startswith(f"I ate {row}") and tok.eos_token_id in trained[-2:], text
        assert "TL;DR" not in text and "SUBREDDIT" not in text  # the prompt is never a target


def test_sft_learns_the_summaries_and_reports_rouge(tmp_path, tiny_model):
    config = _config(tmp_path, tiny_model)
    result = run_sft_stage(config, tmp_path / "sft")
    m = result.summary
    assert m["posts"] == {"train": 32, "held_out": 8}
    assert m["train"]["final_loss"] < m["train"]["first_loss"]
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(result.out_dir / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    for key in ("rouge_before", "rouge_after"):
        assert set(m[key]) == {"rouge1", "rouge2", "rougeL"} and m[key]["rougeL"]["n"] == 8
    assert m["rouge_after"]["rouge1"]["mean"] > m["rouge_before"]["rouge1"]["mean"]  # the toy pattern is learnt
    assert m["rouge_source_summaries"]["rouge1"]["mean"] > 0 and m["lengths"]["reference"]["mean_words"] == 4
    samples = [json.loads(line) for line in (result.out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(math.isfinite(s["rougeL_after"]) for s in samples)
    assert run_sft_stage(config, tmp_path / "sft").reused


def test_sft_resumes_after_an_interruption_with_the_uninterrupted_result(tmp_path, tiny_model):
    config = _config(tmp_path, tiny_model)
    straight = run_sft_stage(config, tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def stop_at_step_6(done, total):
        if done == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sft_stage(config, tmp_path / "sft", progress=stop_at_step_6)
    assert not (tmp_path / "sft").exists()
    steps: list[int] = []
    resumed = run_sft_stage(config, tmp_path / "sft", progress=lambda done, total: steps.append(done))
    assert steps[0] == 5  # after checkpoint-4
    a, b = load_file(straight.out_dir / "model.safetensors"), load_file(resumed.out_dir / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.summary["rouge_after"] == straight.summary["rouge_after"]


def test_sft_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, tiny_model):
    """`align sft` in a subprocess killed with SIGKILL mid-training (after a sealed checkpoint): no output
    folder is left half-written, and the same command resumes after the newest intact checkpoint and ends
    with the weights and ROUGE of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from alignment.checkpoints import checkpoint_folder, checkpoint_problem

    root = Path(__file__).resolve().parents[1]
    config = _config(tmp_path, tiny_model, epochs=12, checkpoint_every=4)  # 96 steps
    straight = run_sft_stage(config, tmp_path / "straight")
    out = tmp_path / "killed"
    overrides = [f"{k}={v}" for k, v in config.model_dump(exclude={"section", "policy", "source"}).items()
                 if v is not None]
    argv = [sys.executable, "-m", "cli", "-q", "sft", "--policy", config.policy, "--source", config.source,
            "--out", str(out), *overrides]
    proc = subprocess.Popen(argv, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    checkpoints = checkpoint_folder(out)
    try:
        deadline = time.time() + 180
        while not list(checkpoints.glob("checkpoint-8/sealed.json")):
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no checkpoint in 180 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    intact = [int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*") if checkpoint_problem(c) is None]
    assert 8 <= max(intact) < 96
    steps: list[int] = []
    resumed = run_sft_stage(config, out, progress=lambda done, total: steps.append(done))
    assert steps[0] == max(intact) + 1 and steps[-1] == 96
    a, b = load_file(straight.out_dir / "model.safetensors"), load_file(resumed.out_dir / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.summary["rouge_after"] == straight.summary["rouge_after"] and not checkpoints.exists()


def test_sft_in_the_pipeline_is_where_rl_starts_and_what_scoring_compares_with(tmp_path, tiny_model):
    """options.sft: SFT runs after the data stage; REINFORCE's policy and the scoring's base are its output."""
    from alignment.algorithms.sft import plan_sft
    from alignment.pipeline import pipeline_stages, plan_pipeline
    from tests.conftest import tiny_pipeline_config

    sft = _config(tmp_path, tiny_model)
    config = tiny_pipeline_config(tiny_model, tmp_path / "runs", sft=sft)
    config = config.model_copy(update={"options": config.options.model_copy(update={"sft": True})})
    assert pipeline_stages(config.options)[:2] == ["data", "sft"]
    stages = plan_pipeline(config)
    sft_out = str(plan_sft(sft, config.options.runs_dir).done)
    assert str(stages["sft"][1].out) == sft_out
    assert stages["reinforce"][0].policy == sft_out
    assert stages["score"][0].models == {"base": sft_out, "tuned": str(stages["reinforce"][1].done)}
    # without it, RL starts from the configured policy, as before
    plain = plan_pipeline(config.model_copy(update={"options": config.options.model_copy(update={"sft": False})}))
    assert "sft" not in plain and plain["reinforce"][0].policy == str(tiny_model)


def test_scoring_adds_rouge_where_a_scored_prompt_has_a_reference(tmp_path, eval_stack):
    """rouge_references: prompts that are posts of the summaries source get ROUGE per model and the paired
    gain against the reference model; the other prompts are left out of ROUGE (not of the rewards)."""
    from alignment.data import PairData
    from alignment.evaluation.evaluate import ScoreConfig, rouge_scores, run_score_stage

    prompts = [item.messages[-1]["content"] for item in
               PairData.load(eval_stack["data"] / "validation.parquet").prompt_items()]
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": p, "reference": "the answer is four"}
                                                 for p in prompts[::2]])  # every other prompt has a reference
    config = ScoreConfig(models={"base": str(eval_stack["base"]), "tuned": str(eval_stack["tuned"])},
                         reward_models={"scalar": str(eval_stack["rm"])}, data=str(eval_stack["data"]), n_prompts=12,
                         max_new_tokens=8, bootstrap=200, bf16=False, rouge_references=str(refs))
    result = run_score_stage(config, tmp_path / "scores")
    models = result.summary["models"]
    gens = {name: [json.loads(line) for line in (tmp_path / "scores" / "generations" / f"{name}.jsonl")
                   .read_text().splitlines()] for name in models}
    with_ref = [i for i, row in enumerate(gens["base"]) if row["prompt"][-1]["content"] in set(prompts[::2])]
    assert 0 < len(with_ref) < 12 and models["base"]["rouge"]["rouge1"]["n"] == len(with_ref)
    expected = rouge_scores([gens["tuned"][i]["completion"] for i in with_ref], ["the answer is four"] * len(with_ref))
    assert models["tuned"]["rouge"]["rougeL"]["mean"] == pytest.approx(float(expected["rougeL"].mean()))
    assert "rouge_gain" in models["tuned"] and "rouge_gain" not in models["base"]
    assert "ROUGE (F) against the reference summaries" in (tmp_path / "scores" / "scores.md").read_text()
