"""Majority-class baseline: the test accuracy of always predicting train's most frequent label.

    LMLAB_DATA_DIR=../shared/data python -m benchmarks.majority_baseline [corpus ...]
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from lmlab.data.classification import ClassificationDataModule
from lmlab.data.tokenizers import WordTokenizer


def majority_accuracy(corpus: str, seed: int = 42) -> tuple[list[int], float]:
    """Split sizes and the majority-class test accuracy, with the runs' default seed."""
    data = ClassificationDataModule(WordTokenizer(), corpus=corpus, seed=seed,
                                    data_dir=os.environ.get("LMLAB_DATA_DIR", "data"))
    data.setup()
    top = Counter(ex["labels"] for ex in data.datasets["train"]).most_common(1)[0][0]
    test = [ex["labels"] for ex in data.datasets["test"]]
    sizes = [len(data.datasets[s]) for s in ("train", "val", "test")]
    return sizes, sum(y == top for y in test) / len(test)


def main() -> None:
    for corpus in sys.argv[1:] or ["stdlib_docs", "sst2", "trec", "ag_news"]:
        sizes, accuracy = majority_accuracy(corpus)
        print(f"{corpus:12s} train/val/test {sizes}  majority-class test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
