"""Named corpora: public ones found under the data directory, and the embedded default.

The embedded default needs no download: it is read from the standard library that ships
with the running Python. Each docstring of a function, class or method is labelled with
the standard-library package it belongs to (`asyncio`, `email`, `logging`, ...).
"""

from __future__ import annotations

import ast
import hashlib
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

LM_CORPORA = {"tinyshakespeare": "lm/tinyshakespeare.txt"}  # name -> path under data_dir

STDLIB_PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter",
                   "unittest", "xml")
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
