"""The `align` command and config layering: YAML files, presets, key=value overrides, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.config import ConfigError, build_config, parse_overrides
from alignment.data import DataConfig
from cli.main import main
from tests.conftest import raw_row, write_jsonl


def _src(tmp_path):
    rows = [raw_row(f"q{i}", a, *s) for i in range(10) for a, s in (("g", (4,) * 5), ("b", (1,) * 5))]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def test_parse_overrides_types_and_nesting():
    assert parse_overrides(["seed=3", "validation_fraction=0.25", "column_map.prompt=question", "split=null",
                            "score_weights={helpfulness: 2}"]) == {
        "seed": 3, "validation_fraction": 0.25, "column_map": {"prompt": "question"}, "split": None,
        "score_weights": {"helpfulness": 2}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["seed"])


def test_layering_preset_file_override_flag(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  seed: 7\n  source: from-file.jsonl\n  validation_fraction: 0.3\n")
    cfg = build_config(DataConfig, base={"source": "demo", "seed": 1}, config_file=cfg_file,
                       overrides=["validation_fraction=0.4"], explicit={"source": "flag.jsonl"})
    assert (cfg.source, cfg.seed, cfg.validation_fraction) == ("flag.jsonl", 7, 0.4)
    flat = tmp_path / "flat.yaml"
    flat.write_text("seed: 9\n")
    assert build_config(DataConfig, config_file=flat).seed == 9


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.validation_fraction: Input should be less than 1 \(got 2\)"):
        build_config(DataConfig, overrides=["validation_fraction=2"])
    with pytest.raises(ConfigError, match=r"override 'sead=2': unknown key 'sead' \(did you mean 'seed'\?\)"):
        build_config(DataConfig, overrides=["sead=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(DataConfig, config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(DataConfig, config_file=bad)


def test_digest_is_stable_and_value_sensitive():
    assert DataConfig().digest() == DataConfig().digest()
    assert DataConfig(seed=1).digest() != DataConfig().digest()


def test_cli_data_writes_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "data", "--source", str(_src(tmp_path)), "--out", str(out), "seed=2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 2 and manifest["n_pairs"] == 10
    assert f"data written: {out}" in capsys.readouterr().out
    assert main(["-q", "data", "--source", str(_src(tmp_path)), "--out", str(out), "seed=2"]) == 0
    assert "data reused" in capsys.readouterr().out


def test_cli_print_config(capsys):
    assert main(["data", "--preset", "helpsteer2", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["source"] == "esfrankel17/HelpSteer2_binarized" and cfg["split"] == "average_rating_split"


def test_cli_errors_are_one_clear_line_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("")
    assert main(["data", "--source", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "align data: error:" in err and "the file is empty" in err and "Traceback" not in err
    assert main(["data", "validation_fraction=abc"]) == 2
    assert "validation_fraction" in capsys.readouterr().err


def test_console_script_help():
    """The installed `align` entry point runs and explains its stages."""
    exe = str(Path(sys.executable).parent / "align")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in out and "binarise" in out and "model" in out
    out = subprocess.run([exe, "data", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--on-bad-rows" in out and "key=value" in out
