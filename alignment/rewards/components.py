"""Reward components: one interface for everything an online run can be rewarded by.

A component scores one batch: ``score(items, completions, *, token_ids=None, lengths=None)``, where

* ``items`` are the batch's prompt rows, one per completion (prompt-major, as the rollout orders them):
  dicts with every data column -- ``prompt`` (chat messages, as the data stage writes them, or a plain
  string), ``gold_answer`` and ``gold_checker`` (None on prompts without gold), any extra column; a
  ``PromptItem`` of ``alignment.data`` is accepted as well (see :func:`prompt_rows`);
* ``completions`` the B sampled texts; ``token_ids`` / ``lengths`` their tokens or token counts (the
  rollout's ``tokens`` and ``lengths``, EOS included), for components that count tokens;

and returns :class:`ComponentScores`: B values, each a float or None ("no opinion", e.g. gold on a prompt
without a gold answer), and optionally B variances. :func:`combine` turns the components' scores into
the (B,) reward the algorithm trains on: sum_c weight_c * value_c, where a None counts as 0 from that
component (TRL's GRPO treats None as NaN and sums with nansum: the same total), plus metrics per
component.

Each component has a pydantic config ``{name, kind, weight, ...kind fields}``; a run's ``rewards:`` is a
list of them, a union discriminated on ``kind`` (:data:`RewardComponentConfig`). Kinds
(:data:`REWARD_KINDS`; a new kind is one class decorated with :func:`register_reward_kind` in this
module, and the union is built from the registry):

``reward_model``  a folder written by ``align rm``: the scalar reward, or E[r] - lambda Var[r] for a
                  distributional one (``var_lambda``); its variances Var[r] come with the values.
``gold``          the gold checker (``alignment.evaluation.gold``): 1 right, 0 wrong, None without a gold
                  answer;
                  ``format_credit`` for a wrong answer that clearly states a final one
                  (:func:`states_final_answer`).
``length``        DAPO's soft overlong penalty (Yu et al. 2025, eq. 13) in tokens, optionally a band
                  below ``min_tokens`` too (:func:`overlong_penalty`).
``python``        a user function ``path/to/file.py:name`` called as
                  ``fn(prompts, completions, **columns) -> list[float | None]``.
``ensemble``      several reward-model folders sharing a tokenizer (``members``, or ``folder``: one written
                  by ``align rm ensemble=N``), aggregated by ``mean``, ``mean_minus_std`` (mean - k std)
                  or ``min`` (Coste et al. 2024).

Lifecycle: building a component reads nothing; ``check()`` reads the inputs' small files (config,
manifest) and fails early with a message naming the component; ``setup(device)`` loads what scoring
needs (weights, the user's module); ``key()`` is a JSON-able dict for stage keys (kind, weight and
parameters, plus the reward-model folders' manifest ``stage_key`` or the python file's SHA-256: a folder
moved or a file copied elsewhere keeps its key).

``reward_model=FOLDER`` alone is shorthand for ``rewards: [{name: rm, kind: reward_model, folder:
FOLDER, weight: 1}]`` (:func:`components_from`); for it :func:`rewards_key` is None and the caller keeps
the stage key it computed before components existed, so existing runs keep their keys.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from alignment import tasks_gym
from alignment.evaluation.gold import GoldCheckError, check_answer, extract_answer, extract_number
from alignment.io import read_manifest, sha256_file, sha256_text

log = logging.getLogger(__name__)


class RewardComponentError(ValueError):
    """A reward component cannot be built, loaded or run; the message names the component."""


@dataclass
class ComponentScores:
    """One component's scores for a batch of B completions: ``values`` (a float, or None for "no opinion")
    and optionally ``variance`` (B floats: a distributional reward model's Var[r])."""

    values: list[float | None]
    variance: list[float] | None = None

    def __post_init__(self) -> None:
        if self.variance is not None and len(self.variance) != len(self.values):
            raise ValueError(f"{len(self.variance)} variances for {len(self.values)} values")

    def __len__(self) -> int:
        return len(self.values)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
class ComponentConfig(BaseModel):
    """What every component's config holds. ``name`` (default: the kind) names the component in
    metrics (``rewards/<name>/mean``) and errors; ``weight`` multiplies its values in the total."""

    # Every number finite (a var_lambda of .inf would turn every reward into NaN). Not a ConfigModel: its
    # "*" validators cannot run on the discriminator ``kind``, so pydantic's own flag does it here.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="Component name (letters, digits, '_', '.', '-'): metrics rewards/<name>/...")
    kind: str
    weight: float = Field(1.0, allow_inf_nan=False, description="Multiplies the component's values in the total.")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None and isinstance(data.get("kind"), str):
            data = {**data, "name": data["kind"]}
        return data


class RewardModelComponentConfig(ComponentConfig):
    kind: Literal["reward_model"] = "reward_model"
    folder: str = Field(description="Folder written by `align rm` (scalar or distributional).")
    var_lambda: float = Field(0.1, ge=0.0, description="Distributional RM: the value is E[r] - lambda Var[r].")
    batch_size: int | None = Field(None, ge=1, description="Scoring batch (default: 8 on CPU, 64 on GPU).")


class GoldComponentConfig(ComponentConfig):
    kind: Literal["gold"] = "gold"
    format_credit: float = Field(0.0, ge=0.0, lt=1.0, description="Value of a wrong answer that clearly states a "
                                 "final answer (\\boxed{..}, 'the answer is ..'); 0: none.")
    tolerance: float = Field(1e-6, ge=0.0, description="Absolute tolerance of the 'number' checker.")
    lenient: bool = Field(False, description="reasoning_gym items with a numeric answer: also right when the "
                          "answer states the number in words around it ('The sum is 17.'; math-verify), where "
                          "reasoning-gym's own check wants the bare answer.")


class FormatComponentConfig(ComponentConfig):
    kind: Literal["format"] = "format"


class LengthComponentConfig(ComponentConfig):
    kind: Literal["length"] = "length"
    max_tokens: int = Field(ge=1, description="Completions longer than this get -1.")
    buffer: int = Field(0, ge=0, description="Linear penalty from 0 to -1 over the last `buffer` tokens below "
                        "max_tokens (DAPO's L_cache).")
    min_tokens: int | None = Field(None, ge=1, description="Optional lower bound: shorter completions are penalised.")
    min_buffer: int = Field(0, ge=0, description="Linear penalty from 0 at min_tokens to -1 at min_tokens - min_buffer.")

    @model_validator(mode="after")
    def _check(self) -> LengthComponentConfig:
        if self.buffer >= self.max_tokens:
            raise ValueError(f"buffer={self.buffer} must be below max_tokens={self.max_tokens}")
        if self.min_tokens is not None:
            if self.min_tokens > self.max_tokens - self.buffer:
                raise ValueError(f"min_tokens={self.min_tokens} is above the penalty-free band's top "
                                 f"max_tokens - buffer = {self.max_tokens - self.buffer}")
            if self.min_buffer >= self.min_tokens:
                raise ValueError(f"min_buffer={self.min_buffer} must be below min_tokens={self.min_tokens}")
        elif self.min_buffer:
            raise ValueError("min_buffer needs min_tokens")
        return self


class PythonComponentConfig(ComponentConfig):
    kind: Literal["python"] = "python"
    function: str = Field(description="'path/to/file.py:name': called as fn(prompts, completions, **columns) and "
                          "returning one float (or None) per completion.")

    @field_validator("function")
    @classmethod
    def _spec(cls, value: str) -> str:
        path, sep, name = value.rpartition(":")
        if not sep or not path.endswith(".py") or not name.isidentifier():
            raise ValueError(f"function {value!r} is not of the form 'path/to/file.py:function_name'")
        return value


class EnsembleComponentConfig(ComponentConfig):
    kind: Literal["ensemble"] = "ensemble"
    folder: str | None = Field(None, description="Folder written by `align rm ensemble=N`: its members (give this "
                               "or members).")
    members: list[str] = Field(default_factory=list, description="Folders written by `align rm`, sharing one "
                               "tokenizer (give these or folder).")
    aggregate: Literal["mean", "mean_minus_std", "min"] | None = Field(
        None, description="mean, mean - k * std (population std over members) or min (Coste et al. 2024); default: "
        "the ensemble folder's default (mean), or mean.")
    k: float = Field(1.0, ge=0.0, description="mean_minus_std: how many standard deviations to subtract.")
    var_lambda: float = Field(0.1, ge=0.0, description="Distributional members: each one's value is E[r] - lambda Var[r].")
    batch_size: int | None = Field(None, ge=1, description="Scoring batch of each member.")

    @model_validator(mode="after")
    def _members_or_folder(self) -> EnsembleComponentConfig:
        if self.folder is not None and self.members:
            raise ValueError("give either folder (written by `align rm ensemble=N`) or members, not both")
        if self.folder is None and len(self.members) < 2:
            raise ValueError(f"members lists {len(self.members)} folder(s): an ensemble needs at least 2 "
                             "(or give folder, written by `align rm ensemble=N`)")
        return self


# --------------------------------------------------------------------------------------------
# The interface and the registry
# --------------------------------------------------------------------------------------------
class RewardComponent:
    """Base of every component kind: ``check()``, ``setup(device)``, ``key()``, ``score(...)``."""

    kind: ClassVar[str]
    Config: ClassVar[type[ComponentConfig]]

    def __init__(self, config: ComponentConfig | Mapping[str, Any]):
        if not isinstance(config, self.Config):
            try:
                config = self.Config.model_validate(dict(config) if isinstance(config, Mapping) else config)
            except ValidationError as exc:
                raise RewardComponentError(f"reward component of kind '{self.kind}': {exc}") from None
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def weight(self) -> float:
        return self.config.weight

    def error(self, message: str) -> RewardComponentError:
        return RewardComponentError(f"reward component '{self.name}' ({self.kind}): {message}")

    def check(self) -> None:
        """Cheap checks of the inputs (small files only, no weights); raises :class:`RewardComponentError`."""

    def setup(self, device: str = "cpu", bf16: bool | None = None) -> None:
        """Load what scoring needs (reward-model weights, the user's module). Idempotent."""

    def key(self) -> dict[str, Any]:
        """What the component computes, JSON-able, for stage keys: kind, weight and parameters (not the name)."""
        return self.config.model_dump(mode="json", exclude={"name"})

    def score(self, items: Sequence[Any], completions: Sequence[str], *,
              token_ids: Sequence[Sequence[int]] | None = None,
              lengths: Sequence[int] | torch.Tensor | None = None) -> ComponentScores:
        raise NotImplementedError


REWARD_KINDS: dict[str, type[RewardComponent]] = {}


def register_reward_kind(kind: str) -> Callable[[type[RewardComponent]], type[RewardComponent]]:
    """Class decorator: register a component class under ``kind`` (its ``Config.kind`` literal)."""

    def decorator(cls: type[RewardComponent]) -> type[RewardComponent]:
        declared = cls.Config.model_fields["kind"].default
        if declared != kind:
            raise ValueError(f"{cls.__name__}.Config has kind={declared!r}, registered as {kind!r}")
        if kind in REWARD_KINDS and REWARD_KINDS[kind] is not cls:
            raise ValueError(f"reward kind {kind!r} is already registered ({REWARD_KINDS[kind].__name__})")
        cls.kind = kind
        REWARD_KINDS[kind] = cls
        return cls

    return decorator


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def prompt_rows(items: Sequence[Any]) -> list[dict[str, Any]]:
    """The batch's prompt rows as dicts: mappings are copied; a ``PromptItem`` (``messages``,
    ``gold_answer``, ``gold_checker``, ``extra``: a prompts source's other columns) becomes ``{**extra, "prompt":
    messages, "gold_answer": .., "gold_checker": ..}``."""
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            row = dict(item)
        elif hasattr(item, "messages"):
            row = {**(getattr(item, "extra", None) or {}), "prompt": item.messages,
                   "gold_answer": getattr(item, "gold_answer", None), "gold_checker": getattr(item, "gold_checker", None)}
        else:
            raise RewardComponentError(f"prompt row {i} is a {type(item).__name__}, not a mapping with a 'prompt'")
        if "prompt" not in row:
            raise RewardComponentError(f"prompt row {i} has no 'prompt' column (columns: {', '.join(row) or 'none'})")
        rows.append(row)
    return rows


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A row's ``prompt`` as chat messages (a string becomes the data stage's messages for it)."""
    if isinstance(prompt, str):
        from alignment.data import prompt_to_messages

        return prompt_to_messages(prompt)
    return [dict(m) for m in prompt]


def prompt_text(prompt: Any) -> str:
    """The text a gold check masks restatements of: the last message's content (as
    ``alignment.evaluation.evaluate``)."""
    if isinstance(prompt, str):
        return prompt
    return prompt[-1]["content"] if prompt else ""


def _batch(component: RewardComponent, items: Sequence[Any], completions: Sequence[str]) -> list[dict[str, Any]]:
    rows = prompt_rows(items)
    if len(rows) != len(completions):
        raise component.error(f"{len(rows)} prompt rows for {len(completions)} completions")
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


# --------------------------------------------------------------------------------------------
# reward_model
# --------------------------------------------------------------------------------------------
def _rm_kind(component: RewardComponent, folder: str) -> str:
    from alignment.rewards.model import RewardModelError, reward_model_kind

    if str(folder).startswith("@rm_"):  # the pipeline's '@rm_scalar' / '@rm_distributional', here unresolved
        raise component.error(f"folder {folder!r} is a placeholder that only the pipeline (`align run`) resolves "
                              "to the reward model it trains; run alone, give a reward-model folder (written by "
                              "`align rm`), e.g. runs/rm/scalar-<hash>")
    try:
        return reward_model_kind(folder)
    except RewardModelError as exc:
        raise component.error(str(exc)) from None


def _rm_key(folder: str) -> dict[str, Any]:
    """A reward-model folder in a stage key: its manifest's stage_key, else (no manifest) its resolved path."""
    stage_key = (read_manifest(folder) or {}).get("stage_key")
    return {"stage_key": stage_key} if stage_key else {"folder": str(Path(folder).resolve())}


