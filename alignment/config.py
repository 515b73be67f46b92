"""Stage configs: validated pydantic models, loadable from YAML with ``key=value`` overrides.

Every stage has one config class derived from :class:`StageConfig`. The same class is used by the
CLI (``align <stage> --config FILE key=value``), by Python callers and, later, as Prefect flow
parameters, where pydantic models become UI forms.

Strict: every number is finite (:class:`ConfigModel`), and a mistake is one :class:`ConfigError` line naming
the key and the nearest valid name -- an unknown section or key at any depth of a file or an override
(:func:`check_keys`), a key given twice in one YAML mapping (:class:`_StrictLoader`), a key beside the
sections of a file, an attempt to set ``section``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

C = TypeVar("C", bound="StageConfig")

# Bounds on what a config may hold, so that no config file or override can hang the process (a YAML
# "billion laughs" alias bomb is a few hundred bytes that expand to billions of values).
MAX_CONFIG_BYTES = 1_000_000  # a config file's size on disk
MAX_CONFIG_VALUES = 100_000  # values (scalars, lists, mappings) after alias expansion
MAX_CONFIG_CHARS = 10_000_000  # characters of all strings after alias expansion
MAX_SHOWN_CHARS = 200  # an invalid value is shown in an error message cut to this many characters


# A seed every generator takes: numpy's seeding (transformers.set_seed) refuses anything outside [0, 2**32).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Passes over a training set (the Trainer stages: reward model, SFT, DPO).
Epochs = Annotated[float, Field(gt=0.0, le=1000.0, description="Passes over the training set (fractions allowed; "
                                "more than 1000 is a typo, and the step count it implies would not fit).")]


class ConfigError(ValueError):
    """A config file, override or value is invalid. The message names the field."""


def _union_args(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> (int, NoneType)), else the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _numeric_types(annotation: Any) -> tuple[set[type], bool]:
    """The int/float types an annotation admits, and whether it admits bool (``int | None`` -> ({int}, False))."""
    args = _union_args(annotation)
    return {a for a in args if a in (int, float)}, bool in args


def first_nonfinite_metric(value: Any, path: str = "") -> tuple[str, float] | None:
    """(the dotted path -- ``eval_after.mean_reward``, ``heldout[2].kl`` -- of the first NaN or infinite number in
    ``value``, that number) or None (dicts and lists at any depth; None, strings, booleans and nested config models
    are not numbers: a model checks its own fields). Shared by config validation and ``alignment.finite``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool | numbers.Integral):
        return None if math.isfinite(float(value)) else (path or "(value)", float(value))
    if isinstance(value, Mapping):
        items: Iterable[tuple[str, Any]] = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, item in items:
        bad = first_nonfinite_metric(item, sub_path)
        if bad is not None:
            return bad
    return None


def first_nonfinite(value: Any) -> float | None:
    """The first NaN or infinite number in ``value`` (:func:`first_nonfinite_metric` without its path), else None."""
    bad = first_nonfinite_metric(value)
    return None if bad is None else bad[1]


class ConfigModel(BaseModel):
    """Base of config models: a number field refuses a boolean (pydantic would read ``seed=true`` as 1), and
    every number in every field is finite (``learning_rate=.inf`` would train NaN weights, ``temperature=.inf``
    sample noise, ``epochs=.inf`` overflow): one validator, inherited by every config."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            numeric, takes_bool = _numeric_types(cls.model_fields[info.field_name].annotation)
            if numeric and not takes_bool:
                raise ValueError(f"expected {'an integer' if int in numeric else 'a number'}, not a boolean")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        bad = first_nonfinite(value)
        if bad is not None:
            raise ValueError(f"must be a finite number, not {bad} (inf and NaN are refused)")
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


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth (PyYAML silently keeps
    the last one, so ``data:`` written twice would drop the first section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *alias": merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise ConfigError(f"duplicate key {shown(key, 80)} ({where}); give each key once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, what: str) -> Any:
    """Safe YAML loading (:class:`_StrictLoader`: no duplicate keys) whose failures are ConfigErrors
    (yaml.YAMLError is left to the caller) and whose result is bounded by :func:`check_size`."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{what}: {cut(' '.join(str(exc).split()), 200)}") from None
    return check_size(value, what)


