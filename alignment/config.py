"""Stage configs: validated pydantic models, loadable from YAML with ``key=value`` overrides.

Every stage has one config class derived from :class:`StageConfig`. The same class is used by the
CLI (``align <stage> --config FILE key=value``), by Python callers and, later, as Prefect flow
parameters, where pydantic models become UI forms.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

C = TypeVar("C", bound="StageConfig")

# Bounds on what a config may hold, so that no config file or override can hang the process (a YAML
# "billion laughs" alias bomb is a few hundred bytes that expand to billions of values).
MAX_CONFIG_BYTES = 1_000_000  # a config file's size on disk
MAX_CONFIG_VALUES = 100_000  # values (scalars, lists, mappings) after alias expansion
MAX_CONFIG_CHARS = 10_000_000  # characters of all strings after alias expansion
MAX_SHOWN_CHARS = 200  # an invalid value is shown in an error message cut to this many characters


class ConfigError(ValueError):
    """A config file, override or value is invalid. The message names the field."""


def _numeric_types(annotation: Any) -> tuple[set[type], bool]:
    """The int/float types an annotation admits, and whether it admits bool (``int | None`` -> ({int}, False))."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return {a for a in args if a in (int, float)}, bool in args


class ConfigModel(BaseModel):
    """Base of config models: a number field refuses a boolean (pydantic would read ``seed=true`` as 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            numeric, takes_bool = _numeric_types(cls.model_fields[info.field_name].annotation)
            if numeric and not takes_bool:
                raise ValueError(f"expected {'an integer' if int in numeric else 'a number'}, not a boolean")
        return value


class StageConfig(ConfigModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The key under which this stage's section sits in a multi-stage YAML file.
    section: str = ""

    def digest(self) -> str:
        """A stable hash of the config's values (same values -> same digest, across processes)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def shown(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, in time bounded whatever ``value`` holds (a huge or
    self-referential list included): nesting, items and strings are elided before the repr is built."""
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxtuple, brief.maxdict, brief.maxset = 3, 6, 6, 6, 6
    brief.maxstring = brief.maxother = brief.maxlong = limit
    return cut(brief.repr(value), limit)


def cut(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with "..." when it was longer)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_size(value: Any, what: str) -> Any:
    """Refuse a loaded YAML value that expands (through aliases) to more than MAX_CONFIG_VALUES values or
    MAX_CONFIG_CHARS characters. Counts with an early exit, so a bomb costs at most the limit's work."""
    n_values = n_chars = 0
    stack = [value]
    while stack:
        item = stack.pop()
        n_values += 1
        if isinstance(item, (str, bytes)):
            n_chars += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        if n_values > MAX_CONFIG_VALUES or n_chars > MAX_CONFIG_CHARS:
            raise ConfigError(
                f"{what} expands to more than {MAX_CONFIG_VALUES:,} values or {MAX_CONFIG_CHARS:,} characters "
                "(YAML aliases repeating aliases?); a config is refused beyond that")
    return value


def _load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose failures are ConfigErrors (yaml.YAMLError is left to the caller) and whose
    result is bounded by :func:`check_size`."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{what}: {cut(' '.join(str(exc).split()), 200)}") from None
    return check_size(value, what)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into a nested dict; values are parsed as YAML scalars/flow collections."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {shown(item)} is not of the form key=value")
        try:
            value = _load_yaml(raw, f"override {shown(key, 80)}") if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {shown(item)}: value is not valid YAML ({cut(' '.join(str(exc).split()), 300)})"
                              ) from None
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(item)} conflicts with an earlier override of {shown(part)}")
        node[parts[-1]] = value
    return result


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path, section: str) -> dict[str, Any]:
    """Read a YAML file holding either the stage's fields or a mapping with a ``section:`` key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; a config is refused beyond that")
    try:
        data = _load_yaml(raw.decode("utf-8"), f"config file {path}")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {cut(' '.join(str(exc).split()), 400)}"
                          ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    if section in data and isinstance(data[section], dict):
        return data[section]
    return data


def format_validation_error(exc: ValidationError, prefix: str = "", shown_errors: int = 20) -> str:
    """``invalid config: section.field: message (got VALUE)``, one line per error when there are several;
    values are cut to MAX_SHOWN_CHARS characters."""
    lines = []
    errors = exc.errors(include_url=False)
    for err in errors[:shown_errors]:
        loc = ".".join(cut(str(p), 80) for p in err["loc"]) or "(config)"
        got = f" (got {shown(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{prefix}{loc}: {cut(' '.join(err['msg'].split()), 2 * MAX_SHOWN_CHARS)}{got}")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    if len(errors) > shown_errors:
        lines.append(f"... and {len(errors) - shown_errors} more")
    return "invalid config:\n" + "\n".join(f"  {line}" for line in lines)


def build_config(
    cls: type[C],
    *,
    base: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    explicit: dict[str, Any] | None = None,
) -> C:
    """Layer a config: class defaults < ``base`` (a preset) < YAML file < ``key=value`` < explicit flags."""
    section = cls.model_fields["section"].default
    values: dict[str, Any] = dict(base or {})
    if config_file is not None:
        values = _deep_merge(values, read_config_file(config_file, section))
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))
    if explicit:
        values = _deep_merge(values, {k: v for k, v in explicit.items() if v is not None})
    values.pop("section", None)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix=f"{section}." if section else "")) from None
