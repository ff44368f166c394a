"""What every task shares: one `step` for all splits, and optimizer/scheduler partials."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn


class Task(L.LightningModule):
    """A LightningModule around a plain `net`.

    Args:
        net: the model.
        optimizer: a partial optimizer, called with `optimizer_params()`.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step.
    """

    kind = ""  # the kind of data it needs; DataModules carry the same attribute
    monitor = ("val/loss", "min")  # what picks the best checkpoint

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler

    def step(self, batch: dict, split: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "test")

    def log_epoch(self, split: str) -> None:
        """Logs what is measured over a whole epoch of `split`; called as each one ends."""

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch("test")

    def optimizer_params(self) -> list:
        return [p for p in self.net.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer(params=self.optimizer_params())
        if self.scheduler is None:
            return optimizer
        schedule = {"scheduler": self.scheduler(optimizer=optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
