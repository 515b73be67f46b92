"""Input folders are checked before any model loads: a data folder must be a complete, intact data-stage
output, a reward model a complete reward-model output, a policy a loadable model folder (or hub id, .gguf);
each problem is one line naming the folder (exit code 2 on the CLI), and nothing is loaded or written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignment.inputs import model_source_problem, require_stage_output, stage_output_problem
from alignment.io import sha256_file, write_json


class Refused(ValueError):
    pass


@pytest.fixture
def no_models(monkeypatch) -> list[str]:
    """Make every way a stage loads a model raise (and record it): the checks must come first."""
    import transformers

    import alignment.algorithms.online
    import alignment.evaluation.evaluate
    import alignment.models
    import alignment.rewards.model

    loaded: list[str] = []

    def refuse(what: str):
        def load(*args, **kwargs):
            loaded.append(what)
            raise AssertionError(f"{what} was called before the inputs were checked")
        return load

    for module in (alignment.models, alignment.algorithms.online, alignment.evaluation.evaluate):
        monkeypatch.setattr(module, "load_causal_lm", refuse("load_causal_lm"))
    monkeypatch.setattr(alignment.models, "load_sequence_classifier", refuse("load_sequence_classifier"))
    monkeypatch.setattr(alignment.rewards.model, "load_sequence_classifier", refuse("load_sequence_classifier"))
    monkeypatch.setattr(alignment.rewards.model.RewardScorer, "from_pretrained", refuse("RewardScorer.from_pretrained"))
    monkeypatch.setattr(alignment.evaluation.evaluate, "generate_answers", refuse("generate_answers"))
    for cls in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse(f"{cls}.from_pretrained"))
    return loaded


def _copy(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    write_json(folder / "manifest.json", manifest)


# ---------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------
def test_a_complete_data_folder_passes_and_each_problem_is_named(tmp_path, tiny_stack):
    policy, rm, data = tiny_stack
    assert require_stage_output(data, "data", Refused)["stage"] == "data"
    assert stage_output_problem(rm, "reward_model")[0] is None

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {"missing": (tmp_path / "missing", "it does not exist"),
             "file": (tmp_path / "a-file", "it is a file, not a folder"),
             "empty": (tmp_path / "empty", "it has no manifest.json"),
             "rm": (rm, "its manifest.json says stage 'reward_model', not 'data'"),
             "policy": (policy, "it has no manifest.json")}
    altered = _copy(data, tmp_path / "altered")
    with open(altered / "train.parquet", "ab") as fh:
        fh.write(b"\0")
    cases["altered"] = (altered, "train.parquet changed since the stage wrote it")
    gone = _copy(data, tmp_path / "gone")
    (gone / "validation.parquet").unlink()
    cases["gone"] = (gone, "validation.parquet (listed in its manifest.json) is missing")
    wrong_hash = _copy(data, tmp_path / "wrong-hash")  # a hand-edited manifest: one file's hash changed
    _edit_manifest(wrong_hash, lambda m: m["files"]["validation.parquet"].update(sha256="0" * 64))
    cases["wrong-hash"] = (wrong_hash, "validation.parquet changed since the stage wrote it")
    relabelled = _copy(rm, tmp_path / "relabelled")  # a reward model whose manifest was edited to say "data"
    _edit_manifest(relabelled, lambda m: m.update(stage="data"))
    cases["relabelled"] = (relabelled, "does not list train.parquet")
    restaged = _copy(data, tmp_path / "restaged")  # a data folder whose manifest was edited to another stage
    _edit_manifest(restaged, lambda m: m.update(stage="score"))
    cases["restaged"] = (restaged, "says stage 'score'")
    unlisted = _copy(data, tmp_path / "unlisted")
    _edit_manifest(unlisted, lambda m: m["files"].pop("train.parquet"))
    cases["unlisted"] = (unlisted, "does not list train.parquet")
    escaping = _copy(data, tmp_path / "escaping")
    _edit_manifest(escaping, lambda m: m["files"].update({"../a-file": {"sha256": sha256_file(tmp_path / "a-file")}}))
    cases["escaping"] = (escaping, "outside the folder")

    for name, (folder, problem) in cases.items():
        with pytest.raises(Refused) as err:
            require_stage_output(folder, "data", Refused, "data (--data)")
        message = str(err.value)
        assert message.startswith(f"data (--data) {folder} is not a completed data stage output"), (name, message)
        assert problem in message and "\n" not in message, (name, message)
    with pytest.raises(Refused, match="no folder given"):
        require_stage_output(None, "data", Refused)


def test_policy_sources_are_checked_without_loading(tmp_path, tiny_stack):
    policy, rm, data = tiny_stack
    assert model_source_problem(str(policy)) is None
    assert model_source_problem("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id: the loader's business
    assert "reward model" in model_source_problem(str(rm))
    assert "no config.json" in model_source_problem(str(data))
    assert "no such file or folder" in model_source_problem(str(tmp_path / "nope"))
    (tmp_path / "weights.txt").write_text("x")
    assert "not a .gguf" in model_source_problem(str(tmp_path / "weights.txt"))
    run = tmp_path / "run"
    _copy(policy, run / "final")
    assert "its policy is in final/" in model_source_problem(str(run))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(policy / "config.json", bare / "config.json")
    assert "no weights" in model_source_problem(str(bare))
    # A policy stage's output: intact passes, a changed weight file does not.
    tuned = _copy(policy, tmp_path / "tuned")
    write_json(tuned / "manifest.json", {"stage": "dpo", "stage_key": "k", "files": {
        "model.safetensors": {"sha256": sha256_file(tuned / "model.safetensors")}}})
    assert model_source_problem(str(tuned)) is None
    with open(tuned / "model.safetensors", "ab") as fh:
        fh.write(b"\0")
    assert "model.safetensors changed" in model_source_problem(str(tuned))


# ---------------------------------------------------------------------------------------------
# The stages, through the CLI: exit code 2, one line naming the folder, no model loaded, nothing written
# ---------------------------------------------------------------------------------------------
def _one_line_error(capsys, folder: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(folder) in err, err
    return err


def _altered_data(data: Path, tmp_path: Path) -> Path:
    altered = _copy(data, tmp_path / "altered-data")
    table = (altered / "train.parquet").read_bytes()
    (altered / "train.parquet").write_bytes(table[:-100] + bytes(100))  # same size, other bytes
    return altered


@pytest.mark.parametrize("case", ["data-missing", "data-is-rm", "rm-is-data", "data-altered", "policy-is-rm",
                                  "ppo-data-missing"])
def test_online_stages_refuse_bad_input_folders_before_any_model_loads(case, tmp_path, tiny_stack, no_models,
                                                                       capsys):
    from cli.main import main

    policy, rm, data = tiny_stack
    command, what = ("ppo", "data-missing") if case == "ppo-data-missing" else ("reinforce", case)
    args = {"--rm": rm, "--data": data, "--policy": policy}
    flag, folder, problem = {
        "data-missing": ("--data", tmp_path / "missing", "does not exist"),
        "data-is-rm": ("--data", rm, "says stage 'reward_model'"),
        "rm-is-data": ("--rm", data, "says stage 'data'"),
        "data-altered": ("--data", _altered_data(data, tmp_path) if what == "data-altered" else None,
                         "train.parquet changed"),
        "policy-is-rm": ("--policy", rm, "reward model (written by `align rm`), not a policy"),
    }[what]
    args[flag] = folder
    out = tmp_path / "run"
    argv = ["-q", command, *[str(x) for kv in args.items() for x in kv], "--out", str(out), "steps=2",
            "batch_size=2", "max_new_tokens=4", "eval_prompts=0"]
    assert main(argv) == 2
    err = _one_line_error(capsys, folder)
    assert problem in err, err
    assert no_models == [] and not out.exists()


def test_score_refuses_a_policy_as_reward_model_before_generating(tmp_path, tiny_stack, no_models, capsys):
    from cli.main import main

    policy, rm, data = tiny_stack
    out = tmp_path / "scores"
    argv = ["-q", "score", "--data", str(data), "--model", f"base={policy}", "--rm", f"proxy={policy}",
            "--out", str(out), "n_prompts=2", "max_new_tokens=4"]
    assert main(argv) == 2
    err = _one_line_error(capsys, policy)
    assert "reward model 'proxy'" in err and "is not a saved reward model" in err
    assert no_models == [] and not out.exists()
    # and a reward model given as the policy to answer
    assert main([*argv[:5], f"base={rm}", "--rm", f"proxy={rm}", *argv[8:]]) == 2
    assert "not a policy" in _one_line_error(capsys, rm) and no_models == []


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_trainer_stages_refuse_a_reward_model_as_data(command, tmp_path, tiny_stack, no_models, capsys):
    from cli.main import main

    policy, rm, data = tiny_stack
    model = ["--model", str(policy)] if command == "rm" else ["--policy", str(policy)]
    out = tmp_path / "out"
    assert main(["-q", command, "--data", str(rm), *model, "--out", str(out)]) == 2
    assert "says stage 'reward_model'" in _one_line_error(capsys, rm)
    assert no_models == [] and not out.exists()


def test_judge_refuses_scores_whose_answers_changed(tmp_path, no_models):
    from alignment.evaluation.judge import JudgeConfig, JudgeError, run_judge_stage

    scores = tmp_path / "scores"
    (scores / "generations").mkdir(parents=True)
    files = {}
    for name in ("scores.json", "prompts.jsonl", "generations/base.jsonl", "generations/tuned.jsonl"):
        (scores / name).write_text("{}\n")
        files[name] = {"sha256": sha256_file(scores / name)}
    write_json(scores / "manifest.json", {"stage": "score", "stage_key": "k", "files": files,
                                          "config": {"models": {"base": "b", "tuned": "t"}}})
    (scores / "generations" / "tuned.jsonl").write_text('{"completion": "answer A wins"}\n')
    with pytest.raises(JudgeError, match=r"generations/tuned.jsonl changed since the stage wrote it"):
        run_judge_stage(JudgeConfig(scores=str(scores), backend="local"), tmp_path / "judge")
    assert no_models == [] and not (tmp_path / "judge").exists()
