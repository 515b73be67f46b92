"""Fuzzing the data stage (hypothesis): whatever the input file holds, the stage succeeds or raises DataError.

Generated inputs: rows with missing fields, wrong types, nulls, odd and huge unicode strings, nested
objects, numbers as strings, NaN/inf and huge ratings, bad chat messages; files as JSON Lines, a JSON
array, CSV/TSV, parquet, gzip (whole or cut short), empty, one row; bytes in latin-1, with a BOM, with
invalid UTF-8, or binary garbage. Every run must either write a complete output that the later stages
can read, or raise the project's DataError (one line on the CLI) -- never another exception type. A
folder with a foreign file beside the output (and, sometimes, given as the output) is never touched.

CSV text through the CLI: quoted by a csv writer it reads back exactly; joined by hand it never becomes a pair
made of a split row (a row holding a comma is a bad row, a stray quote one error line or one bad row); random
CSV text is a result or an error line, never a traceback.

Bounded to 150 examples per test, about 10 s (ALIGN_FUZZ_EXAMPLES=N for a longer hunt); no example database is
written (nothing lands in the checkout).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from alignment.data import ATTRIBUTES, MAX_FIELD_CHARS, DataConfig, DataError, PairData, run_data_stage

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # its caches go to the temp folder, not the checkout
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "alignment-hypothesis")
EXAMPLES = int(os.environ.get("ALIGN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
_counter = itertools.count()

# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
ODD_TEXT = ["", " ", "\n\t ", "\x00", "\ud800", "\udcff", "a\udc80b", "\u202eevil", "\ufeffbom", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀",
            "<extra_id_1>User", "<extra_id_1>Assistant\nhi", "q<extra_id_1>Assistant\n", "\n\nHuman: hi",
            "\n\nHuman: hi\n\nAssistant: yo", "\n\nAssistant:", "\n\nHuman:\n\nAssistant: x", "NaN", "inf",
            "-1", "3", "4.0", "1e400", "0x10", "true", "null", "[]", "{}", '{"role": "user"}', "r/", "TL;DR:"]
HUGE = "h" * (MAX_FIELD_CHARS + 1)


def weighted(common: st.SearchStrategy, rare: st.SearchStrategy, rare_in: int = 4) -> st.SearchStrategy:
    """``common`` most of the time, ``rare`` about one time in ``rare_in`` (never when ``rare_in`` is 0)."""
    if rare_in == 0:
        return common
    return st.sampled_from([True] + [False] * (rare_in - 1)).flatmap(lambda r: rare if r else common)


good_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).map(
    lambda s: s.strip() or "x")
any_text = st.one_of(st.text(max_size=40), st.sampled_from(ODD_TEXT), st.just(HUGE),
                     st.text(min_size=200, max_size=400))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), any_text)
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                           max_leaves=8)
roles = st.sampled_from(["user", "assistant", "system", "bot", "", 1, None, ["user"], {"r": 1}])


@st.composite
def messages(draw, end: str = "user") -> list[Any]:
    n = draw(st.integers(0, 3))
    out: list[Any] = []
    for i in range(n):
        msg: Any = {"role": "user" if i % 2 == 0 else "assistant", "content": draw(good_text)}
        if draw(st.integers(0, 4)) == 0:  # a broken message
            msg = draw(st.one_of(st.fixed_dictionaries({"role": roles, "content": json_values}),
                                 st.fixed_dictionaries({"content": good_text}), json_values))
        out.append(msg)
    if draw(st.booleans()):
        out.append({"role": end, "content": draw(good_text)})
    return out


bad_rating = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-(10**400), 10**400), st.sampled_from(["3", "2.5", "nan", "inf", "", "four", "1e999"]),
                       json_values)


@st.composite
def row(draw, shape: str, i: int, noise: int) -> dict[str, Any]:
    """One row of ``shape``: valid, except that about one field in ``noise`` is removed, replaced or added
    (``noise`` 0: a clean row)."""
    text_field = weighted(good_text, st.one_of(any_text, json_values, messages()), noise)
    prompt_field = weighted(st.one_of(good_text, messages("user")), st.one_of(any_text, json_values), noise)
    response_field = weighted(good_text, st.one_of(any_text, json_values, messages("assistant")), noise)
    rating = weighted(st.integers(0, 4) | st.floats(0, 4), bad_rating, noise)
    odd = weighted(st.just(False), st.just(True), noise) if noise else st.just(False)
    prompt = f"question {i}: " + draw(good_text)
    if shape == "pairs":
        rec: dict[str, Any] = {"prompt": draw(weighted(st.just(prompt), prompt_field)),
                               "chosen": draw(response_field), "rejected": draw(response_field)}
        if draw(st.booleans()):
            rec.update(chosen_rating=draw(rating), rejected_rating=draw(rating))
    elif shape == "raw":
        rec = {"prompt": f"prompt {i // 2}" if not draw(odd) else draw(prompt_field),
               "response": draw(text_field), **{a: draw(rating) for a in ATTRIBUTES}}
    elif shape == "hh":
        turns = f"\n\nHuman: {prompt}\n\nAssistant: "
        rec = {"chosen": turns + draw(good_text), "rejected": turns + draw(good_text)}
        if draw(odd):
            rec[draw(st.sampled_from(["chosen", "rejected"]))] = draw(text_field)
    else:  # comparisons
        info: Any = {"subreddit": "r/test", "title": draw(good_text), "post": prompt}
        if draw(odd):
            info = draw(st.one_of(json_values, st.fixed_dictionaries({"article": text_field})))
        summaries: Any = [{"text": draw(good_text)}, {"text": draw(good_text)}]
        if draw(odd):
            summaries = draw(st.one_of(json_values, st.lists(st.fixed_dictionaries({"text": text_field}), max_size=3)))
        rec = {"info": info, "summaries": summaries,
               "choice": draw(weighted(st.sampled_from([0, 1]), st.one_of(scalars, st.sampled_from(["0", "1", 1.0])),
                                       noise))}
    if draw(odd) and rec:  # drop a field
        rec.pop(draw(st.sampled_from(sorted(rec))))
    if draw(odd):  # an extra, odd field
        rec[draw(st.sampled_from(["gold_answer", "gold_checker", "extra", "", "prompt"]))] = draw(json_values)
    return rec


@st.composite
def datasets(draw) -> tuple[str, list[dict[str, Any]]]:
    shape = draw(st.sampled_from(["pairs", "raw", "hh", "comparisons"]))
    n = draw(st.sampled_from([1, 2, 3, 6, 12]))
    noise = draw(st.sampled_from([0, 0, 40, 12, 3]))  # clean, a bad field now and then, many bad fields
    rows = [draw(row(shape, i, noise)) for i in range(n)]
    if noise and draw(st.booleans()) and rows:  # a duplicate row
        rows.append(dict(rows[0]))
    return shape, rows


@st.composite
def configs(draw, shape: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "format": draw(weighted(st.just("auto"), st.sampled_from(["raw", "pairs", "hh", "comparisons", shape]), 6)),
        "on_bad_rows": draw(st.sampled_from(["error", "skip"])),
        "validation_fraction": draw(st.sampled_from([0.2, 0.5, 0.9])),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "pairing": draw(st.sampled_from(["best_worst", "all_pairs"])),
        "score": draw(st.sampled_from(["average", "helpfulness"])),
    }
    if draw(st.sampled_from([True, False, False, False])):
        cfg["max_pairs"] = draw(st.integers(2, 5))
    if draw(st.sampled_from([True, False, False, False])):
        cfg["rating_min"], cfg["rating_max"] = draw(st.sampled_from([(1.0, 10.0), (-1e300, 1e300), (0.0, 1e-300)]))
    if draw(st.sampled_from([True] + [False] * 7)):
        cfg["column_map"] = {"prompt": draw(st.sampled_from(["prompt", "question", "chosen"]))}
    return cfg


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity as JavaScript writes them


def _jsonl(rows, ascii_only: bool) -> str:
    return "".join(_dumps(r, ascii_only) + "\n" for r in rows)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else _dumps(value, False)


def _csv(rows, delimiter: str) -> str:
    columns = sorted({k for r in rows for k in r})
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _parquet(rows) -> bytes:
    buf = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(rows), buf)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        # pyarrow cannot type these rows: store each value as JSON text, as a loosely typed file would
        safe = [{k.encode("utf-8", "replace").decode(): _cell(v).encode("utf-8", "replace").decode()
                 for k, v in r.items()} for r in rows]
        pq.write_table(pa.Table.from_pylist(safe), buf)
    return buf.getvalue()


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "latin-1":
        return text.encode("latin-1", errors="replace")
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates become invalid UTF-8 bytes


def render(kind: str, rows: list[dict[str, Any]], encoding: str, ascii_only: bool) -> tuple[str, bytes]:
    """(file suffix, content) of ``rows`` written as ``kind``."""
    if kind == "jsonl":
        return ".jsonl", _encode(_jsonl(rows, ascii_only), encoding)
    if kind == "jsonl-as-json":
        return ".json", _encode(_jsonl(rows, ascii_only), encoding)
    if kind == "json":
        return ".json", _encode(_dumps(rows, ascii_only), encoding)
    if kind == "json-data":
        return ".json", _encode(_dumps({"data": rows}, ascii_only), encoding)
    if kind == "csv":
        return ".csv", _encode(_csv(rows, ","), encoding)
    if kind == "tsv":
        return ".tsv", _encode(_csv(rows, "\t"), encoding)
    if kind == "parquet":
        return ".parquet", _parquet(rows)
    if kind == "jsonl.gz":
        return ".jsonl.gz", gzip.compress(_encode(_jsonl(rows, ascii_only), encoding), mtime=0)
    raise AssertionError(kind)


KINDS = ["jsonl", "jsonl-as-json", "json", "json-data", "csv", "tsv", "parquet", "jsonl.gz"]
mangles = st.sampled_from(["none"] * 6 + ["bom", "invalid-utf8", "truncate", "garbage-line", "crlf"])


def mangle(content: bytes, how: str, junk: bytes) -> bytes:
    if how == "bom":
        return b"\xef\xbb\xbf" + content
    if how == "invalid-utf8":
        at = len(content) // 2
        return content[:at] + b"\xff\xfe\xc3" + content[at:]
    if how == "truncate":
        return content[: max(1, len(content) * 2 // 3)]
    if how == "garbage-line":
        return content + junk + b"\n"
    if how == "crlf":
        return content.replace(b"\n", b"\r\n")
    return content


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------
def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def arena(tmp_path, monkeypatch) -> dict[str, Any]:
    """A work folder and a victim: a folder with a file this project did not write, hashed."""
    # Each stage call ends with a full gc.collect() (alignment.footprint.release_memory), 0.2 s in a test
    # process that has imported torch: 80% of the fuzzing time, and nothing this test is about.
    monkeypatch.setattr("alignment.footprint.release_memory", lambda: None)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_bytes(b"someone else's file\n" + bytes(range(256)))
    (victim / "sub").mkdir()
    (victim / "sub" / "data.jsonl").write_text('{"prompt": "keep me"}\n')
    return {"root": tmp_path, "victim": victim, "hash": _tree_hash(victim)}


def run_stage(arena: dict[str, Any], suffix: str, content: bytes, cfg: dict[str, Any], into_victim: bool) -> None:
    """Run the data stage on ``content``: it must succeed with a readable output or raise DataError."""
    case = arena["root"] / f"case-{next(_counter)}"
    case.mkdir()
    source = case / f"input{suffix}"
    source.write_bytes(content)
    out = arena["victim"] if into_victim else case / "out"
    try:
        result = run_data_stage(DataConfig(source=str(source), **cfg), out, runs_root=case / "runs")
    except DataError as exc:
        assert str(exc).strip(), "a DataError without a message"
    else:
        assert not into_victim, "the stage wrote into a folder holding someone else's files"
        m = result.summary
        # a prompts source (prompt, no pair columns): one row per prompt, no pairs
        rows = m["n_prompts"] if m.get("prompts_only") else m["n_pairs"]
        assert (out / "manifest.json").is_file() and m["n_train"] + m["n_validation"] == rows > 0
        train, validation = (PairData.load(out / f"{s}.parquet", prompts_ok=bool(m.get("prompts_only")))
                             for s in ("train", "validation"))
        assert (len(train), len(validation)) == (m["n_train"], m["n_validation"])
        for dist in train.chosen_dist + validation.rejected_dist:
            assert dist is None or abs(sum(dist) - 1.0) < 1e-9
    assert _tree_hash(arena["victim"]) == arena["hash"], "the foreign folder changed"


@FUZZ
@given(data=datasets(), kind=st.sampled_from(KINDS), encoding=st.sampled_from(["utf-8"] * 4 + ["latin-1"]),
       ascii_only=st.booleans(), how=mangles, junk=st.binary(max_size=40), cfg=st.data(),
       into_victim=st.sampled_from([False] * 9 + [True]))
def test_generated_rows_succeed_or_raise_data_error(arena, data, kind, encoding, ascii_only, how, junk, cfg,
                                                    into_victim):
    shape, rows = data
    suffix, content = render(kind, rows, encoding, ascii_only)
    run_stage(arena, suffix, mangle(content, how, junk), cfg.draw(configs(shape)), into_victim)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.sampled_from([
           b"", b"\n\n  \n", b"\xef\xbb\xbf", b"[]", b"{}", b"null", b"[1, 2]", b'{"data": 3}', b'[{"a": 1}, 2]',
           b"\x1f\x8b\x08\x00", b"PAR1", b"PAR1\x00\x00PAR1", b'"\\ud800"', b"[" * 5000, b'{"a": ' * 3000,
           b"prompt,chosen,rejected\n", b"prompt,chosen,rejected\nq,a\n", b'prompt,chosen\n"unterminated\n',
           b"\x00" * 100, "prompt,chosen,rejected\nq\u00e9,a,b\n".encode("latin-1")])),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".csv.gz", ".txt", ""]),
       gzipped=st.booleans(), fmt=st.sampled_from(["auto", "pairs", "raw"]))
def test_arbitrary_bytes_succeed_or_raise_data_error(arena, content, suffix, gzipped, fmt):
    if gzipped and suffix.endswith(".gz"):
        content = gzip.compress(content, mtime=0)
    run_stage(arena, suffix, content, {"format": fmt}, into_victim=False)


def test_the_fuzzer_reaches_both_outcomes(arena):
    """A sanity check of the harness: a valid file succeeds, an invalid one raises DataError."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    for kind in KINDS:
        suffix, content = render(kind, rows, "utf-8", False)
        run_stage(arena, suffix, content, {}, into_victim=False)
    assert len(list(arena["root"].glob("case-*/out/manifest.json"))) == len(KINDS)
    with pytest.raises(AssertionError, match="wrote into a folder"):
        run_stage({**arena, "victim": arena["root"] / "empty"}, ".jsonl", render("jsonl", rows, "utf-8", False)[1],
                  {}, into_victim=True)


