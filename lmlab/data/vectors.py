"""Pretrained word vectors from GloVe or word2vec *text* files."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.data.readers import open_text
from lmlab.errors import DataError


def load_vectors(path: str | Path, vocab: list[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads the vectors of the words in `vocab`.

    GloVe files hold `word v1 ... vD` lines; word2vec text files add a `count D` header line,
    which is skipped. Words are matched exactly (lowercase the vocabulary for GloVe).

    Args:
        path: the vector file, optionally gzip-compressed.
        vocab: tokens ordered by id.
        dim: the expected vector width (the model's embedding width).

    Returns:
        `(vectors, found)`: a (V, dim) float tensor, zero where not found, and a (V,) mask.

    Raises:
        DataError: the file is missing, or a line has the wrong number of values.
    """
    index = {word: i for i, word in enumerate(vocab)}
    vectors, found = torch.zeros(len(vocab), dim), torch.zeros(len(vocab), dtype=torch.bool)
    with open_text(Path(path)) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            word, *values = line.rstrip("\r\n").rstrip(" ").split(" ")
            if number == 1 and len(values) == 1:
                continue  # word2vec header: "count dim"
            if len(values) != dim:
                raise DataError(path, f"expected {dim} values after the word, found "
                                f"{len(values)}", number, fix="set model.net.embed_dim to the "
                                "width of these vectors, or check the file")
            row = index.get(word)
            if row is not None:
                vectors[row] = _numbers(values, path, number)
                found[row] = True
    return vectors, found


def _numbers(values: list[str], path, line: int) -> torch.Tensor:
    try:
        return torch.tensor([float(v) for v in values])
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise DataError(path, f"{bad[:20]!r} is not a number", line,
                        fix="a line holds a word and its values, separated by single spaces"
                        ) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