def _load_scorer(component: RewardComponent, folder: str, device: str, bf16: bool | None, batch_size: int | None):
    from alignment.rewards.model import RewardModelError, RewardScorer

    try:
        return RewardScorer.from_pretrained(folder, device=device, bf16=bf16, batch_size=batch_size)
    except RewardModelError as exc:
        raise component.error(str(exc)) from None


def _scorer_values(scorer, prompts: list[list[dict[str, str]]], completions: Sequence[str], var_lambda: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[r] - lambda Var[r], Var[r]) as float32 (N,) tensors, computed as the online loop's shaping does."""
    scores = scorer.score(prompts, list(completions))
    return scores.mean - var_lambda * scores.var, scores.var


@register_reward_kind("reward_model")
class RewardModelComponent(RewardComponent):
    """A reward model from ``align rm``: the scalar reward, or E[r] - lambda Var[r] (distributional).

    ``scorer``: an already loaded ``RewardScorer`` (or anything with its ``score(prompts, texts)``), else
    ``setup`` loads the folder.
    """

    Config = RewardModelComponentConfig

    def __init__(self, config, scorer=None):
        super().__init__(config)
        self.scorer = scorer

    def check(self) -> None:
        _rm_kind(self, self.config.folder)

    def setup(self, device: str = "cpu", bf16: bool | None = None) -> None:
        if self.scorer is None:
            self.check()
            self.scorer = _load_scorer(self, self.config.folder, device, bf16, self.config.batch_size)

    def key(self) -> dict[str, Any]:
        return {**self.config.model_dump(mode="json", exclude={"name", "folder", "batch_size"}),
                "rm": _rm_key(self.config.folder)}

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        if self.scorer is None:
            raise self.error("not loaded: call setup(device) before score()")
        rows = _batch(self, items, completions)
        values, var = _scorer_values(self.scorer, [prompt_messages(r["prompt"]) for r in rows], completions,
                                     self.config.var_lambda)
        return ComponentScores(values.tolist(), var.tolist())


