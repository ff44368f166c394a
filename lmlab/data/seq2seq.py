"""Sequence-to-sequence data (translation, summarization): local files, named corpora, or
the embedded default.

Each example is a source text and a target text, read from two fields of a record; a
summarization corpus may add more reference texts. Whitespace runs (newlines included)
become one space, so every source, reference and hypothesis is one line of a line-aligned
file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.data.corpora import SEQ2SEQ_CORPORA, Seq2SeqCorpus, stdlib_summaries
from lmlab.data.description import DataDescription
from lmlab.data.readers import Record
from lmlab.data.records import SPLITS, Split, TextRecordsDataModule
from lmlab.data.tokenizers import Tokenizer, TokenizerSpec
from lmlab.errors import DataError, LmlabError

EMBEDDED = "stdlib_summaries"
TASK_TYPES = ("translation", "summarization")
JOINT_FILE = "tokenizer.json"
SIDE_FILES = {"source": "source_tokenizer.json", "target": "target_tokenizer.json"}


def language_of(corpus: str | None, target_lang: str | None) -> str:
    """The language of the outputs: `target_lang` if set, else a named summarization
    corpus's own (the embedded corpus's: English); empty when unknown."""
    if target_lang:
        return target_lang
    if corpus == EMBEDDED:
        return "en"
    return SEQ2SEQ_CORPORA[corpus].language if corpus in SEQ2SEQ_CORPORA else ""


METRIC_OF_TASK = {"translation": "bleu", "summarization": "rouge"}


def metric_of(metric: str | None, task_type: str | None) -> str:
    """The metric set, else the task type's own: BLEU for translation, ROUGE for
    summarization."""
    return metric or METRIC_OF_TASK.get(task_type, "bleu")


def task_type_of(corpus: str | None, task_type: str) -> str:
    """The task type data of `corpus` is scored as: a named corpus's or the embedded
    corpus's own, else the configured `task_type`."""
    if corpus == EMBEDDED:
        return "summarization"
    return SEQ2SEQ_CORPORA[corpus].task_type if corpus in SEQ2SEQ_CORPORA else task_type


