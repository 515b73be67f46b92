"""Fuzzing configs (hypothesis): whatever a config file, a preset-like base or a ``key=value`` override holds --
any float (inf and NaN included) in any float field, any value in any field, any key name at any depth -- building
a config either gives a valid config, whose every number is finite, or raises the project's ConfigError with one
line (what the CLI prints with exit 2) -- never another exception, never a pydantic dump.

Bounded to 150 examples per test, a few seconds (ALIGN_FUZZ_EXAMPLES=N for a longer hunt); no example database is
written (nothing lands in the checkout).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import alignment.compare
import alignment.pipeline  # noqa: F401 -- every stage config class is defined once these are imported
from alignment.config import ConfigError, StageConfig, _numeric_types, build_config, first_nonfinite
from alignment.pipeline import PipelineConfig
from tests.test_config_strict import _subclasses

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # its caches go to the temp folder, not the checkout
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "alignment-hypothesis")
EXAMPLES = int(os.environ.get("ALIGN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _stage_classes() -> list[type[StageConfig]]:
    return sorted(_subclasses(StageConfig), key=lambda c: c.__name__)


CLASSES = _stage_classes()
PIPELINE_SECTIONS = {name: field.annotation for name, field in PipelineConfig.model_fields.items() if name != "section"}

FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-300, 1e300, 5e-324, 1.0, 0.5, 1001.0, 3601.0])
SCALARS = (FLOATS | st.integers() | st.integers(-10, 10) | st.booleans() | st.none() | st.text(max_size=20)
           | st.sampled_from(["inf", ".inf", "nan", "NaN", "-inf", "1e30", "", "demo", "scalar", "@rm_scalar"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
KEYS = st.text(max_size=24) | st.sampled_from(["section", "data", "dta", "lerning_rate", "tracking", "rm_scaler",
                                                "seed", "options", "rewards", ".", "..", "a.b", "=", "tracking.urii"])
YAML_VALUES = st.sampled_from([".inf", "-.inf", ".nan", "1e30", "1e400", "-1", "0", "true", "null", "[]", "{}",
                               "{a: 1, a: 2}", "[.inf, 1]", "{x: .nan}", "'text'", "[unclosed", "&a [*a]", "!!python/none"])


def _assert_valid_or_one_line(build) -> None:
    try:
        config = build()
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))
        return
    assert first_nonfinite(config.model_dump()) is None, config  # a valid config holds only finite numbers


def _float_fields(cls: type) -> list[str]:
    return [n for n, f in cls.model_fields.items() if float in _numeric_types(f.annotation)[0]]


@st.composite
def float_settings(draw) -> tuple[type, dict[str, Any]]:
    """(a stage config class, {its float field: any float}), or the pipeline with one in one of its sections."""
    cls = draw(st.sampled_from([*CLASSES, PipelineConfig]))
    if cls is PipelineConfig:
        from alignment.config import _model_of

        section = draw(st.sampled_from([s for s, a in PIPELINE_SECTIONS.items() if _float_fields(_model_of(a))]))
        field = draw(st.sampled_from(_float_fields(_model_of(PIPELINE_SECTIONS[section]))))
        return cls, {section: {field: draw(FLOATS)}}
    fields = _float_fields(cls)
    if not fields:
        return cls, {}
    return cls, {draw(st.sampled_from(fields)): draw(FLOATS)}


@FUZZ
@given(float_settings())
def test_any_float_in_any_float_field_is_a_valid_config_or_one_line(setting):
    cls, base = setting
    _assert_valid_or_one_line(lambda: build_config(cls, base=base))


@FUZZ
@given(st.sampled_from([*CLASSES, PipelineConfig]), st.lists(st.tuples(KEYS, YAML_VALUES | VALUES.map(str)),
                                                             min_size=1, max_size=3))
def test_any_override_key_and_value_is_a_valid_config_or_one_line(cls, items):
    overrides = [f"{key}={value}" for key, value in items]
    _assert_valid_or_one_line(lambda: build_config(cls, overrides=overrides))


@FUZZ
@given(st.sampled_from([*CLASSES, PipelineConfig]),
       st.dictionaries(KEYS | st.sampled_from(sorted(PIPELINE_SECTIONS)),
                       VALUES | st.dictionaries(KEYS | st.sampled_from(["learning_rate", "epochs", "temperature",
                                                                        "seed", "section"]), VALUES, max_size=3),
                       max_size=4))
def test_any_config_file_is_a_valid_config_or_one_line(cls, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(content, allow_unicode=True), encoding="utf-8")
        _assert_valid_or_one_line(lambda: build_config(cls, config_file=path))
