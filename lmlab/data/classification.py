"""Text classification data: local files, named corpora, or the embedded default."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lmlab.data.corpora import CLASSIFICATION_CORPORA, Corpus, stdlib_docstrings
from lmlab.data.description import DataDescription
from lmlab.data.readers import Record
from lmlab.data.records import Split, TextRecordsDataModule
from lmlab.data.tokenizers import TokenizerSpec
from lmlab.errors import DataError, LmlabError

EMBEDDED = "stdlib_docs"


class ClassificationDataModule(TextRecordsDataModule):
    """Labelled texts: batches of `tokens`, `lengths`, `labels` and `weight`.

    Args:
        corpus: a named corpus (`stdlib_docs`, `sst2`, `trec`, `ag_news`), `hf:NAME` or
            `hf:NAME:SUBSET` for a Hugging Face hub dataset, or null to read `files`.
        text_field: column or key of the text; a list joins several columns.
        label_field: column or key of the label.
        load_from: a run folder: use its saved tokenizer and label set instead of building them.
        The others: as `TextRecordsDataModule`'s.
    """

    kind = "classification"
    corpora = CLASSIFICATION_CORPORA
    embedded = (EMBEDDED,)

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = EMBEDDED,
                 files: dict | None = None, format: str = "auto",
                 text_field: str | list[str] = "text", label_field: str = "label",
                 data_dir: str = "data", batch_size: int = 64, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, max_length: int = 256, num_workers: int = 0,
                 seed: int = 0, load_from: str | None = None, on_bad_record: str = "error"):
        super().__init__(tokenizer, corpus, files, format, data_dir, batch_size, val_fraction,
                         test_fraction, max_length, num_workers, seed, load_from, on_bad_record)
        self.text_field, self.label_field = text_field, label_field
        self.labels: list[str] = []
        self.label_names: list[str] = []
        self._label_index: dict[str, int] = {}

    @property
    def texts(self) -> dict[str, list[str]]:
        return {"tokens": self._text_fields()}

    @property
    def field_keys(self) -> dict[str, list[str]]:
        return {"text_field": self._text_fields(), "label_field": [self.label_field]}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def describe(self) -> DataDescription:
        return DataDescription(self.tokenizer, classes=tuple(self.labels))

    def summary(self) -> str:
        """The records per split and vocabulary, and each class's training examples."""
        counts = Counter(self.datasets["train"].column("labels").tolist())
        names = self.label_names or self.labels
        classes = ", ".join(f"{names[i]} {counts[i]:,}" for i in range(len(self.labels)))
        return f"{super().summary()}; {len(self.labels)} classes (train: {classes})"

    def save(self, folder: Path) -> None:
        """Writes what evaluation needs to rebuild this data: tokenizer and label set."""
        super().save(folder)
        # the labels in class-id order; their readable names where the corpus has them
        # (TREC's 0-5 are ABBR ... NUM)
        saved = {"labels": self.labels, **({"names": self.label_names} if self.label_names
                                           else {})}
        (folder / "labels.json").write_text(json.dumps(saved, indent=1))

    def _load(self, folder: Path) -> None:
        super()._load(folder)
        saved = json.loads((folder / "labels.json").read_text())
        self._set_labels(saved["labels"], saved.get("names", []))

    def _fit(self, train: list[Record]) -> None:
        super()._fit(train)
        labels = sorted({self._label(record) for record in train}, key=_natural)
        if len(labels) < 2:
            raise LmlabError(f"the training split has {len(labels)} distinct label(s); "
                             "classification needs at least 2 (check data.label_field)")
        self._set_labels(labels, self.label_names)

    def _set_labels(self, labels: list[str], names: list[str]) -> None:
        self.labels, self.label_names = labels, names
        self._label_index = {label: i for i, label in enumerate(labels)}

    def extras(self, record: Record) -> dict[str, int]:
        label = self._label(record)
        if label not in self._label_index:
            raise DataError(record.path, f"label {label!r} does not occur in the training "
                            f"split (known: {self.labels})", record.line,
                            fix="fix the label, or add examples of it to the training data")
        return {"labels": self._label_index[label]}

    def _adopt(self, corpus: Corpus) -> None:
        self.text_field, self.label_field = corpus.text_field, corpus.label_field
        self.label_names = corpus.label_names

    def _read_embedded(self, name: str) -> dict[str, Split]:
        self._adopt(Corpus(files={}))  # its records have the fields `text` and `label`
        records = [Record({"text": text, "label": label}, name, number)
                   for number, (text, label) in enumerate(stdlib_docstrings(), start=1)]
        return {"train": ([name], records)}

    def _label(self, record: Record) -> str:
        return record.fields[self.label_field].strip()

    def _text_fields(self) -> list[str]:
        return [self.text_field] if isinstance(self.text_field, str) else list(self.text_field)


def _natural(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)
