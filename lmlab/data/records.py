"""The DataModule base of every task that learns from text records: reading and checking the
records, carving missing splits, tokenizing, length bucketing and collating.

A task's DataModule adds only what is its own: which record fields are its texts (each
becomes a padded tensor of token ids in the batch) and what else an example carries (a
label id, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lmlab.data.batching import BucketBatchSampler, ResumableLoader, ShardedDataModule, pad_batch
from lmlab.data.corpora import Corpus, load_hub_dataset
from lmlab.data.packed import PackedExamples
from lmlab.data.readers import BadRecords, Record, read_aligned, read_records
from lmlab.data.tokenizers import Tokenizer, TokenizerSpec, every_core
from lmlab.errors import DataError, LmlabError

SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}

ENCODE_CHUNK = 10_000  # records encoded together, then packed (see lmlab.data.packed)
Split = tuple[list[str], list[Record]]  # the files a split was read from, and its records


def lengths_key(text_key: str) -> str:
    """The batch key of a text's lengths: `lengths` for `tokens`, else `<key>_lengths`."""
    return "lengths" if text_key == "tokens" else f"{text_key}_lengths"


class PaddedExamples(Dataset):
    """Examples looked up by the `(index, weight)` items of a `BucketBatchSampler`.

    Each comes with its `weight`: 0.0 for a copy that only pads a global batch up to a
    multiple of the world size, so losses and metrics can leave it out, and above 0 for a
    real example (see `BucketBatchSampler`).
    """

    def __init__(self, examples: PackedExamples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: tuple[int, float]) -> dict:
        index, weight = item
        return {**self.examples[index], "weight": float(weight)}


