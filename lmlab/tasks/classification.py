"""Text classification task: cross-entropy over any number of classes, accuracy and macro-F1."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lmlab.data.description import DataDescription
from lmlab.data.vectors import load_vectors
from lmlab.tasks.base import Task, example_weights, real_examples

IGNORE = -100  # the label of padding copies: metrics skip it

log = logging.getLogger(__name__)


class ClassificationTask(Task):
    """Trains any net that maps a batch's `tokens` and `lengths` to class logits.

    Args:
        net: the model, e.g. `lmlab.models.rnn.RNNClassifier`.
        num_classes: number of classes (from the DataModule).
        optimizer: a partial optimizer, called with the parameters.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step.
        pretrained_vectors: GloVe/word2vec text file to initialise `net.embedding` from.
        data: the data's description; its vocabulary is needed with `pretrained_vectors`.
    """

    kind = "classification"  # the data it needs
    monitor = ("val/acc", "max")  # what picks the best checkpoint

    def __init__(self, net: nn.Module, num_classes: int, optimizer: Callable,
                 scheduler: Callable | None = None, pretrained_vectors: str | None = None,
                 compile: bool = False, compile_mode: str = "default",
                 activation_checkpointing: bool = False,
                 data: DataDescription | None = None):
        super().__init__(net, optimizer, scheduler, compile, compile_mode,
                         activation_checkpointing)
        self.save_hyperparameters(ignore=["net", "data", "optimizer", "scheduler"])
        self.classes = tuple(data.classes) if data is not None else ()  # names, by class id
        if pretrained_vectors:
            vocab = data.tokenizer.vocab if data is not None else None
            self.vector_coverage = load_pretrained(net.embedding, pretrained_vectors, vocab)
        # "train" would clash with nn.Module.train in a ModuleDict: hence split_metrics names.
        # Evaluation skips the copies that pad a split among ranks; training metrics (at
        # most world - 1 copies an epoch) save that masking, a measurable cost per step.
        self.train_metrics = accuracy_and_f1(num_classes, None).clone(prefix="train/")
        self.val_metrics = accuracy_and_f1(num_classes, IGNORE).clone(prefix="val/")
        self.test_metrics = accuracy_and_f1(num_classes, IGNORE).clone(prefix="test/")

    @classmethod
    def config_from_data(cls, data: DataDescription) -> dict:
        classes = len(data.classes)
        return {"num_classes": classes,
                "net": {"vocab_size": data.vocab_size, "num_classes": classes,
                        "pad_id": data.pad_id}}

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.net(tokens, lengths)

    def predict(self, batch: dict) -> list[dict]:
        """Each text's label, that label's probability and every class's (`p(LABEL)`), one
        dict a text of the batch."""
        probabilities = self(batch["tokens"], batch["lengths"]).float().softmax(dim=-1)  # (B, C)
        names = self.classes or tuple(str(i) for i in range(probabilities.size(1)))
        rows = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            rows.append({"label": names[best], "probability": row[best],
                         **{f"p({name})": p for name, p in zip(names, row)}})
        return rows

    def step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["tokens"], batch["lengths"])
        weight = example_weights(batch, len(logits), logits.device)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        labels = batch["labels"]
        if split != "train":
            labels = labels.masked_fill(weight == 0, IGNORE)  # copies count nowhere
        getattr(self, f"{split}_metrics").update(logits, labels)
        return self.log_loss(split, losses, weight)

    def count_tokens(self, batch: dict) -> torch.Tensor:
        """Input tokens, not padding."""
        lengths = batch["lengths"]
        return (lengths * real_examples(batch, len(lengths)).to(lengths.device)).sum()

    def flop_lengths(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return (batch["lengths"],)

    def log_epoch(self, split: str) -> None:
        # Computed once an epoch (over all ranks), not logged per step: logging metric
        # objects every step cost ~2 ms a step in Lightning's result handling.
        metrics = getattr(self, f"{split}_metrics")
        values = metrics.compute()
        metrics.reset()
        if split != "train":
            values[f"{split}/loss"] = self.epoch_loss(split)
        self.log_dict(values, prog_bar=split == "val")


def accuracy_and_f1(num_classes: int, ignore_index: int | None) -> MetricCollection:
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=ignore_index),
    })


def load_pretrained(embedding: nn.Embedding, path: str, vocab: list[str] | None) -> float:
    """Copies pretrained vectors into the embedding rows of the words they cover.

    Returns:
        The share of the vocabulary found in the vector file.
    """
    if vocab is None:
        raise ValueError("pretrained_vectors needs the vocabulary (the data description)")
    vectors, found = load_vectors(path, vocab, embedding.embedding_dim)
    with torch.no_grad():
        embedding.weight[found] = vectors[found]
    coverage = found.float().mean().item()
    log.info("pretrained vectors %s cover %d of %d vocabulary entries (%.1f%%)",
             path, int(found.sum()), len(vocab), 100 * coverage)
    return coverage
