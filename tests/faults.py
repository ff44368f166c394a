"""Faults injected on purpose, to show that a check can fail (negative controls)."""

import os
import signal
import time

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


class ScaleOutputAt(Callback):
    """Multiplies the net's output by `factor` in training step `step`, the weights untouched:
    `nan` gives the non-finite loss a too-high learning rate or an fp16 overflow gives, a
    large factor a loss spike.

    Args:
        step: the training step (trainer.global_step) whose forward pass is changed.
        factor: what the output is multiplied by (`nan`, `inf`, 100.0, ...).
    """

    def __init__(self, step: int, factor: float):
        self.step = step
        self.factor = factor

    def setup(self, trainer, pl_module, stage: str) -> None:
        def scale(module, args, output):
            if module.training and trainer.global_step == self.step:
                return output * self.factor
            return output

        pl_module.net.register_forward_hook(scale)


class StopRankAt(Callback):
    """At training step `step`, rank `rank` dies (SIGKILL: no Python cleanup, as the kernel's
    out-of-memory killer or a lost node would do) or hangs (sleeps, holding its peers in
    their next collective).

    Args:
        step: the training step at whose start the rank stops.
        rank: the global rank that stops.
        how: `die` or `hang`.
        mark: a file created just before the rank stops, to time its peers' exit from.
    """

    def __init__(self, step: int, rank: int, how: str = "die", mark: str | None = None):
        self.step, self.rank, self.how, self.mark = step, rank, how, mark

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.mark:
                open(self.mark, "w").close()
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)


class StuckSave(Callback):
    """The save of a stopped run never ends (a hung network file system, say). Creates
    `save-started` in the run's folder when it starts."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.interrupted:
            open(os.path.join(trainer.default_root_dir, "save-started"), "w").close()
            time.sleep(3600)