# ---------------------------------------------------------------------------------------------
# CSV text: read back exactly, or a bad row naming its line, or one error line; never a split row
# ---------------------------------------------------------------------------------------------
# Field text with what CSV must quote (delimiters, quotes, line breaks) and some unicode; no '<' (HelpSteer2's
# turn markers would turn a prompt into several messages).
CSV_CHARS = st.sampled_from(list("ab ,\t\"'\n\r;é😀\x00"))
csv_text = st.text(CSV_CHARS, max_size=12)


def _csv_rows(texts: list[list[str]]) -> list[list[str]]:
    """Rows of three distinct, never-empty fields: ``p<i> <text>``, ``c<i> <text>``, ``r<i> <text>``."""
    return [[f"{tag}{i} {t}" for tag, t in zip("pcr", row, strict=True)] for i, row in enumerate(texts)]


def _cli(arena: dict[str, Any], capsys, name: str, body: bytes, *extra: str) -> tuple[int, str, Path]:
    """``align data`` on ``body``: (exit code, stderr, output folder), after checking there is no traceback
    and that a failure is one line."""
    case = arena["root"] / f"case-{next(_counter)}"
    case.mkdir()
    (case / name).write_bytes(body)
    out = case / "out"
    from cli.main import main

    code = main(["-q", "data", "--source", str(case / name), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and code in (0, 2), (code, captured.err)
    if code == 2 and "--on-bad-rows" in extra:  # with bad rows skipped, what stops the stage is one line
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("align data: error: "), captured.err
    return code, captured.err, out


def _written(out: Path) -> set[tuple[str, str, str]]:
    rows = [r for s in ("train", "validation") for r in pq.read_table(out / f"{s}.parquet").to_pylist()]
    return {(r["prompt"][0]["content"], r["chosen"], r["rejected"]) for r in rows}


@FUZZ
@given(texts=st.lists(st.lists(csv_text, min_size=3, max_size=3), min_size=2, max_size=8),
       delimiter=st.sampled_from([",", "\t"]),
       # not "\n" with minimal quoting: Python's writer then leaves a lone "\r" unquoted (a bad row when read)
       style=st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL), ("\r\n", csv.QUOTE_ALL)]))
