"""Readers for labelled text files: CSV, TSV, JSON lines and `LABEL<space>text` lines.

Each reader yields `(text, label, line_number)`, and a malformed line raises a `DataError`
naming the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from lmlab.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "label_text")
Example = tuple[str, str, int]


def open_text(path: Path) -> io.TextIOBase:
    """Opens a text file, gzip-compressed or not; undecodable bytes become U+FFFD."""
    if not path.is_file():
        raise DataError(path, "file not found", fix="check the path, or point paths.data_dir "
                        "(env LMLAB_DATA_DIR) at the folder that holds the corpus")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def guess_format(path: Path) -> str:
    """The format from the file name: .csv, .tsv, .jsonl/.json, else `LABEL<space>text`."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    by_extension = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
    return by_extension.get(ext, "label_text")


def read_examples(path: Path, format: str, text_field: str | list[str], label_field: str
                  ) -> list[Example]:
    """Reads every example of one file.

    Args:
        path: the file, optionally gzip-compressed.
        format: one of `FORMATS`, or `auto` to guess from the file name.
        text_field: column or key holding the text; a list joins several with a space.
        label_field: column or key holding the label (unused for `label_text`).

    Raises:
        DataError: the file is missing, or a line is malformed.
    """
    format = guess_format(path) if format == "auto" else format
    if format not in FORMATS:
        raise DataError(path, f"unknown format {format!r}", fix=f"use one of {FORMATS} or auto")
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    with open_text(path) as f:
        if format == "label_text":
            return list(_label_text(f, path))
        if format == "jsonl":
            return list(_records(_json_lines(f, path), path, fields, label_field))
        reader = csv.DictReader(f, delimiter="," if format == "csv" else "\t")
        rows = ((row, reader.line_num) for row in reader)
        return list(_records(rows, path, fields, label_field))


def _label_text(f, path: Path) -> Iterator[Example]:
    for number, line in enumerate(f, start=1):
        line = line.strip()
        if not line:
            continue
        label, _, text = line.partition(" ")
        if not text.strip():
            raise DataError(path, "expected `LABEL<space>text`, found no text after the label",
                            number, fix="fix or remove this line")
        yield text.strip(), label, number


def _json_lines(f, path: Path) -> Iterator[tuple[dict, int]]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON ({err.msg})", number,
                            fix="each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object", number)
        yield record, number


def _records(rows, path: Path, fields: list[str], label_field: str) -> Iterator[Example]:
    for row, number in rows:
        missing = [k for k in [*fields, label_field] if row.get(k) in (None, "")]
        if missing:
            raise DataError(path, f"missing or empty field(s) {missing}; the line has "
                            f"{sorted(k for k in row if k is not None)}", number,
                            fix="fix the line, or set data.text_field / data.label_field")
        text = " ".join(str(row[k]).strip() for k in fields)
        yield text, str(row[label_field]).strip(), number
