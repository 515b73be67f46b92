"""Stage configs: validated pydantic models, loadable from YAML with ``key=value`` overrides.

Every stage has one config class derived from :class:`StageConfig`. The same class is used by the
CLI (``align <stage> --config FILE key=value``), by Python callers and, later, as Prefect flow
parameters, where pydantic models become UI forms.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A config file, override or value is invalid. The message names the field."""


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The key under which this stage's section sits in a multi-stage YAML file.
    section: str = ""

    def digest(self) -> str:
        """A stable hash of the config's values (same values -> same digest, across processes)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into a nested dict; values are parsed as YAML scalars/flow collections."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    if section in data and isinstance(data[section], dict):
        return data[section]
    return data


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {prefix}{loc}: {err['msg']}{got}")
    return "invalid config:\n" + "\n".join(lines)


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
        return cls(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix=f"{section}." if section else "")) from None