# --------------------------------------------------------------------------------------------
# gold
# --------------------------------------------------------------------------------------------
# An explicit final answer: "\boxed{X}", "the answer is X" / "final answer: X" / "answer = X" (not "the
# answer is not ...", "... unclear"), "result is X", "X is the (final) answer", a GSM8K "#### X" line.
_FINAL_ANSWER = re.compile(
    r"\\boxed\{\s*[^{}\s]"
    r"|\banswer\s*(?:is|was|:|=)\s*(?!(?:not|unclear|unknown|uncertain)\b)[^\s.?!]"
    r"|\bresult\s*(?:is|:|=)\s*(?!(?:not|unclear|unknown|uncertain)\b)[^\s.?!]"
    r"|[^\s.?!]\s+is\s+(?:the|my)\s+(?:final\s+|correct\s+)?answer\b"
    r"|^\s*#{2,4}\s*[^\s#]",
    re.I | re.M,
)


def states_final_answer(completion: str, checker: str, prompt: str | None = None) -> bool:
    """Whether a completion clearly states a final answer, right or wrong (``gold.format_credit``).

    ``alignment.evaluation.gold`` finds *an* answer in almost any text (its last number, a short last
    sentence), so this asks for more: an explicit answer statement (``\\boxed{X}``, "the answer is X",
    "final answer: X", "answer = X", "result is X", "X is the answer", a line "#### X"; "the answer is
    not ..." does not count) and, for the ``number`` checker, a number
    :func:`alignment.evaluation.gold.extract_number` reads, for ``exact`` an answer
    :func:`alignment.evaluation.gold.extract_answer` reads; for ``reasoning_gym`` one well-formed
    ``<answer>X</answer>`` (:func:`alignment.tasks_gym.format_reward`).
    """
    if checker == tasks_gym.CHECKER:  # reasoning-gym asks for the answer inside <answer></answer>
        return tasks_gym.format_reward(completion) > 0
    if checker in ("constraints", "ifeval") or not _FINAL_ANSWER.search(completion or ""):  # no final answer there
        return False
    if checker == "number":
        return extract_number(completion, prompt) is not None
    if checker == "exact":
        return extract_answer(completion, prompt) is not None
    return True


