"""Language-modelling data: text tokenized once into a cached token file, read by np.memmap.

The token file is keyed by a hash of the corpus text and the tokenizer settings, so a second
run (or every rank of a multi-process run after the first) reuses it, and corpora larger
than memory work: only the blocks a batch needs are read.
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
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.data.batching import ShardedDataModule
from lmlab.data.corpora import LM_CORPORA, STDLIB_PACKAGES, load_hub_dataset, stdlib_files
from lmlab.data.readers import open_text
from lmlab.data.tokenizers import Tokenizer, TokenizerSpec
from lmlab.errors import DataError, LmlabError

log = logging.getLogger(__name__)
EMBEDDED = "stdlib_source"
CHUNK_CHARS = 1 << 20  # text is tokenized in pieces of about 1 MB, cut at line ends


def stdlib_source_files() -> list[Path]:
    """The embedded LM corpus: the Python source of a fixed set of standard-library packages."""
    return [path for package in STDLIB_PACKAGES for path in stdlib_files(package)]


class Blocks(Dataset):
    """(input, target) pairs of `block_size` tokens starting at a given offset."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, offset: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[offset:offset + self.block_size + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "targets": chunk[1:]}


class RandomOffsets(Sampler[int]):
    """Random block offsets: `num_batches` global batches of `batch_size` a epoch.

    The global batches are drawn from `seed + epoch` alone, the same on every rank; each rank
    yields its share of each (examples rank, rank + world, ...), so N processes train on the
    same blocks as one.
    """

    def __init__(self, num_offsets: int, num_batches: int, batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0):
        self.num_offsets, self.num_batches, self.batch_size = num_offsets, num_batches, batch_size
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        size = (self.num_batches, self.batch_size)
        offsets = torch.randint(self.num_offsets, size, generator=generator)
        yield from offsets[:, self.rank::self.num_replicas].flatten().tolist()

    def __len__(self) -> int:
        return self.num_batches * len(range(self.rank, self.batch_size, self.num_replicas))


class LMDataModule(ShardedDataModule):
    """Token blocks for causal language modelling.

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
        val_fraction: the last share of the token stream held out for validation.
        train_batches: batches of random blocks in one training epoch.
        val_batches: batches of the deterministic validation sweep (null: the whole split).
        num_workers: DataLoader worker processes.
        seed: seed of the random blocks.
        load_from: a run folder whose saved tokenizer is used instead of training one.
    """

    kind = "lm"

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = EMBEDDED,
                 files: str | list[str] | None = None, data_dir: str = "data",
                 cache_dir: str = ".cache/lmlab", block_size: int = 64, batch_size: int = 12,
                 val_fraction: float = 0.1, train_batches: int = 1000,
                 val_batches: int | None = None, num_workers: int = 0, seed: int = 0,
                 load_from: str | None = None):
        super().__init__()
        self.tokenizer_spec, self.load_from = tokenizer, load_from
        self.corpus, self.files = corpus, files
        self.data_dir, self.cache_dir = Path(data_dir), Path(cache_dir)
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction = val_fraction
        self.train_batches, self.val_batches = train_batches, val_batches
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.chars_per_token = 1.0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        paths = self._paths()
        folder = self.cache_dir / self._cache_key(paths)
        if not (folder / "tokens.bin").is_file():
            self._build_cache(paths, folder)
        else:
            log.info("reusing token cache %s", folder)
        self.cache_folder = folder
        meta = json.loads((folder / "meta.json").read_text())
        self.tokenizer = Tokenizer.load(Path(self.load_from or folder) / "tokenizer.json")
        tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
        cut = int(len(tokens) * (1 - self.val_fraction))
        self.splits = {"train": tokens[:cut], "val": tokens[cut:], "test": tokens[cut:]}
        self.chars_per_token = meta["chars"] / max(len(tokens), 1)
        for split, part in self.splits.items():
            if len(part) <= self.block_size:
                raise LmlabError(f"the {split} split has {len(part)} tokens, fewer than one "
                                 f"block of {self.block_size}; use more text or a smaller "
                                 "block_size / val_fraction")

    def model_args(self) -> dict:
        return {"net": {"vocab_size": self.vocab_size}, "chars_per_token": self.chars_per_token}

    def model_objects(self) -> dict:
        return {"tokenizer": self.tokenizer}

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
            path.with_suffix(".tmp").write_text("\n".join(rows), encoding="utf-8")
            path.with_suffix(".tmp").replace(path)
        return path

    def _texts(self, paths: list[Path]) -> Iterator[str]:
        """The corpus as pieces of about CHUNK_CHARS, each ending at a line end."""
        for path in paths:
            with open_text(path) as f:
                while piece := f.read(CHUNK_CHARS):
                    yield piece + f.readline()

    def _cache_key(self, paths: list[Path]) -> str:
        digest = hashlib.sha1()
        for piece in self._texts(paths):
            digest.update(piece.encode())
        spec = self.load_from or f"{type(self.tokenizer_spec).__name__}{vars(self.tokenizer_spec)}"
        digest.update(str(spec).encode())
        name = self.corpus or Path(paths[0]).stem
        return f"{name}-{digest.hexdigest()[:16]}"

    def _build_cache(self, paths: list[Path], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.load_from:
            tokenizer = Tokenizer.load(Path(self.load_from) / "tokenizer.json")
        else:
            tokenizer = self.tokenizer_spec.fit(self._texts(paths))
        dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
        tmp = folder / f"tokens.bin.{os.getpid()}.tmp"
        chars = count = 0
        with open(tmp, "wb") as out:
            for piece in self._texts(paths):
                ids = np.asarray(tokenizer.encode(piece), dtype=dtype)
                out.write(ids.tobytes())
                chars, count = chars + len(piece), count + len(ids)
        tokenizer.save(folder / "tokenizer.json")
        (folder / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name,
                                                      "tokens": count, "chars": chars}))
        os.replace(tmp, folder / "tokens.bin")  # last: its presence means the cache is whole
        log.info("tokenized %d characters into %d tokens at %s", chars, count, folder)

    # -- loading ---------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        blocks = Blocks(self.splits["train"], self.block_size)
        world, rank = self.world()
        sampler = RandomOffsets(len(blocks), self.train_batches, self.batch_size, self.seed,
                                world, rank)
        return DataLoader(blocks, batch_size=self.per_device_batch_size(), sampler=sampler,
                          num_workers=self.num_workers, drop_last=True)

    def _sweep(self, split: str) -> DataLoader:
        """Non-overlapping blocks from the start of the split, sharded across ranks."""
        blocks = Blocks(self.splits[split], self.block_size)
        world, rank = self.world()
        per_device = self.per_device_batch_size()
        offsets = list(range(0, len(blocks), self.block_size))
        if self.val_batches:
            offsets = offsets[:self.val_batches * per_device * world]
        return DataLoader(blocks, batch_size=per_device, sampler=offsets[rank::world],
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._sweep("val")

    def test_dataloader(self) -> DataLoader:
        return self._sweep("test")
