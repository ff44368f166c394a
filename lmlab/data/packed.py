"""Tokenized examples stored by column, without a Python object per example.

Each text of the examples (`tokens`, or `source` and `target`) is one flat array of token
ids with the offsets where each example's ids start; each other value (a label id, a score,
an index) is one array. A million short records then cost the bytes of their ids and of a
few numbers each, not a million dicts of tensors. An example is built when it is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


class PackedExamples:
    """A split's examples: `examples[i]` is the dict `{text key: (n,) int64 tensor, value
    key: number}` the DataModule's `_encode` made for example i."""

    def __init__(self, texts: dict[str, tuple[np.ndarray, np.ndarray]],
                 values: dict[str, np.ndarray], count: int):
        self.texts = texts  # key -> (ids, offsets): example i is ids[offsets[i]:offsets[i+1]]
        self.values = values  # key -> (N,) array
        self.count = count

    @classmethod
    def pack(cls, chunks: Iterable[list[dict]]) -> PackedExamples:
        """Packs the examples of consecutive chunks (lists of example dicts, each holding
        1-D tensors of token ids and numbers); only one chunk is held as dicts at a time."""
        ids: dict[str, list[np.ndarray]] = {}
        lengths: dict[str, list[np.ndarray]] = {}
        values: dict[str, list[np.ndarray]] = {}
        count = 0
        for examples in chunks:
            count += len(examples)
            for key in examples[0] if examples else ():
                column = [example[key] for example in examples]
                if torch.is_tensor(column[0]):
                    ids.setdefault(key, []).append(torch.cat(column).numpy().astype(np.int32))
                    lengths.setdefault(key, []).append(np.array([len(t) for t in column]))
                else:
                    values.setdefault(key, []).append(np.asarray(column))
        texts = {key: (np.concatenate(ids[key]),
                       np.concatenate([[0], np.cumsum(np.concatenate(lengths[key]))]))
                 for key in ids}
        return cls(texts, {key: np.concatenate(parts) for key, parts in values.items()}, count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not -self.count <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        index %= self.count
        example = {key: torch.from_numpy(ids[offsets[index]:offsets[index + 1]].astype(np.int64))
                   for key, (ids, offsets) in self.texts.items()}
        return {**example, **{key: column[index].item() for key, column in self.values.items()}}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(self.count))

    def lengths(self) -> np.ndarray:
        """(N,) each example's longest text, in tokens."""
        return np.max([np.diff(offsets) for _, offsets in self.texts.values()], axis=0)

    def column(self, key: str) -> np.ndarray:
        """(N,) the value `key` of every example (e.g. its label id)."""
        return self.values[key]

    def nbytes(self) -> int:
        """Bytes of the arrays that hold the examples."""
        return sum(ids.nbytes + offsets.nbytes for ids, offsets in self.texts.values()) + \
            sum(column.nbytes for column in self.values.values())
