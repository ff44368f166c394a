"""Faults injected on purpose, to show that a check can fail (negative controls), and the
hostile inputs and full disks the entry points must survive."""

import resource
import signal

from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO


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


class BreakJob(Callback):
    """Breaks one job of a sweep after its first training step: `crash` raises, `nan` fills
    the weights with NaN (so every later loss is NaN).

    Args:
        job: this job's number (`${hydra:job.num}`).
        crash: the number of the job that raises.
        nan: the number of the job whose weights turn to NaN.
    """

    def __init__(self, job: int, crash: int | str = -1, nan: int | str = -1):
        self.job, self.crash, self.nan = int(job), int(crash), int(nan)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.job == self.crash:
            raise RuntimeError(f"job {self.job} crashed on purpose")
        if self.job == self.nan:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


class DiskFullAfter(TorchCheckpointIO):
    """Lightning's own checkpoint writer, on a disk that fills up: from the `saves`+1-th
    checkpoint on, the process may write no file larger than `limit` bytes (RLIMIT_FSIZE),
    so the kernel fails the real write, as it does on a full disk.

    Args:
        saves: checkpoints written normally first.
        limit: the file size limit after them, smaller than a checkpoint.
    """

    def __init__(self, saves: int, limit: int = 1 << 20):
        super().__init__()
        self.saves, self.limit = saves, limit

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if self.saves == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))
        self.saves -= 1
        super().save_checkpoint(checkpoint, path, storage_options)


class Payload:
    """An object whose unpickling creates `marker`: stands for code a foreign checkpoint
    could run when loaded without `weights_only`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")
