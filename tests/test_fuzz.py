"""Hostile files for every reader and the tokenizers: random bytes, mixed encodings
(latin-1, UTF-16, byte-order marks, invalid UTF-8), NULs, CR/LF mixes, quotes, long lines,
damaged gzip. Each input gives records, or a DataError naming the file (and the line) with
its fix, in one line; never another exception.

Hypothesis runs derandomized (the same examples on every run) with a bounded number of
small examples, so that this file stays within seconds; no deadline, because the house
rule is no wall-time thresholds in tests (the bounded sizes keep it from hanging).
"""

import codecs
import gzip
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.data.readers import FORMATS, BadRecords, Record, read_aligned, read_records
from lmlab.data.tokenizers import SPECIALS, ByteBPETokenizer, CharTokenizer, WordTokenizer
from lmlab.data.vectors import load_vectors
from lmlab.errors import DataError

FUZZ = settings(derandomize=True, max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Pieces that break readers: separators, quotes, line ends of every kind, NULs, marks of
# other encodings, and text in several scripts.
PIECES = ["a", "b c", ",", "\t", '"', '""', "'", "{", "}", "[", "]", ":", "null", "1e999",
          "\n", "\r\n", "\r", "\x00", "\ufeff", "\u2028", "\x85", "\x1c", "é", "日本", "🙂",
          "<eos>", "<pad>", " ", "  ", "label", "text", '{"text": "x", "label": "y"}',
          "text,label", "text\tlabel"]
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
             "cp1252"]

texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@st.composite
def file_bytes(draw) -> bytes:
    """Random bytes, or text of hostile pieces in some encoding, perhaps with invalid
    UTF-8 spliced in, perhaps after a header, perhaps with one very long line."""
    kind = draw(st.sampled_from(["bytes", "text", "text"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    text = draw(texts)
    header = draw(st.sampled_from(["", "text,label\n", "text\tlabel\n", "label text\n"]))
    if draw(st.booleans()):
        text += "x" * draw(st.sampled_from([1000, 70_000]))  # past the csv field limit (128 KiB)?
    encoding = draw(st.sampled_from(ENCODINGS))
    data = (header + text).encode(encoding, errors="replace")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                                 codecs.BOM_UTF8, codecs.BOM_UTF16_LE])) + data[at:]
    return data


def write(path: Path, data: bytes, damage: str = "none") -> Path:
    """Writes `data`; a .gz path gets it compressed, whole or cut short."""
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
            f.write(data)
        data = buffer.getvalue()
        if damage == "truncated":
            data = data[:len(data) // 2]
        elif damage == "not gzip":
            data = b"plain text, not gzip\n"
    path.write_bytes(data)
    return path


def check_error(err: DataError, path: Path) -> None:
    """A reader's error: one line, naming the file, with its fix."""
    message = str(err)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    assert "fix:" in message, message


def check_records(records: list, path: Path) -> None:
    for record in records:
        assert isinstance(record, Record) and record.path == str(path) and record.line >= 1
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in record.fields.items())


@FUZZ
@given(data=file_bytes(), format=st.sampled_from(FORMATS),
       suffix=st.sampled_from([".txt", ".gz"]),
       damage=st.sampled_from(["none", "none", "truncated", "not gzip"]),
       policy=st.sampled_from(["error", "skip"]))
def test_read_records_gives_records_or_a_data_error(tmp_path, data, format, suffix, damage,
                                                    policy):
    path = write(tmp_path / f"f{suffix}", data, damage)
    try:
        records = read_records(path, format, BadRecords(policy))
    except DataError as err:
        check_error(err, path)
    else:
        check_records(records, path)
        assert damage == "none" or suffix != ".gz", "a damaged gzip file read as records"


@FUZZ
@given(first=file_bytes(), second=file_bytes(), suffix=st.sampled_from([".txt", ".gz"]),
       policy=st.sampled_from(["error", "skip"]))
def test_read_aligned_gives_records_or_a_data_error(tmp_path, first, second, suffix, policy):
    paths = {"en": write(tmp_path / f"a.en{suffix}", first),
             "de": write(tmp_path / f"a.de{suffix}", second)}
    try:
        records = read_aligned(paths, BadRecords(policy))
    except DataError as err:
        message = str(err)
        assert "\n" not in message and "fix:" in message, message
        assert message.startswith((str(paths["en"]), str(paths["de"]))), message
    else:
        check_records(records, paths["en"])
        assert all(set(r.fields) == {"en", "de"} and all(r.fields.values()) for r in records)


