"""Data stage: load preference data, binarise raw ratings, map ratings to distributions, split.

Four input shapes are understood (detected from the columns, or forced with ``format``):

* ``raw``   -- one row per response with five HelpSteer2 attribute scores 0-4
  (``prompt, response, helpfulness, correctness, coherence, complexity, verbosity``); responses of
  the same prompt are *binarised* into chosen/rejected pairs.
* ``pairs`` -- ``prompt, chosen, rejected`` as strings or chat message lists, optionally with
  ``chosen_rating, rejected_rating`` (e.g. ``esfrankel17/HelpSteer2_binarized``, UltraFeedback).
* ``hh``    -- Anthropic hh-rlhf transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is
  everything before the last Assistant turn.
* ``prompts`` -- prompts without responses for the online stages: ``prompt`` (text or chat messages),
  optionally ``gold_answer``/``gold_checker`` and any other columns, which travel with the prompt
  (``PromptItem.extra``) to the reward components; detected when a file has a ``prompt`` column and
  none of the pair, raw or comparison columns (the embedded ``demo-verifiable`` set is one). The splits
  hold one row per prompt with empty (null) pair columns; :meth:`PairData.load` refuses them to the
  stages that need pairs (reward model, DPO).
* ``comparisons`` -- OpenAI's summarize-from-feedback comparisons (``openai/summarize_from_feedback``,
  configuration ``comparisons``, and the JSON files it was built from): ``info`` (the post's
  ``subreddit``, ``title``, ``post``, or a news ``article``), ``summaries`` (two, each with ``text``) and
  ``choice`` (0 or 1, the human's pick). The post becomes the TL;DR prompt text of the seed documents,
  ``"SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"`` (the shared ``tldr-rlaif`` files' form),
  chosen = the picked summary; a pair judged by several workers is one pair by majority vote (an even
  split is a tie, dropped).

Every pair is written with its prompt as chat messages, so later stages apply the model's own chat
template. A rating x in [rating_min, rating_max] (default [0, 4]) maps to f(x) = 1 + 9 (x - min) /
(max - min) in [1, 10] (= 2.25 x + 1 on HelpSteer2's scale) and then to a 10-bin distribution split
between the two neighbouring integers.

Departures from the esfrankel17/HelpSteer2_binarized recipe: prompts with more than two responses
are paired best-vs-worst by default (``pairing="all_pairs"`` keeps every non-tied pair), and
message contents are stripped of surrounding whitespace.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import logging
import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from alignment import __version__, tasks_gym, tasks_ifeval
from alignment.config import Seed, StageConfig, cut
from alignment.evaluation.gold import CHECKERS, GoldCheckError, validate_reference
from alignment.footprint import records_footprint
from alignment.hub import hub_status, looks_like_repo_id, offline_requested
from alignment.io import MANIFEST, atomic_directory, sha256_file, sha256_text, write_json
from alignment.ownership import local_paths
from alignment.stage import StagePlan, StageResult, exclusive_stage, reuse_or_guard, stage_folder

log = logging.getLogger(__name__)

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
N_BINS = 10
ROLES = frozenset({"system", "user", "assistant"})
GOLD_COLUMNS = ("gold_answer", "gold_checker")  # optional, per prompt: a checkable answer and how to check it
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "chosen_rating", "rejected_rating", "response", *ATTRIBUTES,
                     *GOLD_COLUMNS)
BUILTIN_SOURCES = {"demo": "demo_helpsteer.jsonl", "demo-verifiable": "demo_verifiable.jsonl"}
# Splits a hub dataset is read from when the config names none.
DEFAULT_HUB_SPLITS = {"esfrankel17/HelpSteer2_binarized": "average_rating_split", "nvidia/HelpSteer2": "train"}
# Configurations (subsets) a hub dataset is read from when the config names none.
DEFAULT_HUB_SUBSETS = {"openai/summarize_from_feedback": "comparisons"}
# Lone surrogates mark bytes that were not valid UTF-8 (decoded with errors="surrogateescape").
_UNDECODABLE = re.compile("[\udc80-\udcff]")
# Any other lone surrogate (a JSON "\ud800" escape) is text that cannot be written as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The longest text one field may hold: the stdlib csv reader's own limit (csv.field_size_limit()),
# applied to every file format, so one line of megabytes is a bad row, not a stall or a memory spike.
MAX_FIELD_CHARS = 131_072
# The most a .gz input may expand to (1 GiB): past it the file is refused, before more is held in memory.
MAX_DECOMPRESSED_BYTES = 1 << 30
_HS2_TURN = re.compile(r"\s*<extra_id_1>(User|Assistant)\s*\n?")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

# 2: raw responses grouped by the exact prompt string; 3: gold columns; 4: given pairs with tied or reversed
# ratings, or contradicting each other, dropped. Bump when the output files change shape or meaning: invalidates reuse
SCHEMA_VERSION = 4
Message = dict[str, str]
Format = Literal["raw", "pairs", "hh", "comparisons", "prompts"]
COMPARISON_COLUMNS = ("info", "summaries", "choice")
# Columns that mean a file is not a prompts-only source (a near miss of one, e.g. "respnse", stops detection).
PAIR_LIKE_COLUMNS = ("chosen", "rejected", "response", "chosen_rating", "rejected_rating", *ATTRIBUTES,
                     *COMPARISON_COLUMNS)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
class DataConfig(StageConfig):
    """Where the preference data comes from and how it becomes train/validation pairs."""

    section: str = "data"
    source: str = Field(
        "demo",
        description="'demo' (the embedded preference set), 'demo-verifiable' (embedded prompts with checkable "
        "constraints and answers, for the online stages), 'gym:NAME[:SIZE],...' (reasoning-gym tasks as prompts with "
        "gold answers, e.g. gym:chain_sum,letter_counting:50; docs/data.md), 'ifeval:N' (N IFEval-style "
        "instruction prompts graded by IFEval's checkers; docs/data.md), a local .jsonl/.json/.parquet/.csv file, or a Hugging Face "
        "dataset id such as esfrankel17/HelpSteer2_binarized or nvidia/HelpSteer2.",
    )
    format: Literal["auto", "raw", "pairs", "hh", "comparisons", "prompts"] = Field(
        "auto", description="Input shape; 'auto' detects it from the columns ('prompts': prompts only, for the "
        "online stages)."
    )
    split: str | None = Field(None, description="Hub split to read (default: the dataset's usual one).")
    subset: str | None = Field(None, description="Hub configuration (subset) to read, e.g. 'comparisons' of "
                               "openai/summarize_from_feedback (its default); most datasets have none.")
    column_map: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns: {canonical_name: name_in_source}."
    )
    score: Literal["average", "helpfulness", "weighted"] = Field(
        "average", description="How raw responses are scored for binarisation."
    )
    score_weights: dict[str, float] = Field(
        default_factory=dict, description="Attribute weights for score='weighted' (normalised to sum 1)."
    )
    pairing: Literal["best_worst", "all_pairs"] = Field(
        "best_worst", description="Raw form: one best-vs-worst pair per prompt, or every non-tied pair."
    )
    rating_min: float = Field(0.0, allow_inf_nan=False, description="Lowest rating on the source scale (finite).")
    rating_max: float = Field(4.0, allow_inf_nan=False, description="Highest rating on the source scale (finite).")
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of prompts held out.")
    seed: Seed = Field(0, description="Seed of the train/validation split and of max_pairs sampling.")
    max_pairs: int | None = Field(None, ge=2, description="Keep a seeded random subset of this many pairs.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="'error' stops at bad input naming file, row and field; 'skip' drops and counts."
    )
    extra_train: list[str] = Field(
        default_factory=list, description="Further local pair files (prompt/chosen/rejected; .jsonl/.json/.parquet/"
        ".csv) whose pairs join the train split only, e.g. a preference store's rounds (`align round`): a pair "
        "whose prompt is held out is dropped and counted, so no validation prompt is trained on; their content "
        "hashes join the stage key.")
    gym_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="A 'gym:' source's generator settings (difficulty) per task, e.g. "
        "{chain_sum: {min_terms: 2, max_terms: 3}} (the reasoning-gym task's config fields).")

    @field_validator("column_map")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CANONICAL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown canonical column(s) {unknown}; expected some of {list(CANONICAL_COLUMNS)}")
        return value

    @field_validator("score_weights", mode="before")
    @classmethod
    def _no_bool_weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(isinstance(w, bool) for w in value.values()):
            raise ValueError("weights must be numbers, not booleans")
        return value

    @field_validator("score_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}; expected some of {list(ATTRIBUTES)}")
        if any(w < 0 or not math.isfinite(w) for w in value.values()):
            raise ValueError("weights must be finite and >= 0 (the score must stay on the rating scale)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.rating_max <= self.rating_min:
            raise ValueError("rating_max must be greater than rating_min")
        if not math.isfinite(self.rating_max - self.rating_min):
            raise ValueError("rating_max - rating_min must be a finite number (the scale maps to 1..10)")
        if self.gym_settings and not self.source.startswith(tasks_gym.PREFIX):
            raise ValueError("gym_settings apply to a 'gym:' source only")
        if self.score == "weighted" and sum(self.score_weights.values()) <= 0:
            raise ValueError("score='weighted' needs score_weights with a positive sum")
        return self


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class DataError(ValueError):
    """The input cannot be used at all (missing file or columns, empty file, unreachable hub)."""


@dataclass(frozen=True)
class RowIssue:
    file: str
    row: int  # 1-based record number in the source (the line number for .jsonl)
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


class BadRowsError(DataError):
    """Some rows are invalid and ``on_bad_rows`` is 'error'. ``issues`` lists every one."""

    def __init__(self, issues: list[RowIssue], shown: int = 20):
        self.issues = issues
        lines = [str(i) for i in issues[:shown]]
        if len(issues) > shown:
            lines.append(f"... and {len(issues) - shown} more")
        super().__init__(
            f"{len(issues)} bad row(s):\n  " + "\n  ".join(lines)
            + "\nFix them, or pass on_bad_rows=skip (--on-bad-rows skip) to drop and count them."
        )


class _Bad(Exception):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------------
# Rating -> distribution
# --------------------------------------------------------------------------------------------
def rating_to_scale10(x: float, rating_min: float = 0.0, rating_max: float = 4.0) -> float:
    """f(x) = 1 + 9 (x - min) / (max - min); on [0, 4] this is 2.25 x + 1."""
    if not (rating_min <= x <= rating_max):
        raise ValueError(f"rating {x} outside [{rating_min}, {rating_max}]")
    # Rounded so that e.g. 2.25 * 2.2 + 1 = 5.95 does not become 5.9499999 and move mass by 1e-16.
    return round(1.0 + 9.0 * (x - rating_min) / (rating_max - rating_min), 9)


def rating_to_distribution(x: float, rating_min: float = 0.0, rating_max: float = 4.0) -> np.ndarray:
    """A rating as 10 probabilities over the integers 1..10 (index i <-> rating i + 1).

    The mass is split between the two integers around f(x): f = 5.5 -> 0.5 on 5 and 0.5 on 6;
    f = 10 -> 1.0 on 10. The mean of the distribution is exactly f(x).
    """
    f = rating_to_scale10(x, rating_min, rating_max)
    lo = math.floor(f)
    frac = round(f - lo, 12)
    dist = np.zeros(N_BINS, dtype=np.float64)
    dist[lo - 1] = 1.0 - frac
    if frac > 0:
        dist[lo] = frac
    return dist


# --------------------------------------------------------------------------------------------
# Parsing helpers (each raises _Bad(field, message) on invalid input)
# --------------------------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, field: str) -> str:
    if _is_missing(value):
        raise _Bad(field, "missing value")
    if not isinstance(value, str):
        raise _Bad(field, f"expected text, got {type(value).__name__}")
    if _UNDECODABLE.search(value):
        raise _Bad(field, "undecodable bytes (the text is not valid UTF-8)")
    if _SURROGATE.search(value):
        raise _Bad(field, "invalid text: a lone UTF-16 surrogate (e.g. a JSON \\ud800 escape), not valid Unicode")
    if not value.strip():
        raise _Bad(field, "empty text")
    return value.strip()


def prompt_to_messages(text: str, field: str = "prompt") -> list[Message]:
    """A prompt string as chat messages; HelpSteer2's ``<extra_id_1>User/Assistant`` markers become turns."""
    text = _text(text, field)
    if "<extra_id_1>" not in text:
        return [{"role": "user", "content": text}]
    parts = _HS2_TURN.split(text)
    messages: list[Message] = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        if not content.strip():
            raise _Bad(field, f"empty {role} turn")
        messages.append({"role": role.lower(), "content": content.strip()})
    return messages