class TextRecordsDataModule(ShardedDataModule):
    """Text records tokenized once and served in length buckets, sharded across ranks.

    Every batch holds, for each text key `K` of `texts`, the padded (B, T) token ids under
    `K` and their (B,) lengths under `lengths_key(K)`; each value of `extras` stacked into
    (B,); and `weight` (B,), 0.0 for the copies that pad the last global batch.

    Subclasses define `texts` and `field_keys`, and extend `_fit`, `extras`, `save` and
    `_load` with what is their own; `corpora` and `embedded` name the corpora they know.

    Args:
        tokenizer: the tokenizer to train on the training texts.
        corpus: a name from `embedded` or `corpora`, `hf:NAME[:SUBSET]` for a Hugging Face
            hub dataset, or null to read `files`.
        files: split -> a file, or field -> file for line-aligned files (`train` required;
            a missing `val` or `test` is carved out of train).
        format: of single files: `auto` (from the file name), `csv`, `tsv`, `jsonl` or
            `label_text`.
        data_dir: where named corpora live.
        batch_size: global batch size, divided evenly among the devices.
        val_fraction: share of train carved out for validation when there is no val split.
        test_fraction: share of train carved out for test when there is no test split.
        max_length: longer texts are cut to this many tokens.
        num_workers: DataLoader worker processes.
        seed: seed of the carved splits and of the batch order.
        load_from: a run folder: use what it saved (the tokenizer, ...) instead of fitting.
        on_bad_record: `error` stops at the first malformed record (missing or empty field,
            unparsable line, wrong number of fields); `skip` drops them and logs one warning
            with their count and first locations.
    """

    corpora: dict[str, Corpus] = {}  # named corpora on disk, under data_dir
    embedded: tuple[str, ...] = ()  # named corpora that need no files (`_read_embedded`)

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = None,
                 files: dict | None = None, format: str = "auto", data_dir: str = "data",
                 batch_size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 max_length: int = 256, num_workers: int = 0, seed: int = 0,
                 load_from: str | None = None, on_bad_record: str = "error"):
        super().__init__()
        BadRecords(on_bad_record)  # an unknown policy fails at construction, before any reading
        self.tokenizer_spec, self.load_from = tokenizer, load_from
        self.corpus, self.format, self.data_dir = corpus, format, Path(data_dir)
        self.files = {split: where if isinstance(where, (str, os.PathLike)) else dict(where)
                      for split, where in (files or {}).items()}
        self.batch_size, self.max_length, self.num_workers = batch_size, max_length, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.on_bad_record = on_bad_record
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, list[dict]] = {}

    @property
    def texts(self) -> dict[str, list[str]]:
        """Batch key -> the record fields joined (with a space) into that text."""
        raise NotImplementedError

    @property
    def field_keys(self) -> dict[str, list[str]]:
        """Config key -> the record fields it names; together, the fields every record needs."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records = self._read_splits()
        with every_core():  # before any DataLoader worker is forked
            if self.load_from:
                self._load(Path(self.load_from))
            else:
                self._fit(records["train"])
            self.datasets = {split: self._pack(split_records)
                             for split, split_records in records.items()}

    def summary(self) -> str:
        """One line: records per split and the vocabulary size (the run logs it)."""
        sizes = " / ".join(f"{split} {len(self.datasets[split]):,}" for split in SPLITS
                           if split in self.datasets)
        description = self.describe()
        source, target = description.source_tokenizer, description.target_tokenizer
        vocab = f"vocabulary {description.tokenizer.vocab_size:,}" if source is target \
            else f"vocabulary {source.vocab_size:,} source, {target.vocab_size:,} target"
        return f"{sizes} records; {vocab}"

    def save(self, folder: Path) -> None:
        """Writes what evaluation needs to rebuild this data: here the tokenizer."""
        self.tokenizer.save(folder / "tokenizer.json")

    def _load(self, folder: Path) -> None:
        """Reads back what `save` wrote."""
        self.tokenizer = Tokenizer.load(folder / "tokenizer.json")

    def _fit(self, train: list[Record]) -> None:
        """Learns what comes from the training records: here the tokenizer, on every text."""
        self.tokenizer = self.tokenizer_spec.fit(
            [text_of(record, fields) for record in train for fields in self.texts.values()])

    def extras(self, record: Record) -> dict[str, int | float]:
        """What an example carries besides its token ids, e.g. `{"labels": 3}`."""
        return {}

    def _read_embedded(self, name: str) -> dict[str, Split]:
        """The splits of an `embedded` corpus."""
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------------------

    def _read_splits(self) -> dict[str, list[Record]]:
        """Every split's checked records; bad ones raise or are skipped (one warning)."""
        bad = BadRecords(self.on_bad_record)
        records = {split: self._checked(split, *read, bad)
                   for split, read in self.read(bad).items()}
        bad.warn()
        return self._carve(records)

    def read(self, bad: BadRecords) -> dict[str, Split]:
        """Every split's records, as `split -> (sources, records)`: of the embedded corpus,
        a hub dataset, or files. A DataModule for a format of its own overrides this (docs/
        extending.md); what follows stays: the check that each record has its fields, a
        val or test split carved out of train when absent, the tokenizer, batching.

        Args:
            bad: called as `bad(path, line, problem, fix)` on a malformed record: raises,
                or counts it for one warning (`data.on_bad_record`).
        """
        if self.corpus in self.embedded:
            return self._read_embedded(self.corpus)
        if self.corpus and self.corpus.startswith("hf:"):
            return self._read_hub(self.corpus[3:])
        return self._read_files(self._resolve_corpus(), bad)

    def _resolve_corpus(self) -> Corpus:
        if self.corpus is None:
            if "train" not in self.files:
                raise LmlabError("data.files needs at least a `train` file "
                                 "(e.g. data.files.train=path/to/train.csv), or set data.corpus")
            unknown = sorted(set(self.files) - set(SPLITS))
            if unknown:
                raise LmlabError(f"data.files.{unknown[0]} is not a split; the splits are "
                                 f"{', '.join(SPLITS)} (a missing val or test is carved from "
                                 "train)")
            return Corpus(self.files, self.format)
        if self.corpus not in self.corpora:
            known = ", ".join([*self.embedded, *self.corpora, "hf:NAME"])
            raise LmlabError(f"unknown corpus {self.corpus!r}; known: {known}, "
                             "or data.corpus=null with data.files.train=...")
        corpus = self.corpora[self.corpus]
        self._adopt(corpus)
        return corpus

    def _adopt(self, corpus: Corpus) -> None:
        """Takes from a named corpus what it fixes about its records (field names, ...)."""

    def _read_files(self, corpus: Corpus, bad: BadRecords) -> dict[str, Split]:
        base = self.data_dir if self.corpus else Path(".")
        raw = {}
        for split, where in corpus.files.items():
            if split not in SPLITS:
                continue
            if isinstance(where, (str, os.PathLike)):
                raw[split] = [str(base / where)], read_records(base / where, corpus.format, bad)
            else:
                paths = {field: base / path for field, path in where.items()}
                raw[split] = [str(path) for path in paths.values()], read_aligned(paths, bad)
        return raw

    def _read_hub(self, name: str) -> dict[str, Split]:
        loaded, required = load_hub_dataset(name), self._required()
        raw = {}
        for split, hub in HUB_SPLITS.items():
            if hub in loaded:
                source = f"hf:{name} ({hub})"
                raw[split] = [source], [
                    Record({k: str(row[k]) for k in required if row.get(k) is not None},
                           source, number) for number, row in enumerate(loaded[hub], start=1)]
        if "train" not in raw:
            raise LmlabError(f"the hub dataset {name!r} has no train split")
        return raw

    def _required(self) -> list[str]:
        return [field for fields in self.field_keys.values() for field in fields]

    def _checked(self, split: str, sources: list[str], records: list[Record],
                 bad: BadRecords) -> list[Record]:
        """The records that have every required field; a split left empty is an error."""
        required, kept = self._required(), []
        settings = " / ".join(f"data.{key}" for key in self.field_keys)
        for record in records:
            missing = [field for field in required if not record.fields.get(field, "").strip()]
            if missing:
                bad(record.path, record.line, f"missing or empty field(s) {missing}; the record "
                    f"has {sorted(record.fields)}", fix=f"fix the record, or set {settings}")
            else:
                kept.append(record)
        if not kept:
            skipped = sum(bad.count(source) for source in sources)
            raise DataError(" + ".join(sources), f"the {split} split has no records"
                            + (f" ({skipped} bad one(s) skipped)" if skipped else ""),
                            fix="add records to it" if split == "train" else
                            f"add records to it, or remove data.files.{split} to carve {split} "
                            "out of train instead")
        return kept

    def _carve(self, records: dict[str, list[Record]]) -> dict[str, list[Record]]:
        """Fills a missing val or test split with a seeded share of train."""
        generator = torch.Generator().manual_seed(self.seed)
        total = len(records["train"])
        train = [records["train"][i] for i in torch.randperm(total, generator=generator)]
        for split, fraction in (("test", self.test_fraction), ("val", self.val_fraction)):
            if split not in records:
                count = max(1, int(total * fraction))
                records[split], train = train[:count], train[count:]
        if not train:
            raise LmlabError(f"the training split has {total} record(s), too few to carve "
                             "val and test out of it; add records, or give data.files.val and "
                             "data.files.test")
        records["train"] = train
        return records

    def _pack(self, records: list[Record]) -> PackedExamples:
        """The records' examples, encoded ENCODE_CHUNK records at a time and packed."""
        return PackedExamples.pack(self._encode(records[start:start + ENCODE_CHUNK], start)
                                   for start in range(0, len(records), ENCODE_CHUNK))

    def _encode(self, records: list[Record], first: int = 0) -> list[dict]:
        """The examples of `records` (the split's records from its `first`)."""
        unk = [self.tokenizer.unk_id]  # a text that encodes to nothing still has length 1
        columns = {key: self.tokenizer.encode_batch([text_of(r, fields) for r in records])
                   for key, fields in self.texts.items()}
        return [{**{key: torch.tensor(ids[i][:self.max_length] or unk)
                    for key, ids in columns.items()}, **self.extras(record)}
                for i, record in enumerate(records)]

    # -- loading ---------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        examples = self.datasets[split]
        world, rank = self.world()
        lengths = examples.lengths().tolist()
        sampler = BucketBatchSampler(lengths, self.batch_size, shuffle, self.seed, world, rank)
        if shuffle and self.trainer:
            # Worker processes prefetch batches as soon as the loader is iterated, which a
            # resumed run does before Lightning's set_epoch: start from the trainer's epoch.
            sampler.set_epoch(self.trainer.current_epoch)
        return ResumableLoader(PaddedExamples(examples), batch_sampler=sampler,
                               collate_fn=self.collate, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0,
                               pin_memory=self.pin_memory())

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Pads each text into (B, T) with its (B,) lengths; stacks every other value."""
        batch = {}
        for key in self.texts:
            batch[key], batch[lengths_key(key)] = pad_batch([ex[key] for ex in examples],
                                                            self.tokenizer.pad_id)
        for key in [key for key in examples[0] if key not in self.texts]:
            batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch

    def train_dataloader(self) -> DataLoader:
        overfit = bool(self.trainer and self.trainer.overfit_batches)  # the same batches each epoch
        return self._loader("train", shuffle=not overfit)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def text_of(record: Record, fields: list[str]) -> str:
    """The named fields of a record joined with a space."""
    return " ".join(record.fields[field].strip() for field in fields)
