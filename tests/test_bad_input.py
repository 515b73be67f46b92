"""Bad input to the data stage and to any config is one error line (exit code 2), never a traceback or a hang.

Undecodable or truncated gzip, a data folder whose split is missing or damaged when a later stage reads
it, non-finite rating scales, booleans given for numbers, a field of megabytes, a YAML alias bomb.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ValidationError

from alignment import config as C
from alignment.config import ConfigError, ConfigModel, build_config, check_size, parse_overrides, shown
from alignment.data import MAX_FIELD_CHARS, BadRowsError, DataConfig, DataError, PairData, run_data_stage
from cli.main import main
from tests.conftest import write_jsonl


def pair(i: int, **extra) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}", **extra}


def pairs_file(tmp_path: Path, n: int = 6, name: str = "pairs.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [pair(i) for i in range(n)])


def one_error_line(capsys, command: str = "data") -> str:
    """The CLI's stderr: exactly one line, `align <command>: error: ...`, and no traceback."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"align {command}: error: "), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# gzip
# ---------------------------------------------------------------------------------------------
def _gz_variants(tmp_path: Path) -> dict[str, bytes]:
    body = gzip.compress("".join(json.dumps(pair(i)) + "\n" for i in range(200)).encode())
    corrupt = bytearray(body)
    for at in range(20, len(corrupt) - 12, 7):  # damage the deflate stream, keep the header
        corrupt[at] ^= 0x5A
    return {"not-gzip": b"this is plain text, not gzip\n", "truncated": body[: len(body) // 2],
            "corrupt": bytes(corrupt), "header-only": body[:10]}


@pytest.mark.parametrize("variant", ["not-gzip", "truncated", "corrupt", "header-only"])
def test_undecodable_gzip_is_one_line(tmp_path, capsys, variant):
    path = tmp_path / f"{variant}.jsonl.gz"
    path.write_bytes(_gz_variants(tmp_path)[variant])
    with pytest.raises(DataError, match="not a readable gzip file"):
        run_data_stage(DataConfig(source=str(path)), tmp_path / "out-direct", runs_root=tmp_path / "runs")
    assert main(["-q", "data", "--source", str(path), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "not a readable gzip file" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A data folder with a manifest whose split is missing or damaged, read by a later stage
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def data_folder(tmp_path) -> Path:
    out = tmp_path / "data"
    run_data_stage(DataConfig(source=str(pairs_file(tmp_path, 10)), validation_fraction=0.3), out,
                   runs_root=tmp_path / "runs")
    assert (out / "manifest.json").is_file()
    return out


def _damage(folder: Path, how: str) -> Path:
    path = folder / "train.parquet"
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"PAR1 this is not parquet at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-30])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":  # a readable parquet file that is not a data stage split
        pq.write_table(pa.table({"text": ["a", "b"]}), path)
    elif how == "wrong-types":
        pq.write_table(pa.table({"prompt": ["a"], "chosen": [1], "rejected": [2]}), path)
    elif how == "directory":
        path.unlink()
        path.mkdir()
    return path


DAMAGE = ["missing", "garbage", "truncated", "empty", "foreign", "wrong-types", "directory"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_split_is_a_data_error_naming_the_file(data_folder, how):
    path = _damage(data_folder, how)
    with pytest.raises(DataError) as info:
        PairData.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "re-run `align data`" in message


@pytest.mark.parametrize("how", ["missing", "garbage", "foreign"])
def test_a_later_stage_on_a_damaged_data_folder_exits_2(data_folder, tmp_path, capsys, how):
    """`align rm --data DIR` reads the splits before it loads any model: one line, exit code 2."""
    path = _damage(data_folder, how)
    code = main(["-q", "rm", "--data", str(data_folder), "--model", str(tmp_path / "no-model"),
                 "--out", str(tmp_path / "rm"), "device=cpu"])
    assert code == 2
    assert path.name in one_error_line(capsys, "rm")


# ---------------------------------------------------------------------------------------------
# Config values: rating scale, booleans for numbers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, field", [
    ("rating_max=.inf", "rating_max"), ("rating_min=-.inf", "rating_min"), ("rating_max=.nan", "rating_max"),
    ("rating_min=.nan", "rating_min"), ("seed=true", "seed"), ("seed=false", "seed"), ("seed=-1", "seed"),
    ("validation_fraction=.nan", "validation_fraction"), ("max_pairs=true", "max_pairs"),
])
def test_bad_config_values_are_refused_in_one_line(tmp_path, capsys, override, field):
    out = tmp_path / "out"
    assert main(["-q", "data", "--source", str(pairs_file(tmp_path)), "--out", str(out), override]) == 2
    line = one_error_line(capsys)
    assert f"data.{field}:" in line
    assert not out.exists()


def test_rating_scale_must_be_finite_and_ordered():
    for bad in ({"rating_min": float("-inf")}, {"rating_max": float("inf")}, {"rating_max": float("nan")},
                {"rating_min": 4.0, "rating_max": 4.0}, {"rating_min": 5.0, "rating_max": 1.0},
                {"rating_min": -1e308, "rating_max": 1e308}):  # finite ends, but an infinite width
        with pytest.raises(ValidationError):
            DataConfig(**bad)
    assert DataConfig(rating_min=1, rating_max=10).rating_max == 10.0


def test_score_weights_refuse_booleans():
    with pytest.raises(ValidationError, match="booleans"):
        DataConfig(score="weighted", score_weights={"helpfulness": True})


def _config_classes() -> list[type[BaseModel]]:
    import alignment.algorithms.dpo  # noqa: F401
    import alignment.algorithms.ppo  # noqa: F401
    import alignment.compare  # noqa: F401  (every config class, imported so that it is registered)
    import alignment.pipeline  # noqa: F401

    found, todo = [], [ConfigModel]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.model_fields]


def test_every_number_field_of_every_config_refuses_a_boolean():
    """pydantic reads True as 1 for int and float fields; every config (the seeds included) refuses it."""
    checked = 0
    for cls in _config_classes():
        for name, info in cls.model_fields.items():
            numeric, takes_bool = C._numeric_types(info.annotation)
            if not numeric or takes_bool:
                continue
            with pytest.raises(ValidationError) as exc:
                cls.model_validate({name: True})
            assert any(e["loc"] == (name,) and "boolean" in e["msg"] for e in exc.value.errors()), (cls, name)
            checked += 1
    names = {c.__name__ for c in _config_classes()}
    assert {"DataConfig", "RewardModelConfig", "ReinforceConfig", "PipelineOptions", "SamplingConfig"} <= names
    assert checked > 50
    # bool fields still take booleans, and int fields still take integers
    assert DataConfig(seed=3).seed == 3
    from alignment.pipeline import PipelineOptions

    assert PipelineOptions(judge=False, num_processes=2).judge is False


# ---------------------------------------------------------------------------------------------
# A field of megabytes
# ---------------------------------------------------------------------------------------------
def test_a_huge_jsonl_field_is_a_bad_row_naming_line_and_field(tmp_path, capsys):
    rows = [pair(i) for i in range(6)]
    rows[2]["chosen"] = "x" * (2 * 1024 * 1024)  # 2 MB in one field
    rows[4]["prompt"] = [{"role": "user", "content": "y" * (MAX_FIELD_CHARS + 1)}]
    path = write_jsonl(tmp_path / "huge.jsonl", rows)
    with pytest.raises(BadRowsError) as info:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "o1", runs_root=tmp_path / "runs")
    issues = [(i.row, i.field) for i in info.value.issues]
    assert issues == [(3, "chosen"), (5, "prompt[0].content")]
    assert "field larger than the field limit (131,072 characters" in str(info.value)
    assert main(["-q", "data", "--source", str(path), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{path}, row 3, field 'chosen': field larger than the field limit" in err
    # skippable like any bad row, and counted
    res = run_data_stage(DataConfig(source=str(path), on_bad_rows="skip"), tmp_path / "o3", runs_root=tmp_path / "runs")
    assert res.summary["n_rows_rejected"] == 2 and res.summary["n_pairs"] == 4


def test_a_huge_field_in_a_json_array_and_in_csv(tmp_path, capsys):
    rows = [pair(i) for i in range(5)]
    rows[1]["rejected"] = "z" * (MAX_FIELD_CHARS + 10)
    array = tmp_path / "huge.json"
    array.write_text(json.dumps(rows))
    with pytest.raises(BadRowsError, match=r"row 2, field 'rejected': field larger than the field limit"):
        run_data_stage(DataConfig(source=str(array)), tmp_path / "o1", runs_root=tmp_path / "runs")
    table = tmp_path / "huge.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["-q", "data", "--source", str(table), "--out", str(tmp_path / "o2")]) == 2
    line = one_error_line(capsys)
    assert f"{table}, line 3: not a readable csv file (field larger than field limit" in line


def test_deep_nesting_and_huge_integers_are_bad_rows(tmp_path):
    lines = [json.dumps(pair(i)) for i in range(6)]
    lines[1] = '{"prompt": "q", "chosen": "a", "rejected": ' + "[" * 5000 + "]" * 5000 + "}"
    lines[2] = json.dumps(pair(2, chosen={"a": [[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]}))
    lines[3] = '{"prompt": "q3", "chosen": "a", "rejected": "b", "chosen_rating": 1' + "0" * 5000 + "}"
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowsError) as info:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "o", runs_root=tmp_path / "runs")
    assert [i.row for i in info.value.issues] == [2, 3, 4]


# ---------------------------------------------------------------------------------------------
# A config cannot hang the process
# ---------------------------------------------------------------------------------------------
def alias_bomb(levels: int = 9, width: int = 9) -> str:
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = [f"{names[0]}: &{names[0]} [{','.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [{','.join([f'*{names[i - 1]}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["top", "field"])
def test_a_yaml_alias_bomb_config_file_is_refused_quickly(tmp_path, capsys, where):
    bomb = alias_bomb()
    assert len(bomb) < 1000
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb + ("source: *i\n" if where == "field" else ""))
    start = time.perf_counter()
    code = main(["-q", "data", "--config", str(cfg), "--out", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    assert code == 2 and elapsed < 10
    line = one_error_line(capsys)
    assert str(cfg) in line and "expands to more than" in line
    assert not (tmp_path / "out").exists()


def test_a_yaml_alias_bomb_override_is_refused_quickly(tmp_path, capsys):
    value = "[" + ", ".join(line.split(": ", 1)[1] for line in alias_bomb().splitlines()) + "]"
    assert "&a" in value and len(value) < 1000
    start = time.perf_counter()
    code = main(["-q", "data", "--out", str(tmp_path / "out"), f"column_map={value}"])
    assert code == 2 and time.perf_counter() - start < 10
    assert "override 'column_map' expands to more than" in one_error_line(capsys)


def test_recursive_yaml_and_deep_nesting_are_refused(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("source: &x [*x]\n")  # a list that holds itself
    with pytest.raises(ConfigError, match="expands to more than"):
        build_config(DataConfig, config_file=cfg)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_overrides(["source=" + "[" * 3000 + "]" * 3000])
    with pytest.raises(ConfigError, match="not valid YAML|nested too deeply"):
        parse_overrides(["seed=" + "[" * 3000])


def test_an_oversized_config_file_is_refused(tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("source: demo\n" + "# padding\n" * (C.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"larger than 1,000,000 bytes"):
        build_config(DataConfig, config_file=cfg)


def test_validation_errors_show_bounded_values(tmp_path, capsys):
    long_list = "[" + ", ".join(["word"] * 50_000) + "]"  # under the limits, but a long value
    start = time.perf_counter()
    assert main(["-q", "data", "--out", str(tmp_path / "o"), f"source={long_list}"]) == 2
    assert time.perf_counter() - start < 10
    line = one_error_line(capsys)
    assert "data.source:" in line and len(line) < 700
    with pytest.raises(ConfigError) as info:
        build_config(DataConfig, overrides=["split=" + "s" * 100_000 + ":"])  # a mapping, not a string
    assert len(str(info.value)) < 800


def test_shown_and_check_size_are_bounded():
    loop: list = []
    loop.append(loop)
    assert len(shown(loop)) <= C.MAX_SHOWN_CHARS
    wide = [["x" * 1000] * 1000] * 1000  # 10^6 strings that share storage
    start = time.perf_counter()
    assert len(shown(wide)) <= C.MAX_SHOWN_CHARS
    with pytest.raises(ConfigError):
        check_size(wide, "value")
    assert time.perf_counter() - start < 2
    assert check_size({"a": [1, 2, {"b": "c"}]}, "value") == {"a": [1, 2, {"b": "c"}]}


def test_non_string_keys_and_odd_yaml_types_are_config_errors(tmp_path):
    cfg = tmp_path / "odd.yaml"
    for text in ("1: 2\n", "? [a, b]\n: c\n", "seed: 2024-01-01\n", "seed: !!set {1, 2}\n",
                 "seed: 1" + "0" * 5000 + "\n", "source: !!python/object:os.system x\n"):
        cfg.write_text(text)
        with pytest.raises(ConfigError):
            build_config(DataConfig, config_file=cfg)


# ---------------------------------------------------------------------------------------------
# Found by tests/test_data_fuzz.py
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column_or_row(tmp_path, suffix):
    rows = [pair(i) for i in range(4)]
    if suffix == ".csv":
        buf = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    elif suffix == ".jsonl":
        buf = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buf = json.dumps(rows)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + buf.encode())
    res = run_data_stage(DataConfig(source=str(path)), tmp_path / "out", runs_root=tmp_path / "runs")
    assert res.summary["n_pairs"] == 4 and res.summary["n_rows_rejected"] == 0


def test_odd_values_in_rows_are_bad_rows_not_crashes(tmp_path):
    """Each of these crashed the stage with a traceback (TypeError, OverflowError, UnicodeEncodeError)."""
    rows = [pair(0), pair(1),
            pair(2, prompt=[{"role": ["user"], "content": "hi"}]),  # an unhashable role
            pair(3, chosen_rating=10**400, rejected_rating=1),  # too large for a float
            pair(4, chosen="lone \ud800 surrogate"),  # valid JSON escape, not valid UTF-8 text
            pair(5), pair(6)]
    for r in rows:
        r.setdefault("chosen_rating", 3)
        r.setdefault("rejected_rating", 1)
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRowsError) as info:
        run_data_stage(DataConfig(source=str(path)), tmp_path / "o", runs_root=tmp_path / "runs")
    assert [(i.row, i.field) for i in info.value.issues] == [(3, "prompt"), (4, "chosen_rating"), (5, "chosen")]
    comparisons = tmp_path / "cmp.jsonl"
    info_ = {"subreddit": "r/x", "title": "t", "post": "p"}
    comparisons.write_text("".join(json.dumps({"info": {**info_, "post": f"p{i}"}, "choice": choice,
                                               "summaries": [{"text": f"a{i}"}, {"text": f"b{i}"}]}) + "\n"
                                   for i, choice in enumerate([1.0, 0, 1, [1], {"a": 1}])))
    with pytest.raises(BadRowsError) as info:
        run_data_stage(DataConfig(source=str(comparisons)), tmp_path / "o2", runs_root=tmp_path / "runs")
    assert [(i.row, i.field) for i in info.value.issues] == [(4, "choice"), (5, "choice")]  # 1.0 reads as 1


def test_one_prompt_only_names_the_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "one.jsonl", [pair(0), {**pair(0), "chosen": "another good answer"}])
    assert main(["-q", "data", "--source", str(path), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert f"{path}: need at least 2 distinct prompts" in line


def test_unusable_source_paths_are_one_line(tmp_path, capsys):
    for spec in ("bad\x00name.jsonl", "x" * 5000 + ".jsonl"):
        assert main(["-q", "data", "--source", spec, "--out", str(tmp_path / "o")]) == 2
        assert len(one_error_line(capsys)) < 600
