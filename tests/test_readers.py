"""File readers: records with their file:line, and every malformed input found with its fix."""

import gzip
import json
import logging
from pathlib import Path

import pytest

from lmlab.data.readers import BadRecords, read_aligned, read_records
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, ROOT, needs_data

CASES = ROOT.parent / "shared" / "cases"
needs_cases = pytest.mark.skipif(not (CASES / "README.md").is_file(),
                                 reason=f"the failing-cases folder {CASES} is not present")
BOM = "\ufeff"


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@needs_cases
def test_tsv_takes_quotes_literally_so_no_rows_merge():
    records = read_records(CASES / "unclosed_quote.tsv")
    assert len(records) == 60  # 61 lines: a header and 60 rows
    assert [r.line for r in records] == list(range(2, 62))
    assert records[20].fields["text"].startswith('"so film')  # line 22 opens a quote
    assert records[20].fields["label"] == "neu"
    assert records[30].fields["text"].endswith('12" wide')


def test_tsv_row_with_another_field_count_names_its_line(tmp_path):
    path = write(tmp_path / "t.tsv", "text\tlabel\ngood\tpos\nbad\tneg\textra\nfine\tpos\n")
    with pytest.raises(DataError, match=r"t.tsv:3: 3 field\(s\) where the header has 2"):
        read_records(path)
    assert [r.line for r in read_records(path, bad=BadRecords("skip"))] == [2, 4]


def test_csv_unclosed_quote_at_end_of_file_names_the_line_where_the_record_starts(tmp_path):
    path = write(tmp_path / "c.csv", 'text,label\ngood,pos\n"never closed,neg\nmore,pos\n')
    with pytest.raises(DataError, match=r"c.csv:3: a quoted field .* is never closed"):
        read_records(path, bad=BadRecords("skip"))  # it swallowed the rest: never skipped


def test_csv_malformed_quoting_names_its_line(tmp_path):
    path = write(tmp_path / "c.csv", 'text,label\ngood,pos\n"half" quoted,neg\n')
    with pytest.raises(DataError, match=r"c.csv:3: malformed CSV"):
        read_records(path)


def test_csv_records_start_where_their_quoted_field_starts(tmp_path):
    text = 'text,label\n"two\nlines",pos\none,two,three\n'
    path = write(tmp_path / "c.csv", text)
    with pytest.raises(DataError, match=r"c.csv:4: 3 field\(s\) where the header has 2"):
        read_records(path)
    records = read_records(path, bad=BadRecords("skip"))
    assert [(r.fields["text"], r.line) for r in records] == [("two\nlines", 2)]


def test_header_naming_a_column_twice_is_refused(tmp_path):
    path = write(tmp_path / "h.csv", "\ntext,label,text\na,pos,b\n")
    with pytest.raises(DataError, match=r"h.csv:2: the header names column 'text' more than"):
        read_records(path)


@needs_cases
def test_excel_byte_order_mark_is_ignored():
    records = read_records(CASES / "excel_bom.csv")
    assert len(records) == 180
    assert set(records[0].fields) == {"text", "label"}
    assert records[0].fields["text"].startswith("room very")


@pytest.mark.parametrize("name,text", [
    ("b.csv", "text,label\nnice,pos\n"), ("b.tsv", "text\tlabel\nnice\tpos\n"),
    ("b.jsonl", '{"text": "nice", "label": "pos"}\n'), ("b.txt", "pos nice\n"),
    ("b.jsonl.gz", '{"text": "nice", "label": "pos"}\n'), ("b.csv.gz", "text,label\nnice,pos\n"),
])
def test_byte_order_mark_is_ignored_in_every_format(tmp_path, name, text):
    records = read_records(write(tmp_path / name, BOM + text))
    assert records[0].fields == {"text": "nice", "label": "pos"}


