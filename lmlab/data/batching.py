"""Length bucketing and padding, shared by every task's DataModule."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Sampler

GOLDEN = (5 ** 0.5 - 1) / 2


def spread(n: int) -> torch.Tensor:
    """A fixed order of `0 .. n-1` whose every prefix is spread evenly over the range (by
    the golden-ratio sequence: k of them lie about n / k apart, for any k). Evaluation takes
    its batches, sorted by length, in this order, so that a limited evaluation scores one
    sample of every length, the same in every run, whatever its seed."""
    return torch.argsort(torch.frac(torch.arange(n, dtype=torch.float64) * GOLDEN), stable=True)


class BucketBatchSampler(Sampler[list[tuple[int, float]]]):
    """Batches of similar length (the seed's BucketIterator), split evenly across ranks.

    Training order: shuffle the examples, sort them by length within pools of
    `pool_batches` batches, cut the pools into batches and shuffle the batches. Evaluation
    order (`shuffle=False`): sort everything by length, cut it into batches and take them in
    the `spread` order, so that the first k batches (a limited validation) are one fixed
    sample of every length, not the k shortest. An epoch's order comes from
    `seed + epoch` alone, the epoch being the last one given to `set_epoch`, so a run
    resumed at epoch k sees the batches an uninterrupted run sees at epoch k; `skip`
    skips the batches of that epoch that were trained before the checkpoint.

    The global batches are the same whatever the world size, and every rank gets the same
    number of batches with the same number of examples at each step: a global batch is
    padded up to a multiple of the world size with copies of its own examples, and rank r
    takes positions r, r + world, ... . Each item is `(index, weight)`: 0 for a copy, and
    `padded size / real size` for a real example (1 unless the batch was padded). So
    evaluation counts each example whose weight is above 0 once, and in training the mean of
    weight x loss over a rank's examples, averaged over the ranks as DDP averages gradients,
    is exactly the mean loss of the global batch's real examples.

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
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank, self.pool_batches = num_replicas, rank, pool_batches
        self.epoch, self.skip = 0, Skip()

    @property
    def sampler(self) -> BucketBatchSampler:
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler`, not on the batch
        # sampler itself (lightning.fabric.utilities.data._set_sampler_epoch).
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        if not self.shuffle:
            batches = torch.argsort(self.lengths, stable=True).split(self.batch_size)
            return [batches[i] for i in spread(len(batches))]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for pool in order.split(self.batch_size * self.pool_batches):
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += list(pool.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        # A generator: the order is drawn at the first batch, after set_epoch.
        for batch in self._batches()[self.skip.take(self.epoch):]:
            real = len(batch)
            padded = -(-real // self.num_replicas) * self.num_replicas
            copies = batch[torch.arange(padded) % real].tolist()  # real ones first, then copies
            yield [(copies[i], padded / real if i < real else 0.0)
                   for i in range(self.rank, padded, self.num_replicas)]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class Skip:
    """Batches a sampler leaves out of one epoch's order, once: those a resumed run had
    trained before its checkpoint."""

    def __init__(self):
        self.epoch, self.batches = None, 0

    def set(self, epoch: int, batches: int) -> None:
        self.epoch, self.batches = epoch, batches

    def take(self, epoch: int) -> int:
        """The batches to leave out of `epoch`'s order (0 for any other epoch); then none."""
        batches = self.batches if epoch == self.epoch else 0
        self.epoch, self.batches = None, 0
        return batches


def leave_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGTERM and Ctrl-C reach the whole process
    group, and a worker they killed would fail the step it serves. The main process stops
    the run at the end of the step (`lmlab.training.callbacks.interrupt.InterruptCheckpoint`)
    and then ends its workers; a worker whose main process is gone exits by itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning saves with each checkpoint.

    Lightning's fit loop saves `state_dict()` of a loader that has one (under `loops ->
    fit_loop -> state_dict -> combined_loader`) and, resuming mid-epoch, gives it back to
    `load_state_dict` (see `lmlab.checkpointing.exact_resume.ExactResume` for when it does
    not). The position is the sampler's epoch and the batches this loader has given in it,
    counted as they leave (not as workers prefetch them), so a resumed run continues with
    the batch after
    the last one trained. The sampler (`sampler`, or `batch_sampler` for a batch sampler)
    needs `set_epoch` and a `skip` (`Skip`).

    Iterating starts at the first batch, not at `iter()`: Lightning creates the iterator
    before it restores the position when a schedule asks `trainer.estimated_stepping_batches`.
    The workers' base seed comes from `generator`, not from the global generator, whose
    state a checkpoint restores for dropout (the workers draw nothing at random).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("generator", torch.Generator())
        kwargs.setdefault("worker_init_fn", leave_signals_to_the_trainer)
        super().__init__(*args, **kwargs)
        self.given = 0

    @property
    def order(self):
        """The sampler that draws the epoch's order; None for one that cannot skip (the
        sequential sampler Lightning puts in for `overfit_batches`)."""
        return next((s for s in (self.sampler, self.batch_sampler) if hasattr(s, "skip")), None)

    def __iter__(self):
        order = self.order
        resumed = order is not None and order.skip.epoch == order.epoch
        self.given = order.skip.batches if resumed else 0
        for batch in super().__iter__():
            self.given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        order = self.order
        return {} if order is None else {"epoch": order.epoch, "batches": self.given}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        order = self.order
        if order is None or not state_dict:
            return
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        order.set_epoch(epoch)
        if batches < len(self):  # an epoch that ended resumes at the next one's start
            order.skip.set(epoch, batches)


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

    def pin_memory(self) -> bool:
        """Whether batches go to a CUDA device: they are then put in page-locked memory, from
        which Lightning copies them without blocking the host."""
        strategy = self.trainer.strategy if self.trainer else None
        return getattr(getattr(strategy, "root_device", None), "type", "cpu") == "cuda"


def pad_batch(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads 1-D token tensors into a (B, T) batch; returns it with the (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences])
    return pad_sequence(sequences, batch_first=True, padding_value=pad_id), lengths
