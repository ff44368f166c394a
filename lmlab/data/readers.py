"""Readers of text files into records: CSV, TSV, JSON lines, `LABEL<space>text` lines, and
line-aligned files (one file per field, e.g. `train.en.gz` + `train.de.gz`).

A record is the fields of one example plus the file and line it starts at, so every later
problem (an empty field, an unknown label) names both. What happens to a malformed record is
decided by a `BadRecords` policy: a `DataError` naming the file and the line (the default),
or skipped and reported in one warning.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import itertools
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lmlab.errors import DataError, LmlabError

log = logging.getLogger(__name__)
FORMATS = ("csv", "tsv", "jsonl", "label_text")
SHOWN_LOCATIONS = 5  # skipped records listed by file:line in the warning, per file


@dataclass(frozen=True)
class Record:
    """One example as read: field name -> text, and where it starts."""

    fields: dict[str, str]
    path: str
    line: int


class BadRecords:
    """What happens to a malformed record: `error` raises, `skip` drops it and counts it.

    Args:
        policy: `error` or `skip` (the DataModules' `on_bad_record`).

    Raises:
        LmlabError: the policy is neither.
    """

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise LmlabError(f"data.on_bad_record={policy!r} is not a policy; use error "
                             "(stop at the first bad record) or skip (drop and count them)")
        self.policy = policy
        self.skipped: dict[str, list[tuple[int, str]]] = {}  # file -> (line, problem)

    def __call__(self, path, line: int, problem: str, fix: str) -> None:
        """Reports the record at `path:line`: raises, or notes it as skipped."""
        if self.policy == "error":
            raise DataError(path, problem, line,
                            fix=f"{fix}; or set data.on_bad_record=skip to drop such records")
        self.skipped.setdefault(str(path), []).append((line, problem))

    def count(self, path) -> int:
        return len(self.skipped.get(str(path), []))

    def summary(self) -> str:
        """One line: how many records were skipped in each file, and the first locations."""
        parts = []
        for path, found in self.skipped.items():
            where = ", ".join(f"{path}:{line}" for line, _ in found[:SHOWN_LOCATIONS])
            more = ", ..." if len(found) > SHOWN_LOCATIONS else ""
            parts.append(f"{len(found)} in {path} (at {where}{more}; the first: {found[0][1]})")
        return "skipped bad records (data.on_bad_record=skip): " + "; ".join(parts)

    def warn(self) -> None:
        """Logs the summary once (on rank zero), if anything was skipped."""
        if self.skipped:
            _warn_once(self.summary())


@rank_zero_only
def _warn_once(message: str) -> None:
    log.warning(message)


@contextlib.contextmanager
def open_text(path: Path) -> Iterator[io.TextIOBase]:
    """Opens a text file, gzip-compressed or not, for a `with` block.

    UTF-8, with undecodable bytes made U+FFFD; a UTF-8 byte-order mark is dropped (Excel
    writes one), and a UTF-16 or UTF-32 one (Windows "Unicode" text) decodes the file in
    that encoding. Line ends are passed through untranslated, as the csv module needs.

    Raises:
        DataError: the file is missing, or a .gz file is not gzip data or is cut short
            (raised where the reading fails, inside the `with` block).
    """
    if not path.is_file():
        raise DataError(path, "file not found", fix="check the path, or point paths.data_dir "
                        "(env LMLAB_DATA_DIR) at the folder that holds the corpus")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            encoding = _encoding(f.read(4))
        with opener(path, "rt", encoding=encoding, errors="replace", newline="") as f:
            yield f
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        if path.suffix != ".gz":
            raise
        raise DataError(path, f"is not a complete gzip file ({err})",
                        fix="compress it again (gzip FILE), or drop the .gz suffix of a plain "
                        "text file") from None


def _encoding(head: bytes) -> str:
    """The encoding a file's first bytes announce by a byte-order mark; else UTF-8."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return encoding
    return "utf-8-sig"


def guess_format(path: Path) -> str:
    """The format from the file name: .csv, .tsv, .jsonl/.json, else `LABEL<space>text`."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    by_extension = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    return by_extension.get(ext, "label_text")


def read_records(path: Path, format: str = "auto", bad: BadRecords | None = None
                 ) -> list[Record]:
    """Reads every record of one file.

    CSV has strict quoting; TSV is tab-separated with quotes taken literally; both need a
    header row, and a row with another number of fields than the header is a bad record.
    JSON lines give each object's keys (non-string values as JSON text, nulls left out);
    `LABEL<space>text` lines give the fields `label` and `text`. Blank lines are skipped.

    Args:
        path: the file, optionally gzip-compressed.
        format: one of `FORMATS`, or `auto` to guess from the file name.
        bad: the policy for malformed records (default: raise).

    Raises:
        DataError: the file is missing, the format unknown, a CSV quote is never closed or
            malformed (skipping cannot tell which lines it swallowed), or a record is bad
            under the `error` policy.
    """
    format = guess_format(path) if format == "auto" else format
    if format not in FORMATS:
        raise DataError(path, f"unknown format {format!r}", fix=f"use one of {FORMATS} or auto")
    bad = bad or BadRecords()
    with open_text(path) as f:
        if format == "label_text":
            return list(_label_text(f, str(path), bad))
        if format == "jsonl":
            return list(_json_lines(f, str(path), bad))
        if format == "tsv":
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        else:
            rows = csv.reader(f, strict=True)
        return list(_table(rows, str(path), bad))


def read_aligned(paths: dict[str, Path], bad: BadRecords | None = None) -> list[Record]:
    """Reads line-aligned files: line i of every file together make record i.

    Args:
        paths: field name -> file (plain or gzip-compressed), e.g. `{"en": ..., "de": ...}`.
        bad: the policy for a record with an empty line on any side (default: raise).

    Returns:
        Records located at the first file and their shared line number.

    Raises:
        DataError: a file is missing, the files have different numbers of lines (both files
            and both counts named), or a line is empty under the `error` policy.
    """
    bad = bad or BadRecords()
    first = str(next(iter(paths.values())))
    records = []
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_text(path)) for path in paths.values()]
        for number, lines in enumerate(itertools.zip_longest(*files), start=1):
            if None in lines:
                _misaligned(paths, files, lines, number)
            fields = {field: line.strip() for field, line in zip(paths, lines)}
            empty = [field for field, text in fields.items() if not text]
            if empty:
                bad(paths[empty[0]], number, f"empty line (field {empty[0]!r})",
                    fix="give every line a text, or remove this line from all the files")
                continue
            records.append(Record(fields, first, number))
    return records


def _misaligned(paths: dict[str, Path], files: list, lines: tuple, number: int) -> None:
    """Raises a DataError naming the shortest and the longest file and their line counts."""
    counts = {str(path): number - (line is None) + sum(1 for _ in f)
              for path, f, line in zip(paths.values(), files, lines)}
    short, long = min(counts, key=counts.get), max(counts, key=counts.get)
    raise DataError(long, f"has no counterpart in {short}: {long} has {counts[long]} lines, "
                    f"{short} has {counts[short]}", counts[short] + 1,
                    fix="line-aligned files need one example a line and the same number of "
                    "lines; find where they drift apart")


def _label_text(f, path: str, bad: BadRecords) -> Iterator[Record]:
    for number, line in enumerate(f, start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) == 1:
            bad(path, number, "expected `LABEL<space>text`, found no text after the label",
                fix="fix or remove this line")
            continue
        yield Record({"label": parts[0], "text": parts[1].strip()}, path, number)


def _json_lines(f, path: str, bad: BadRecords) -> Iterator[Record]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            bad(path, number, f"not valid JSON ({err.msg})",
                fix="each line must be one JSON object")
            continue
        except (ValueError, RecursionError) as err:  # a number of 4,300+ digits, deep nesting
            bad(path, number, f"not readable JSON ({str(err)[:80] or type(err).__name__})",
                fix="each line must be one JSON object, of ordinary numbers and depth")
            continue
        if not isinstance(value, dict):
            bad(path, number, f"expected a JSON object, found {type(value).__name__}",
                fix="each line must be one JSON object")
            continue
        fields = {key: v if isinstance(v, str) else json.dumps(v)
                  for key, v in value.items() if v is not None}
        yield Record(fields, path, number)


def _table(rows, path: str, bad: BadRecords) -> Iterator[Record]:
    """Records of a CSV or TSV reader, keyed by its header row."""
    header = None
    while True:
        start = rows.line_num + 1  # a quoted field may span lines: name where the record starts
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as err:
            raise _quoting_error(path, start, err) from None
        if not row:
            continue
        if header is None:
            header = _header(row, path, start)
        elif len(row) != len(header):
            bad(path, start, f"{len(row)} field(s) where the header has {len(header)} "
                f"({', '.join(header)})", fix=_FIELD_COUNT_FIX[rows.dialect.delimiter])
        else:
            yield Record(dict(zip(header, row)), path, start)


def _header(row: list[str], path: str, line: int) -> list[str]:
    names = [name.strip() for name in row]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(path, f"the header names column {twice[0]!r} more than once", line,
                        fix="give every column its own name")
    return names


_FIELD_COUNT_FIX = {
    ",": 'quote a field that holds commas ("a, b"), or fix the line',
    "\t": "a TSV field cannot hold a tab; fix the line",
}


def _quoting_error(path: str, line: int, err: csv.Error) -> DataError:
    if "field larger than field limit" in str(err):
        return DataError(path, f"a field of this record is longer than {csv.field_size_limit()} "
                         "characters, usually a quote that is closed many lines later", line,
                         fix='close the quote; a quote inside a quoted field is written twice '
                         '("")')
    if "unexpected end of data" in str(err):
        return DataError(path, "a quoted field that starts in this record is never closed",
                         line, fix='close the quote; a quote inside a quoted field is written '
                         'twice ("")')
    return DataError(path, f"malformed CSV ({err})", line,
                     fix='quote the whole field and double the quotes inside it ("a ""b"" c"), '
                     "or save the file as TSV (data.format=tsv takes quotes literally)")
