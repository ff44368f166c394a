"""Blocks of tokens and the orders they are read in: random blocks for training, the same
sweep of non-overlapping blocks for evaluation, each shared evenly among the ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lmlab.data.batching import (
    Skip,
    spread,
)


class Blocks(Dataset):
    """(input, target) pairs of `block_size` tokens starting at a given offset, weight 1."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, offset: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[offset:offset + self.block_size + 1].astype(np.int64))
        return {"tokens": chunk[:-1], "targets": chunk[1:], "weight": torch.tensor(1.0)}


class Sweep(Dataset):
    """One rank's share of a deterministic sweep over non-overlapping blocks.

    The sweep's offsets are padded with copies of the first block up to a multiple of
    `per_device * world`, so every rank gets the same number of full batches (a sharded
    strategy hangs when one rank runs a batch more than another). Copies have weight 0, real
    blocks weight 1, and rank r takes blocks r, r + world, ... so the ranks together see
    every real block exactly once.

    Args:
        blocks: the split's blocks.
        per_device: batch size on each rank.
        world: data-parallel world size.
        rank: this rank.
        max_batches: a limit on the sweep's global batches (None: the whole split): that
            many batches of blocks spread over the whole split (`spread`), in text order,
            the same in every run.
    """

    def __init__(self, blocks: Blocks, per_device: int, world: int, rank: int,
                 max_batches: int | None = None):
        offsets = list(range(0, len(blocks), blocks.block_size))
        if max_batches and max_batches * per_device * world < len(offsets):
            kept = spread(len(offsets))[:max_batches * per_device * world].sort()[0]
            offsets = [offsets[i] for i in kept]
        padding = -len(offsets) % (per_device * world)
        weights = [1.0] * len(offsets) + [0.0] * padding
        offsets += offsets[:1] * padding
        self.blocks = blocks
        self.offsets, self.weights = offsets[rank::world], weights[rank::world]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.blocks[self.offsets[index]], "weight": torch.tensor(self.weights[index])}


class RandomOffsets(Sampler[int]):
    """Random block offsets: `num_batches` global batches of `batch_size` a epoch.

    The global batches are drawn from `seed + epoch` alone, the same on every rank; each rank
    yields its share of each (examples rank, rank + world, ...), so N processes train on the
    same blocks as one. Lightning sets the epoch before each training epoch (`set_epoch`),
    resumed runs included, so a run resumed at epoch k draws epoch k's blocks; `skip`
    leaves out the batches of that epoch that were trained before the checkpoint.
    """

    def __init__(self, num_offsets: int, num_batches: int, batch_size: int, seed: int,
                 num_replicas: int = 1, rank: int = 0):
        self.num_offsets, self.num_batches, self.batch_size = num_offsets, num_batches, batch_size
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0
        self.skip = Skip()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = (self.num_batches, self.batch_size)
        offsets = torch.randint(self.num_offsets, size, generator=generator)
        offsets = offsets[self.skip.take(self.epoch):]  # whole global batches
        yield from offsets[:, self.rank::self.num_replicas].flatten().tolist()

    def __len__(self) -> int:
        return self.num_batches * len(range(self.rank, self.batch_size, self.num_replicas))
