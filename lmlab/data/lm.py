"""Language-modelling data: text tokenized once into cached token files, read by np.memmap.

The cache folder (a token file a split, the tokenizer, the counts) is keyed by the corpus
files' paths, sizes and modification times, the tokenizer settings, the split fractions and
the cache's format version, so a second run (or every rank of a multi-process run after the
first) finds it without reading the text, and corpora larger than memory work: the text is
tokenized a piece at a time on every core, and training reads only the blocks a batch needs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from lmlab.data.batching import (
    ResumableLoader,
    ShardedDataModule,
    leave_signals_to_the_trainer,
)
from lmlab.data.blocks import Blocks, RandomOffsets, Sweep
from lmlab.data.corpora import LM_CORPORA, STDLIB_PACKAGES, load_hub_dataset, stdlib_files
from lmlab.data.description import DataDescription
from lmlab.data.readers import open_text
from lmlab.data.token_cache import (
    CHUNK_CHARS,
    FORMAT,
    SPLITS,
    building,
    cut_at_lines,
    files_key,
    private_name,
    progress_bar,
    publish,
    write_tokens,
)
from lmlab.data.tokenizers import Tokenizer, TokenizerSpec, every_core
from lmlab.errors import DataError, LmlabError

log = logging.getLogger(__name__)
EMBEDDED = "stdlib_source"


def stdlib_source_files() -> list[Path]:
    """The embedded LM corpus: the Python source of a fixed set of standard-library packages."""
    return [path for package in STDLIB_PACKAGES for path in stdlib_files(package)]


class LMDataModule(ShardedDataModule):
    """Token blocks for causal language modelling.

    The text is cut at line ends into train | val | test (in that order, the last
    `val_fraction + test_fraction` of the characters held out), the tokenizer is trained on
    the train part alone, and each part is tokenized into its own token file, with its
    characters counted, so bits per character use the split's own characters per token.

    Args:
        tokenizer: the tokenizer to train on the corpus.
        corpus: `stdlib_source` (embedded, no download), `tinyshakespeare` (under `data_dir`),
            `hf:NAME[:SUBSET]` (the `text` column of a hub dataset's train split, for users
            who are online), or null to read `files`.
        files: a path, a glob or a list of them (plain or gzip-compressed text).
        data_dir: where named corpora live.
        cache_dir: where token files are kept.
        block_size: tokens per training example (the model's context).
        batch_size: global batch size, divided evenly among the devices.
        val_fraction: the share of the text, after train, held out for validation (it
            chooses the best checkpoint).
        test_fraction: the last share of the text, held out for the final test.
        train_batches: batches of random blocks in one training epoch.
        val_batches: batches of the deterministic validation and test sweeps, drawn from
            the whole split, the same in every run (null: the whole split).
        num_workers: DataLoader worker processes.
        seed: seed of the random blocks.
        load_from: a run folder whose saved tokenizer is used instead of training one.
    """

    kind = "lm"

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = EMBEDDED,
                 files: str | list[str] | None = None, data_dir: str = "data",
                 cache_dir: str = ".cache/lmlab", block_size: int = 64, batch_size: int = 12,
                 val_fraction: float = 0.1, test_fraction: float = 0.05,
                 train_batches: int = 1000, val_batches: int | None = None,
                 num_workers: int = 0, seed: int = 0, load_from: str | None = None):
        super().__init__()
        self.tokenizer_spec, self.load_from = tokenizer, load_from
        self.corpus, self.files = corpus, files
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_batches, self.val_batches = train_batches, val_batches
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.counts: dict[str, dict] = {}  # characters and tokens of each split
        self.chars_per_token: dict[str, float] = {}
        self.cache_folder: Path | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prepare_data(self) -> None:
        """Builds the token cache unless it exists (Lightning: once per node, before setup)."""
        folder = self._find_cache()
        if folder.is_dir():
            log.info("reusing token cache %s", folder)
        else:
            with every_core():  # Lightning calls it before any DataLoader worker is forked
                self._build_cache(self._paths(), folder)

    def setup(self, stage: str | None = None) -> None:
        """Reads the token cache (building it first when called without `prepare_data`).

        Raises:
            LmlabError: a split is shorter than one block.
        """
        if self.splits:
            return
        folder = self._find_cache()
        if not folder.is_dir():  # called alone: tests, lmlab.evaluate, the dry run
            self.prepare_data()
        meta = json.loads((folder / "meta.json").read_text())
        counts = meta["splits"]
        for split in SPLITS:
            self._check_size(split, counts[split]["tokens"])
        self.tokenizer = Tokenizer.load(folder / "tokenizer.json")
        self.splits = {split: np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")
                       for split in SPLITS}
        self.chars_per_token = {split: c["chars"] / c["tokens"] for split, c in counts.items()}
        self.counts = counts

    def _check_size(self, split: str, tokens: int) -> None:
        if tokens > self.block_size:
            return
        fix = ("smaller data.val_fraction / data.test_fraction" if split == "train"
               else f"larger data.{split}_fraction")
        raise LmlabError(f"the {split} split has {tokens} tokens, fewer than one block of "
                         f"{self.block_size}; use more text, a smaller data.block_size or a "
                         f"{fix}")

    def describe(self) -> DataDescription:
        return DataDescription(self.tokenizer, chars_per_token=dict(self.chars_per_token))

    def summary(self) -> str:
        """One line: tokens per split (and their share of the text), and the vocabulary."""
        total = sum(c["chars"] for c in self.counts.values())
        sizes = " / ".join(f"{s} {self.counts[s]['tokens']:,}" for s in SPLITS)
        shares = " / ".join(f"{self.counts[s]['chars'] / total:.0%}" for s in SPLITS)
        return f"{sizes} tokens ({shares} of the text); vocabulary {self.vocab_size:,}"

    def save(self, folder: Path) -> None:
        self.tokenizer.save(folder / "tokenizer.json")

    # -- the token cache -------------------------------------------------------------------

    def _paths(self) -> list[Path]:
        if self.corpus and self.corpus.startswith("hf:"):
            return [self._hub_text_file()]
        if self.corpus == EMBEDDED:
            return stdlib_source_files()
        if self.corpus in LM_CORPORA:
            return [self.data_dir / LM_CORPORA[self.corpus]]
        if self.corpus is not None:
            known = ", ".join([EMBEDDED, *LM_CORPORA])
            raise LmlabError(f"unknown LM corpus {self.corpus!r}; known: {known}, or "
                             "data.corpus=null with data.files=PATH_OR_GLOB")
        patterns = [self.files] if isinstance(self.files, str) else list(self.files or [])
        paths = sorted(Path(p) for pattern in patterns for p in glob.glob(pattern))
        if not paths:
            raise DataError(patterns or "data.files", "no file matches", fix="set data.files "
                            "to a text file, a glob such as 'texts/*.txt', or a list of them")
        return paths

    def _hub_text_file(self) -> Path:
        """Writes a hub dataset's `text` column (train split) once into the cache folder."""
        path = self.cache_dir / "hub" / (self.corpus[3:].replace("/", "_") + ".txt")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = load_hub_dataset(self.corpus[3:])["train"]["text"]
            tmp = path.with_name(private_name(path.name))
            tmp.write_text("\n".join(rows), encoding="utf-8")
            os.replace(tmp, path)
        return path

    def _texts(self, paths: list[Path]) -> Iterator[str]:
        """The corpus as pieces of about CHUNK_CHARS, each ending at a line end."""
        for path in paths:
            with open_text(path) as f:
                while piece := f.read(CHUNK_CHARS):
                    yield piece + f.readline()

    def _saved_tokenizer(self) -> Path:
        path = Path(self.load_from) / "tokenizer.json"
        if not path.is_file():
            raise DataError(path, "no saved tokenizer", fix="pass the folder of a run of "
                            "lmlab.run (it saves tokenizer.json there)")
        return path

    def _find_cache(self) -> Path:
        """The cache folder of this corpus, tokenizer and split (its hash read once)."""
        if self.cache_folder is None:
            self.cache_folder = self.cache_dir / self._cache_key(self._paths())
        return self.cache_folder

    def _cache_key(self, paths: list[Path]) -> str:
        """The files' paths, sizes and times (not their text, which every rank would read
        at every start), the tokenizer and the split."""
        digest = hashlib.sha1(f"format {FORMAT}\n{files_key(paths)}\n".encode())
        if self.load_from:
            digest.update(self._saved_tokenizer().read_bytes())
        else:
            spec = self.tokenizer_spec
            digest.update(f"{type(spec).__name__}{vars(spec)}".encode())
        digest.update(f"val {self.val_fraction} test {self.test_fraction}".encode())
        name = self.corpus or Path(paths[0]).stem
        return f"{name}-{digest.hexdigest()[:16]}"

    def _build_cache(self, paths: list[Path], folder: Path) -> None:
        """Writes the tokenizer, one token file a split and their counts into this host's
        build folder, then publishes it whole; resumes what an interrupted build left there
        (`lmlab.data.token_cache`)."""
        self._check_fractions()
        with building(folder) as partial:
            if folder.is_dir():
                return  # another process of this host built it while this one waited
            total = sum(len(piece) for piece in self._texts(paths))
            held_out = self.val_fraction + self.test_fraction
            cuts = [round(total * (1 - held_out)), round(total * (1 - self.test_fraction))]
            tokenizer = self._build_tokenizer(paths, cuts, partial / "tokenizer.json")
            with progress_bar(total, f"tokenizing {self.corpus or paths[0].name}") as advance:
                meta = write_tokens(tokenizer, cut_at_lines(self._texts(paths), cuts), partial,
                                    advance=advance)
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))
            publish(partial, folder)
        log.info("tokenized %d characters into %s", total, folder)

    def _build_tokenizer(self, paths: list[Path], cuts: list[int], saved: Path) -> Tokenizer:
        """The run's tokenizer (trained on the train part alone: held-out text must stay
        unseen), saved into the build folder; an interrupted build's saved one is reused."""
        if saved.is_file():
            return Tokenizer.load(saved)
        if self.load_from:
            tokenizer = Tokenizer.load(self._saved_tokenizer())
        else:
            parts = cut_at_lines(self._texts(paths), cuts)
            tokenizer = self.tokenizer_spec.fit(text for part, text in parts if part == 0)
        tokenizer.save(saved)
        return tokenizer

    def _check_fractions(self) -> None:
        fractions = (self.val_fraction, self.test_fraction)
        if not (all(f > 0 for f in fractions) and sum(fractions) < 1):
            raise LmlabError(f"data.val_fraction={self.val_fraction} and data.test_fraction="
                             f"{self.test_fraction} must each be above 0 and together below 1")

    # -- loading ---------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        blocks = Blocks(self.splits["train"], self.block_size)
        world, rank = self.world()
        sampler = RandomOffsets(len(blocks), self.train_batches, self.batch_size, self.seed,
                                world, rank)
        return ResumableLoader(blocks, batch_size=self.per_device_batch_size(), sampler=sampler,
                               num_workers=self.num_workers, drop_last=True,
                               pin_memory=self.pin_memory())

    def _sweep(self, split: str, shard: tuple[int, int] | None = None) -> DataLoader:
        """The split's non-overlapping blocks in order, padded and sharded across ranks.

        Args:
            split: `val` or `test`.
            shard: (world size, rank); the attached trainer's if None.
        """
        world, rank = shard or self.world()
        per_device = max(1, self.batch_size // world)  # as per_device_batch_size, for `world`
        sweep = Sweep(Blocks(self.splits[split], self.block_size), per_device, world, rank,
                      self.val_batches)
        return DataLoader(sweep, batch_size=per_device, num_workers=self.num_workers,
                          worker_init_fn=leave_signals_to_the_trainer,
                          pin_memory=self.pin_memory())

    def val_dataloader(self) -> DataLoader:
        return self._sweep("val")

    def test_dataloader(self) -> DataLoader:
        return self._sweep("test")
