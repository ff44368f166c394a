"""Callbacks of lmlab's own."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn


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
