"""What every task shares: one `step` for all splits, and optimizer/scheduler partials."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from lmlab.data.description import DataDescription
from lmlab.parallel.sharding import checkpoint_blocks, shard

log = logging.getLogger(__name__)

TRAINING_PASSES = 3  # forward, and a backward of about twice its matrix products


def example_weights(batch: dict, size: int, device: torch.device) -> torch.Tensor:
    """(B,) weights of a batch's examples: 0 for the copies that pad a split so that every
    rank gets as many examples as the others, above 0 for real ones, scaled so that the
    weighted mean loss of each rank, averaged over the ranks, is the mean loss of the global
    batch (see `lmlab.data.batching.BucketBatchSampler`). 1 when the data gives none."""
    weight = batch.get("weight")
    return torch.ones(size, device=device) if weight is None else weight.to(device)


def real_examples(batch: dict, size: int) -> torch.Tensor:
    """(B,) True for a batch's real examples, False for the copies that pad it."""
    weight = batch.get("weight")
    return torch.ones(size, dtype=torch.bool) if weight is None else weight > 0


FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def fused_where_supported(optimizer: Callable, device: torch.device) -> dict:
    """`{"fused": True}` for torch's Adam or AdamW on a CUDA device when the config chose
    neither `fused` nor `foreach` (one kernel updates every parameter, instead of torch's
    default of a few kernels a parameter group); nothing otherwise."""
    target = getattr(optimizer, "func", optimizer)  # a partial from the config
    chosen = set(getattr(optimizer, "keywords", {}))
    if device.type != "cuda" or target not in FUSABLE or chosen & {"fused", "foreach"}:
        return {}
    return {"fused": True}


