"""Faults injected on purpose, to show that a check can fail (negative controls)."""

from lightning.pytorch import Callback


class ScaleGradients(Callback):
    """Multiplies every gradient by `factor` in multi-process runs, after the strategy has
    reduced them: what a reduction that sums over ranks instead of averaging would do.

    Args:
        factor: the scale (2 on two processes: a sum instead of a mean).
    """

    def __init__(self, factor: float):
        self.factor = factor

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.world_size > 1:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.factor)
