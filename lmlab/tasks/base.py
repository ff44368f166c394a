"""What every task shares: one `step` for all splits, and optimizer/scheduler partials."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from lmlab.parallel import shard


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
        # Evaluation losses are weighted means over every example of every rank, synced by
        # torchmetrics (keys avoid "train"/"test", which nn.Module attributes shadow).
        self.eval_losses = nn.ModuleDict({"val_loss": MeanMetric(), "test_loss": MeanMetric()})

    def log_loss(self, split: str, loss: torch.Tensor, weight: int) -> None:
        """Logs the training loss per step; accumulates evaluation losses for `epoch_loss`."""
        if split == "train":  # batch_size given: Lightning would walk the batch to infer it
            self.log("train/loss", loss, prog_bar=True, batch_size=weight)
        else:
            self.eval_losses[f"{split}_loss"].update(loss, weight)

    def epoch_loss(self, split: str) -> torch.Tensor:
        """The mean evaluation loss of the epoch that ends, over all ranks."""
        mean = self.eval_losses[f"{split}_loss"]
        loss = mean.compute()
        mean.reset()
        return loss

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # set by ModelParallelStrategy (strategy=fsdp2)
            shard(self.net, self.device_mesh)

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