def test_json_lines_problems_are_bad_records(tmp_path):
    lines = ['{"text": "a", "label": 1}', '{"text": "b"', "[1, 2]", '{"text": "c", "n": null}']
    path = write(tmp_path / "j.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"j.jsonl:2: not valid JSON"):
        read_records(path)
    bad = BadRecords("skip")
    records = read_records(path, bad=bad)
    assert [r.fields for r in records] == [{"text": "a", "label": "1"}, {"text": "c"}]
    assert [line for line, _ in bad.skipped[str(path)]] == [2, 3]


def test_label_text_lines_give_label_and_text(tmp_path):
    path = write(tmp_path / "l.txt", "pos a good film\n\nneg\r\n2 tabbed\tline\n")
    with pytest.raises(DataError, match=r"l.txt:3: expected `LABEL<space>text`"):
        read_records(path)
    records = read_records(path, bad=BadRecords("skip"))
    assert [(r.fields, r.line) for r in records] == [
        ({"label": "pos", "text": "a good film"}, 1), ({"label": "2", "text": "tabbed\tline"}, 4)]


def test_bad_records_summary_counts_per_file_and_shows_the_first_five(tmp_path, caplog):
    bad = BadRecords("skip")
    for line in range(1, 8):
        bad("a.csv", line, "missing field", fix="")
    bad("b.csv", 3, "missing field", fix="")
    with caplog.at_level(logging.WARNING):
        bad.warn()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "7 in a.csv (at a.csv:1, a.csv:2, a.csv:3, a.csv:4, a.csv:5, ...;" in message
    assert "1 in b.csv (at b.csv:3;" in message


def test_unknown_bad_record_policy_is_refused():
    with pytest.raises(LmlabError, match="on_bad_record='ignore'.*use error"):
        BadRecords("ignore")


def test_aligned_files_make_one_record_a_line(tmp_path):
    en = write(tmp_path / "x.en.gz", "a cat\nthe dog\n")
    de = write(tmp_path / "x.de", "eine Katze\r\nder Hund\r\n")
    records = read_aligned({"en": en, "de": de})
    assert [r.fields for r in records] == [{"en": "a cat", "de": "eine Katze"},
                                           {"en": "the dog", "de": "der Hund"}]
    assert [(r.path, r.line) for r in records] == [(str(en), 1), (str(en), 2)]


def test_aligned_files_of_different_lengths_name_both_files_and_counts(tmp_path):
    en = write(tmp_path / "x.en", "a\nb\nc\nd\n")
    de = write(tmp_path / "x.de", "A\nB\n")
    pattern = rf"x.en:3: has no counterpart in {de}: {en} has 4 lines, {de} has 2"
    for paths in ({"en": en, "de": de}, {"de": de, "en": en}):
        with pytest.raises(DataError, match=pattern):
            read_aligned(paths, bad=BadRecords("skip"))


def test_aligned_empty_line_names_the_file_it_is_in(tmp_path):
    en = write(tmp_path / "x.en", "a\nb\nc\n")
    de = write(tmp_path / "x.de", "A\n \nC\n")
    with pytest.raises(DataError, match=r"x.de:2: empty line \(field 'de'\)"):
        read_aligned({"en": en, "de": de})
    records = read_aligned({"en": en, "de": de}, bad=BadRecords("skip"))
    assert [r.line for r in records] == [1, 3]


@needs_data
def test_multi30k_pairs_read_as_records():
    folder = DATA_DIR / "translation" / "multi30k"
    records = read_aligned({"en": folder / "val.en.gz", "de": folder / "val.de.gz"})
    assert len(records) == 1014
    assert set(records[0].fields) == {"en", "de"}
    assert all(r.fields["en"] and r.fields["de"] for r in records)


def test_missing_file_and_unknown_format_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: file not found"):
        read_records(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"x.csv: unknown format 'xml'"):
        read_records(write(tmp_path / "x.csv", "a\n"), format="xml")


def test_json_values_that_are_not_strings_become_json_text(tmp_path):
    path = write(tmp_path / "v.jsonl", json.dumps({"a": 1.5, "b": [1, 2], "c": True}) + "\n")
    assert read_records(path)[0].fields == {"a": "1.5", "b": "[1, 2]", "c": "true"}