def parse_overrides(items: list[str], check: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Turn ``["a=1", "b.c=x"]`` into a nested dict; values are parsed as YAML scalars/flow collections.
    ``check(item, {"b": {"c": "x"}})`` sees each override alone first (to name the one holding a mistake)."""
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
        parts = key.split(".")
        if check is not None:
            alone: Any = value
            for part in reversed(parts):
                alone = {part: alone}
            check(item, alone)
        node = result
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


def read_config_file(path: str | Path, section: str, cls: type[BaseModel] | None = None) -> dict[str, Any]:
    """Read a YAML file holding either the stage's fields or a mapping with a section per stage (``section:``
    among them, or the whole file when it is ``cls``'s own sections, as a pipeline file is). In a file of
    sections every top-level key must be a known section (:data:`alignment.presets.FILE_SECTIONS`) holding a
    mapping; the keys of the part read are checked against ``cls`` (:func:`check_keys`)."""
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
    where = f"config file {path}"
    if cls is None:  # unchecked: the section when there is one, else the whole file
        return data[section] if isinstance(data.get(section), dict) else data
    fields = cls.model_fields
    if _holds_sections(cls):  # the pipeline's file: its sections, at the top or under ``pipeline:``
        if isinstance(data.get(section), dict) and section not in fields:
            for key in data:
                if key != section:
                    raise ConfigError(f"{where}: key {shown(key, 80)} sits beside {section!r}, which holds the "
                                      "sections; put it inside")
            data = data[section]
        check_keys(cls, data, where, file=True)
        return data
    sections = [k for k, v in data.items() if k in _file_sections() and isinstance(v, dict)
                and not (k in fields and _takes_mapping(fields[k].annotation))]
    if not sections:  # the stage's own fields
        check_keys(cls, data, where, file=True)
        return data
    for key, value in data.items():
        if key not in _file_sections():
            if key in fields:
                raise ConfigError(f"{where}: key {shown(key, 80)} sits beside the sections; put it under its section "
                                  f"({section}.{key})")
            raise ConfigError(f"{where}: unknown section {shown(key, 80)}{_nearest(key, _file_sections())}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: section {shown(key, 80)} must hold a mapping of settings, not "
                              f"{type(value).__name__}")
    own = next((s for s in (section, getattr(fields.get("section"), "default", None)) if s and data.get(s)), None)
    values = data[own] if own else {}
    check_keys(cls, values, where, file=True, path=(own or section,))
    return values


def _file_sections() -> tuple[str, ...]:
    from alignment.presets import FILE_SECTIONS  # the one table of section names

    return FILE_SECTIONS


def _nearest(key: Any, names: Any) -> str:
    """`` (did you mean 'x'?)`` with the valid name nearest ``key`` (difflib), else ``""``."""
    close = difflib.get_close_matches(str(key), [str(n) for n in names], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The one config model a field holds (``X`` or ``X | None``), else None (a list or union of models is left
    to pydantic)."""
    models = [a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _takes_mapping(annotation: Any) -> bool:
    """Whether a field of this type can hold a mapping (a config model or a dict): ``data: {source: x}`` is then
    that field's value, not a section (``RewardModelConfig.data`` is a folder name: there it is a section)."""
    return any(a is dict or a is Any or typing.get_origin(a) is dict or (isinstance(a, type) and issubclass(a, BaseModel))
               for a in _union_args(annotation))


def _holds_sections(cls: type[BaseModel]) -> bool:
    """Every field of ``cls`` (but ``section``) is a config model: its keys are sections (the pipeline's)."""
    return all(name == "section" or _model_of(f.annotation) for name, f in cls.model_fields.items())


def check_keys(cls: type[BaseModel], values: Any, where: str, *, file: bool = False, path: tuple[str, ...] = ()
               ) -> None:
    """Refuse a key ``cls`` has no field for, at any depth of nested configs, with one line naming it and the
    nearest valid name: ``config file x.yaml: unknown section 'dta' (did you mean 'data'?)``. ``section`` is
    fixed by the class: a file may repeat its value (a dumped config carries it), an override may not set it."""
    if not isinstance(values, dict) or cls.model_config.get("extra") != "forbid":
        return
    fields = cls.model_fields
    sections = _holds_sections(cls)
    for key, value in values.items():
        dotted = ".".join((*path, str(key)))
        if key == "section" and "section" in fields:
            fixed = fields["section"].default
            if file and value == fixed:
                continue
            raise ConfigError(f"{where}: {dotted!r} cannot be set: it names where the stage's settings sit "
                              f"({fixed!r}), not a setting")
        if key not in fields:
            if sections:
                owners = [s for s, f in fields.items() if (m := _model_of(f.annotation)) and key in m.model_fields]
                if owners and not isinstance(value, dict):
                    raise ConfigError(f"{where}: key {dotted!r} sits beside the sections; put it under its section "
                                      f"(e.g. {owners[0]}.{key})")
                names = [name for name in fields if name != "section"]
                if key in _file_sections():  # another command's section (dpo, compare, ...)
                    raise ConfigError(f"{where}: section {dotted!r} is not one of this config's ({', '.join(names)})")
                raise ConfigError(f"{where}: unknown section {dotted!r}{_nearest(key, names)}")
            raise ConfigError(f"{where}: unknown key {dotted!r}{_nearest(key, fields)}")
        model = _model_of(fields[key].annotation)
        if model is not None:
            check_keys(model, value, where, file=file, path=(*path, str(key)))


def format_validation_error(exc: ValidationError, prefix: str = "", shown_errors: int = 5) -> str:
    """``invalid config: section.field: message (got VALUE)``: one line, several errors separated by ``; `` (the
    first ``shown_errors``, then how many more); values are cut to MAX_SHOWN_CHARS characters."""
    parts = []
    errors = exc.errors(include_url=False)
    for err in errors[:shown_errors]:
        loc = ".".join(cut(str(p), 80) for p in err["loc"]) or "(config)"
        got = f" (got {shown(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")  # a validator's own message says what is wrong
        parts.append(f"{prefix}{loc}: {cut(' '.join(msg.split()), 2 * MAX_SHOWN_CHARS)}{got}")
    if len(errors) > shown_errors:
        parts.append(f"and {len(errors) - shown_errors} more")
    return "invalid config: " + "; ".join(parts)


def build_config(
    cls: type[C],
    *,
    base: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    explicit: dict[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Layer a config: class defaults < ``base`` (a preset) < YAML file < ``key=value`` < explicit flags.
    ``section``: the file's section to read (default the class's: ``rm_scalar`` for ``align rm --kind
    scalar``, whose class says ``rm``). An unknown key in the file or an override is a ConfigError naming it."""
    prefix = cls.model_fields["section"].default  # errors name the class's section (rm.learning_rate)
    section = section or prefix
    values: dict[str, Any] = dict(base or {})
    if config_file is not None:
        values = _deep_merge(values, read_config_file(config_file, section, cls))
    if overrides:
        values = _deep_merge(values, parse_overrides(
            overrides, check=lambda item, alone: check_keys(cls, alone, f"override {shown(item, 120)}")))
    if explicit:
        values = _deep_merge(values, {k: v for k, v in explicit.items() if v is not None})
    values.pop("section", None)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix=f"{prefix}." if prefix else "")) from None
