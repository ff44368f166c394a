"""Non-finite losses and gradients, and loss spikes: caught before the optimizer step.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from lightning.pytorch import Callback

from lmlab.errors import NumericalFault

log = logging.getLogger(__name__)


class NumericalGuard(Callback):
    """Checks every optimizer step's loss and gradients: a non-finite one stops the run (or,
    with `non_finite=skip`, skips the step), and no checkpoint is ever written of weights a
    non-finite step touched. Optionally skips the step of a loss spike: a loss above
    `spike_factor` times its running mean.

    By default (`stop`, no spike skipping) a step costs no host sync: its loss and squared
    gradient norm are reduced over the ranks by one asynchronous all-reduce, together with
    whether a rank received a stop signal (`InterruptCheckpoint`), and read as the next step
    begins, when they have long arrived; a pending value is also read before a checkpoint is
    written and when training ends. A non-finite step is thus applied, then found one step
    later: the run stops there, naming the step, before any checkpoint holds its weights.
    Skipping a step must be decided before it is taken: with `skip` or `spike_factor`, the
    values are read at once, one host sync a step. Skipped steps are logged as
    `train/skipped_steps`. Under fp16 mixed precision the gradients are not checked: the
    gradient scaler skips their overflows itself. DeepSpeed keeps its gradients out of the
    parameters: only the loss is checked there.

    Args:
        non_finite: `stop` (exit with status 3, naming the step) or `skip` the step.
        spike_factor: skip the step when the loss exceeds this multiple of its running mean
            (null: never).
        spike_decay: the running mean's decay per step (0.99: about the last 100 steps).
        spike_warmup: steps to average before a spike can be skipped.
    """

    def __init__(self, non_finite: str = "stop", spike_factor: float | None = None,
                 spike_decay: float = 0.99, spike_warmup: int = 20):
        if non_finite not in ("stop", "skip"):
            raise ValueError(f"non_finite must be stop or skip, not {non_finite!r}")
        self.non_finite = non_finite
        self.spike_factor = spike_factor
        self.spike_decay = spike_decay
        self.spike_warmup = spike_warmup
        self.at_once = non_finite == "skip" or spike_factor is not None
        self.loss: torch.Tensor | None = None
        self.pending: Pending | None = None  # the last step's values, on their way
        self.mean: float | None = None
        self.seen = 0
        self.skipped = 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss  # accumulated batches

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.settle(trainer)  # the previous step's values
        if self.loss is None:
            return
        grads = [] if has_scaler(trainer) else local_grads(pl_module)
        # filled on the device: a tensor made from a host value would be a blocking copy
        stop = torch.full((), float(stop_requested(trainer)), device=self.loss.device)
        stats = torch.stack([self.loss, squared_norm(grads, self.loss), stop])  # float32
        self.loss = None
        self.pending = Pending(stats, trainer.world_size, trainer.global_step)
        if self.at_once:
            self.settle(trainer, optimizer)
        # `self.log` costs ~1 ms: only on the steps an lmlab task writes
        if self.skipped and getattr(pl_module, "writes_logs", lambda: True)():
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.settle(trainer)  # a checkpoint of weights a non-finite step touched: never

    def on_train_end(self, trainer, pl_module) -> None:
        self.settle(trainer)

    def settle(self, trainer, optimizer=None) -> None:
        """Reads the pending step's values (a host sync if they have not arrived) and acts:
        stops the run on a non-finite one, skips the step it is taken before (`optimizer`)
        when so configured, and passes on a stop signal that any rank received."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        loss, grad_norm, stop = pending.values()
        if stop:
            agree_to_stop(trainer)
        fault = self.fault(loss, grad_norm)
        if fault and fault != "spike" and self.non_finite == "stop":
            raise NumericalFault(non_finite_message(trainer, fault, pending.step))
        if fault and optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # optimizers step no parameter without a gradient
            self.skipped += 1
            log.warning("step %d skipped: %s", pending.step, fault)
        elif not fault:
            self.seen += 1
            self.mean = loss if self.mean is None else \
                self.spike_decay * self.mean + (1 - self.spike_decay) * loss

    def fault(self, loss: float, grad_norm: float) -> str | None:
        """What is wrong with this step, if anything."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return "a gradient is not finite"
        if self.spike_factor is not None and self.seen >= self.spike_warmup \
                and loss > self.spike_factor * self.mean:
            return "spike"
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.mean, self.seen, self.skipped = (state_dict["mean"], state_dict["seen"],
                                              state_dict["skipped"])


class Pending:
    """A step's (loss, squared gradient norm, stop) on its way to the host: averaged over
    the ranks by an asynchronous all-reduce, then copied without blocking (into pinned
    memory on a GPU); `values` waits for both, by then long done."""

    def __init__(self, stats: torch.Tensor, world_size: int, step: int):
        self.step = step
        self.work = None
        if world_size > 1:
            stats = stats / world_size
            self.work = torch.distributed.all_reduce(stats, async_op=True)
        self.stats, self.event = stats, None
        if stats.device.type == "cuda":
            if self.work is not None:
                self.work.wait()  # on NCCL: the copy below is queued after the reduction
                self.work = None
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def values(self) -> tuple[float, float, bool]:
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            self.event.synchronize()
            loss, grad_norm, stop = self.host.tolist()
        else:
            loss, grad_norm, stop = self.stats.tolist()
        return loss, grad_norm, stop > 0


def stop_requested(trainer) -> bool:
    """Whether this rank received a stop signal (`InterruptCheckpoint`)."""
    from lmlab.training.callbacks.interrupt import InterruptCheckpoint

    return any(isinstance(c, InterruptCheckpoint) and c.received is not None
               for c in trainer.callbacks)


def agree_to_stop(trainer) -> None:
    """Every rank stops after this step: a stop signal reached one of them."""
    from lmlab.training.callbacks.interrupt import InterruptCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, InterruptCheckpoint):
            callback.agree(trainer)


def has_scaler(trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def local_grads(pl_module) -> list[torch.Tensor]:
    """This rank's gradients (its shard's, under FSDP)."""
    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def squared_norm(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The sum of the squared gradients (NaN or inf with any non-finite one)."""
    if not grads:
        return torch.zeros((), device=like.device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().square().sum().to(like.device)


def non_finite_message(trainer, fault: str, step: int) -> str:
    """Names the step, the likely causes, and the newest checkpoint of finite weights."""
    saved = [path for c in trainer.checkpoint_callbacks
             for path in (getattr(c, "best_model_path", ""), getattr(c, "last_model_path", ""))
             if path and os.path.isfile(path)]
    kept = f"the newest checkpoint, {max(saved, key=os.path.getmtime)}, holds finite weights" \
        if saved else "no checkpoint was written yet"
    return (f"{fault} at step {step} (epoch {trainer.current_epoch}); the run stopped "
            f"before writing any checkpoint of its weights, and {kept}. Likely causes: a "
            "learning rate too high (model.optimizer.lr, or warm-up), fp16 overflow "
            "(precision=bf16-mixed or 32-true), or bad values in the data; "
            "trainer.gradient_clip_val limits spikes, and callbacks.numerics.non_finite=skip "
            "skips such steps instead")