def test_csv_written_by_a_csv_writer_reads_back_exactly(arena, capsys, texts, delimiter, style):
    rows = _csv_rows(texts)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=style[0], quoting=style[1])
    writer.writerows([["prompt", "chosen", "rejected"], *rows])
    suffix = ".csv" if delimiter == "," else ".tsv"
    code, err, out = _cli(arena, capsys, f"in{suffix}", buf.getvalue().encode())
    assert code == 0, err
    assert _written(out) == {tuple(f.strip() for f in r) for r in rows}
    assert json.loads((out / "manifest.json").read_text())["n_rows_rejected"] == 0


@FUZZ
@given(texts=st.lists(st.lists(csv_text.map(lambda t: t.replace('"', "").replace("\n", "").replace("\r", "")),
                               min_size=3, max_size=3), min_size=1, max_size=8),
       quotes=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2)), max_size=2, unique_by=lambda q: q[0]))
def test_naive_csv_is_never_split_into_rows(arena, capsys, texts, quotes):
    """Fields joined with commas and no quoting (as a hand-written file would): a row whose text holds a comma
    is a bad row, never a pair made of its pieces. A stray quote at the start of a field (``quotes``: row,
    field) either never closes (one line naming its line) or closes at the next stray quote, making the rows
    between one bad row."""
    rows = _csv_rows(texts)
    quoted = sorted({r for r, _ in quotes if r < len(rows)})
    for r, f in quotes:
        if r < len(rows):
            rows[r][f] = '"' + rows[r][f]
    lines = ["prompt,chosen,rejected", *(",".join(r) for r in rows)]
    code, err, out = _cli(arena, capsys, "in.csv", ("\n".join(lines) + "\n").encode(), "--on-bad-rows", "skip")
    if len(quoted) == 1:  # header = line 1, row r = line r + 2
        assert code == 2 and f"line {quoted[0] + 2}: a quote opens a field there and never closes" in err, err
        return
    swallowed = set(range(quoted[0], quoted[1] + 1)) if quoted else set()
    clean = [r for i, r in enumerate(rows) if i not in swallowed and all("," not in f for f in r)]
    n_bad = sum(1 for i, r in enumerate(rows) if i not in swallowed and any("," in f for f in r)) + bool(swallowed)
    if len(clean) < 2:  # not enough left to split into train and validation
        assert code == 2, err
        return
    assert code == 0, err
    assert _written(out) == {tuple(f.strip() for f in r) for r in clean}
    m = json.loads((out / "manifest.json").read_text())
    assert (m["n_rows_rejected"], m["n_pairs"]) == (n_bad, len(clean))


@FUZZ
@given(body=st.text(st.sampled_from(list('ab ,"\n\r\t')), max_size=80),
       header=st.sampled_from(["prompt,chosen,rejected\n", "prompt,chosen,rejected,chosen_rating,rejected_rating\n",
                               "prompt,chosen,chosen,rejected\n", '"prompt,chosen,rejected\n', ""]),
       skip=st.booleans())
def test_random_csv_text_is_a_result_or_an_error_line(arena, capsys, body, header, skip):
    code, err, out = _cli(arena, capsys, "in.csv", (header + body).encode(), *(["--on-bad-rows", "skip"] if skip else []))
    if code == 0:
        m = json.loads((out / "manifest.json").read_text())
        assert m["n_pairs"] == m["n_train"] + m["n_validation"] > 0
        assert m["n_rows_read"] >= m["n_rows_rejected"] + m["n_pairs"]
    else:
        assert err.startswith("align data: error: "), err
