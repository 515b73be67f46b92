"""Reward-model ensembles (`align rm ensemble=N`): members from seeds and bootstrap resamples, the ensemble
folder and its spread figures, reuse and resume, the `ensemble` component built from the folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignment.data import DataConfig, PairData, run_data_stage
from alignment.inputs import require_stage_output
from alignment.io import read_manifest, sha256_text
from alignment.rewards import EnsembleComponent, RewardComponentError, RewardModelComponent
from alignment.rewards.ensemble import member_configs, members_staging, train_reward_model
from alignment.rewards.model import (
    ENSEMBLE_STAGE,
    RewardModelConfig,
    RewardModelError,
    RewardScorer,
    plan_reward_model,
    reward_stage_key,
    training_pairs,
)
from tests.conftest import Interrupt

ROWS = [{"prompt": [{"role": "user", "content": "What is 2 plus 2?"}]},
        {"prompt": [{"role": "user", "content": "Write a short poem."}]},
        {"prompt": "Say hi."}]
TEXTS = ["It is 4.", "Roses are red.", "Hi!"]


def _config(tiny_model: Path, data: Path, **kw) -> RewardModelConfig:
    return RewardModelConfig(**{"model": str(tiny_model), "data": str(data), "max_length": 64, "max_train_pairs": 16,
                                "max_eval_pairs": 8, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3,
                                "bf16": False, "ensemble": 3, "checkpoint_every": 1, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return run_data_stage(DataConfig(), tmp_path_factory.mktemp("ens-data") / "data").out_dir


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tiny_model, data):
    out = tmp_path_factory.mktemp("ens") / "ens"
    config = _config(tiny_model, data)
    return config, train_reward_model(config, out)


def test_one_member_keeps_its_key_and_folder(tiny_model, data):
    single = _config(tiny_model, data, ensemble=1)
    cfg = single.model_dump(mode="json", exclude={"data", "checkpoint_every", "checkpoint_every_s", "ensemble",
                                                  "bootstrap", "data_seed", "resample"})
    files = json.dumps(read_manifest(data)["files"], sort_keys=True)
    assert reward_stage_key(single, data) == sha256_text(json.dumps(cfg, sort_keys=True) + files + "rm-schema=2")
    assert reward_stage_key(single.model_copy(update={"bootstrap": False}), data) == reward_stage_key(single, data)
    plan = plan_reward_model(single, "runs")
    assert plan.out.name.startswith("scalar-") and "ensemble" not in plan.out.name
    ens = plan_reward_model(_config(tiny_model, data), "runs")
    assert ens.out.name.startswith("scalar-ensemble3-") and ens.key != plan.key
    with pytest.raises(ValueError, match="set by the ensemble"):
        _config(tiny_model, data, resample=3)


def test_members_differ_in_seed_weights_and_bootstrap_subset(ensemble, data):
    config, result = ensemble
    out = result.out_dir
    members = member_configs(config)
    assert [m.seed for m in members] == [0, 1, 2] and [m.resample for m in members] == [0, 1, 2]
    subsets = []
    for i, member in enumerate(members):
        folder = out / f"member-{i}"
        # A complete reward-model folder of its own: `--rm MEMBER` works alone.
        manifest = require_stage_output(folder, "reward_model", RewardModelError, "--rm")
        assert manifest["stage_key"] == reward_stage_key(member, data)
        RewardScorer.from_pretrained(folder, device="cpu").score([ROWS[0]["prompt"]], TEXTS[:1])
        pairs = training_pairs(member, data)
        assert len(pairs) == 16
        subsets.append(sorted(zip(pairs.chosen, pairs.rejected, strict=True)))
    # Bootstrap: one shared 16-pair subset, resampled with replacement differently per member.
    base = training_pairs(config.model_copy(update={"ensemble": 1}), data)
    pool = set(zip(base.chosen, base.rejected, strict=True))
    assert all(set(s) <= pool for s in subsets)
    assert subsets[0] != subsets[1] != subsets[2] and any(len(set(s)) < 16 for s in subsets)
    weights = [load_file(out / f"member-{i}" / "model.safetensors") for i in range(3)]
    assert not torch.equal(weights[0]["score.weight"], weights[1]["score.weight"])
    assert not torch.equal(weights[1]["score.weight"], weights[2]["score.weight"])
    assert not members_staging(out).exists()  # the staging folder is gone once the ensemble is written


def test_ensemble_manifest_and_spread_figures(ensemble, data):
    config, result = ensemble
    out, m = result.out_dir, result.summary
    manifest = read_manifest(out)
    assert manifest["stage"] == ENSEMBLE_STAGE and manifest["stage_key"] == plan_reward_model(config).key
    require_stage_output(out, ENSEMBLE_STAGE, RewardModelError)  # complete, every listed file intact
    assert [e["folder"] for e in manifest["members"]] == ["member-0", "member-1", "member-2"]
    assert [e["stage_key"] for e in manifest["members"]] == [read_manifest(out / f"member-{i}")["stage_key"]
                                                             for i in range(3)]
    accs = [json.loads((out / f"member-{i}" / "metrics.json").read_text())["accuracy"] for i in range(3)]
    assert [e["accuracy"] for e in manifest["members"]] == accs
    assert manifest["aggregate"] == {"how": "mean", "k": 1.0}
    sp = m["spread"]
    assert sp["member_accuracy"] == accs
    assert sp["member_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert sp["member_accuracy_std"] == pytest.approx(np.std(accs))
    # The margin spread and the disagreement, by hand from the members scored one by one.
    val = PairData.load(data / "validation.parquet").head(8)
    margins = []
    for i in range(3):
        scorer = RewardScorer.from_pretrained(out / f"member-{i}", device="cpu")
        scorer.bf16 = False
        margins.append((scorer.score(val.prompts, val.chosen).mean - scorer.score(val.prompts, val.rejected).mean)
                       .numpy())
    margins = np.stack(margins)
    assert m["n_pairs"] == 8
    assert sp["margin_std_mean"] == pytest.approx(margins.std(0).mean(), rel=1e-4)
    signs = margins > 0
    assert sp["disagreement"] == pytest.approx(np.mean([len(set(col)) > 1 for col in signs.T]))
    assert sp["margin_std_mean"] > 0
    assert set(sp["ensemble_accuracy"]) == {"mean", "min", "mean_minus_std"}
    assert json.loads((out / "metrics.json").read_text())["spread"] == sp


def test_rerun_reuses_everything(ensemble):
    config, result = ensemble
    again = train_reward_model(config, result.out_dir)
    assert again.reused and again.summary == result.summary


def test_an_interrupted_member_resumes(tmp_path, tiny_model, data):
    config = _config(tiny_model, data, ensemble=2, batch_size=4)  # 4 steps per member
    out = tmp_path / "ens"
    calls: list[int] = []

    def interrupt_second_member(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 4 + 2:  # member 0 done (4 steps), member 1 cut in its step 2 (checkpoint-1 saved)
            raise Interrupt("interrupted")

    with pytest.raises(Interrupt):
        train_reward_model(config, out, progress=interrupt_second_member)
    staging = members_staging(out)
    assert not out.exists() and (staging / "member-0" / "manifest.json").is_file()
    assert not (staging / "member-1").exists() and (staging / ".member-1.checkpoints" / "checkpoint-1").is_dir()
    steps: list[int] = []
    # overwrite, as the Prefect task passes it for an incomplete folder: finished members are kept all the same.
    result = train_reward_model(config, out, overwrite=True, progress=lambda done, total: steps.append(done))
    assert steps == [2, 3, 4]  # member 0 reused, member 1 continued after its checkpoint-1
    assert read_manifest(out)["stage"] == ENSEMBLE_STAGE and not staging.exists()
    assert len(result.summary["members"]) == 2


def test_ensemble_component_from_the_folder_matches_hand_aggregation(ensemble):
    _, result = ensemble
    out = result.out_dir
    folders = [str(out / f"member-{i}") for i in range(3)]
    each = torch.stack([RewardScorer.from_pretrained(f, device="cpu", bf16=False).score(
        [r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}] for r in ROWS],
        TEXTS).mean for f in folders]).numpy().astype(np.float64)
    hand = {"mean": each.mean(0), "min": each.min(0), "mean_minus_std": each.mean(0) - 0.5 * each.std(0)}
    for how, expected in hand.items():
        ens = EnsembleComponent({"kind": "ensemble", "folder": str(out), "aggregate": how, "k": 0.5})
        ens.setup("cpu", bf16=False)
        assert ens.member_folders() == folders
        assert ens.score(ROWS, TEXTS).values == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
        listed = EnsembleComponent({"kind": "ensemble", "members": folders, "aggregate": how, "k": 0.5})
        assert ens.key() == listed.key()  # the folder or its members listed: one key
    default = EnsembleComponent({"kind": "ensemble", "folder": str(out)})
    assert default.aggregate() == "mean"
    assert default.key() == EnsembleComponent({"kind": "ensemble", "members": folders}).key()


def test_an_ensemble_folder_where_one_reward_model_is_expected_points_at_kind_ensemble(ensemble):
    out = ensemble[1].out_dir
    with pytest.raises(RewardComponentError, match=r"reward-model ensemble.*kind: ensemble, folder"):
        RewardModelComponent({"kind": "reward_model", "folder": str(out)}).check()
    with pytest.raises(RewardModelError, match=r"kind: ensemble"):
        RewardScorer.from_pretrained(out)
    with pytest.raises(RewardModelError, match=r"says stage 'reward_model_ensemble'.*kind: ensemble"):
        require_stage_output(out, "reward_model", RewardModelError, "reward_model (--rm)")
    with pytest.raises(RewardComponentError, match="one reward model, not an ensemble.*kind: reward_model"):
        EnsembleComponent({"kind": "ensemble", "folder": str(out / "member-0")}).check()
    with pytest.raises(RewardComponentError, match="either folder .* or members"):
        EnsembleComponent({"kind": "ensemble", "folder": str(out), "members": ["a", "b"]})


def test_cli_rm_ensemble_prints_members_and_spread(tmp_path, tiny_model, data, capsys):
    from cli.main import main

    out = tmp_path / "ens"
    assert main(["-q", "rm", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "ensemble=2",
                 "max_length=64", "max_train_pairs=16", "max_eval_pairs=8", "epochs=1", "bf16=false"]) == 0
    text = capsys.readouterr().out
    assert f"reward-model ensemble trained: {out}" in text
    assert "member-0: seed 0, validation accuracy" in text and "member-1: seed 1, validation accuracy" in text
    assert "members' accuracy: mean" in text and "margin std across members" in text and "disagree on" in text
    assert main(["-q", "rm", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "ensemble=2",
                 "max_length=64", "max_train_pairs=16", "max_eval_pairs=8", "epochs=1", "bf16=false"]) == 0
    assert f"reward-model ensemble reused: {out}" in capsys.readouterr().out
