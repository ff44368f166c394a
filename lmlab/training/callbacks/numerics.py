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
    """Checks every optimizer step's loss and gradients before the step is taken: a
    non-finite one stops the run (or, with `non_finite=skip`, skips the step), so the
    weights, and every checkpoint written after, stay finite. Optionally skips the step of
    a loss spike: a loss above `spike_factor` times its running mean.

    One sync with the device per step (the values are read on the host to decide), and one
    small all-reduce in multi-process runs, so that every rank decides alike. Skipped steps
    are logged as `train/skipped_steps`. Under fp16 mixed precision the gradients are not
    checked: the gradient scaler skips their overflows itself. DeepSpeed keeps its gradients
    out of the parameters: only the loss is checked there.

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
        self.loss: torch.Tensor | None = None
        self.mean: float | None = None
        self.seen = 0
        self.skipped = 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss  # accumulated batches

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.loss is None:
            return
        grads = [] if has_scaler(trainer) else local_grads(pl_module)
        stats = torch.stack([self.loss, squared_norm(grads, self.loss)])
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum") / trainer.world_size
        loss, grad_norm = stats.tolist()  # the one sync: the decision is taken on the host
        self.loss = None
        fault = self.fault(loss, grad_norm)
        if fault and fault != "spike" and self.non_finite == "stop":
            raise NumericalFault(non_finite_message(trainer, fault))
        if fault:
            optimizer.zero_grad(set_to_none=True)  # optimizers step no parameter without a gradient
            self.skipped += 1
            log.warning("step %d skipped: %s", trainer.global_step, fault)
        else:
            self.seen += 1
            self.mean = loss if self.mean is None else \
                self.spike_decay * self.mean + (1 - self.spike_decay) * loss
        # `self.log` costs ~1 ms: only on the steps an lmlab task writes
        if self.skipped and getattr(pl_module, "writes_logs", lambda: True)():
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

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


def non_finite_message(trainer, fault: str) -> str:
    """Names the step, the likely causes, and the newest checkpoint of finite weights."""
    saved = [path for c in trainer.checkpoint_callbacks
             for path in (getattr(c, "best_model_path", ""), getattr(c, "last_model_path", ""))
             if path and os.path.isfile(path)]
    kept = f"the newest checkpoint, {max(saved, key=os.path.getmtime)}, holds finite weights" \
        if saved else "no checkpoint was written yet"
    return (f"{fault} at step {trainer.global_step} (epoch {trainer.current_epoch}); the run "
            f"stopped before the optimizer step and {kept}. Likely causes: a learning rate "
            "too high (model.optimizer.lr, or warm-up), fp16 overflow (precision=bf16-mixed "
            "or 32-true), or bad values in the data; trainer.gradient_clip_val limits spikes, "
            "and callbacks.numerics.non_finite=skip skips such steps instead")
