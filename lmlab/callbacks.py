"""Callbacks of lmlab's own."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lmlab.parallel.memory import live_tensor_bytes

log = logging.getLogger(__name__)


class ResumeHint(Callback):
    """When a run is stopped with Ctrl-C, says which checkpoint resumes it.

    Args:
        checkpoint: the file `OnExceptionCheckpoint` writes on the way out.
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = Path(checkpoint)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            rank_zero_warn(f"interrupted at step {trainer.global_step}; the state is saved to "
                           f"{self.checkpoint}: resume with ckpt_path={self.checkpoint}")


class TensorMemory(Callback):
    """Logs, per rank, the bytes of all live tensors just before the second optimizer step,
    when parameters, gradients and optimizer state (as the strategy shards them) are all
    alive; plus the batch. Add it with `+callbacks.memory._target_=lmlab.callbacks.TensorMemory`
    and train at least two steps."""

    def __init__(self):
        self.bytes = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            self.bytes = live_tensor_bytes()
            log.info("live tensor memory on rank %d: %.3f MiB before the second step",
                     trainer.global_rank, self.bytes / 2**20)