@register_reward_kind("gold")
class GoldComponent(RewardComponent):
    """1.0 when the completion states the prompt's gold answer, else 0.0 (``format_credit`` when it clearly
    states a wrong final answer); None on prompts without a gold answer."""

    Config = GoldComponentConfig

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        rows = _batch(self, items, completions)
        credit = self.config.format_credit
        values: list[float | None] = []
        for i, (row, text) in enumerate(zip(rows, completions, strict=True)):
            answer = row.get("gold_answer")
            if _missing(answer):
                values.append(None)
                continue
            checker, prompt = row.get("gold_checker"), prompt_text(row["prompt"])
            try:
                right = check_answer(text, str(answer), checker, prompt=prompt, tolerance=self.config.tolerance,
                                     lenient=self.config.lenient)
            except GoldCheckError as exc:
                raise self.error(f"row {i}: {exc}") from None
            if right:
                values.append(1.0)
            else:
                values.append(credit if credit and states_final_answer(text, checker, prompt) else 0.0)
        return ComponentScores(values)


# --------------------------------------------------------------------------------------------
# length
# --------------------------------------------------------------------------------------------
def overlong_penalty(length: int, max_tokens: int, buffer: int = 0, min_tokens: int | None = None,
                     min_buffer: int = 0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with an optional band below.

    0 for min_tokens <= length <= max_tokens - buffer; (max_tokens - buffer - length) / buffer over the
    buffer (linear, down to -1 at max_tokens); -1 above max_tokens. Below: (length - min_tokens) /
    min_buffer from min_tokens down to -1 at min_tokens - min_buffer, -1 further down (min_buffer 0: -1
    for any length below min_tokens).
    """
    if length > max_tokens:
        return -1.0
    if length > max_tokens - buffer:
        return (max_tokens - buffer - length) / buffer
    if min_tokens is not None and length < min_tokens:
        if length <= min_tokens - min_buffer:
            return -1.0
        return (length - min_tokens) / min_buffer
    return 0.0


@register_reward_kind("format")
class FormatComponent(RewardComponent):
    """1.0 when a completion states a final answer in its prompt's answer format, right or wrong
    (:func:`states_final_answer`: for reasoning-gym items one well-formed ``<answer>X</answer>``), else 0.0;
    None on prompts without a gold answer. The small format term of RLVR recipes (DeepSeek-R1-Zero)."""

    Config = FormatComponentConfig

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        rows = _batch(self, items, completions)
        return ComponentScores([None if _missing(row.get("gold_answer")) else
                                float(states_final_answer(text, row.get("gold_checker"), prompt_text(row["prompt"])))
                                for row, text in zip(rows, completions, strict=True)])


@register_reward_kind("length")
class LengthComponent(RewardComponent):
    """:func:`overlong_penalty` of each completion's token count (from ``lengths`` or ``token_ids``)."""

    Config = LengthComponentConfig

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        if lengths is None and token_ids is None:
            raise self.error("needs the completions' token counts (lengths= or token_ids=)")
        counts = ([len(t) for t in token_ids] if lengths is None else
                  lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths))
        if len(counts) != len(completions):
            raise self.error(f"{len(counts)} token counts for {len(completions)} completions")
        cfg = self.config
        return ComponentScores([overlong_penalty(int(n), cfg.max_tokens, cfg.buffer, cfg.min_tokens, cfg.min_buffer)
                                for n in counts])


