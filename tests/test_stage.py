"""The stage contract (folders, completeness, the other-config guard), the one preset table, and the
rollout module's small pieces."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.generation import Rollout, SamplingConfig, completion_mask, pad_completions
from alignment.io import atomic_directory, sha256_file, write_json
from alignment.presets import PRESETS, SECTIONS, pipeline_preset, stage_preset
from alignment.stage import claim_output, complete_manifest, reuse_or_guard, stage_folder


class Refused(ValueError):
    pass


def _finished(folder, key):
    with atomic_directory(folder) as tmp:
        (tmp / "out.txt").write_text("result")
        write_json(tmp / "manifest.json", {"stage_key": key, "files": {"out.txt": {"sha256": sha256_file(tmp / "out.txt")}}})


def test_stage_folder_rule():
    assert str(stage_folder("runs", "score", "abcdef0123456789")) == "runs/score/abcdef012345"
    assert str(stage_folder("r", "rm", "abcdef0123456789", "scalar")) == "r/rm/scalar-abcdef012345"


def test_complete_reused_other_config_refused_overwrite_allowed(tmp_path):
    out = tmp_path / "out"
    assert reuse_or_guard(out, "k1", Refused) is None  # nothing there yet
    _finished(out, "k1")
    assert complete_manifest(out, "k1")["stage_key"] == "k1"
    assert reuse_or_guard(out, "k1", Refused)["stage_key"] == "k1"
    with pytest.raises(Refused, match="already holds a different output of this stage .*--overwrite"):
        reuse_or_guard(out, "k2", Refused)
    assert reuse_or_guard(out, "k2", Refused, overwrite=True) is None
    (out / "out.txt").write_text("tampered")  # listed file changed: not complete, and not reusable
    assert complete_manifest(out, "k1") is None
    with pytest.raises(Refused, match="not a complete output"):
        reuse_or_guard(out, "k1", Refused)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("?")
    for overwrite in (False, True):  # never removed, with or without overwrite
        with pytest.raises(Refused, match=r"holds files this project did not write \(x\)"):
            reuse_or_guard(tmp_path / "junk", "k1", Refused, overwrite=overwrite)


def test_resumable_stage_continues_its_own_run_and_refuses_another(tmp_path):
    out = tmp_path / "run"
    claim_output(out, "k1", {"steps": 3}, stage="judge", model_a="tuned")
    assert json.loads((out / "run.json").read_text()) == {"stage": "judge", "stage_key": "k1", "config": {"steps": 3},
                                                          "model_a": "tuned"}
    (out / "checkpoints").mkdir()
    assert reuse_or_guard(out, "k1", Refused, resumable=True, done=out / "final") is None  # continue
    with pytest.raises(Refused, match="different config") as err:
        reuse_or_guard(out, "k2", Refused, resumable=True, done=out / "final")
    assert "--overwrite" not in str(err.value)
    _finished(out / "final", "k1")
    assert reuse_or_guard(out, "k1", Refused, resumable=True, done=out / "final")["stage_key"] == "k1"


def test_stages_default_to_the_folder_their_plan_names(tmp_path, tiny_stack):
    from alignment.data import DataConfig, plan_data, run_data_stage
    from alignment.rewards.model import RewardModelConfig, plan_reward_model

    data = run_data_stage(DataConfig(), runs_root=tmp_path)
    assert data.out_dir == plan_data(DataConfig(), tmp_path).out and data.out_dir.parent == tmp_path / "data"
    _, rm, data_dir = tiny_stack
    config = RewardModelConfig(**json.loads((rm / "manifest.json").read_text())["config"])
    plan = plan_reward_model(config, tmp_path)
    assert plan.key == json.loads((rm / "manifest.json").read_text())["stage_key"]
    assert plan.out == tmp_path / "rm" / f"scalar-{plan.key[:12]}"


def test_one_preset_table():
    assert set(PRESETS) == {"demo", "demo-verifiable", "demo-rounds", "demo-rlvr", "helpsteer2", "tldr"}
    for name in PRESETS:
        row = pipeline_preset(name)
        assert set(row) <= set(SECTIONS)
        for section in SECTIONS:
            assert stage_preset(name, section) == row.get(section, {})
    # The demo reward models: the stage preset is the pipeline's section (they once drifted: epochs 2 vs 1).
    assert stage_preset("demo", "rm_scalar")["epochs"] == 1.0
    pipeline_preset("demo")["rm_scalar"]["epochs"] = 99  # a copy: the table itself does not change
    assert stage_preset("demo", "rm_scalar")["epochs"] == 1.0
    with pytest.raises(ValueError, match="unknown preset"):
        pipeline_preset("nope")


def test_cli_stage_preset_equals_the_pipeline_section(capsys):
    from alignment.pipeline import PipelineConfig
    from cli.main import main

    pipeline = PipelineConfig(**PipelineConfig.preset("demo"))
    for argv, section in ((["rm", "--preset", "demo"], "rm_scalar"),
                          (["rm", "--preset", "demo", "--kind", "distributional"], "rm_distributional"),
                          (["reinforce", "--preset", "demo"], "reinforce"), (["score", "--preset", "demo"], "score"),
                          (["judge", "--preset", "demo"], "judge"), (["data", "--preset", "demo"], "data")):
        assert main(["-q", *argv, "--print-config"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == getattr(pipeline, section).model_dump(mode="json"), section


def test_sampling_config_kwargs():
    assert SamplingConfig(greedy=True).generate_kwargs() == {"do_sample": False}
    assert SamplingConfig(temperature=0.7, top_p=0.9).generate_kwargs() == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": None}
    assert SamplingConfig(top_k=5).generate_kwargs()["top_k"] == 5


def test_pad_completions_and_rollout_views():
    ids, mask = pad_completions([[5, 6, 2], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6, 2], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_completions([[]], pad_id=0)
    assert ids.shape == (1, 1) and mask.sum() == 0
    completion = torch.tensor([[5, 2, 9], [6, 7, 8]])
    m = completion_mask(completion, 2)
    ro = Rollout([[]] * 2, torch.tensor([[0, 3], [4, 3]]), torch.tensor([[0, 1], [1, 1]]), completion, m,
                 torch.tensor([True, False]), [[5, 2], [6, 7, 8]], ["a", "b"])
    assert ro.prompt_width == 2 and ro.lengths.tolist() == [2, 3]
    assert ro.input_ids.tolist() == [[0, 3, 5, 2, 9], [4, 3, 6, 7, 8]]
    assert ro.attention_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.slow
def test_demo_reward_models_hold_every_demo_prompt_with_its_scored_answer(tmp_path):
    """The demo row's reward models are cut at 144 tokens for speed: every demo prompt (chat template
    included) with the longest answer the pipeline later scores must still be encoded uncut."""
    from alignment.data import DataConfig, PairData, run_data_stage
    from alignment.models import load_tokenizer, resolve_model
    from alignment.rewards.model import encode_conversations

    row = pipeline_preset("demo")
    tok = load_tokenizer(resolve_model())
    data = run_data_stage(DataConfig(**row["data"]), tmp_path / "data").out_dir
    longest = max(row["score"]["max_new_tokens"], row["reinforce"]["max_new_tokens"])
    answer = " one" * longest
    assert len(tok(answer, add_special_tokens=False)["input_ids"]) == longest
    prompts = [p for split in ("train", "validation") for p in PairData.load(data / f"{split}.parquet").unique_prompts()]
    uncut = encode_conversations(tok, prompts, [answer] * len(prompts), 4096)
    for section in ("rm_scalar", "rm_distributional"):
        assert encode_conversations(tok, prompts, [answer] * len(prompts), row[section]["max_length"]) == uncut