class Seq2SeqDataModule(TextRecordsDataModule):
    """Source -> target pairs: batches of `source`, `source_lengths`, `target`,
    `target_lengths`, `weight` and `index`.

    `source` holds token ids without `<bos>`/`<eos>`; `target` holds `<bos> y1 ... yn
    <eos>`; both are right-padded with the pad id. `index` is the example's position in its
    split, the position of its text in `sources(split)` and `references(split)`. Batches
    are bucketed by the longer side.

    Args:
        tokenizer: the tokenizer of both sides (joint vocabulary) or of the source side.
        corpus: a named corpus (`stdlib_summaries`, `multi30k`, `debian_ddtp`, `aeslc`,
            `debian_desc`), `hf:NAME[:SUBSET]` for a Hugging Face hub dataset, or null to
            read `files`.
        files: split -> one file (TSV or CSV with a header row, JSON lines), or field ->
            file for line-aligned files (`{source: train.en, target: train.de}`).
        task_type: `translation` or `summarization` (how outputs are scored); a named
            corpus sets its own.
        source_field: column or key of the source text (files and hub datasets).
        target_field: column or key of the target text.
        reference_fields: columns or keys of more references, kept where a record has them.
        source_lang: translation corpora: the language translated from (`en`, `de`); the
            source field is the one holding it. Else informational.
        target_lang: the language translated into; for summarization, the language of the
            texts (ROUGE stems English words only; a named corpus sets its own).
        description: `short` or `long`: which descriptions of `debian_ddtp` to translate.
        joint_vocab: one tokenizer trained on both sides (saved as `tokenizer.json`), or
            one per side (`source_tokenizer.json`, `target_tokenizer.json`).
        target_tokenizer: the target side's tokenizer when `joint_vocab` is false; null:
            the same settings as `tokenizer`.
        max_source_length: longer sources are cut to this many tokens.
        max_target_length: longer targets are cut to this many tokens, `<bos>` and `<eos>`
            included; the `<eos>` is kept.
        The others: as `TextRecordsDataModule`'s.

    Raises:
        LmlabError: an unknown task type, language or description, lengths too short, or
            a target tokenizer with a joint vocabulary.
    """

    kind = "seq2seq"
    corpora = SEQ2SEQ_CORPORA
    embedded = (EMBEDDED,)

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = EMBEDDED,
                 files: dict | None = None, format: str = "auto",
                 task_type: str = "summarization", source_field: str = "source",
                 target_field: str = "target", reference_fields: list[str] | tuple = (),
                 source_lang: str | None = None, target_lang: str | None = None,
                 description: str = "short", joint_vocab: bool = False,
                 target_tokenizer: TokenizerSpec | None = None, data_dir: str = "data",
                 batch_size: int = 64, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 max_source_length: int = 256, max_target_length: int = 128,
                 num_workers: int = 0, seed: int = 0, load_from: str | None = None,
                 on_bad_record: str = "error"):
        super().__init__(tokenizer, corpus, files, format, data_dir, batch_size, val_fraction,
                         test_fraction, max(max_source_length, max_target_length), num_workers,
                         seed, load_from, on_bad_record)
        _check_settings(task_type, max_source_length, max_target_length, joint_vocab,
                        target_tokenizer)
        self.task_type, self.description = task_type_of(corpus, task_type), description
        self.source_field, self.target_field = source_field, target_field
        self.reference_fields = tuple(reference_fields)
        self.source_lang, self.target_lang = source_lang, target_lang
        self.joint_vocab, self.target_tokenizer_spec = joint_vocab, target_tokenizer
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.source_tokenizer: Tokenizer | None = None
        self.target_tokenizer: Tokenizer | None = None
        self._framed: Tokenizer | None = None  # the target tokenizer adding <bos> and <eos>
        self._originals: dict[str, list[tuple[str, list[str]]]] = {}  # (source, references)
        self._translation_corpus = False
        if corpus in self.corpora:  # a wrong language or description fails before reading
            self._adopt(self.corpora[corpus])

    @property
    def texts(self) -> dict[str, list[str]]:
        return {"source": [self.source_field], "target": [self.target_field]}

    @property
    def field_keys(self) -> dict[str, list[str]]:
        # Named for the settings that choose the fields, so a fix names the right one.
        keys = ("source_lang", "target_lang") if self._translation_corpus \
            else ("source_field", "target_field")
        return {keys[0]: [self.source_field], keys[1]: [self.target_field]}

    def describe(self) -> DataDescription:
        """Both sides' tokenizers (`tokenizer` is the target side's), the task type and the
        target language."""
        return DataDescription(self.target_tokenizer, source_tokenizer=self.source_tokenizer,
                               target_tokenizer=self.target_tokenizer,
                               task_type=self.task_type,
                               target_lang=language_of(self.corpus, self.target_lang))

    def sources(self, split: str) -> list[str]:
        """The source texts of a split, by example index (one line each)."""
        return [source for source, _ in self._split_originals(split)]

    def references(self, split: str) -> list[list[str]]:
        """The references of a split, by example index: the target text first (untruncated,
        one line), then the extra references the record has (AESLC's `ann0..ann2`)."""
        return [references for _, references in self._split_originals(split)]

    # -- tokenizers ------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Writes the tokenizer(s): `tokenizer.json` for a joint vocabulary, else
        `source_tokenizer.json` and `target_tokenizer.json`."""
        if self.source_tokenizer is self.target_tokenizer:
            self.source_tokenizer.save(folder / JOINT_FILE)
        else:
            self.source_tokenizer.save(folder / SIDE_FILES["source"])
            self.target_tokenizer.save(folder / SIDE_FILES["target"])

    def _load(self, folder: Path) -> None:
        """Reads back what `save` wrote; the files decide joint or separate, as the weights
        were trained with them."""
        if all((folder / name).is_file() for name in SIDE_FILES.values()):
            self._set_tokenizers(Tokenizer.load(folder / SIDE_FILES["source"]),
                                 Tokenizer.load(folder / SIDE_FILES["target"]), folder)
        elif (folder / JOINT_FILE).is_file():
            joint = Tokenizer.load(folder / JOINT_FILE)
            self._set_tokenizers(joint, joint, folder)
        else:
            raise DataError(folder, f"no {JOINT_FILE}, nor {' and '.join(SIDE_FILES.values())}",
                            fix="point load_from at the folder of a sequence-to-sequence run")

    def _fit(self, train: list[Record]) -> None:
        sources = [_one_line(record, self.source_field) for record in train]
        targets = [_one_line(record, self.target_field) for record in train]
        if self.joint_vocab:
            joint = self.tokenizer_spec.fit(sources + targets)
            self._set_tokenizers(joint, joint)
        else:
            target_spec = self.target_tokenizer_spec or self.tokenizer_spec
            self._set_tokenizers(self.tokenizer_spec.fit(sources), target_spec.fit(targets))

    def _set_tokenizers(self, source: Tokenizer, target: Tokenizer, folder: Path | None = None
                        ) -> None:
        # One pad id for both sides: batches and nets pad both with it.
        if source.pad_id != target.pad_id:
            where = folder / SIDE_FILES["target"] if folder else "the target tokenizer"
            raise DataError(where, f"pad id {target.pad_id} differs "
                            f"from the source tokenizer's {source.pad_id}",
                            fix="train both tokenizers with lmlab's specials (<pad> first)")
        self.source_tokenizer, self.target_tokenizer = source, target
        self.tokenizer = target  # the base's `tokenizer` (pad id, vocab_size): the target side
        self._framed = target.framed(bos=True, eos=True)

    # -- reading and encoding --------------------------------------------------------------

    def _adopt(self, corpus: Seq2SeqCorpus) -> None:
        self._translation_corpus = bool(corpus.languages)
        if not corpus.languages:
            self.source_field, self.target_field = corpus.source_field, corpus.target_field
            self.reference_fields = corpus.reference_fields
            return
        _check_choice("source_lang", self.source_lang, corpus.languages, self.corpus)
        _check_choice("target_lang", self.target_lang, corpus.languages, self.corpus)
        if self.source_lang == self.target_lang:
            raise LmlabError(f"data.source_lang and data.target_lang are both "
                             f"{self.source_lang!r}: a translation goes between two languages; "
                             f"set data.target_lang to another of {list(corpus.languages)}")
        if corpus.descriptions:
            _check_choice("description", self.description, corpus.descriptions, self.corpus)
        self.source_field = corpus.field_of(self.source_lang, self.description)
        self.target_field = corpus.field_of(self.target_lang, self.description)
        self.reference_fields = corpus.reference_fields

    def _read_embedded(self, name: str) -> dict[str, Split]:
        self.source_field, self.target_field = "source", "target"
        self.reference_fields = ()
        records = [Record({"source": source, "target": target}, name, number)
                   for number, (source, target) in enumerate(stdlib_summaries(), start=1)]
        return {"train": ([name], records)}

    def _read_splits(self) -> dict[str, list[Record]]:
        records = super()._read_splits()
        self._originals = {split: [(_one_line(r, self.source_field), self._references(r))
                                   for r in split_records]
                           for split, split_records in records.items()}
        return records

    def _references(self, record: Record) -> list[str]:
        extra = [field for field in self.reference_fields
                 if record.fields.get(field, "").strip()]
        return [_one_line(record, field) for field in (self.target_field, *extra)]

    def _encode(self, records: list[Record], first: int = 0) -> list[dict]:
        sources = encode_sources(self.source_tokenizer,
                                 [record.fields[self.source_field] for record in records],
                                 self.max_source_length)
        targets = self._framed.encode_batch(
            [_one_line(record, self.target_field) for record in records])
        return [{"source": torch.tensor(source), "target": torch.tensor(self._cut_target(target)),
                 "index": index} for index, (source, target) in enumerate(zip(sources, targets),
                                                                    first)]

    def _cut_target(self, ids: list[int]) -> list[int]:
        """Cuts `<bos> y1 ... yn <eos>` to `max_target_length`, keeping the `<eos>` so the
        model still learns to stop."""
        if len(ids) <= self.max_target_length:
            return ids
        return ids[:self.max_target_length - 1] + [self.target_tokenizer.eos_id]

    def _split_originals(self, split: str) -> list[tuple[str, list[str]]]:
        if split not in SPLITS:
            raise LmlabError(f"no split {split!r}; the splits are {', '.join(SPLITS)}")
        if not self._originals:
            raise LmlabError("the data are not read yet: call setup() first")
        return self._originals[split]


def encode_sources(tokenizer: Tokenizer, texts: list[str], longest: int | None
                   ) -> list[list[int]]:
    """Source texts as the model reads them: white space folded to single spaces, encoded,
    cut to `longest` tokens; a text that encodes to nothing is `<unk>` (length 1)."""
    encoded = tokenizer.encode_batch([" ".join(text.split()) for text in texts])
    return [ids[:longest] or [tokenizer.unk_id] for ids in encoded]


def _one_line(record: Record, field: str) -> str:
    """A field's text with every whitespace run (newlines included) made one space."""
    return " ".join(record.fields[field].split())


def _check_choice(key: str, value, choices: tuple[str, ...], corpus: str) -> None:
    if value not in choices:
        raise LmlabError(f"data.{key}={value!r} is not available for corpus {corpus!r}; "
                         f"choose one of {', '.join(choices)}")


def _check_settings(task_type: str, max_source_length: int, max_target_length: int,
                    joint_vocab: bool, target_tokenizer: TokenizerSpec | None) -> None:
    if task_type not in TASK_TYPES:
        raise LmlabError(f"data.task_type={task_type!r} is not a task type; use "
                         f"{' or '.join(TASK_TYPES)}")
    if max_source_length < 1 or max_target_length < 3:
        raise LmlabError(f"data.max_source_length={max_source_length} / data.max_target_length="
                         f"{max_target_length} are too short: a source needs at least 1 token, "
                         "a target at least 3 (<bos>, one token, <eos>)")
    if joint_vocab and target_tokenizer is not None:
        raise LmlabError("data.target_tokenizer is set but data.joint_vocab=true trains one "
                         "tokenizer for both sides; set data.joint_vocab=false, or remove "
                         "data.target_tokenizer")