# --------------------------------------------------------------------------------------------
# python
# --------------------------------------------------------------------------------------------
@register_reward_kind("python")
class PythonComponent(RewardComponent):
    """A user function ``path/to/file.py:name``, loaded from the file (not from ``sys.path``), called as
    ``fn(prompts, completions, **columns)``: ``prompts`` the rows' ``prompt`` values, ``completions`` the
    texts, ``columns`` every other column of the rows as a list (``gold_answer=[...]``, ...), and
    ``completion_ids`` when the caller has the token ids; the function should take ``**kwargs`` for the
    columns it does not use. It returns one value per completion: a finite number (bools count as 0/1)
    or None. Anything else is an error naming the component.

    The user's file runs inside the training process, so whatever it raises -- ``SystemExit`` from a
    ``sys.exit()`` included, anything but Ctrl-C -- is an error naming the file, never a silent exit. A
    function that returns None for every completion of its first :data:`ALWAYS_NONE_CALLS` calls is refused
    (an always-None reward trains on nothing); later all-None batches are counted in the
    ``rewards/<name>/none_share`` metric, the first one with a warning."""

    Config = PythonComponentConfig
    ALWAYS_NONE_CALLS: ClassVar[int] = 3

    def __init__(self, config):
        super().__init__(config)
        self.fn: Callable[..., Any] | None = None
        self.calls = 0  # calls of the function so far
        self.calls_with_a_value = 0  # of them, those that gave at least one completion a value
        self._warned = False

    @property
    def path(self) -> Path:
        return Path(self.config.function.rpartition(":")[0])

    @property
    def function_name(self) -> str:
        return self.config.function.rpartition(":")[2]

    def check(self) -> None:
        if not self.path.is_file():
            raise self.error(f"file {self.path} does not exist")

    def setup(self, device: str = "cpu", bf16: bool | None = None) -> None:
        if self.fn is not None:
            return
        self.check()
        digest = sha256_file(self.path)
        module_name = f"alignment_reward_{re.sub(r'[^0-9A-Za-z_]', '_', self.name)}_{digest[:12]}"
        spec = importlib.util.spec_from_file_location(module_name, self.path)
        if spec is None or spec.loader is None:
            raise self.error(f"{self.path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so dataclasses and pickling inside the file find their module
        try:
            spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the user's file must not end the run
            del sys.modules[module_name]
            raise self.error(f"importing {self.path} failed: {_raised(exc)}") from exc
        fn = getattr(module, self.function_name, None)
        if fn is None:
            raise self.error(f"{self.path} defines no {self.function_name!r}")
        if not callable(fn):
            raise self.error(f"{self.path}: {self.function_name!r} is not callable ({type(fn).__name__})")
        self.fn = fn

    def key(self) -> dict[str, Any]:
        self.check()
        return {**self.config.model_dump(mode="json", exclude={"name", "function"}),
                "file": self.path.name, "function": self.function_name, "sha256": sha256_file(self.path)}

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        self.setup()
        rows = _batch(self, items, completions)
        names = list(dict.fromkeys(k for row in rows for k in row if k != "prompt"))
        columns = {k: [row.get(k) for row in rows] for k in names}
        if token_ids is not None:
            columns.setdefault("completion_ids", [list(t) for t in token_ids])
        try:
            out = self.fn([row["prompt"] for row in rows], list(completions), **columns)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the user's function must not end the run
            raise self.error(f"{self.path}: {self.function_name}() raised {_raised(exc)}") from exc
        values = self._validate(out, len(rows))
        self._count(values)
        return ComponentScores(values)

    def _count(self, values: list[float | None]) -> None:
        """Refuse an always-None function (its first ALWAYS_NONE_CALLS calls gave no value); warn on its first
        all-None batch otherwise."""
        self.calls += 1
        if any(v is not None for v in values):
            self.calls_with_a_value += 1
            return
        if self.calls_with_a_value == 0 and self.calls >= self.ALWAYS_NONE_CALLS:
            raise self.error(f"{self.path}: {self.function_name}() returned None for every completion of its "
                             f"first {self.calls} calls: an always-None reward cannot train; return a number "
                             "(None only where it has no opinion)")
        if not self._warned:
            self._warned = True
            log.warning("reward component '%s' (python): %s() returned None for all %d completions of a batch; "
                        "they count as 0 (see rewards/%s/none_share)", self.name, self.function_name, len(values),
                        self.name)

    def _validate(self, out: Any, n: int) -> list[float | None]:
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # numpy array, torch tensor
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise self.error(f"{self.function_name}() returned a {type(out).__name__}, not a list of {n} numbers "
                             "or None")
        if len(out) != n:
            raise self.error(f"{self.function_name}() returned {len(out)} values for {n} completions")
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
            elif not isinstance(v, numbers.Real):
                raise self.error(f"{self.function_name}() returned {v!r} ({type(v).__name__}) for completion {i}, "
                                 "not a number or None")
            elif not math.isfinite(float(v)):
                raise self.error(f"{self.function_name}() returned {float(v)} for completion {i} (NaN or infinite)")
            else:
                values.append(float(v))
        return values


def _raised(exc: BaseException) -> str:
    """``ZeroDivisionError: division by zero``; a ``SystemExit`` says it is a ``sys.exit(code)`` call."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: sys.exit({exc.code!r}) was called"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# ensemble
# --------------------------------------------------------------------------------------------
def aggregate_ensemble(values: torch.Tensor, how: str, k: float = 1.0) -> torch.Tensor:
    """(M, B) member values -> (B,): ``mean``, ``mean_minus_std`` (mean - k * population std over the M
    members) or ``min`` (worst-case; Coste et al. 2024)."""
    if how == "mean":
        return values.mean(0)
    if how == "mean_minus_std":
        return values.mean(0) - k * values.std(0, unbiased=False)
    if how == "min":
        return values.min(0).values
    raise ValueError(f"unknown ensemble aggregate {how!r}; known: mean, mean_minus_std, min")


def _tokenizer_identity(folder: str) -> dict[str, str]:
    """What identifies the tokenizer a reward-model folder was trained with, without loading it: the
    vocabulary fingerprint its config records, and the base model its manifest names."""
    out = {}
    try:
        sha = json.loads((Path(folder) / "config.json").read_text()).get("alignment_tokenizer_sha")
    except (OSError, ValueError):
        sha = None
    if sha:
        out["vocabulary fingerprint"] = sha
    base = ((read_manifest(folder) or {}).get("config") or {}).get("model")
    if base:
        out["base model"] = base
    return out


@register_reward_kind("ensemble")
class EnsembleComponent(RewardComponent):
    """Reward-model folders scored alike (E[r] - lambda Var[r] each) and aggregated per completion.

    The members must share a tokenizer: compared by the vocabulary fingerprint each folder's config
    records, else by the base model its manifest names. ``scorers``: already loaded scorers, one per
    member (else ``setup`` loads the folders).
    """

    Config = EnsembleComponentConfig

    def __init__(self, config, scorers: Sequence[Any] | None = None):
        super().__init__(config)
        self._folder_manifest: dict[str, Any] | None = None
        if scorers is not None and self.config.members and len(scorers) != len(self.config.members):
            raise self.error(f"{len(scorers)} scorers for {len(self.config.members)} members")
        self.scorers = list(scorers) if scorers is not None else None

    def _ensemble_manifest(self) -> dict[str, Any]:
        """The ensemble folder's manifest (read once; its stage and members checked, not its files' hashes)."""
        if self._folder_manifest is None:
            from alignment.rewards.model import ENSEMBLE_STAGE

            folder = self.config.folder
            manifest = read_manifest(folder)
            if manifest is None:
                raise self.error(f"{folder} is not a reward-model ensemble (written by `align rm ensemble=N`): "
                                 "no readable manifest.json")
            if manifest.get("stage") == "reward_model":
                raise self.error(f"{folder} is one reward model, not an ensemble: use it as a component "
                                 f"{{kind: reward_model, folder: {folder}}}, or list several as members")
            if manifest.get("stage") != ENSEMBLE_STAGE or not isinstance(manifest.get("members"), list):
                raise self.error(f"{folder} is not a reward-model ensemble (written by `align rm ensemble=N`): "
                                 f"its manifest says stage {manifest.get('stage')!r}")
            self._folder_manifest = manifest
        return self._folder_manifest

    def member_folders(self) -> list[str]:
        """The members' folders: ``members``, or those the ``folder``'s manifest lists (inside it)."""
        if self.config.folder is None:
            return list(self.config.members)
        root = Path(self.config.folder)
        folders = []
        for m in self._ensemble_manifest()["members"]:
            name = m.get("folder") if isinstance(m, dict) else None
            path = root / str(name or "")
            if not name or path.resolve() == root.resolve() or not path.resolve().is_relative_to(root.resolve()):
                raise self.error(f"{root}/manifest.json lists a member outside the folder: {m!r}")
            folders.append(str(path))
        return folders

    def aggregate(self) -> str:
        """The aggregate used: the config's, else the ensemble folder's default, else mean."""
        if self.config.aggregate is not None:
            return self.config.aggregate
        if self.config.folder is not None:
            how = (self._ensemble_manifest().get("aggregate") or {}).get("how")
            if how in ("mean", "mean_minus_std", "min"):
                return how
        return "mean"

    def check(self) -> None:
        if self.config.folder is not None:
            from alignment.inputs import stage_output_problem
            from alignment.rewards.model import ENSEMBLE_STAGE

            self._ensemble_manifest()
            problem, _ = stage_output_problem(self.config.folder, ENSEMBLE_STAGE)  # complete and intact
            if problem is not None:
                raise self.error(f"{self.config.folder} is not a complete reward-model ensemble: {problem}")
        members = self.member_folders()
        if self.scorers is not None and len(self.scorers) != len(members):
            raise self.error(f"{len(self.scorers)} scorers for {len(members)} members")
        for folder in members:
            _rm_kind(self, folder)
        first = _tokenizer_identity(members[0])
        for i, folder in enumerate(members[1:], start=1):
            ident = _tokenizer_identity(folder)
            shared = [what for what in first if what in ident]
            if not shared:
                raise self.error(f"cannot tell whether member {i} ({folder}) shares member 0's ({members[0]}) "
                                 "tokenizer: neither a vocabulary fingerprint nor a base model recorded for both")
            what = shared[0]
            if ident[what] != first[what]:
                raise self.error(f"member {i} ({folder}) was trained with another tokenizer than member 0 "
                                 f"({members[0]}): {what} {ident[what]} != {first[what]}; ensemble members "
                                 "must share a tokenizer")

    def setup(self, device: str = "cpu", bf16: bool | None = None) -> None:
        if self.scorers is None:
            self.check()
            self.scorers = [_load_scorer(self, folder, device, bf16, self.config.batch_size)
                            for folder in self.member_folders()]

    def key(self) -> dict[str, Any]:
        # The same key whether the members come listed or from their ensemble folder (and as before folder existed).
        return {**self.config.model_dump(mode="json", exclude={"name", "members", "batch_size", "folder"}),
                "aggregate": self.aggregate(), "members": [_rm_key(folder) for folder in self.member_folders()]}

    def member_values(self, items, completions) -> torch.Tensor:
        """(M, B) each member's E[r] - lambda Var[r]."""
        if self.scorers is None:
            raise self.error("not loaded: call setup(device) before score()")
        rows = _batch(self, items, completions)
        prompts = [prompt_messages(r["prompt"]) for r in rows]
        return torch.stack([_scorer_values(s, prompts, completions, self.config.var_lambda)[0] for s in self.scorers])

    def score(self, items, completions, *, token_ids=None, lengths=None) -> ComponentScores:
        values = aggregate_ensemble(self.member_values(items, completions), self.aggregate(), self.config.k)
        return ComponentScores(values.tolist())


