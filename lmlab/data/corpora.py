"""Named corpora: public ones found under the data directory, and the embedded defaults.

The embedded defaults need no download: they are read from the standard library that ships
with the running Python. For classification, each docstring of a function, class or method
is labelled with the standard-library package it belongs to (`asyncio`, `email`, `logging`,
...); for summarization, each documented function's source is paired with the first
sentence of its docstring.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class Corpus:
    """A corpus on disk: where each split lives and how to read it.

    A split is one file (read with `format`), or line-aligned files, one per field, whose
    line i together make example i: `{"train": {"en": "translation/multi30k/train.en.gz",
    "de": "translation/multi30k/train.de.gz"}}` gives records with the fields `en` and `de`.
    """

    files: dict[str, str | dict[str, str]]  # split -> path, or field -> path; under data_dir
    format: str = "auto"
    text_field: str | list[str] = "text"
    label_field: str = "label"
    label_names: list[str] = field(default_factory=list)

    def all_files(self) -> list[str]:
        """Every file of every split, relative to the data directory."""
        return [path for where in self.files.values()
                for path in ([where] if isinstance(where, str) else where.values())]


CLASSIFICATION_CORPORA = {
    "sst2": Corpus(
        files={s: f"classification/sst2/{f}.txt" for s, f in
               [("train", "train"), ("val", "dev"), ("test", "test")]},
        format="label_text",
        label_names=["negative", "positive"],
    ),
    # TREC has no validation split; one is carved out of train.
    "trec": Corpus(
        files={s: f"classification/trec/{s}.txt" for s in ("train", "test")},
        format="label_text",
    ),
    # Only AG News' public test split (7,600 rows) is stored; val and test are carved out of it.
    "ag_news": Corpus(
        files={"train": "classification/ag_news/test.csv.gz"},
        format="csv",
        text_field=["title", "description"],
        label_names=["World", "Sports", "Business", "Sci/Tech"],
    ),
}


@dataclass(frozen=True)
class Seq2SeqCorpus(Corpus):
    """A corpus of source -> target pairs: which record fields are the two sides.

    A translation corpus holds several languages, and `data.source_lang` /
    `data.target_lang` choose the direction: the field of a language is `field_pattern`
    filled with `lang` (and `description`, a choice among `descriptions`, for corpora that
    hold texts of several kinds). A summarization corpus names its fields directly.
    """

    task_type: str = "translation"  # translation or summarization: how outputs are scored
    languages: tuple[str, ...] = ()  # translation: the language codes it holds
    field_pattern: str = "{lang}"  # translation: the record field of a language
    descriptions: tuple[str, ...] = ()  # choices of data.description, if any
    source_field: str = "source"  # summarization: the input text
    target_field: str = "target"  # summarization: the reference output
    reference_fields: tuple[str, ...] = ()  # more references where a record has them
    language: str = ""  # summarization: the language of its texts (en: ROUGE stems words)

    def field_of(self, lang: str, description: str | None = None) -> str:
        """The record field holding language `lang` (translation corpora)."""
        return self.field_pattern.format(lang=lang, description=description)


def _multi30k(split: str) -> dict[str, str]:
    return {lang: f"translation/multi30k/{split}.{lang}.gz" for lang in ("en", "de")}


SEQ2SEQ_CORPORA = {
    # Multi30k task 1, raw and cased: 29,000 / 1,014 / 1,000 line-aligned caption pairs.
    "multi30k": Seq2SeqCorpus(
        files={"train": _multi30k("train"), "val": _multi30k("val"),
               "test": _multi30k("test_2016_flickr")},
        languages=("en", "de"),
    ),
    # Debian package descriptions (4,000), short (one line) or long; val and test are carved.
    "debian_ddtp": Seq2SeqCorpus(
        files={"train": "translation/debian_ddtp/sample4k_bookworm_en_de.jsonl.gz"},
        format="jsonl",
        languages=("en", "de"),
        field_pattern="{lang}_{description}",
        descriptions=("short", "long"),
    ),
    # E-mail body -> subject line; dev and test carry three more human subject lines.
    "aeslc": Seq2SeqCorpus(
        files={s: f"summarization/aeslc/{f}.jsonl.gz" for s, f in
               [("train", "train"), ("val", "dev"), ("test", "test")]},
        format="jsonl",
        task_type="summarization",
        language="en",
        source_field="email",
        target_field="subject",
        reference_fields=("ann0", "ann1", "ann2"),
    ),
    # Long Debian package description -> its one-line synopsis (5,000); val and test carved.
    "debian_desc": Seq2SeqCorpus(
        files={"train": "summarization/debian_desc/sample5k_bookworm_en.jsonl.gz"},
        format="jsonl",
        task_type="summarization",
        language="en",
        source_field="document",
        target_field="summary",
    ),
}

LM_CORPORA = {"tinyshakespeare": "lm/tinyshakespeare.txt"}  # name -> path under data_dir

STDLIB_PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter",
                   "unittest", "xml")
SUMMARY_PACKAGES = STDLIB_PACKAGES + ("collections", "concurrent", "http", "idlelib", "json",
                                      "urllib", "wsgiref", "xmlrpc")
SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")
SUMMARY_SOURCE_CHARS = 1000  # longer function sources are cut (at a space) to this length
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(packages=STDLIB_PACKAGES, min_words: int = 5, per_class: int = 300
                      ) -> list[tuple[str, str]]:
    """Docstrings of the standard library, each labelled with its package.

    Deterministic for a given Python version: files are read in sorted order, and when a
    package has more than `per_class` docstrings, those with the smallest content hash are
    kept (a balanced, seed-free subsample).

    Args:
        packages: top-level standard-library packages, one class each.
        min_words: shorter docstrings ("Return self.") are skipped.
        per_class: most docstrings kept per package.

    Returns:
        `(docstring, package)` pairs.
    """
    examples = []
    for package in packages:
        texts = sorted(set(_package_docstrings(package, min_words)), key=_digest)
        examples += [(text, package) for text in texts[:per_class]]
    return examples


def stdlib_files(package: str) -> list[Path]:
    """The Python files of one standard-library package, tests left out, in sorted order."""
    folder = stdlib_root() / package
    return [path for path in sorted(folder.rglob("*.py"))
            if not SKIPPED_DIRS.intersection(path.relative_to(folder).parts)]


def _package_docstrings(package: str, min_words: int):
    for path in stdlib_files(package):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                text = " ".join((ast.get_docstring(node) or "").split())
                if len(text.split()) >= min_words:
                    yield text


def stdlib_summaries(packages=SUMMARY_PACKAGES, min_words: int = 3,
                     max_chars: int = SUMMARY_SOURCE_CHARS) -> list[tuple[str, str]]:
    """Documented standard-library functions: their source, docstring left out, paired with
    the first sentence of the docstring.

    Deterministic for a given Python version: files are read in sorted order and functions
    in `ast.walk` order; a source seen before is skipped. Whitespace runs (newlines and
    indentation included) become one space, so every text is one line.

    Args:
        packages: top-level standard-library packages to read.
        min_words: shorter summaries ("Return self.") are skipped.
        max_chars: longer sources are cut at the last space before this many characters.

    Returns:
        `(source, summary)` pairs.
    """
    pairs, seen = [], set()
    for package in packages:
        for path in stdlib_files(package):
            for source, summary in _documented_functions(path):
                source = _cut(" ".join(source.split()), max_chars)
                if len(summary.split()) >= min_words and source not in seen:
                    seen.add(source)
                    pairs.append((source, summary))
    return pairs


def _documented_functions(path: Path):
    """`(source without its docstring, first sentence of the docstring)` of each function
    of a file that has a docstring on its own lines and a body besides it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        doc = node.body[0]
        if not docstring or len(node.body) < 2 or doc.lineno == node.lineno:
            continue
        hidden = _docstring_lines(node)
        source = [line for number, line in enumerate(lines[node.lineno - 1:node.end_lineno],
                                                     start=node.lineno)
                  if number not in hidden]
        yield "\n".join(source), first_sentence(docstring)


def _docstring_lines(function: ast.AST) -> set[int]:
    """The line numbers of a function's docstring and of those of the functions and classes
    nested in it, so that no example's source holds another example's summary."""
    hidden = set()
    for node in ast.walk(function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and ast.get_docstring(node) and node.body[0].lineno != node.lineno:
            hidden.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return hidden


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence: its first paragraph up to the first period followed
    by a capital (so `e.g. this` does not end it)."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    end = SENTENCE_END.search(paragraph)
    return paragraph[:end.start() + 1] if end else paragraph


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    space = text.rfind(" ", 0, max_chars + 1)
    return text[:space if space > 0 else max_chars]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def load_hub_dataset(name: str):
    """A Hugging Face hub dataset, `NAME` or `NAME:SUBSET` (needs `datasets` and a network)."""
    try:
        import datasets
    except ImportError:
        raise LmlabError("hf: corpora need the `datasets` package: pip install -e '.[hub]'") \
            from None
    path, _, subset = name.partition(":")
    try:
        return datasets.load_dataset(path, subset or None)
    except Exception as err:  # the hub raises many types: connection, missing dataset, ...
        raise LmlabError(f"could not load {name!r} from the Hugging Face hub: {err}") from None
