"""Length bucketing and padding, shared by every task's DataModule."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (the seed's BucketIterator), split across ranks.

    Training order: shuffle the examples, sort them by length within pools of
    `pool_batches` batches, cut the pools into batches and shuffle the batches. Evaluation
    order (`shuffle=False`): sort everything by length. Each epoch reseeds from
    `seed + epoch`, so runs repeat exactly. The global batches are the same whatever the
    world size: rank r takes examples r, r + world, ... of each, so a step of N processes
    sees the same examples as a step of one (a global batch smaller than the world is
    topped up with the first examples).

    Args:
        lengths: length of each example.
        batch_size: examples per global batch (all ranks together).
        shuffle: training order if true, sorted order otherwise.
        seed: base seed of the shuffles.
        num_replicas: world size.
        rank: this process's rank.
        pool_batches: how many batches are sorted together.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, pool_batches: int = 50):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank, self.pool_batches = num_replicas, rank, pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)
            return list(order.split(self.batch_size))
        order = torch.randperm(n, generator=generator)
        batches = []
        for pool in order.split(self.batch_size * self.pool_batches):
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += list(pool.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        if self.shuffle:
            self.epoch += 1  # Lightning does not call set_epoch on batch samplers
        for batch in batches:
            if len(batch) < self.num_replicas:
                batch = torch.cat([batch, batches[0]])[:self.num_replicas]
            yield batch[self.rank::self.num_replicas].tolist()

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class ShardedDataModule(L.LightningDataModule):
    """A DataModule whose `batch_size` is global and which shards its own batches by rank."""

    batch_size: int

    def world(self) -> tuple[int, int]:
        """(data-parallel world size, this process's data-parallel rank), once a trainer is
        attached; (1, 0) before. Tensor-parallel peers share a rank: they get the same batch."""
        strategy = self.trainer.strategy if self.trainer else None
        shards = getattr(strategy, "distributed_sampler_kwargs", None)
        return (shards["num_replicas"], shards["rank"]) if shards else (1, 0)

    def per_device_batch_size(self) -> int:
        return max(1, self.batch_size // self.world()[0])


def pad_batch(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads 1-D token tensors into a (B, T) batch; returns it with the (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    return pad_sequence(sequences, batch_first=True, padding_value=pad_id), lengths
