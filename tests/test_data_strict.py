"""Data accepted wrongly before, each case through the real CLI (`align data --source FILE --out DIR`).

CSV read strictly: a row split by an unquoted comma is a bad row naming its line, a duplicate header and a
quote that never closes are one error line; given pairs whose ratings tie or run the wrong way, and pairs
preferred both ways, are dropped and counted by the rule of docs/data.md; a misspelt known column is one
error line; a .gz input is decompressed under a cap, and blank JSON lines cost no memory.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alignment import data as D
from cli.main import main
from tests.conftest import write_jsonl

RATED = "prompt,chosen,rejected,chosen_rating,rejected_rating\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI's default runs folder lands in the test's own folder


def align_data(path: Path, *extra: str) -> int:
    return main(["-q", "data", "--source", str(path), "--out", str(out_dir(path)), *extra])


def out_dir(source: Path) -> Path:
    return source.parent / f"{source.name}.out"


def one_error_line(capsys) -> str:
    """stderr holds exactly one line, `align data: error: ...`, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("align data: error: "), err
    return lines[0]


def manifest(path: Path) -> dict:
    return json.loads((out_dir(path) / "manifest.json").read_text())


def written_pairs(path: Path) -> list[dict]:
    return [r for s in ("train", "validation") for r in pq.read_table(out_dir(path) / f"{s}.parquet").to_pylist()]