# --------------------------------------------------------------------------------------------
# The config union, building, keys
# --------------------------------------------------------------------------------------------
# Every registered kind's config, discriminated on ``kind``: the type of a run's ``rewards:`` entries.
RewardComponentConfig = Annotated[Union[tuple(cls.Config for cls in REWARD_KINDS.values())],  # noqa: UP007
                                  Field(discriminator="kind")]
_CONFIGS = TypeAdapter(list[RewardComponentConfig])


def check_unique_names(configs: Sequence[ComponentConfig]) -> None:
    """Raise :class:`RewardComponentError` when two components share a name (their metrics would collide)."""
    seen: set[str] = set()
    for c in configs:
        if c.name in seen:
            raise RewardComponentError(f"two reward components are named '{c.name}': give each a distinct name")
        seen.add(c.name)


def parse_reward_configs(rewards: Sequence[Mapping[str, Any] | ComponentConfig]) -> list[ComponentConfig]:
    """Validate a ``rewards:`` list (dicts or configs) into configs; errors name the entry and field."""
    if not rewards:
        raise RewardComponentError("rewards is empty: give at least one component")
    raw = [r.model_dump() if isinstance(r, ComponentConfig) else r for r in rewards]
    try:
        configs = _CONFIGS.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(f"rewards[{'.'.join(str(p) for p in e['loc'])}]: {e['msg']}" for e in exc.errors())
        raise RewardComponentError(f"invalid rewards: {problems} (kinds: {', '.join(REWARD_KINDS)})") from None
    check_unique_names(configs)
    return configs


