"""A probe of the live tensor memory per rank, for the memory estimate's tests.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback

from lmlab.parallel.memory import live_tensor_bytes

log = logging.getLogger(__name__)


class TensorMemory(Callback):
    """Logs, per rank, the bytes of all live tensors just before the second optimizer step,
    when parameters, gradients and optimizer state (as the strategy shards them) are all
    alive; plus the batch. Add it with
    `+callbacks.memory._target_=lmlab.training.callbacks.memory.TensorMemory` and train at
    least two steps."""

    def __init__(self):
        self.bytes = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            self.bytes = live_tensor_bytes()
            log.info("live tensor memory on rank %d: %.3f MiB before the second step",
                     trainer.global_rank, self.bytes / 2**20)