@st.composite
def vector_lines(draw) -> bytes:
    """Lines of `word v1 v2 v3`, some broken: another width, a word for a number, blanks,
    CR line ends, a word2vec header, random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    values = st.sampled_from(["0.1", "-2", "1e3", "nan", "inf", "x", "", "1,5", "\x00"])
    widths = st.sampled_from([3, 3, 3, 2, 4])
    lines = draw(st.lists(st.tuples(st.sampled_from(["the", "cat", "é", "", "<unk>"]),
                                    widths.flatmap(lambda n: st.lists(values, min_size=n,
                                                                      max_size=n))),
                          max_size=6))
    ends = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    head = draw(st.sampled_from(["", "3 3" + ends]))
    return (head + "".join(f"{w} {' '.join(v)}{ends}" for w, v in lines)).encode()


@settings(FUZZ, max_examples=80)
@given(data=vector_lines(), suffix=st.sampled_from([".txt", ".gz"]))
def test_vectors_give_vectors_or_a_data_error(tmp_path, data, suffix):
    path = write(tmp_path / f"v{suffix}", data)
    vocab = [*SPECIALS, "the", "cat", "é"]
    try:
        vectors, found = load_vectors(path, vocab, 3)
    except DataError as err:
        check_error(err, path)
    else:
        assert vectors.shape == (len(vocab), 3) and found.shape == (len(vocab),)


SPECS = {"word": lambda: WordTokenizer(max_size=50), "char": lambda: CharTokenizer(),
         "bpe": lambda: ByteBPETokenizer(vocab_size=300, min_freq=1)}


@settings(FUZZ, max_examples=25)
@given(train=st.lists(st.one_of(texts, st.text(max_size=50)), max_size=8),
       probe=st.lists(st.one_of(texts, st.text(max_size=50)), min_size=1, max_size=4),
       kind=st.sampled_from(sorted(SPECS)))
def test_tokenizers_train_and_encode_any_text(train, probe, kind):
    tokenizer = SPECS[kind]().fit(train)
    assert tokenizer.vocab[:4] == SPECIALS
    probe = [*probe, " ".join(SPECIALS)]  # names a corpus line or a prompt may hold
    for text, ids in zip(probe, tokenizer.encode_batch(probe)):
        assert ids == tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        if kind == "bpe":  # byte level: any text comes back, special-token names included
            assert tokenizer.decode(ids) == text


# -- what the fuzzing found, each kept as a plain test -----------------------------------


@pytest.mark.parametrize("line", ['{"text": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["number-of-5000-digits", "nested-100000-deep"])
def test_json_lines_that_python_refuses_to_parse_are_bad_records(tmp_path, line):
    # They raised ValueError / RecursionError, not JSONDecodeError: a traceback.
    path = write(tmp_path / "t.jsonl", f'{{"text": "ok", "label": "a"}}\n{line}\n'.encode())
    with pytest.raises(DataError, match=r"t.jsonl:2: not readable JSON"):
        read_records(path)
    assert [r.line for r in read_records(path, bad=BadRecords("skip"))] == [1]


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_gzip_file_is_named_with_its_fix(tmp_path, damage):
    # gzip raised BadGzipFile / EOFError from inside the reading loop.
    path = write(tmp_path / "t.tsv.gz", b"text\tlabel\n" + b"good\tpos\n" * 5000, damage)
    with pytest.raises(DataError, match=r"t.tsv.gz: is not a complete gzip file.*fix: compress"):
        read_records(path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_decoded(tmp_path, encoding):
    # They were read as UTF-8: every other character a NUL, and no record matched its header.
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\nnaïve café,pos\r\n日本,neg\n".encode(encoding))
    assert [r.fields for r in read_records(path)] == [{"text": "naïve café", "label": "pos"},
                                                     {"text": "日本", "label": "neg"}]


def test_a_vector_value_that_is_not_a_number_names_its_line(tmp_path):
    # float("x") raised ValueError: a traceback.
    path = write(tmp_path / "v.txt", b"the 0.1 0.2 0.3\ncat 0.1 x 0.3\n")
    with pytest.raises(DataError, match=r"v.txt:2: 'x' is not a number; fix:"):
        load_vectors(path, ["the", "cat"], 3)


def test_blank_lines_and_crlf_in_a_vectors_file_are_fine(tmp_path):
    # A blank line was a line of 0 values: an error.
    path = write(tmp_path / "v.txt", b"the 1 2 3\r\n\r\ncat 4 5 6\r\n\n")
    vectors, found = load_vectors(path, ["the", "cat"], 3)
    assert vectors.tolist() == [[1, 2, 3], [4, 5, 6]] and found.all()


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_special_token_names_in_text_are_text(kind):
    # "<eos>" in a corpus line or a prompt was encoded as the end-of-sequence token.
    tokenizer = SPECS[kind]().fit(["a b <eos> c <pad>"] * 3)
    ids = tokenizer.encode("a <eos> b <pad>")
    assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids
    framed = tokenizer.framed()
    assert framed.encode("a <eos>")[0] == tokenizer.bos_id
    assert framed.encode("a <eos>").count(tokenizer.eos_id) == 1  # the one it adds