def build_components(configs: Sequence[ComponentConfig]) -> list[RewardComponent]:
    """One component per config, from the registry (nothing is read or loaded)."""
    return [REWARD_KINDS[c.kind](c) for c in configs]


def components_from(reward_model: str | None, rewards: Sequence[Mapping[str, Any] | ComponentConfig] | None,
                    *, var_lambda: float = 0.1) -> list[RewardComponent]:
    """The run's components: ``rewards`` when given, else the shorthand ``reward_model=FOLDER``, i.e.
    ``[{name: rm, kind: reward_model, folder: FOLDER, weight: 1, var_lambda: var_lambda}]`` (pass the
    run's ``reward_var_lambda``). Giving both, or neither, is an error."""
    if rewards is not None and reward_model is not None:
        raise RewardComponentError("give either reward_model (one folder written by `align rm`) or rewards (a list "
                                   "of components), not both: add the folder as a reward_model component instead")
    if rewards is None:
        if reward_model is None:
            raise RewardComponentError("no reward: give reward_model (a folder written by `align rm`) or rewards")
        return [RewardModelComponent(RewardModelComponentConfig(name="rm", folder=str(reward_model), weight=1.0,
                                                                var_lambda=var_lambda))]
    return build_components(parse_reward_configs(rewards))


def rewards_key(reward_model: str | None, rewards: Sequence[Mapping[str, Any] | ComponentConfig] | None,
                *, var_lambda: float = 0.1) -> str | None:
    """The SHA-256 of the components' keys, for the stage key; None for the ``reward_model=FOLDER``
    shorthand, whose caller keeps the key it computed before components existed (the RM's stage key and
    ``reward_var_lambda`` are already in it), so existing runs keep their keys."""
    if rewards is None:
        components_from(reward_model, rewards, var_lambda=var_lambda)  # the same errors as building
        return None
    keys = [[c.name, c.key()] for c in components_from(reward_model, rewards, var_lambda=var_lambda)]
    return sha256_text(json.dumps(keys, sort_keys=True) + "rewards-schema=1")