class Task(L.LightningModule):
    """A LightningModule around a plain `net`.

    Args:
        net: the model.
        optimizer: a partial optimizer, called with `optimizer_params()`.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step. A
            `total_steps` it leaves unset is the run's length in optimizer steps.
        compile: compile the net (`torch.compile`, in place: its parameter names stay) once
            the strategy has sharded it, as the run starts.
        compile_mode: `torch.compile`'s mode: default, reduce-overhead or max-autotune.
        activation_checkpointing: recompute each of the net's declared blocks in the
            backward pass instead of keeping its activations, under any strategy
            (`lmlab.parallel.sharding.checkpoint_blocks`).
    """

    kind = ""  # the kind of data it needs; DataModules carry the same attribute
    monitor = ("val/loss", "min")  # what picks the best checkpoint

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 compile: bool = False, compile_mode: str = "default",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        if activation_checkpointing and not checkpoint_blocks(net):
            raise ValueError(f"activation_checkpointing: {type(net).__name__} declares no "
                             "block classes to recompute (block_classes)")
        self.compile_mode = compile_mode if compile else None
        # Evaluation losses are weighted means over every example of every rank, synced by
        # torchmetrics (keys avoid "train"/"test", which nn.Module attributes shadow).
        self.eval_losses = nn.ModuleDict({"val_loss": MeanMetric(), "test_loss": MeanMetric()})

    def log_loss(self, split: str, losses: torch.Tensor, weight: torch.Tensor,
                 sizes: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch from its per-example mean `losses` (B,) and their weights.

        Without `sizes`, each example counts alike: in training the weighted mean (logged per
        step), in evaluation the mean over the real examples, also accumulated for
        `epoch_loss`. With `sizes` (B,), the number of tokens each example's loss is the mean
        of, each token counts alike: the mean over the real tokens of the global batch in
        training, over the split's real tokens in evaluation. (With gradient accumulation,
        each micro-batch is its own mean, and Lightning averages those.)"""
        losses = losses.float()  # counts past 256 are not exact in bfloat16
        real = (weight > 0).float()
        if split != "train":
            counts = real if sizes is None else real * sizes
            self.eval_losses[f"{split}_loss"].update(losses.detach(), counts)
            return (losses * counts).sum() / counts.sum().clamp(min=1)
        if sizes is None:
            loss = (losses * weight).mean()
        else:  # one small all-reduce of the token count: the denominator is global
            counts = real * sizes
            loss = (losses * counts).sum() / self.mean_over_ranks(counts.sum()).clamp(min=1)
        if self.writes_logs():  # batch_size given: Lightning would walk the batch for it
            self.log("train/loss", loss, prog_bar=True, batch_size=len(losses))
        return loss

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the ranks (itself on one process). Data-parallel ranks
        average their gradients, so a rank's sum over this mean gives the global batch's
        mean; tensor-parallel peers hold the same batch and leave the mean unchanged."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.detach().float(), reduce_op="mean")

    def writes_logs(self) -> bool:
        """Whether the loggers write this training step's values. `self.log` costs about a
        millisecond (torch 2.13's compiler guard around it), 2-3% of a small model's step,
        so per-step values are logged only on the steps that are written (every
        `trainer.log_every_n_steps`; the progress bar refreshes its loss as often)."""
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return every > 0 and (self.global_step + 1) % every == 0

    def epoch_loss(self, split: str) -> torch.Tensor:
        """The mean evaluation loss of the epoch that ends, over all ranks."""
        mean = self.eval_losses[f"{split}_loss"]
        loss = mean.compute()
        mean.reset()
        return loss

    @classmethod
    def config_from_data(cls, data: DataDescription) -> dict:
        """Config values of this task and its net that the data decides (vocabulary size,
        classes, ...), merged into the model config before it is instantiated."""
        return {}

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # set by ModelParallelStrategy (strategy=fsdp2)
            shard(self.net, self.device_mesh, self.trainer.precision,
                  **getattr(self.trainer.strategy, "sharding", {}))
        if self.compile_mode is not None:  # the net alone: self.log does not compile
            self.net.compile(mode=self.compile_mode)

    def through_strategy(self, method: str, *args, **kwargs):
        """Calls `self.<method>` through the strategy's wrapper, as Lightning calls the steps,
        so that what the wrapper shards (FSDP's flattened parameters) is gathered first."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is None or strategy.model is None or strategy.model is self:
            return getattr(self, method)(*args, **kwargs)
        return strategy._forward_redirection(strategy.model, self, method, *args, **kwargs)

    def step(self, batch: dict, split: str) -> torch.Tensor:
        raise NotImplementedError

    def count_tokens(self, batch: dict) -> torch.Tensor:
        """The batch's real tokens, as a tensor on its device (reading it would sync): no
        padding, nothing of the copies that pad a batch across ranks."""
        raise NotImplementedError

    def count_flops(self, batch: dict) -> torch.Tensor | None:
        """The model FLOPs of training on the batch's real examples, forward and backward
        (3 x the net's forward `flops`, each example at its own length: no padding), as a
        tensor on its device; None for a net without a `flops` formula."""
        formula = getattr(self.net, "flops", None)
        if formula is None:
            return None
        per_example = formula(*self.flop_lengths(batch))
        real = real_examples(batch, len(per_example)).to(per_example.device)
        return TRAINING_PASSES * (per_example * real).sum()

    def flop_lengths(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The arguments of the net's `flops`: its examples' real lengths."""
        raise NotImplementedError

    def count_examples(self, batch: dict) -> torch.Tensor:
        """The batch's real examples (not the copies that pad it across ranks), as a tensor."""
        size = len(next(t for t in batch.values() if isinstance(t, torch.Tensor)))
        return real_examples(batch, size).sum()

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
        # Positional: optimizers name their first argument differently (DeepSpeedCPUAdam's
        # is model_params).
        optimizer = self.optimizer(self.optimizer_params(),
                                   **fused_where_supported(self.optimizer, self.device))
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer=optimizer, **self.schedule_length())
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["planned_steps"] = float(self.trainer.estimated_stepping_batches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed_plan = checkpoint.get("planned_steps")  # compared once training starts

    def on_train_start(self) -> None:
        """Says in one line when a resumed run is longer or shorter than the run it resumes
        (`trainer.max_steps` or `max_epochs` changed): a schedule fitted to the run's length
        (`total_steps` left unset) now ends at the new length."""
        before, now = getattr(self, "resumed_plan", None), self.trainer.estimated_stepping_batches
        if before is not None and before != now:
            log.warning("resuming with another length: the run was planned for %s optimizer "
                        "steps and is now planned for %s (trainer.max_steps or max_epochs "
                        "changed); a schedule fitted to the run's length follows the new one",
                        f"{before:g}", f"{float(now):g}")

    def schedule_length(self) -> dict:
        """`total_steps` for a scheduler that takes it and was not given it: the run's
        optimizer steps, as the trainer counts them."""
        takes = "total_steps" in inspect.signature(self.scheduler).parameters
        given = getattr(self.scheduler, "keywords", {}).get("total_steps")
        if not takes or given is not None:
            return {}
        return {"total_steps": int(self.trainer.estimated_stepping_batches)}