def _messages(value: Any, field: str) -> list[Message]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        return prompt_to_messages(value, field)
    if _is_missing(value):
        raise _Bad(field, "missing value")
    if not isinstance(value, (list, tuple)):
        raise _Bad(field, f"expected text or a list of chat messages, got {type(value).__name__}")
    if not value:
        raise _Bad(field, "empty message list")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _Bad(field, f"message {i} must be an object with 'role' and 'content'")
        if not isinstance(msg["role"], str) or msg["role"] not in ROLES:
            raise _Bad(field, f"message {i} has role {cut(repr(msg['role']), 80)}; expected one of {sorted(ROLES)}")
        messages.append({"role": msg["role"], "content": _text(msg["content"], f"{field}[{i}].content")})
    return messages


def _check_prompt(messages: list[Message], field: str = "prompt") -> list[Message]:
    if not messages:
        raise _Bad(field, "empty prompt")
    if messages[-1]["role"] != "user":
        raise _Bad(field, f"the prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages


def _response(value: Any, field: str) -> tuple[str, list[Message] | None]:
    """A response given as text, or as a conversation whose last turn is the assistant's answer."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        messages = _messages(value, field)
        if messages[-1]["role"] != "assistant":
            raise _Bad(field, "the last message must be the assistant's response")
        return messages[-1]["content"], messages[:-1]
    return _text(value, field), None


def _rating(value: Any, field: str, config: DataConfig, coerce_text: bool) -> float:
    if _is_missing(value):
        raise _Bad(field, "missing or NaN rating")
    if isinstance(value, str) and coerce_text:  # CSV has no types
        try:
            value = float(value)
        except ValueError:
            raise _Bad(field, f"rating {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _Bad(field, f"rating must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise _Bad(field, f"rating outside [{config.rating_min:g}, {config.rating_max:g}] (a huge number)") from None
    if math.isnan(value):
        raise _Bad(field, "rating is NaN")
    if not (config.rating_min <= value <= config.rating_max):
        raise _Bad(field, f"rating {value:g} outside [{config.rating_min:g}, {config.rating_max:g}]")
    return value


def _gold(rec: dict) -> tuple[str | None, str | None]:
    """(gold_answer, gold_checker) of a row: both absent, or a valid pair (checked by
    ``alignment.evaluation.gold``)."""
    answer, checker = rec.get("gold_answer"), rec.get("gold_checker")
    if _is_missing(answer) and _is_missing(checker):
        return None, None
    if _is_missing(checker):
        raise _Bad("gold_checker", f"gold_answer is given but gold_checker is missing (one of {', '.join(CHECKERS)})")
    if _is_missing(answer):
        raise _Bad("gold_answer", "gold_checker is given but gold_answer is missing")
    if isinstance(answer, np.ndarray):
        answer = answer.tolist()
    if checker in ("constraints", "ifeval") and isinstance(answer, dict):  # a JSON object, not as text
        answer = json.dumps(answer, ensure_ascii=False)
    answer = _text(str(answer) if isinstance(answer, (int, float)) else answer, "gold_answer")
    try:
        validate_reference(answer, checker)
    except GoldCheckError as exc:
        raise _Bad("gold_checker" if checker not in CHECKERS else "gold_answer", str(exc)) from None
    return answer, checker


def parse_hh_transcript(text: Any, field: str) -> tuple[list[Message], str]:
    """Split an hh-rlhf transcript into (prompt messages, final assistant response)."""
    text = _text(text, field)
    parts = _HH_TURN.split("\n\n" + text if not text.startswith("\n\n") else text)
    turns = [(role, content.strip()) for role, content in zip(parts[1::2], parts[2::2], strict=True)]
    if not turns or turns[-1][0] != "Assistant":
        raise _Bad(field, "transcript must end with an '\\n\\nAssistant:' turn")
    if not turns[-1][1]:
        raise _Bad(field, "empty text (the last Assistant turn is empty)")
    prompt = [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in turns[:-1]]
    for i, msg in enumerate(prompt):
        if not msg["content"]:
            raise _Bad(field, f"turn {i} is empty")
    if prompt and prompt[-1]["role"] == "assistant":
        raise _Bad(field, "two Assistant turns in a row before the response (a malformed 'Human:' marker?)")
    return _check_prompt(prompt, field), turns[-1][1]


def _field(mapping: Any, key: str, where: str) -> str:
    if not isinstance(mapping, dict):
        raise _Bad(where, f"expected an object, got {type(mapping).__name__}")
    return _text(mapping.get(key), f"{where}.{key}")


def tldr_prompt(info: Any) -> str:
    """The TL;DR prompt text of a summarize-from-feedback ``info`` record (a Reddit post or a news article).

    Reddit: ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``, the form of the
    seed documents and of the shared ``tldr-rlaif`` files; a news article (the CNN/DM rows of the
    validation split): ``"TITLE: {title}\\n\\nARTICLE: {article}\\n\\nTL;DR:"`` (the title when present).
    """
    if not isinstance(info, dict):
        raise _Bad("info", f"expected an object with the post, got {type(info).__name__}")
    if _is_missing(info.get("post")) and not _is_missing(info.get("article")):
        article = _field(info, "article", "info").strip()
        title = "" if _is_missing(info.get("title")) else f"TITLE: {_field(info, 'title', 'info').strip()}\n\n"
        return f"{title}ARTICLE: {article}\n\nTL;DR:"
    post = _field(info, "post", "info").strip()
    subreddit = _field(info, "subreddit", "info").strip()
    title = _field(info, "title", "info").strip()
    return f"SUBREDDIT: r/{subreddit.removeprefix('r/')}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def comparison_to_pair_record(rec: dict) -> dict[str, str]:
    """A summarize-from-feedback comparison -> ``{prompt, chosen, rejected}`` text (chosen = ``choice``'s summary).

    Errors name the field: ``info.post``, ``summaries`` (not two), ``summaries[1].text``, ``choice``.
    """
    summaries = rec.get("summaries")
    if isinstance(summaries, np.ndarray):
        summaries = summaries.tolist()
    if not isinstance(summaries, list) or len(summaries) != 2:
        got = f"{len(summaries)} item(s)" if isinstance(summaries, list) else type(summaries).__name__
        raise _Bad("summaries", f"expected a list of two summaries, got {got}")
    texts = [_field(s, "text", f"summaries[{i}]").strip() for i, s in enumerate(summaries)]
    choice = rec.get("choice")
    if isinstance(choice, str) and choice.strip() in ("0", "1"):
        choice = int(choice)
    if isinstance(choice, bool) or not isinstance(choice, (int, float, np.integer, np.floating)) \
            or choice not in (0, 1):
        raise _Bad("choice", f"expected 0 or 1 (the index of the preferred summary), got {cut(repr(choice), 80)}")
    choice = int(choice)  # 1.0 from a JSON float indexes like 1
    return {"prompt": tldr_prompt(rec.get("info")), "chosen": texts[choice], "rejected": texts[1 - choice]}


# --------------------------------------------------------------------------------------------
# Typed rows
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]
    chosen: str | None  # None (and rejected too) for a prompts source's rows
    rejected: str | None
    chosen_rating: float | None = None
    rejected_rating: float | None = None
    source_rows: tuple[int, ...] = ()
    gold_answer: str | None = None
    gold_checker: str | None = None
    extra: dict[str, Any] | None = None  # a prompts source's other columns

    @property
    def prompt_key(self) -> str:
        return sha256_text(json.dumps(self.prompt, sort_keys=True, ensure_ascii=False))

    @property
    def pair_key(self) -> str:
        return sha256_text(json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True, ensure_ascii=False))


@dataclass(frozen=True)
class RawResponse:
    prompt: list[Message]
    response: str
    score: float
    row: int
    prompt_key: str  # the prompt exactly as the source wrote it: what binarisation groups by
    gold: tuple[str | None, str | None] = (None, None)


@dataclass
class BinariseStats:
    n_prompts: int = 0
    n_pairs: int = 0
    n_ties_dropped: int = 0
    n_prompts_unpaired: int = 0  # prompts with a single response
    n_rating_reversed_dropped: int = 0  # given pairs whose chosen is rated below their rejected
    n_contradictory_dropped: int = 0  # given pairs with the same two responses preferred the other way too
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> source rows (given pairs)


@dataclass
class SourceData:
    """Records read from a source, with the 1-based row number of each."""

    name: str  # how errors refer to the source (a path or hub id)
    kind: Literal["builtin", "file", "hub", "gym", "ifeval"]
    records: list[dict[str, Any]]
    rows: list[int]
    sha256: str
    split: str | None = None
    unreadable: list[RowIssue] = field(default_factory=list)  # rows that could not even be decoded
    typed: bool = True  # False for CSV, whose ratings arrive as text


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------
def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("alignment.resources").joinpath(BUILTIN_SOURCES[name])))


def _read_bytes(path: Path) -> bytes | bytearray:
    """The file's bytes; a ``.gz`` file decompressed (see :func:`_gunzip`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return _gunzip(path, data) if path.suffix.lower() == ".gz" else data


def _gunzip(path: Path, data: bytes) -> bytearray:
    """Decompress in 1 MiB chunks and stop past MAX_DECOMPRESSED_BYTES: a small file that expands to
    gigabytes (a gzip bomb, or a file of newlines) is one error line, never that much memory."""
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            while chunk := fh.read(1 << 20):
                out += chunk
                if len(out) > MAX_DECOMPRESSED_BYTES:
                    raise DataError(
                        f"{path}: expands to more than {MAX_DECOMPRESSED_BYTES:,} bytes when decompressed (the "
                        f"limit for .gz inputs, {len(data):,} bytes compressed); decompress it yourself if it is "
                        "genuine")
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        what = "cut short (truncated)" if isinstance(exc, EOFError) else f"{exc}"
        raise DataError(f"{path}: not a readable gzip file: {what}") from None
    return out


MAX_NESTING = 100  # levels of lists/objects inside one row


def _row_problem(record: Any) -> tuple[str | None, str] | None:
    """(field, reason) when a row holds a text longer than MAX_FIELD_CHARS or nests deeper than
    MAX_NESTING levels; None when it is fine. Iterative: a row nested a thousand levels costs no recursion."""
    stack: list[tuple[Any, str, int]] = [(record, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, (str, bytes)):
            if len(value) > MAX_FIELD_CHARS:
                return where or None, (f"field larger than the field limit ({MAX_FIELD_CHARS:,} characters; it has "
                                       f"{len(value):,})")
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, dict):
            children = [(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        if depth >= MAX_NESTING:
            return where or None, f"nested deeper than {MAX_NESTING} levels"
        stack.extend((child, name, depth + 1) for child, name in children)
    return None


def _drop_bad_rows(name: str, records: list[dict], rows: list[int]) -> tuple[list[dict], list[int], list[RowIssue]]:
    """Set aside the rows :func:`_row_problem` refuses, as row issues (skippable like any bad row)."""
    kept, kept_rows, issues = [], [], []
    for rec, row in zip(records, rows, strict=True):
        problem = _row_problem(rec)
        if problem is None:
            kept.append(rec)
            kept_rows.append(row)
        else:
            issues.append(RowIssue(name, row, cut(problem[0], 120) if problem[0] else None, problem[1]))
    return kept, kept_rows, issues


def _read_jsonl(path: Path, data: bytes | bytearray) -> tuple[list[dict], list[int], list[RowIssue]]:
    """The JSON Lines records with their line numbers. Only non-empty lines become objects (a regex scan
    with line numbers counted between them): a file of millions of blank lines costs no list of lines."""
    records, rows, issues = [], [], []
    lineno, last = 1, 0
    for match in re.finditer(rb"[^\n]+", data):
        lineno += data.count(b"\n", last, match.start())
        last = match.start()
        raw = match.group()
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(RowIssue(str(path), lineno, None, f"undecodable bytes at byte {exc.start} of the line (not UTF-8)"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            issues.append(RowIssue(str(path), lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            issues.append(RowIssue(str(path), lineno, None, "invalid JSON (nested too deeply)"))
            continue
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            issues.append(RowIssue(str(path), lineno, None, f"invalid JSON ({cut(str(exc), 120)})"))
            continue
        if not isinstance(obj, dict):
            issues.append(RowIssue(str(path), lineno, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        records.append(obj)
        rows.append(lineno)
    return records, rows, issues


# --------------------------------------------------------------------------------------------
# CSV / TSV, read strictly: a row must have the header's number of fields, a quote must close
# --------------------------------------------------------------------------------------------
def _read_csv(name: str, text: str, kind: str) -> tuple[list[dict], list[int], list[RowIssue]]:
    """The records of a CSV/TSV text (``kind`` 'csv' or 'tsv'), each with its 1-based record number.

    Strict, so that no row is silently split or swallowed: a row with more or fewer fields than the
    header (an unquoted comma inside a field) is a bad row naming its line; so is text after a closing
    quote. A duplicate header name, a quote that never closes (it would swallow every later row) and a
    field over the stdlib reader's limit stop the file in one line naming the line. Blank lines are skipped.
    """
    delimiter = "\t" if kind == "tsv" else ","
    reader = csv.reader(_csv_lines(text), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records, rows, issues = [], [], []
    n = 0  # record number (the header is not one)
    while True:
        start = reader.line_num + 1  # the line this record starts on
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad = _csv_error(name, text, kind, exc, start, reader.line_num)
            if header is None:
                raise DataError(f"{name}, line {reader.line_num}: the header is not readable ({bad})") from None
            n += 1
            issues.append(RowIssue(name, n, None, bad))
            continue
        if not fields:
            continue
        if header is None:
            header = _csv_header(name, fields, start)
            continue
        n += 1
        if len(fields) != len(header):
            issues.append(RowIssue(name, n, None, _field_count_problem(len(fields), len(header), delimiter, start,
                                                                       reader.line_num)))
            continue
        records.append({k: (v if v != "" else None) for k, v in zip(header, fields, strict=True)})
        rows.append(n)
    return records, rows, issues


def _csv_lines(text: str) -> io.StringIO:
    """The text as lines ending at "\n" (a "\r\n" ending included): a lone "\r" inside an unquoted field
    (Python's csv writer leaves it unquoted with lineterminator="\n") is then a reader error, a bad row,
    not a line break that would split the row in two. A file without any "\n" (classic Mac) ends lines at "\r"."""
    return io.StringIO(text, newline="\n" if "\n" in text else "")


def _line_breaks(text: str, within: str) -> int:
    """Line breaks in ``within`` as :func:`_csv_lines` counts them in ``text``."""
    return within.count("\n") if "\n" in text else within.count("\r")


def _csv_header(name: str, fields: list[str], line: int) -> list[str]:
    """The column names; a name given twice is refused (a reader would keep only the last column's values)."""
    first: dict[str, int] = {}
    for i, col in enumerate(fields, start=1):
        key = col.strip()
        if key in first:
            j = first[key]
            what = f"{col!r}" if fields[j - 1] == col else f"{fields[j - 1]!r} / {col!r}"
            raise DataError(f"{name}, line {line}: duplicate column {what} in the header (columns {j} and {i}); "
                            "rename or remove one")
        first[key] = i
    return fields


def _field_count_problem(got: int, want: int, delimiter: str, start: int, end: int) -> str:
    where = f"on line {start}" if start == end else (
        f"on lines {start}-{end} (a quoted field runs over {end - start + 1} lines: an unbalanced quote?)")
    why = f"an unquoted {delimiter!r} inside a field? quote such fields" if got > want else "a field left out?"
    return f"{got} fields where the header has {want}, {where} ({why})"


def _csv_error(name: str, text: str, kind: str, exc: csv.Error, start: int, end: int) -> str:
    """What a stdlib reader error means, for a bad row; a quote that never closes (the rest of the file would
    be one field) or a field over the reader's limit is a DataError naming the line."""
    msg = str(exc)
    span = "" if start == end else f"; the row began on line {start}: an unbalanced quote there?"
    if "unexpected end of data" in msg:
        opened = _quote_line(text, kind, start)
        raise DataError(f"{name}, line {opened}: a quote opens a field there and never closes (it would swallow "
                        f"lines {opened}-{end} into one field); close it, or double it (\"\") inside a quoted field")
    if "field larger than field limit" in msg:
        raise DataError(f"{name}, line {end}: not a readable {kind} file ({exc}){span}")
    if "expected after" in msg:
        return (f"text after a closing quote on line {end} ({msg}): quote the whole field and double the quotes "
                f"inside it{span}")
    if "new-line character seen in unquoted field" in msg:
        return f"a line break (\\r) inside an unquoted field on line {end}: quote the field{span}"
    return f"not readable on line {end} ({msg}){span}"


def _quote_line(text: str, kind: str, start: int) -> int:
    """The line where the last field of the record starting on line ``start`` opens its quote: ``start`` plus
    the line breaks inside the fields before it (the record is re-read without strictness)."""
    lines = _csv_lines(text)
    for _ in range(start - 1):
        next(lines, None)
    try:
        fields = next(csv.reader(lines, delimiter="\t" if kind == "tsv" else ","), [])
    except csv.Error:
        return start
    return start + sum(_line_breaks(text, f) for f in fields[:-1])


def _read_file(path: Path) -> SourceData:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    name = str(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (spreadsheet exports): not part of the text
        data = data[3:]
    if not data or data.isspace():  # (no stripped copy of a large file)
        raise DataError(f"{name}: the file is empty")
    sha = sha256_file(path)
    typed = True
    issues: list[RowIssue] = []
    if ext == ".jsonl":
        records, rows, issues = _read_jsonl(path, data)
    elif ext == ".json":
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(f"{name}: undecodable bytes (not UTF-8) on line {line}, byte {exc.start}") from None
        except RecursionError:
            raise DataError(f"{name}: invalid JSON (nested too deeply)") from None
        except ValueError:  # JSONDecodeError (or an integer of more than 4300 digits): maybe JSON Lines
            records, rows, issues = _read_jsonl(path, data)  # JSON Lines saved as .json
        else:
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]
            if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
                raise DataError(f"{name}: expected a JSON array of objects (or JSON Lines)")
            records, rows = obj, list(range(1, len(obj) + 1))
    elif ext == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
            records, rows = table.to_pylist(), list(range(1, table.num_rows + 1))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{name}: not a readable parquet file ({cut(str(exc), 300)})") from None
    elif ext in (".csv", ".tsv"):
        # The stdlib reader, not pandas: bytes that are not UTF-8 survive as lone surrogates
        # (surrogateescape) and are then reported per row and field instead of failing the file.
        text = data.decode("utf-8", errors="surrogateescape")
        records, rows, issues = _read_csv(name, text, ext[1:])
        typed = False
    else:
        raise DataError(f"{name}: unsupported file type {cut(ext, 40) or '(none)'}; use .jsonl, .json, .parquet or .csv")
    records, rows, oversized = _drop_bad_rows(name, records, rows)
    issues = sorted(issues + oversized, key=lambda i: i.row)
    if not records and not issues:
        raise DataError(f"{name}: the file holds no rows")
    return SourceData(name, "file", records, rows, sha, unreadable=issues, typed=typed)


OFFLINE_HINT = ("Pass a local file with --source (e.g. ../shared/data/helpsteer2/validation.jsonl; in a pipeline "
                "data.source=FILE)")


def _read_hub(repo_id: str, split: str | None, subset: str | None = None, hint: str = OFFLINE_HINT) -> SourceData:
    split = split or DEFAULT_HUB_SPLITS.get(repo_id, "train")
    subset = subset or DEFAULT_HUB_SUBSETS.get(repo_id)
    what = f"{repo_id}/{subset}" if subset else repo_id
    reachable, reason = hub_status()
    if not reachable and not offline_requested():
        raise DataError(
            f"cannot reach the Hugging Face hub to load dataset {repo_id!r} ({reason}). {hint}, "
            "or set HF_HUB_OFFLINE=1 to use a copy already in the local datasets cache."
        )
    import datasets

    log.info("loading %s (split %s) from the Hugging Face hub", what, split)
    try:
        ds = datasets.load_dataset(repo_id, subset, split=split)
    except Exception as exc:  # datasets raises many types: name the dataset and split, keep the cause
        raise DataError(f"could not load {what!r} split {split!r} from the hub: {exc}") from exc
    records = ds.to_list()
    return SourceData(f"{what}[{split}]", "hub", records, list(range(1, len(records) + 1)),
                      sha256_text(f"{what}:{split}:{ds._fingerprint}"), split=split)


def _read_generated(config: DataConfig, kind: Literal["gym", "ifeval"], build, error: type[Exception]) -> SourceData:
    """A generated source's prompt records (``build()``), each naming its split; ``error`` (the generator's
    refusal) becomes one :class:`DataError` line."""
    try:
        records = build()
    except error as exc:
        raise DataError(str(exc)) from None
    sha = sha256_text(json.dumps(records, sort_keys=True, ensure_ascii=False))
    return SourceData(config.source, kind, records, list(range(1, len(records) + 1)), sha)


def _read_gym(config: DataConfig) -> SourceData:
    """A ``gym:`` source: reasoning-gym items as prompt records (``alignment.tasks_gym``)."""
    return _read_generated(config, "gym", lambda: tasks_gym.build_items(
        tasks_gym.parse_spec(config.source, config.gym_settings), config.seed, config.validation_fraction),
        tasks_gym.GymError)


def _read_ifeval(config: DataConfig) -> SourceData:
    """An ``ifeval:`` source: IFEval-style instruction prompts (``alignment.tasks_ifeval``)."""
    return _read_generated(config, "ifeval", lambda: tasks_ifeval.build_items(
        tasks_ifeval.parse_spec(config.source), config.seed, config.validation_fraction),
        tasks_ifeval.IfevalSourceError)


def read_source(config: DataConfig, offline_hint: str = OFFLINE_HINT) -> SourceData:
    spec = config.source
    if spec.startswith(tasks_gym.PREFIX):
        return _read_gym(config)
    if spec.startswith(tasks_ifeval.PREFIX):
        return _read_ifeval(config)
    if spec in BUILTIN_SOURCES:
        data = _read_file(_builtin_path(spec))
        data.name, data.kind = f"builtin:{spec}", "builtin"
        return data
    try:
        path = Path(spec).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, an unknown ~user
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else cut(str(exc), 100)
        raise DataError(f"source {cut(repr(spec), 200)} is not a usable path ({why})") from None
    if exists:
        return _read_file(path)
    if looks_like_repo_id(spec) and not spec.startswith((".", "/")):
        return _read_hub(spec, config.split, config.subset, offline_hint)
    raise DataError(f"source {cut(repr(spec), 200)} is neither an existing file, 'demo', nor a Hugging Face dataset id")


# --------------------------------------------------------------------------------------------
# Summaries (supervised fine-tuning data): a post and its reference summary
# --------------------------------------------------------------------------------------------
# Column names of the summary sources this project reads: the shared TL;DR file (id, prompt, reference,
# policy_summary) and the hub's CarperAI/openai_summarize_tldr (prompt, label).
SUMMARY_COLUMNS = {"prompt": ("prompt", "post"), "reference": ("reference", "label", "summary"),
                   "policy_summary": ("policy_summary",), "id": ("id",)}


@dataclass
class SummaryData:
    """Posts with their reference summaries (and, where the source has one, another model's summary).

    ``prompts``: the text the model continues, e.g. "SUBREDDIT: ...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:";
    ``references``: the human summaries; ``policy_summaries``: e.g. the 1.3B PPO model's, or None.
    """

    source: str
    sha256: str
    ids: list[str]
    prompts: list[str]
    references: list[str]
    policy_summaries: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> SummaryData:
        pick = list(index)
        return SummaryData(self.source, self.sha256, [self.ids[i] for i in pick], [self.prompts[i] for i in pick],
                           [self.references[i] for i in pick], [self.policy_summaries[i] for i in pick])

    def split(self, n_eval: int, seed: int) -> tuple[SummaryData, SummaryData]:
        """(train, held-out): ``n_eval`` posts drawn with ``seed``, the rest for training; a post (id) is
        never on both sides."""
        unique = sorted(set(self.ids))
        if n_eval >= len(unique):
            raise DataError(f"{self.source}: {len(unique)} posts, not enough to hold out {n_eval} and train on the rest")
        held = set(np.random.default_rng(seed).permutation(unique)[:n_eval].tolist())
        train = [i for i, x in enumerate(self.ids) if x not in held]
        evaluate = [i for i, x in enumerate(self.ids) if x in held]
        return self.subset(train), self.subset(evaluate)


def read_summaries(source: str, split: str | None = None, on_bad_rows: Literal["error", "skip"] = "error"
                   ) -> SummaryData:
    """Read a summary source (a .jsonl/.json/.parquet/.csv file or a hub dataset id) into SummaryData.

    Columns: the post in ``prompt`` (or ``post``), the reference in ``reference`` (or ``label``,
    ``summary``), optionally ``policy_summary`` and ``id`` (default: the row number). Rows without a
    post or reference are errors naming the row and field (``on_bad_rows='skip'`` drops them, counted
    in the log); a source without the columns is one error listing the columns it has.
    """
    data = read_source(DataConfig(source=source, split=split), offline_hint=(
        "Pass a local summaries file with --source (e.g. ../shared/data/tldr-rlaif/summaries.jsonl; in a pipeline "
        "sft.source=FILE)"))
    columns = _columns(data.records)
    found = {name: next((c for c in options if c in columns), None) for name, options in SUMMARY_COLUMNS.items()}
    for name in ("prompt", "reference"):
        if found[name] is None:
            raise DataError(f"{data.name}: no {name} column (looked for {', '.join(SUMMARY_COLUMNS[name])}); "
                            f"it has: {', '.join(sorted(columns)) or 'none'}")
    issues = list(data.unreadable)
    ids, prompts, references, others = [], [], [], []
    for rec, row in zip(data.records, data.rows, strict=True):
        try:
            prompt = _text(rec.get(found["prompt"]), found["prompt"])
            reference = _text(rec.get(found["reference"]), found["reference"])
            other = rec.get(found["policy_summary"]) if found["policy_summary"] else None
            other = None if _is_missing(other) else _text(other, found["policy_summary"])
        except _Bad as bad:
            issues.append(RowIssue(data.name, row, bad.field, bad.message))
            continue
        ids.append(str(rec.get(found["id"], row) if found["id"] else row))
        prompts.append(prompt)
        references.append(reference.strip())
        others.append(other.strip() if other is not None else None)
    if issues and on_bad_rows == "error":
        raise BadRowsError(issues)
    if issues:
        log.warning("%s: skipped %d bad row(s), e.g. %s", data.name, len(issues), issues[0])
    if not ids:
        raise DataError(f"{data.name}: no usable rows")
    return SummaryData(data.name, data.sha256, ids, prompts, references, others)


# --------------------------------------------------------------------------------------------
# Columns and format
# --------------------------------------------------------------------------------------------
def _apply_column_map(source: SourceData, column_map: dict[str, str]) -> None:
    if not column_map:
        return
    columns = _columns(source.records)
    for canonical, original in column_map.items():
        if original not in columns:
            raise DataError(f"{source.name}: column_map.{canonical} names column {original!r}, which does not "
                            f"exist (columns: {sorted(columns)})")
    for rec in source.records:
        for canonical, original in column_map.items():
            rec[canonical] = rec.pop(original, None)


def _columns(records: Iterable[dict]) -> set[str]:
    cols: set[str] = set()
    for rec in records:
        cols.update(rec)
    return cols


def _did_you_mean(column: str, known: str) -> str:
    return f"column {column!r} is not a known column: did you mean {known!r}? (rename it, or pass " \
           f"column_map.{known}={column})"


def _missing_columns_error(name: str, missing: list[str], columns: set[str], fmt: str) -> DataError:
    hints = []
    for col in missing:
        close = difflib.get_close_matches(col, sorted(columns), n=1, cutoff=0.6)
        if close:
            hints.append(_did_you_mean(close[0], col))
    msg = f"{name}: missing column(s) {missing} for the {fmt} format (columns found: {sorted(columns)})"
    return DataError(msg + ("; " + "; ".join(hints) if hints else ""))  # one line


KNOWN_COLUMNS = (*CANONICAL_COLUMNS, *COMPARISON_COLUMNS)


def _near_misses(name: str, cols: set[str]) -> DataError | None:
    """A column that is not a known one but looks like a known one the file lacks (``chosen_ratingg``,
    ``Prompt``, ``rejected ``): read as an unknown column it would be ignored, silently dropping the ratings
    or changing the detected format. The error to raise, one line naming each ("did you mean
    'chosen_rating'?"), or None."""
    absent = {k.lower(): k for k in KNOWN_COLUMNS if k not in cols}
    hints = []
    for col in sorted(c for c in cols if isinstance(c, str) and c not in KNOWN_COLUMNS):
        close = difflib.get_close_matches(col.strip().lower(), list(absent), n=1, cutoff=0.85)
        if close:
            hints.append(_did_you_mean(col, absent[close[0]]))
    return DataError(f"{name}: " + "; ".join(hints)) if hints else None


def detect_format(source: SourceData) -> Format:
    cols = _columns(source.records)
    if set(COMPARISON_COLUMNS) <= cols:
        return "comparisons"
    if "response" in cols and cols & set(ATTRIBUTES):
        return "raw"
    if {"chosen", "rejected"} <= cols:
        if "prompt" in cols:
            return "pairs"
        first = next((r["chosen"] for r in source.records if isinstance(r.get("chosen"), str)), None)
        if first is not None and "Assistant:" in first:
            return "hh"
        return "pairs"
    if "prompt" in cols and not cols & set(PAIR_LIKE_COLUMNS):
        near = sorted({c for c in cols - set(CANONICAL_COLUMNS)
                       if difflib.get_close_matches(c, PAIR_LIKE_COLUMNS, n=1, cutoff=0.75)})
        if not near:
            return "prompts"
    raise DataError(
        f"{source.name}: cannot tell the format from the columns {sorted(cols)}. Expected "
        "prompt/chosen/rejected (pairs), chosen/rejected hh-rlhf transcripts (hh), or "
        f"prompt/response/{'/'.join(ATTRIBUTES)} (raw), or info/summaries/choice (summarize-from-feedback "
        "comparisons), or prompt alone (prompts, for the online stages). Rename columns with column_map or set format."
    )


def _required_columns(fmt: Format, config: DataConfig, cols: set[str]) -> list[str]:
    if fmt == "raw":
        return ["prompt", "response", *_score_weights(config)]
    if fmt == "hh":
        return ["chosen", "rejected"]
    if fmt == "comparisons":
        return list(COMPARISON_COLUMNS)
    if fmt == "prompts":
        return ["prompt"]
    need = ["chosen", "rejected"]
    if "chosen_rating" in cols or "rejected_rating" in cols:
        need += ["chosen_rating", "rejected_rating"]
    return need


def _score_weights(config: DataConfig) -> dict[str, float]:
    """Attribute weights of the score (not normalised: the score divides by their sum)."""
    if config.score == "average":
        return dict.fromkeys(ATTRIBUTES, 1.0)
    if config.score == "helpfulness":
        return {"helpfulness": 1.0}
    return {a: w for a, w in config.score_weights.items() if w > 0}


# --------------------------------------------------------------------------------------------
# Rows -> pairs
# --------------------------------------------------------------------------------------------
def _parse_pair(rec: dict, fmt: Format, config: DataConfig, with_ratings: bool, typed: bool) -> PreferencePair:
    if fmt == "comparisons":
        rec, fmt = comparison_to_pair_record(rec), "pairs"
    if fmt == "hh":
        prompt, chosen = parse_hh_transcript(rec.get("chosen"), "chosen")
        rejected_prompt, rejected = parse_hh_transcript(rec.get("rejected"), "rejected")
        if rejected_prompt != prompt:
            raise _Bad("rejected", "the transcript's conversation before the last Assistant turn differs from chosen's")
        ratings: tuple[float | None, float | None] = (None, None)
    else:
        chosen, chosen_prefix = _response(rec.get("chosen"), "chosen")
        rejected, rejected_prefix = _response(rec.get("rejected"), "rejected")
        if "prompt" in rec and not _is_missing(rec["prompt"]):
            prompt = _messages(rec["prompt"], "prompt")
        elif chosen_prefix:
            if rejected_prefix is not None and rejected_prefix != chosen_prefix:
                raise _Bad("rejected", "the conversation before the response differs from chosen's")
            prompt = chosen_prefix
        else:
            raise _Bad("prompt", "missing value (and chosen carries no conversation to take it from)")
        prompt = _check_prompt(prompt)
        ratings = (None, None)
        if with_ratings:
            ratings = (_rating(rec.get("chosen_rating"), "chosen_rating", config, not typed),
                       _rating(rec.get("rejected_rating"), "rejected_rating", config, not typed))
    if chosen == rejected:
        raise _Bad("rejected", "chosen and rejected are the same text")
    return PreferencePair(prompt, chosen, rejected, *ratings, (), *_gold(rec))


def _json_value(value: Any) -> Any:
    """A source cell as plain JSON (numpy arrays as lists, NaN as null, anything else unusual as text)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if _is_missing(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _parse_prompt_row(rec: dict, extra_columns: list[str], row: int) -> PreferencePair:
    """A prompts-source row: the prompt (ending with a user turn), its gold answer, the other columns."""
    prompt = _check_prompt(_messages(rec.get("prompt"), "prompt"))
    extra = {c: _json_value(rec.get(c)) for c in extra_columns}
    for c, value in extra.items():
        if isinstance(value, str) and (_UNDECODABLE.search(value) or _SURROGATE.search(value)):
            raise _Bad(c, "undecodable or invalid text (not valid UTF-8 / a lone surrogate)")
    return PreferencePair(prompt, None, None, None, None, (row,), *_gold(rec), extra)


def _parse_raw(rec: dict, config: DataConfig, weights: dict[str, float], typed: bool, row: int) -> RawResponse:
    prompt = _check_prompt(_messages(rec.get("prompt"), "prompt"))
    response = _text(rec.get("response"), "response")
    # sum / total rather than a sum of pre-divided weights: a mean of 0-4 integers stays exact (17/5 = 3.4).
    score = sum(w * _rating(rec.get(a), a, config, not typed) for a, w in weights.items()) / sum(weights.values())
    raw = rec.get("prompt")
    exact = raw if isinstance(raw, str) else json.dumps(raw.tolist() if isinstance(raw, np.ndarray) else raw,
                                                        sort_keys=True, ensure_ascii=False, default=str)
    return RawResponse(prompt, response, min(max(score, config.rating_min), config.rating_max), row, exact, _gold(rec))


def binarise(responses: list[RawResponse], pairing: str = "best_worst", tol: float = 1e-9
             ) -> tuple[list[PreferencePair], BinariseStats]:
    """Group responses by prompt and pair them: chosen = higher score; equal scores are ties, dropped.

    Responses are grouped by the prompt exactly as the source wrote it (``RawResponse.prompt_key``),
    as the esfrankel17/HelpSteer2_binarized recipe does: prompts that differ only in whitespace are
    different prompts there, and stay different here.

    ``best_worst``: the best and the worst response of each prompt (earliest row wins among equals);
    a prompt whose best and worst tie counts one tie. ``all_pairs``: every pair of responses, each
    equal-score pair counting one tie.
    """
    groups: dict[str, list[RawResponse]] = {}
    for resp in responses:
        groups.setdefault(resp.prompt_key, []).append(resp)
    stats = BinariseStats(n_prompts=len(groups))
    pairs: list[PreferencePair] = []

    def make(a: RawResponse, b: RawResponse) -> PreferencePair:
        hi, lo = (a, b) if a.score > b.score else (b, a)
        gold = hi.gold if hi.gold[0] is not None else lo.gold
        return PreferencePair(hi.prompt, hi.response, lo.response, hi.score, lo.score, (hi.row, lo.row), *gold)

    for group in groups.values():
        if len(group) < 2:
            stats.n_prompts_unpaired += 1
            continue
        if pairing == "best_worst":
            best = max(group, key=lambda r: (r.score, -r.row))
            worst = min(group, key=lambda r: (r.score, r.row))
            if best.score - worst.score <= tol:
                stats.n_ties_dropped += 1
            else:
                pairs.append(make(best, worst))
        else:
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    if abs(group[i].score - group[j].score) <= tol:
                        stats.n_ties_dropped += 1
                    else:
                        pairs.append(make(group[i], group[j]))
    stats.n_pairs = len(pairs)
    return pairs, stats


def merge_votes(judgments: list[PreferencePair]) -> tuple[list[PreferencePair], BinariseStats]:
    """Repeated judgments of the same two summaries of the same post -> one pair by majority vote.

    OpenAI's comparisons hold some pairs labelled by several workers, sometimes in opposite directions.
    Each pair (in either order) is counted once, chosen = the summary picked more often; an even split
    is a tie, dropped and counted. ``source_rows`` keeps every vote's row.
    """
    groups: dict[str, list[PreferencePair]] = {}
    for j in judgments:
        key = sha256_text(json.dumps([j.prompt, sorted((j.chosen, j.rejected))], sort_keys=True, ensure_ascii=False))
        groups.setdefault(key, []).append(j)
    stats = BinariseStats()
    pairs = []
    for votes in groups.values():
        first = votes[0]
        wins = Counter(v.chosen for v in votes)
        a, b = first.chosen, first.rejected
        if wins[a] == wins[b]:
            stats.n_ties_dropped += 1
            continue
        winner, loser = (a, b) if wins[a] > wins[b] else (b, a)
        rows = tuple(sorted(r for v in votes for r in v.source_rows))
        pairs.append(PreferencePair(first.prompt, winner, loser, source_rows=rows))
    stats.n_pairs = len(pairs)
    stats.n_prompts = len({p.prompt_key for p in pairs})
    return pairs, stats


def settle_pairs(given: list[PreferencePair], tol: float = 1e-9) -> tuple[list[PreferencePair], BinariseStats]:
    """Given pairs (formats pairs and hh) whose labels disagree with themselves are dropped and counted.

    * ratings that tie (within ``tol``): dropped, counted in ``n_ties_dropped`` (as binarisation drops ties);
    * chosen rated below rejected: dropped, ``n_rating_reversed_dropped`` -- the label and the ratings
      disagree and nothing tells which is wrong (swapping would trust the ratings over the label);
    * contradictions, the same two responses to the same prompt preferred one way in one row and the other
      way in another: every such row dropped, ``n_contradictory_dropped`` (rows), as an even vote is a tie
      (:func:`merge_votes`). Checked after the ratings, so a reversed row no longer contradicts its twin.
    """
    stats = BinariseStats(n_prompts=len({p.prompt_key for p in given}))
    dropped: dict[str, list[int]] = {}
    kept = []
    for pair in given:
        reason = None
        if pair.chosen_rating is not None and pair.rejected_rating is not None:
            if abs(pair.chosen_rating - pair.rejected_rating) <= tol:
                reason = "tie"
            elif pair.chosen_rating < pair.rejected_rating:
                reason = "rating_reversed"
        if reason is None:
            kept.append(pair)
        else:
            dropped.setdefault(reason, []).extend(pair.source_rows)

    def both_ways(p: PreferencePair) -> str:
        return sha256_text(json.dumps([p.prompt, sorted((p.chosen, p.rejected))], sort_keys=True, ensure_ascii=False))

    winners: dict[str, set[str | None]] = {}
    for pair in kept:
        winners.setdefault(both_ways(pair), set()).add(pair.chosen)
    pairs = [p for p in kept if len(winners[both_ways(p)]) == 1]
    contradictory = [r for p in kept if len(winners[both_ways(p)]) > 1 for r in p.source_rows]
    if contradictory:
        dropped["contradictory"] = contradictory
    stats.n_ties_dropped = len(dropped.get("tie", []))
    stats.n_rating_reversed_dropped = len(dropped.get("rating_reversed", []))
    stats.n_contradictory_dropped = len(contradictory)
    stats.n_pairs, stats.dropped_rows = len(pairs), dropped
    return pairs, stats


@dataclass
class ParsedData:
    pairs: list[PreferencePair]
    stats: BinariseStats
    format: Format
    issues: list[RowIssue]
    n_rows_read: int


def parse_source(source: SourceData, config: DataConfig) -> ParsedData:
    """Validate every row, turn rows into pairs (binarising the raw form) and drop duplicates."""
    _apply_column_map(source, config.column_map)
    cols = _columns(source.records)
    near_miss = _near_misses(source.name, cols)
    try:
        fmt: Format = detect_format(source) if config.format == "auto" else config.format
    except DataError as exc:
        if near_miss is None:
            raise
        raise DataError(f"{exc}; {str(near_miss).removeprefix(f'{source.name}: ')}") from None  # likely why
    missing = [c for c in _required_columns(fmt, config, cols) if c not in cols]
    if missing:
        raise _missing_columns_error(source.name, missing, cols, fmt)
    if near_miss:  # the columns it needs are there, and this one would be ignored
        raise near_miss
    issues = list(source.unreadable)
    weights = _score_weights(config)
    with_ratings = fmt == "pairs" and "chosen_rating" in cols
    seen: dict[str, int] = {}
    items: list[Any] = []
    extra_columns = sorted(cols - {"prompt", *GOLD_COLUMNS}) if fmt == "prompts" else []
    for rec, row in zip(source.records, source.rows, strict=True):
        try:
            if fmt == "raw":
                item = _parse_raw(rec, config, weights, source.typed, row)
                key = sha256_text(json.dumps([item.prompt_key, item.response], sort_keys=True))
            elif fmt == "prompts":
                item = _parse_prompt_row(rec, extra_columns, row)
                key = item.prompt_key
            else:
                item = _parse_pair(rec, fmt, config, with_ratings, source.typed)
                item = PreferencePair(item.prompt, item.chosen, item.rejected, item.chosen_rating,
                                      item.rejected_rating, (row,), item.gold_answer, item.gold_checker)
                if fmt == "comparisons":  # a pair judged by several labellers: votes, merged below
                    items.append(item)
                    continue
                key = item.pair_key
            if key in seen:
                what = {"raw": "response to the same prompt", "prompts": "prompt"}.get(fmt, "pair")
                raise _Bad(None, f"duplicate {what} (first seen at row {seen[key]})")
            seen[key] = row
            items.append(item)
        except _Bad as bad:
            issues.append(RowIssue(source.name, row, bad.field, bad.message))
    issues.sort(key=lambda i: i.row)
    if fmt == "raw":
        pairs, stats = binarise(items, config.pairing)
    elif fmt == "comparisons":
        pairs, stats = merge_votes(items)
    elif fmt == "prompts":
        pairs, stats = items, BinariseStats(n_prompts=len({p.prompt_key for p in items}))
    else:
        pairs, stats = settle_pairs(items)
    return ParsedData(pairs, stats, fmt, issues, len(source.records) + len(source.unreadable))


# --------------------------------------------------------------------------------------------
# Split and write
# --------------------------------------------------------------------------------------------
def split_by_prompt(pairs: list[PreferencePair], validation_fraction: float, seed: int
                    ) -> tuple[list[int], list[int]]:
    """Seeded split of pair indices, grouped by prompt so no prompt lands in both halves."""
    keys = sorted({p.prompt_key for p in pairs})
    if len(keys) < 2:
        raise DataError(f"need at least 2 distinct prompts to split into train and validation, got {len(keys)}")
    n_val = min(max(1, round(len(keys) * validation_fraction)), len(keys) - 1)
    order = np.random.default_rng(seed).permutation(len(keys))
    val_keys = {keys[i] for i in order[:n_val]}
    train = [i for i, p in enumerate(pairs) if p.prompt_key not in val_keys]
    val = [i for i, p in enumerate(pairs) if p.prompt_key in val_keys]
    return train, val


def _given_split(pairs: list[PreferencePair]) -> tuple[list[int], list[int]]:
    """A gym or ifeval source's split: its records say which (train and held-out were drawn from disjoint seeds
    or topics)."""
    train = [i for i, p in enumerate(pairs) if (p.extra or {}).get("split") == "train"]
    val = [i for i, p in enumerate(pairs) if (p.extra or {}).get("split") == "validation"]
    if not train or not val:
        raise DataError(f"the generated items hold {len(train)} train and {len(val)} held-out prompts; both must be kept")
    return train, val


PAIR_SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("prompt_id", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_rating", pa.float64()),
    ("rejected_rating", pa.float64()),
    ("chosen_dist", pa.list_(pa.float64())),
    ("rejected_dist", pa.list_(pa.float64())),
    ("source_rows", pa.list_(pa.int64())),
    ("gold_answer", pa.string()),
    ("gold_checker", pa.string()),
])


# A prompts source's splits: the pair schema (pair columns null) plus ``extra``, the row's other columns as
# a JSON object text (one column whatever they hold, so any source's columns fit one schema).
PROMPTS_SCHEMA = PAIR_SCHEMA.append(pa.field("extra", pa.string()))


def pairs_to_table(pairs: list[PreferencePair], config: DataConfig, *, prompts: bool = False) -> pa.Table:
    """A split as a table: :data:`PAIR_SCHEMA`, or for a prompts source (``prompts``) :data:`PROMPTS_SCHEMA`."""
    def dist(x: float | None) -> list[float] | None:
        return None if x is None else rating_to_distribution(x, config.rating_min, config.rating_max).tolist()

    columns = {
        "pair_id": [p.pair_key[:16] for p in pairs],
        "prompt_id": [p.prompt_key[:16] for p in pairs],
        "prompt": [p.prompt for p in pairs],
        "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs],
        "chosen_rating": [p.chosen_rating for p in pairs],
        "rejected_rating": [p.rejected_rating for p in pairs],
        "chosen_dist": [dist(p.chosen_rating) for p in pairs],
        "rejected_dist": [dist(p.rejected_rating) for p in pairs],
        "source_rows": [list(p.source_rows) for p in pairs],
        "gold_answer": [p.gold_answer for p in pairs],
        "gold_checker": [p.gold_checker for p in pairs],
    }
    if prompts:
        columns["extra"] = [json.dumps(p.extra or {}, ensure_ascii=False, sort_keys=True) for p in pairs]
        return pa.table(columns, schema=PROMPTS_SCHEMA)
    return pa.table(columns, schema=PAIR_SCHEMA)


PAIR_COLUMNS = ("prompt", "chosen", "rejected")  # what a split needs at least (older splits lack the gold columns)


def read_pairs(path: str | Path) -> pa.Table:
    """Read a split written by the data stage. A missing, unreadable or foreign file is a :class:`DataError`
    naming it (a later stage pointed at a damaged or wrong data folder), never an Arrow traceback."""
    path = Path(path)
    hint = (f"{path.parent} is not a complete data stage output: re-run `align data` "
            "(with --overwrite if the folder is damaged)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; {hint}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({cut(' '.join(str(exc).split()), 200)}); {hint}"
                        ) from None
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: not a data stage split (no column(s) {', '.join(missing)}; it has "
                        f"{cut(', '.join(table.column_names), 200) or 'none'}); {hint}")
    types_ = {c: table.schema.field(c).type for c in PAIR_COLUMNS}
    wrong = [f"prompt is {types_['prompt']}, not a list of messages"] if not (
        pa.types.is_list(types_["prompt"]) or pa.types.is_large_list(types_["prompt"])) else []
    wrong += [f"{c} is {types_[c]}, not text" for c in ("chosen", "rejected")
              if not (pa.types.is_string(types_[c]) or pa.types.is_large_string(types_[c]))]
    if wrong:
        raise DataError(f"{path}: not a data stage split ({cut('; '.join(wrong), 300)}); {hint}")
    return table


@dataclass(frozen=True)
class PromptItem:
    """A prompt with its optional gold answer, the checker kind that decides it and, from a prompts source,
    its other columns (``extra``: what a ``python`` reward component receives beside the gold columns)."""

    messages: list[Message]
    gold_answer: str | None = None
    gold_checker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PromptsOnlyError(DataError):
    """A prompts-only data folder (format ``prompts``) given to a stage that needs preference pairs."""


def is_prompts_split(table: pa.Table) -> bool:
    """Whether a split holds prompts only (a ``prompts`` source: every chosen is null)."""
    return "extra" in table.column_names or (table.num_rows > 0 and table.column("chosen").null_count == table.num_rows)


@dataclass
class PairData:
    """A split written by this stage, column-wise, as the later stages read it."""

    prompts: list[list[Message]]
    chosen: list[str]
    rejected: list[str]
    chosen_rating: list[float | None]
    rejected_rating: list[float | None]
    chosen_dist: list[list[float] | None]
    rejected_dist: list[list[float] | None]
    gold_answer: list[str | None]
    gold_checker: list[str | None]
    # Not dataclass fields (callers rebuild a PairData from its fields): set by load, concat and head.
    extra = None  # list[dict | None] per row: a prompts source's other columns; None: the split has none
    prompts_only = False  # a prompts source's split: every chosen/rejected is None

    @classmethod
    def load(cls, path: str | Path, limit: int | None = None, seed: int = 0, *, prompts_ok: bool = False
             ) -> PairData:
        """A split. A prompts-only split (format ``prompts``) is a :class:`PromptsOnlyError` naming the folder
        unless ``prompts_ok`` (the online stages and the scoring stage, which need prompts only)."""
        table = read_pairs(path)
        prompts_only = is_prompts_split(table)
        if prompts_only and not prompts_ok:
            folder = Path(path).parent
            raise PromptsOnlyError(
                f"{folder} is a prompts-only data folder (format 'prompts': prompts and any gold answers, no "
                "chosen/rejected pairs); this stage needs preference pairs: give it a data folder built from a "
                "pairs source (e.g. source=demo), and use this one with reinforce, ppo or grpo")
        rows = table.to_pylist()
        if limit is not None and len(rows) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
            rows = [rows[i] for i in keep]
        # .get: splits written before the gold columns existed read as "no gold answer"
        data = cls([r["prompt"] for r in rows], *([r.get(k) for r in rows] for k in (
            "chosen", "rejected", "chosen_rating", "rejected_rating", "chosen_dist", "rejected_dist",
            "gold_answer", "gold_checker")))
        if "extra" in table.column_names:
            data.extra = [json.loads(r["extra"]) if r["extra"] else {} for r in rows]
        data.prompts_only = prompts_only
        return data

    def _extras(self) -> list[dict[str, Any] | None]:
        return self.extra if self.extra is not None else [None] * len(self.prompts)

    @classmethod
    def concat(cls, parts: Sequence[PairData]) -> PairData:
        data = cls(*(sum((getattr(p, f) for p in parts), []) for f in cls.__dataclass_fields__))
        if any(p.extra is not None for p in parts):
            data.extra = sum((p._extras() for p in parts), [])
        data.prompts_only = bool(parts) and all(p.prompts_only for p in parts)
        return data

    def head(self, n: int) -> PairData:
        data = PairData(*(getattr(self, f)[:n] for f in self.__dataclass_fields__))
        data.extra, data.prompts_only = None if self.extra is None else self.extra[:n], self.prompts_only
        return data

    def unique_prompts(self) -> list[list[Message]]:
        """The distinct prompts in first-seen order (several pairs can share a prompt)."""
        return [p.messages for p in self.prompt_items()]

    def prompt_items(self) -> list[PromptItem]:
        """The distinct prompts in first-seen order, each with its gold answer and checker (or None)."""
        seen: dict[str, PromptItem] = {}
        for p, answer, checker, extra in zip(self.prompts, self.gold_answer, self.gold_checker, self._extras(),
                                             strict=True):
            key = json.dumps(p, sort_keys=True)
            if key not in seen or seen[key].gold_answer is None and answer is not None:
                seen[key] = PromptItem(p, answer, checker, extra or {})
        return list(seen.values())

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_ratings(self) -> bool:
        return len(self) > 0 and all(d is not None for d in self.chosen_dist)


def stage_key(config: DataConfig, source: SourceData, extra: Sequence[SourceData] = ()) -> str:
    """What the output depends on: the config values, the inputs' content hashes and the output schema."""
    extras = "".join(f"extra={e.sha256};" for e in extra)
    return sha256_text(f"{config.digest()}{source.sha256}{extras}schema={SCHEMA_VERSION};code={__version__}")


def read_extra_train(config: DataConfig) -> list[SourceData]:
    """The ``extra_train`` files, read (an unreadable or missing one is a DataError naming it)."""
    out = []
    for i, spec in enumerate(config.extra_train):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"extra_train[{i}]: {spec}: no such file")
        out.append(_read_file(path))
    return out


def _extra_pairs(config: DataConfig, sources: Sequence[SourceData], validation_prompts: set[str],
                 seen: set[str]) -> tuple[list[PreferencePair], list[dict[str, Any]], list[RowIssue]]:
    """The pairs of the ``extra_train`` sources that may join train (not a held-out prompt, not a duplicate)."""
    pairs: list[PreferencePair] = []
    report: list[dict[str, Any]] = []
    issues: list[RowIssue] = []
    as_pairs = config.model_copy(update={"format": "auto", "column_map": {}})
    for src in sources:
        parsed = parse_source(src, as_pairs)
        if parsed.format not in ("pairs", "hh", "comparisons"):
            raise DataError(f"{src.name}: extra_train files hold preference pairs (prompt, chosen, rejected); "
                            f"this one reads as {parsed.format!r}")
        issues += parsed.issues
        kept = held_out = duplicate = 0
        for pair in parsed.pairs:
            if pair.prompt_key in validation_prompts:
                held_out += 1
            elif pair.pair_key in seen:
                duplicate += 1
            else:
                seen.add(pair.pair_key)
                pairs.append(pair)
                kept += 1
        _log_dropped(src.name, parsed.stats)
        report.append({"source": src.name, "sha256": src.sha256, "n_pairs": kept,
                       "n_dropped_validation_prompt": held_out, "n_dropped_duplicate": duplicate,
                       "n_rows_rejected": len(parsed.issues), "n_ties_dropped": parsed.stats.n_ties_dropped,
                       "n_rating_reversed_dropped": parsed.stats.n_rating_reversed_dropped,
                       "n_contradictory_dropped": parsed.stats.n_contradictory_dropped})
    return pairs, report, issues


def plan_data(config: DataConfig, runs_dir: str | Path = "runs", source: SourceData | None = None) -> StagePlan:
    """Key and default folder ``<runs_dir>/data/<source name>-<key[:12]>`` (reads and hashes the source)."""
    source = source if source is not None else read_source(config)
    extra = read_extra_train(config) if config.extra_train else []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source.name.split("[")[0]).stem if source.kind == "file"
                  else source.name.split(":")[-1].split("[")[0]).strip("-").lower()[:40]
    key = stage_key(config, source, extra)
    out = stage_folder(runs_dir, "data", key, slug)
    return StagePlan(key, out, out)


@exclusive_stage
@records_footprint
def run_data_stage(config: DataConfig, out_dir: str | Path | None = None, *, overwrite: bool = False,
                   runs_root: str | Path = "runs") -> StageResult:
    """Build ``train.parquet``, ``validation.parquet`` and ``manifest.json`` in ``out_dir``.

    An existing complete output for the same config, input and code version is reused. With
    ``overwrite`` the stage always rebuilds and replaces whatever ``out_dir`` holds. The folder appears
    atomically, complete or not at all. The result's summary is the manifest.
    """
    source = read_source(config)
    plan = plan_data(config, runs_root, source)
    key, out = plan.key, Path(out_dir) if out_dir is not None else plan.out
    existing = reuse_or_guard(out, key, DataError, stage="data", overwrite=overwrite,
                              inputs=local_paths(config.model_dump(mode="json")), runs_root=runs_root)
    if existing is not None:
        log.info("data stage already complete in %s (same config and input): reusing it", out)
        return StageResult(out, existing, reused=True)

    parsed = parse_source(source, config)
    if parsed.issues and config.on_bad_rows == "error":
        raise BadRowsError(parsed.issues)
    for issue in parsed.issues[:5]:
        log.warning("skipped %s", issue)
    if len(parsed.issues) > 5:
        log.warning("... skipped %d bad rows in all (listed in rejected_rows.jsonl)", len(parsed.issues))

    pairs = parsed.pairs
    n_before_limit = len(pairs)
    if config.max_pairs is not None and len(pairs) > config.max_pairs:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(pairs), config.max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    prompts_only = parsed.format == "prompts"
    if not pairs and prompts_only:
        raise DataError(f"{source.name}: no usable prompts (rows read: {parsed.n_rows_read}, rejected: "
                        f"{len(parsed.issues)})")
    _log_dropped(source.name, parsed.stats)
    if not pairs:
        raise DataError(f"{source.name}: no usable pairs (rows read: {parsed.n_rows_read}, rejected: "
                        f"{len(parsed.issues)}, {_dropped_summary(parsed.stats)})")
    try:
        train_idx, val_idx = (_given_split(pairs) if source.kind in ("gym", "ifeval")
                              else split_by_prompt(pairs, config.validation_fraction, config.seed))
    except DataError as exc:
        raise DataError(f"{source.name}: {exc}") from None
    splits = {"train": [pairs[i] for i in train_idx], "validation": [pairs[i] for i in val_idx]}
    extra_report: list[dict[str, Any]] = []
    if config.extra_train:  # e.g. a preference store's rounds: train only, never a held-out prompt
        if prompts_only:
            raise DataError(f"{source.name}: extra_train adds pairs, but this source holds prompts only")
        extra, extra_report, extra_issues = _extra_pairs(
            config, read_extra_train(config), {p.prompt_key for p in splits["validation"]},
            {p.pair_key for p in pairs})
        if extra_issues and config.on_bad_rows == "error":
            raise BadRowsError(extra_issues)
        parsed.issues.extend(extra_issues)
        splits["train"] += extra
        train_idx = [*train_idx, *range(len(pairs), len(pairs) + len(extra))]
        log.info("data: %d extra train pairs from %d file(s)", len(extra), len(extra_report))

    with atomic_directory(out) as tmp:
        files = {}
        for name, subset in splits.items():
            fname = f"{name}.parquet"
            pq.write_table(pairs_to_table(subset, config, prompts=prompts_only), tmp / fname)
            files[fname] = {"sha256": sha256_file(tmp / fname), "rows": len(subset)}
        if parsed.issues:
            with open(tmp / "rejected_rows.jsonl", "w", encoding="utf-8") as fh:
                for issue in parsed.issues:
                    fh.write(json.dumps({"row": issue.row, "field": issue.field, "reason": issue.message}) + "\n")
        manifest = {
            "stage": "data",
            "schema_version": SCHEMA_VERSION,
            "source": source.name,
            "source_kind": source.kind,
            "source_split": source.split,
            "source_sha256": source.sha256,
            "format": parsed.format,
            "config": config.model_dump(mode="json"),
            "config_digest": config.digest(),
            "stage_key": key,
            "n_rows_read": parsed.n_rows_read,
            "n_rows_rejected": len(parsed.issues),
            "rejected_by_reason": dict(Counter(_reason_class(i) for i in parsed.issues)),
            "n_prompts": parsed.stats.n_prompts,
            "n_prompts_unpaired": parsed.stats.n_prompts_unpaired,
            "n_ties_dropped": parsed.stats.n_ties_dropped,
            "n_rating_reversed_dropped": parsed.stats.n_rating_reversed_dropped,
            "n_contradictory_dropped": parsed.stats.n_contradictory_dropped,
            "n_pairs_before_limit": n_before_limit,
            "n_pairs": 0 if prompts_only else len(pairs),
            "n_train": len(train_idx),
            "n_validation": len(val_idx),
            "n_train_prompts": len({p.prompt_key for p in splits["train"]}),
            "n_validation_prompts": len({p.prompt_key for p in splits["validation"]}),
            "n_gold_prompts": {name: len({p.prompt_key for p in subset if p.gold_answer is not None})
                               for name, subset in splits.items()},
            "has_ratings": pairs[0].chosen_rating is not None,
            **({"extra_train": extra_report, "n_extra_train": sum(e["n_pairs"] for e in extra_report)}
               if config.extra_train else {}),
            **({"prompts_only": True, "extra_columns": sorted(pairs[0].extra or {})} if prompts_only else {}),
            "files": files,
            "created_by": f"alignment {__version__}",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(tmp / MANIFEST, manifest)  # last: a folder with a manifest is complete
    if prompts_only:
        log.info("data: %d prompts, no pairs (%d bad rows skipped) -> %d train / %d validation prompts in %s",
                 manifest["n_prompts"], manifest["n_rows_rejected"], manifest["n_train"], manifest["n_validation"], out)
        return StageResult(out, manifest)
    log.info("data: %d prompts -> %d pairs (%s, %d bad rows skipped) -> %d train / %d validation in %s",
             manifest["n_prompts"], manifest["n_pairs"], _dropped_summary(parsed.stats), manifest["n_rows_rejected"],
             manifest["n_train"], manifest["n_validation"], out)
    return StageResult(out, manifest)


def _dropped_summary(stats: BinariseStats) -> str:
    """The pairs dropped by rule, in words: "3 ties dropped, 1 rated chosen < rejected dropped, ..."."""
    parts = [f"{stats.n_ties_dropped} ties dropped"]
    if stats.n_rating_reversed_dropped:
        parts.append(f"{stats.n_rating_reversed_dropped} rated chosen < rejected dropped")
    if stats.n_contradictory_dropped:
        parts.append(f"{stats.n_contradictory_dropped} contradictory dropped")
    return ", ".join(parts)


DROP_RULES = {"tie": "their ratings tie", "rating_reversed": "chosen is rated below rejected",
              "contradictory": "another row prefers the same two responses the other way"}


def _log_dropped(name: str, stats: BinariseStats) -> None:
    """A warning per rule that dropped given pairs, naming their first rows (the rules: :func:`settle_pairs`)."""
    for reason, rows in stats.dropped_rows.items():
        shown = ", ".join(map(str, rows[:10])) + (f", ... ({len(rows)} in all)" if len(rows) > 10 else "")
        log.warning("%s: dropped %d pair(s) because %s: row(s) %s", name, len(rows), DROP_RULES[reason], shown)


def _reason_class(issue: RowIssue) -> str:
    msg = issue.message
    for needle, label in (("fields where the header has", "field_count"), ("quote", "quoting"),
                          ("duplicate", "duplicate"), ("undecodable", "undecodable"), ("invalid JSON", "invalid_json"),
                          ("empty", "empty_text"), ("missing", "missing_value"), ("outside", "out_of_range"),
                          ("NaN", "nan"), ("same text", "chosen_equals_rejected")):
        if needle in msg:
            return label
    return "invalid_type" if ("expected" in msg or "must be" in msg) else "other"