def csv_file(tmp_path: Path, body: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8", newline="")
    return path


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
COMMAS = "prompt,chosen,rejected\nWhat is 2+2?,4,5\nWhat is 2, 3 in French?,deux,trois\nq3,a3,b3\nq4,a4,b4\n"


def test_an_unquoted_comma_is_a_bad_row_naming_its_line_not_a_split_row(tmp_path, capsys):
    path = csv_file(tmp_path, COMMAS)
    assert align_data(path) == 2
    err = capsys.readouterr().err
    assert (f"{path}, row 2: 4 fields where the header has 3, on line 3 (an unquoted ',' inside a field? "
            "quote such fields)") in err and "1 bad row(s)" in err and "Traceback" not in err
    assert align_data(path, "--on-bad-rows", "skip") == 0
    m = manifest(path)
    assert (m["n_rows_read"], m["n_rows_rejected"], m["n_pairs"]) == (4, 1, 3)
    assert m["rejected_by_reason"] == {"field_count": 1}
    assert sorted(r["prompt"][0]["content"] for r in written_pairs(path)) == ["What is 2+2?", "q3", "q4"]
    rejected = [json.loads(line) for line in (out_dir(path) / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejected] == [(2, None)] and "on line 3" in rejected[0]["reason"]


def test_a_short_row_and_a_tsv_tab_are_bad_rows(tmp_path, capsys):
    path = csv_file(tmp_path, "prompt,chosen,rejected\nq1,a1,b1\n\nq2,a2\nq3,a3,b3\nq4,a4,b4\n")
    assert align_data(path) == 2
    # the blank line is skipped: row 2 is on line 4
    assert f"{path}, row 2: 2 fields where the header has 3, on line 4 (a field left out?)" in capsys.readouterr().err
    tsv = csv_file(tmp_path, "prompt\tchosen\trejected\nq1\ta1\tb1\nq2\ta\t2\tb2\nq3\ta3\tb3\n", "in.tsv")
    assert align_data(tsv) == 2
    assert f"{tsv}, row 2: 4 fields where the header has 3, on line 3 (an unquoted '\\t'" in capsys.readouterr().err


def test_quoted_commas_and_line_breaks_are_one_field(tmp_path):
    path = csv_file(tmp_path, 'prompt,chosen,rejected\n"What is 2, 3 in French?","deux,\r\ntrois","a ""b"""\n'
                              "q2,a2,b2\n")
    assert align_data(path) == 0
    pairs = {r["prompt"][0]["content"]: (r["chosen"], r["rejected"]) for r in written_pairs(path)}
    assert pairs == {"What is 2, 3 in French?": ("deux,\r\ntrois", 'a "b"'), "q2": ("a2", "b2")}
    assert manifest(path)["n_rows_rejected"] == 0


def test_a_lone_carriage_return_in_an_unquoted_field_is_a_bad_row_not_a_line_break(tmp_path, capsys):
    # what Python's csv writer makes of "b1 \r;" with lineterminator="\n": left unquoted
    path = csv_file(tmp_path, "prompt,chosen,rejected\nq1,a1,b1 \r;\nq2,a2,b2\nq3,a3,b3\n")
    assert align_data(path) == 2
    assert f"{path}, row 1: a line break (\\r) inside an unquoted field on line 2: quote the field" in (
        capsys.readouterr().err)
    mac = csv_file(tmp_path, 'prompt,chosen,rejected\rq1,a1,b1\rq2,"a\r2",b2\r', "mac.csv")  # no "\n" at all
    assert align_data(mac) == 0
    assert {r["chosen"] for r in written_pairs(mac)} == {"a1", "a\r2"}


def test_a_duplicate_header_is_one_line_naming_the_column(tmp_path, capsys):
    path = csv_file(tmp_path, "prompt,chosen,chosen,rejected\nq1,a1,x1,b1\nq2,a2,x2,b2\nq3,a3,x3,b3\n")
    assert align_data(path) == 2
    line = one_error_line(capsys)
    assert line == (f"align data: error: {path}, line 1: duplicate column 'chosen' in the header (columns 2 and 3); "
                    "rename or remove one")
    assert not out_dir(path).exists()
    spaced = csv_file(tmp_path, "prompt,chosen,rejected, chosen\nq1,a1,b1,x\nq2,a2,b2,x\n", "spaced.csv")
    assert align_data(spaced) == 2
    assert "duplicate column 'chosen' / ' chosen' in the header (columns 2 and 4)" in one_error_line(capsys)


def test_an_unterminated_quote_is_one_line_naming_the_line_it_opened_on(tmp_path, capsys):
    rows = "".join(f"q{i},a{i},b{i}\n" for i in range(1, 9))
    path = csv_file(tmp_path, 'prompt,chosen,rejected\nq0,"a0 starts,b0\n' + rows)
    assert align_data(path, "--on-bad-rows", "skip") == 2  # not skippable: the 8 rows after it would be lost
    line = one_error_line(capsys)
    assert f"{path}, line 2: a quote opens a field there and never closes (it would swallow lines 2-10" in line
    # a record whose earlier field legitimately spans lines 2-3: the stray quote opens on line 4
    later = csv_file(tmp_path, 'prompt,chosen,rejected\nq0,"two\nlines",b0\nq1,a1,"b1 never\nq2,a2,b2\n', "later.csv")
    assert align_data(later) == 2
    assert f"{later}, line 4: a quote opens a field there and never closes (it would swallow lines 4-5" in (
        one_error_line(capsys))


def test_a_quote_closed_rows_later_is_a_bad_row_naming_the_lines(tmp_path, capsys):
    # the quote opened on line 2 closes on line 4 before text: rows q1-q3 are one broken row, named
    path = csv_file(tmp_path, 'prompt,chosen,rejected\nq1,"a1,b1\nq2,a2,b2\nq3,"a3",b3\nq4,a4,b4\nq5,a5,b5\n')
    assert align_data(path) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 1: text after a closing quote on line 4" in err
    assert "the row began on line 2: an unbalanced quote there?" in err
    assert align_data(path, "--on-bad-rows", "skip") == 0
    m = manifest(path)
    assert (m["n_rows_read"], m["n_rows_rejected"], m["n_pairs"], m["rejected_by_reason"]) == (
        3, 1, 2, {"quoting": 1})
    # closed before a delimiter, leaving too many fields: the row names both lines
    wide = csv_file(tmp_path, 'prompt,chosen,rejected\nq1,"a1,b1\nq2,a2,b2",x,y\nq3,a3,b3\n', "wide.csv")
    assert align_data(wide) == 2
    assert (f"{wide}, row 1: 4 fields where the header has 3, on lines 2-3 (a quoted field runs over 2 lines: an "
            "unbalanced quote?)") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Ratings and contradictions
# ---------------------------------------------------------------------------------------------
def test_reversed_ratings_and_ties_alone_leave_no_pairs(tmp_path, capsys):
    reversed_ = csv_file(tmp_path, RATED + "".join(f"q{i},a{i},b{i},0,4\n" for i in range(5)), "rev.csv")
    assert align_data(reversed_) == 2
    assert one_error_line(capsys).endswith(
        "no usable pairs (rows read: 5, rejected: 0, 0 ties dropped, 5 rated chosen < rejected dropped)")
    tied = csv_file(tmp_path, RATED + "".join(f"q{i},a{i},b{i},2,2\n" for i in range(5)), "tie.csv")
    assert align_data(tied) == 2
    assert one_error_line(capsys).endswith("no usable pairs (rows read: 5, rejected: 0, 5 ties dropped)")


def test_ties_reversed_and_contradictory_pairs_are_dropped_and_counted(tmp_path, capsys, caplog):
    body = RATED + "".join(f"q{i},a{i},b{i},3,1\n" for i in range(6))   # rows 1-6: fine
    body += "q0,b0,a0,3,1\n"    # row 7: b0 > a0 for q0, while row 1 says a0 > b0: rows 1 and 7 contradict
    body += "qt,x,y,2,2\n"      # row 8: a tie
    body += "qr,x,y,1,3.5\n"    # row 9: chosen rated below rejected
    body += "q5,b5,a5,0,2\n"    # row 10: reversed, so dropped as such; row 6 then contradicts nothing
    path = csv_file(tmp_path, body)
    assert align_data(path) == 0
    captured = capsys.readouterr()
    assert ("8 prompts -> 5 pairs (1 ties dropped, 2 rated chosen < rejected dropped, 2 contradictory dropped)"
            in captured.out)
    assert f"{path}: dropped 2 pair(s) because chosen is rated below rejected: row(s) 9, 10" in caplog.text
    assert "dropped 2 pair(s) because another row prefers the same two responses the other way: row(s) 1, 7" in (
        caplog.text)
    m = manifest(path)
    assert (m["n_rows_read"], m["n_rows_rejected"], m["n_pairs"], m["n_ties_dropped"], m["n_rating_reversed_dropped"],
            m["n_contradictory_dropped"]) == (10, 0, 5, 1, 2, 2)
    pairs = written_pairs(path)
    assert sorted(r["source_rows"][0] for r in pairs) == [2, 3, 4, 5, 6]
    assert all(r["chosen_rating"] > r["rejected_rating"] for r in pairs)


def test_contradictions_without_ratings_in_jsonl_and_hh(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]
    rows.append({"prompt": "q2", "chosen": "b2", "rejected": "a2"})
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert align_data(path) == 0
    m = manifest(path)
    assert (m["n_rows_read"], m["n_pairs"], m["n_contradictory_dropped"], m["n_rating_reversed_dropped"]) == (5, 3, 2, 0)
    assert "(0 ties dropped, 2 contradictory dropped)" in capsys.readouterr().out
    turn = "\n\nHuman: {q}\n\nAssistant: {a}"
    hh = [{"chosen": turn.format(q=f"q{i}", a=f"a{i}"), "rejected": turn.format(q=f"q{i}", a=f"b{i}")} for i in range(3)]
    hh.append({"chosen": hh[0]["rejected"], "rejected": hh[0]["chosen"]})
    hh_path = write_jsonl(tmp_path / "hh.jsonl", hh)
    assert align_data(hh_path) == 0
    m = manifest(hh_path)
    assert (m["format"], m["n_pairs"], m["n_contradictory_dropped"]) == ("hh", 2, 2)


@pytest.mark.parametrize(("header", "column", "known"), [
    ("prompt,chosen,rejected,chosen_ratingg,rejected_rating", "chosen_ratingg", "chosen_rating"),  # needed: missing
    ("prompt,chosen,rejected,chosen_ratingg", "chosen_ratingg", "chosen_rating"),   # would be silently ignored
    ("Prompt,chosen,rejected", "Prompt", "prompt"),
])
def test_a_misspelt_known_column_is_one_line_with_a_suggestion(tmp_path, capsys, header, column, known):
    n = header.count(",") + 1
    path = csv_file(tmp_path, header + "\n" + "".join(",".join([f"q{i}", f"a{i}", f"b{i}", "3", "1"][:n]) + "\n"
                                                      for i in range(5)))
    assert align_data(path) == 2
    line = one_error_line(capsys)
    assert f"column {column!r} is not a known column: did you mean {known!r}? (rename it, or pass " \
           f"column_map.{known}={column})" in line and str(path) in line


def test_a_near_miss_that_stops_detection_says_so(tmp_path, capsys):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejectd": "b"} for i in range(3)])
    assert align_data(path) == 2
    line = one_error_line(capsys)
    assert "cannot tell the format" in line and "did you mean 'rejected'?" in line


# ---------------------------------------------------------------------------------------------
# gzip and blank lines
# ---------------------------------------------------------------------------------------------
def _rows_then_newlines(n_newlines: int, at_end: str = "") -> bytes:
    rows = "".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n" for i in range(6))
    return rows.encode() + b"\n" * n_newlines + at_end.encode()


def test_a_gz_that_expands_past_the_cap_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(_rows_then_newlines(2 << 20), mtime=0))
    assert align_data(path) == 2
    assert one_error_line(capsys) == (
        f"align data: error: {path}: expands to more than 1,048,576 bytes when decompressed (the limit for .gz "
        f"inputs, {path.stat().st_size:,} bytes compressed); decompress it yourself if it is genuine")
    # at the cap exactly: read
    monkeypatch.setattr(D, "MAX_DECOMPRESSED_BYTES", len(_rows_then_newlines(2 << 20)))
    assert align_data(path) == 0 and manifest(path)["n_pairs"] == 6


def test_blank_lines_keep_line_numbers_and_build_no_list(tmp_path, capsys):
    n = 4 << 20
    path = tmp_path / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(_rows_then_newlines(n, "{broken\n"), mtime=0))
    assert align_data(path) == 2
    assert f"{path}, row {6 + n + 1}: invalid JSON" in capsys.readouterr().err  # the line number after 4 Mi blanks
    # Reading holds the decompressed bytes and little more: a list of 4 Mi empty lines alone is 32 MiB.
    tracemalloc.start()
    try:
        source = D.read_source(D.DataConfig(source=str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(source.records) == 6 and [i.row for i in source.unreadable] == [6 + n + 1]
    assert peak < 3 * n, f"peak {peak:,} bytes reading {n:,} bytes of newlines"
