"""Strict configs: every number finite (every float field of every config class, found programmatically), ranges
on hand-chosen fields, and config mistakes (a misspelt section or key, a duplicate YAML key, a key beside the
sections, ``section=...``) refused through the real CLI with exit 2 and one line naming the key."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ValidationError

import alignment.compare
import alignment.pipeline
import alignment.rounds.onpolicy  # noqa: F401 -- every config class is defined once these are imported
from alignment.config import ConfigError, ConfigModel, _numeric_types, build_config
from alignment.presets import FILE_SECTIONS, PRESETS
from alignment.rewards.components import ComponentConfig


def _subclasses(cls: type) -> list[type]:
    found, stack = [], [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                stack.append(sub)
    return found


CONFIG_CLASSES = [c for c in (*_subclasses(ConfigModel), *_subclasses(ComponentConfig))
                  if c.__module__.startswith("alignment.")]
FLOAT_FIELDS = [(cls, name) for cls in CONFIG_CLASSES for name, field in cls.model_fields.items()
                if float in _numeric_types(field.annotation)[0]]
# what a component needs besides the field under test (so the only error is that field's)
REQUIRED = {"reward_model": {"folder": "rm"}, "length": {"max_tokens": 8}, "python": {"function": "f.py:g"},
            "ensemble": {"members": ["a", "b"]}}


def _minimal(cls: type[BaseModel]) -> dict:
    kind = cls.model_fields["kind"].default if issubclass(cls, ComponentConfig) else None
    return {"kind": kind, **REQUIRED.get(kind, {})} if kind else {}


def test_the_enumeration_finds_every_config_and_its_float_fields():
    names = {c.__name__ for c in CONFIG_CLASSES}
    assert {"DataConfig", "RewardModelConfig", "ReinforceConfig", "PPOConfig", "GRPOConfig", "DPOStageConfig",
            "SFTConfig", "ScoreConfig", "JudgeConfig", "PipelineOptions", "RoundsConfig", "SamplingConfig",
            "CompareConfig", "TrackingConfig", "GoldComponentConfig", "EnsembleComponentConfig"} <= names
    assert len(FLOAT_FIELDS) >= 100  # the issue counted 64 distinct float fields; inherited ones count per class
    assert (alignment.compare.CompareConfig, "learning_rate") in FLOAT_FIELDS


@pytest.mark.parametrize(("cls", "name"), FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
def test_every_float_field_refuses_inf_and_nan(cls, name):
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValidationError) as caught:
            cls.model_validate({**_minimal(cls), name: value})
        # refused for that field: by the finite check, or first by its range (-inf < 0, nan > 0 is false)
        assert [e["loc"] for e in caught.value.errors()] == [(name,)], (value, caught.value.errors())
    cls.model_validate(_minimal(cls))  # the defaults (with what a component needs) are valid


def test_a_nonfinite_value_inside_a_list_or_mapping_field_is_refused():
    from alignment.data import DataConfig

    with pytest.raises(ValidationError, match="must be a finite number"):
        DataConfig(score_weights={"helpfulness": math.inf})
    DataConfig(score_weights={"helpfulness": 2.0})


@pytest.mark.parametrize(("section", "cls_path", "field", "bad", "good"), [
    ("rm_scalar", "alignment.rewards.model.RewardModelConfig", "learning_rate", [0.0, -1e-5], [1e-5, 1e30]),
    ("rm_scalar", "alignment.rewards.model.RewardModelConfig", "epochs", [0.0, 1001.0, 1e300], [0.5, 3.0]),
    ("reinforce", "alignment.algorithms.reinforce.ReinforceConfig", "temperature", [0.0, -0.7], [0.7, 1.5]),
    ("reinforce", "alignment.algorithms.reinforce.ReinforceConfig", "top_p", [0.0, 1.01], [0.9, 1.0]),
    ("ppo", "alignment.algorithms.ppo.PPOConfig", "gamma", [0.0, 1.5], [1.0, 0.99]),
    ("judge", "alignment.evaluation.judge.JudgeConfig", "timeout_s", [0.0, 3601.0, 1e300], [0.5, 60.0]),
    ("judge", "alignment.evaluation.judge.JudgeConfig", "max_backoff_s", [-1.0, 1e300], [0.0, 60.0]),
    ("options", "alignment.pipeline.PipelineOptions", "judge_retry_delay_s", [-1.0, 1e300], [0.0, 30.0]),
    ("data", "alignment.data.DataConfig", "validation_fraction", [0.0, 1.0], [0.1, 0.5]),
    ("sft", "alignment.algorithms.sft.SFTConfig", "seed", [-1, 2**32], [0, 2**32 - 1]),  # numpy's seed range
    ("rm_scalar", "alignment.rewards.model.RewardModelConfig", "data_seed", [-1, 2**40], [None, 7]),
])
def test_ranges_on_hand_chosen_fields(section, cls_path, field, bad, good):
    import importlib

    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    for value in bad:
        with pytest.raises(ValidationError) as caught:
            cls.model_validate({field: value})
        assert [e["loc"] for e in caught.value.errors()] == [(field,)], value
    for value in good:
        assert getattr(cls.model_validate({field: value}), field) == value


def test_presets_still_validate_and_file_sections_cover_every_stage():
    from alignment.config import StageConfig
    from alignment.pipeline import PipelineConfig
    from alignment.presets import stage_preset

    for name in PRESETS:
        build_config(PipelineConfig, base=PipelineConfig.preset(name))
    rm = build_config(alignment.rewards.model.RewardModelConfig, base=stage_preset("demo", "rm_scalar"))
    assert rm.max_length == 144
    # the project's own stage configs (a test may define a toy one of its own)
    sections = {c.model_fields["section"].default for c in _subclasses(StageConfig)
                if c.__module__.startswith("alignment.")} - {""}
    assert sections - {"pipeline"} <= set(FILE_SECTIONS)
    assert set(PipelineConfig.model_fields) - {"section"} <= set(FILE_SECTIONS)


# ---------------------------------------------------------------------------------------------
# Config mistakes through the real CLI: exit 2, one line naming the key (and the nearest valid name)
# ---------------------------------------------------------------------------------------------
def _align(capsys, *argv: str) -> tuple[int, str]:
    from cli.main import main

    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _refused(capsys, argv: list[str], *names: str) -> str:
    code, err = _align(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err
    return err


CASES = {
    "misspelt section": ("data:\n  source: demo\ndta:\n  seed: 3\n", ["'dta'", "did you mean 'data'?"]),
    "duplicate key": ("data:\n  source: demo\ndata:\n  seed: 3\n", ["duplicate key 'data'", "lines 1 and 3"]),
    "nested duplicate key": ("rm_scalar:\n  epochs: 1\n  batch_size: 4\n  epochs: 2\n",
                             ["duplicate key 'epochs'", "lines 2 and 4"]),
    "key beside sections": ("learning_rate: 0.001\ndata:\n  source: demo\n",
                            ["'learning_rate'", "beside the sections"]),
    "misspelt nested key": ("rm_scalar:\n  lerning_rate: 0.001\n",
                            ["'rm_scalar.lerning_rate'", "did you mean 'learning_rate'?"]),
    "misspelt tracking key": ("tracking:\n  urii: http://x\n", ["'tracking.urii'", "did you mean 'uri'?"]),
    "another command's section": ("dpo:\n  beta: 0.1\n", ["'dpo'", "not one of this config's"]),
    "section set to another": ("section: rm\n", ["'section' cannot be set"]),
}




def test_the_issue_example_message(tmp_path, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(CASES["misspelt section"][0])
    _, err = _align(capsys, "run", "--config", str(cfg), "--print-config")
    assert err == f"align run: error: config file {cfg}: unknown section 'dta' (did you mean 'data'?)"


STAGE_FILES = {
    "misspelt section": ("rm_scalar:\n  epochs: 2\nrm_scaler:\n  epochs: 3\n", ["'rm_scaler'", "'rm_scalar'"]),
    "key beside sections": ("epochs: 2\ndata:\n  source: demo\n", ["'epochs'", "beside the sections",
                                                                   "rm_scalar.epochs"]),
    "misspelt key in its section": ("rm_scalar:\n  epoch: 2\n", ["'rm_scalar.epoch'", "did you mean 'epochs'?"]),
    "misspelt flat key": ("epoch: 2\n", ["'epoch'", "did you mean 'epochs'?"]),
    "duplicate flat key": ("epochs: 2\nepochs: 3\n", ["duplicate key 'epochs'"]),
    "section not a mapping": ("rm_scalar:\n  epochs: 2\njudge: 3\n", ["section 'judge' must hold a mapping"]),
}


@pytest.mark.parametrize(("command", "case"), [*(("run", c) for c in CASES), *(("rm", c) for c in STAGE_FILES)])
def test_config_file_mistakes_are_one_line_naming_the_key(command, case, tmp_path, capsys):
    """The pipeline's file (sections) and a stage's file (its fields, or a section per stage)."""
    text, names = (CASES if command == "run" else STAGE_FILES)[case]
    cfg = tmp_path / "x.yaml"
    cfg.write_text(text)
    err = _refused(capsys, [command, "--config", str(cfg), "--print-config"], *names)
    assert err.startswith(f"align {command}: error: ")
    if command == "run":
        assert f"config file {cfg}" in err


def test_a_stage_reads_its_own_section_of_a_pipeline_file(tmp_path, capsys):
    import json

    from cli.main import main

    cfg = tmp_path / "all.yaml"
    cfg.write_text("data:\n  source: demo\nrm_scalar:\n  epochs: 2\nrm_distributional:\n  epochs: 3\n"
                   "tracking:\n  backend: none\n")
    for kind, epochs in (("scalar", 2.0), ("distributional", 3.0)):  # align rm --kind K reads rm_K
        assert main(["-q", "rm", "--kind", kind, "--config", str(cfg), "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["epochs"] == epochs
    flat = tmp_path / "flat.yaml"  # a file of the stage's own fields; data is its folder, not a section
    flat.write_text("data: runs/data/x\nepochs: 2\n")
    assert main(["-q", "rm", "--config", str(flat), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "runs/data/x"


def test_a_dumped_config_round_trips_with_its_section_keys(tmp_path, capsys):
    import yaml

    from alignment.pipeline import PipelineConfig

    cfg = tmp_path / "dump.yaml"
    cfg.write_text(yaml.safe_dump(PipelineConfig().model_dump(mode="json")))  # carries section: keys
    assert _align(capsys, "run", "--config", str(cfg), "--print-config")[0] == 0


OVERRIDES = [
    (["rm", "section=rm"], ["'section' cannot be set"]),
    (["run", "section=rm"], ["'section' cannot be set"]),
    (["run", "rm_scalar.section=x"], ["'rm_scalar.section' cannot be set"]),
    (["rm", "lerning_rate=1"], ["'lerning_rate'", "did you mean 'learning_rate'?"]),
    (["run", "dta.seed=3"], ["'dta'", "did you mean 'data'?"]),
    (["run", "rm_scalar.lerning_rate=1"], ["'rm_scalar.lerning_rate'", "did you mean 'learning_rate'?"]),
    (["run", "learning_rate=1"], ["'learning_rate'", "beside the sections"]),
    (["run", "tracking.urii=x"], ["'tracking.urii'", "did you mean 'uri'?"]),
    (["data", "tracking.urii=x"], ["'tracking.urii'", "did you mean 'uri'?"]),
    (["data", "tracking.backend=mlfow"], ["tracking.backend"]),
    (["rm", "learning_rate=.inf"], ["learning_rate", "finite"]),
    (["rm", "learning_rate=.nan"], ["learning_rate"]),  # nan > 0 is false: the range refuses it
    (["rm", "epochs=.inf"], ["epochs"]),
    (["reinforce", "temperature=.inf"], ["temperature", "finite"]),
    (["reinforce", "kl_beta=-.inf"], ["kl_beta"]),
    (["judge", "timeout_s=.inf"], ["timeout_s"]),
    (["judge", "initial_backoff_s=.inf"], ["initial_backoff_s"]),
    (["run", "reinforce.learning_rate=.inf"], ["reinforce.learning_rate", "finite"]),
    (["run", "options.judge_retry_delay_s=1e300"], ["judge_retry_delay_s"]),
    (["run", "reinforce.rewards=[{kind: reward_model, folder: x, var_lambda: .inf}]"], ["var_lambda", "finite"]),
    (["rm", "learning_rate={a: 1, a: 2}"], ["duplicate key 'a'"]),
]


@pytest.mark.parametrize(("argv", "names"), OVERRIDES, ids=[" ".join(a) for a, _ in OVERRIDES])
def test_override_mistakes_are_one_line_naming_the_key(argv, names, capsys):
    _refused(capsys, [*argv, "--print-config"], *names)


def test_a_valid_override_still_works(capsys):
    import json

    from cli.main import main

    assert main(["-q", "rm", "learning_rate=1e-4", "epochs=2.5", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["learning_rate"], printed["epochs"]) == (1e-4, 2.5)


def test_build_config_unknown_key_and_section_errors_are_config_errors():
    from alignment.data import DataConfig

    with pytest.raises(ConfigError, match=r"override 'sead=2': unknown key 'sead' \(did you mean 'seed'\?\)"):
        build_config(DataConfig, overrides=["sead=2"])
    with pytest.raises(ConfigError, match="'section' cannot be set"):
        build_config(DataConfig, overrides=["section=data"])