# --------------------------------------------------------------------------------------------
# Scoring and combining
# --------------------------------------------------------------------------------------------
def score_components(components: Sequence[RewardComponent], items: Sequence[Any], completions: Sequence[str], *,
                     token_ids: Sequence[Sequence[int]] | None = None,
                     lengths: Sequence[int] | torch.Tensor | None = None) -> dict[str, ComponentScores]:
    """Every component's scores for one batch, by name (each checked to hold one value per completion)."""
    rows = prompt_rows(items)
    out = {}
    for c in components:
        scores = c.score(rows, completions, token_ids=token_ids, lengths=lengths)
        if len(scores) != len(completions):
            raise c.error(f"returned {len(scores)} values for {len(completions)} completions")
        out[c.name] = scores
    return out


def _aligned(components: Sequence[RewardComponent],
             scores: Mapping[str, ComponentScores] | Sequence[ComponentScores]) -> list[ComponentScores]:
    if isinstance(scores, Mapping):
        missing = [c.name for c in components if c.name not in scores]
        if missing:
            raise RewardComponentError(f"no scores for reward component(s) {', '.join(missing)}")
        return [scores[c.name] for c in components]
    if len(scores) != len(components):
        raise RewardComponentError(f"{len(scores)} score lists for {len(components)} reward components")
    return list(scores)


def combine(components: Sequence[RewardComponent],
            scores: Mapping[str, ComponentScores] | Sequence[ComponentScores]
            ) -> tuple[torch.Tensor, dict[str, float | None]]:
    """(total (B,) float32, metrics): total_i = sum_c weight_c * value_ci, a None value contributing 0
    from its component (TRL's nansum of NaNs: the same total; a completion every component passes on
    gets 0). ``scores``: by component name, or in the components' order.

    Metrics per component: ``rewards/<name>/mean`` (unweighted, over the non-None values; None when all
    are None) and ``rewards/<name>/none_share`` (the share of None values).
    """
    if not components:
        raise RewardComponentError("combine: no reward components")
    per = _aligned(components, scores)
    n = len(per[0])
    total: torch.Tensor | None = None
    metrics: dict[str, float | None] = {}
    for c, s in zip(components, per, strict=True):
        if len(s) != n:
            raise c.error(f"{len(s)} values, other components gave {n}")
        values = torch.tensor([0.0 if v is None else v for v in s.values], dtype=torch.float32)
        given = [v for v in s.values if v is not None]
        term = values if c.weight == 1.0 else c.weight * values
        total = term if total is None else total + term
        metrics[f"rewards/{c.name}/mean"] = sum(given) / len(given) if given else None
        metrics[f"rewards/{c.name}/none_share"] = (n - len(given)) / n if n else 0.0
    return total, metrics


def combined_variance(components: Sequence[RewardComponent],
                      scores: Mapping[str, ComponentScores] | Sequence[ComponentScores]) -> torch.Tensor | None:
    """sum_c weight_c^2 Var_c (components taken as independent) over the components that report variances,
    (B,) float32; None when none does. For the single reward-model shorthand it is that model's Var[r]."""
    total = None
    for c, s in zip(components, _aligned(components, scores), strict=True):
        if s.variance is None:
            continue
        var = torch.tensor(s.variance, dtype=torch.float32)
        term = var if c.weight == 1.0 else c.weight**2 * var
        total = term if total is None else total + term
    return total
