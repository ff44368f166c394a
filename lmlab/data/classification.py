"""Text classification data: local files, named corpora, or the embedded default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lmlab.data.batching import BucketBatchSampler, ShardedDataModule, pad_batch
from lmlab.data.corpora import (
    CLASSIFICATION_CORPORA,
    Corpus,
    load_hub_dataset,
    stdlib_docstrings,
)
from lmlab.data.readers import read_examples
from lmlab.data.tokenizers import Tokenizer, TokenizerSpec
from lmlab.errors import DataError, LmlabError

SPLITS = ("train", "val", "test")
EMBEDDED = "stdlib_docs"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork


class ClassificationDataModule(ShardedDataModule):
    """Labelled texts, tokenized once and served in length buckets.

    Args:
        tokenizer: the tokenizer to train on the training texts.
        corpus: a named corpus (`stdlib_docs`, `sst2`, `trec`, `ag_news`), `hf:NAME` or
            `hf:NAME:SUBSET` for a Hugging Face hub dataset, or null to read `files`.
        files: split -> path of local files (`train` required; a missing `val` or `test` is
            carved out of train).
        format: `auto` (from the file name), `csv`, `tsv`, `jsonl` or `label_text`.
        text_field: column or key of the text; a list joins several columns.
        label_field: column or key of the label.
        data_dir: where named corpora live.
        batch_size: global batch size, divided evenly among the devices.
        val_fraction: share of train carved out for validation when there is no val split.
        test_fraction: share of train carved out for test when there is no test split.
        max_length: longer texts are cut to this many tokens.
        num_workers: DataLoader worker processes.
        seed: seed of the carved splits and of the batch order.
        load_from: a run folder: use its saved tokenizer and label set instead of building them.
    """

    kind = "classification"

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = EMBEDDED,
                 files: dict | None = None, format: str = "auto",
                 text_field: str | list[str] = "text", label_field: str = "label",
                 data_dir: str = "data", batch_size: int = 64, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, max_length: int = 256, num_workers: int = 0,
                 seed: int = 0, load_from: str | None = None):
        super().__init__()
        self.tokenizer_spec, self.load_from = tokenizer, load_from
        self.corpus, self.files, self.format = corpus, dict(files or {}), format
        self.text_field, self.label_field = text_field, label_field
        self.data_dir = Path(data_dir)
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.tokenizer: Tokenizer | None = None
        self.labels: list[str] = []
        self.label_names: list[str] = []
        self.datasets: dict[str, list[tuple[torch.Tensor, int]]] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        raw = self._read_splits()
        texts = {split: [text for text, _, _ in examples] for split, examples in raw.items()}
        if self.load_from:
            self._load(Path(self.load_from))
        else:
            self.labels = self._label_set(raw["train"])
            self.tokenizer = self.tokenizer_spec.fit(texts["train"])
        self._label_index = {label: i for i, label in enumerate(self.labels)}
        for split, examples in raw.items():
            ids = self.tokenizer.encode_batch(texts[split])
            labels = [self._label_id(label, split, line) for _, label, line in examples]
            unk = [self.tokenizer.unk_id]  # a text that encodes to nothing still has length 1
            self.datasets[split] = [(torch.tensor(x[:self.max_length] or unk), y)
                                    for x, y in zip(ids, labels)]

    def model_args(self) -> dict:
        """Config values that the task and its net take from the data."""
        net = {"vocab_size": self.vocab_size, "num_classes": self.num_classes,
               "pad_id": self.tokenizer.pad_id}
        return {"num_classes": self.num_classes, "net": net}

    def model_objects(self) -> dict:
        """Python objects that the task takes from the data, passed as they are."""
        return {"vocab": self.tokenizer.vocab}

    def save(self, folder: Path) -> None:
        """Writes what evaluation needs to rebuild this data: tokenizer and label set."""
        self.tokenizer.save(folder / "tokenizer.json")
        (folder / "labels.json").write_text(json.dumps(
            {"labels": self.labels, "names": self.label_names}, indent=1))

    def _load(self, folder: Path) -> None:
        self.tokenizer = Tokenizer.load(folder / "tokenizer.json")
        saved = json.loads((folder / "labels.json").read_text())
        self.labels, self.label_names = saved["labels"], saved["names"]

    # -- reading ---------------------------------------------------------------------------

    def _read_splits(self) -> dict[str, list]:
        self.sources = {"train": self.corpus}
        if self.corpus == EMBEDDED:
            return self._carve({"train": [(t, y, i) for i, (t, y) in
                                          enumerate(stdlib_docstrings(), start=1)]})
        if self.corpus and self.corpus.startswith("hf:"):
            return self._carve(_read_hub(self.corpus[3:], self.text_field, self.label_field))
        corpus = self._resolve_corpus()
        self.label_names = corpus.label_names
        paths = self._paths(corpus)
        self.sources = {split: str(path) for split, path in paths.items()}
        raw = {split: read_examples(path, corpus.format, corpus.text_field, corpus.label_field)
               for split, path in paths.items()}
        return self._carve(raw)

    def _resolve_corpus(self) -> Corpus:
        if self.corpus is None:
            if "train" not in self.files:
                raise LmlabError("data.files needs at least a `train` file "
                                 "(e.g. data.files.train=path/to/train.csv), or set data.corpus")
            return Corpus(self.files, self.format, self.text_field, self.label_field)
        if self.corpus not in CLASSIFICATION_CORPORA:
            known = ", ".join([EMBEDDED, *CLASSIFICATION_CORPORA, "hf:NAME"])
            raise LmlabError(f"unknown corpus {self.corpus!r}; known: {known}, "
                             "or data.corpus=null with data.files.train=...")
        return CLASSIFICATION_CORPORA[self.corpus]

    def _paths(self, corpus: Corpus) -> dict[str, Path]:
        base = self.data_dir if self.corpus else Path(".")
        return {split: base / path for split, path in corpus.files.items() if split in SPLITS}

    def _carve(self, raw: dict[str, list]) -> dict[str, list]:
        """Fills a missing val or test split with a seeded share of train."""
        generator = torch.Generator().manual_seed(self.seed)
        total = len(raw["train"])
        train = [raw["train"][i] for i in torch.randperm(total, generator=generator)]
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split not in raw:
                count = max(1, int(total * fraction))
                raw[split], train = train[:count], train[count:]
        raw["train"] = train
        return raw

    def _label_set(self, train: list) -> list[str]:
        labels = sorted({label for _, label, _ in train}, key=_natural)
        if len(labels) < 2:
            raise LmlabError(f"the training split has {len(labels)} distinct label(s); "
                             "classification needs at least 2 (check data.label_field)")
        return labels

    def _label_id(self, label: str, split: str, line: int) -> int:
        if label not in self._label_index:
            source = self.sources.get(split, self.sources["train"])
            raise DataError(source, f"label {label!r} does not occur in the training split "
                            f"(known: {self.labels})", line,
                            fix="fix the label, or add examples of it to the training data")
        return self._label_index[label]

    # -- loading ---------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.datasets[split]
        world, rank = self.world()
        sampler = BucketBatchSampler([len(x) for x, _ in data], self.batch_size, shuffle,
                                     self.seed, world, rank)
        return DataLoader(data, batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def collate(self, examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        tokens, lengths = pad_batch([x for x, _ in examples], self.tokenizer.pad_id)
        return {"tokens": tokens, "lengths": lengths,
                "labels": torch.tensor([y for _, y in examples])}

    def train_dataloader(self) -> DataLoader:
        overfit = bool(self.trainer and self.trainer.overfit_batches)  # the same batches each epoch
        return self._loader("train", shuffle=not overfit)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _natural(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _read_hub(name: str, text_field, label_field) -> dict[str, list]:
    loaded = load_hub_dataset(name)
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    names = {"train": "train", "val": "validation", "test": "test"}
    return {split: [(" ".join(str(r[k]) for k in fields), str(r[label_field]), i + 1)
                    for i, r in enumerate(loaded[hub])]
            for split, hub in names.items() if hub in loaded}

