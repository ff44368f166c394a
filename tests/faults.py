"""Faults injected on purpose, to show that a check can fail (negative controls), crashes at
chosen moments, and the hostile inputs and full disks the entry points must survive. With
`tests/` on PYTHONPATH they go on the command line, e.g.
`+callbacks.kill._target_=faults.KillAtStep +callbacks.kill.step=13`."""

import io
import os
import resource
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lmlab.checkpointing.io import AtomicCheckpointIO


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


class DiskFullAfter(AtomicCheckpointIO):
    """lmlab's checkpoint writer, on a disk that fills up: from the `saves`+1-th
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


class KillAtStep(Callback):
    """SIGKILLs every process of the run as training step `step` begins, that is right after
    step `step`'s checkpoint (if one is due then) is written: a deterministic crash.

    Args:
        step: the number of optimizer steps taken when the processes die.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(Callback):
    """Sends `signum` to this process while training step `step` runs (in its backward
    pass): the signal lands mid-step, as a scheduler's does.

    Args:
        step: the optimizer steps taken before the step that receives it.
        signum: the signal's number (15: SIGTERM).
    """

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class StallingCheckpointIO(AtomicCheckpointIO):
    """lmlab's atomic writer that, from the checkpoint of step `step` on, writes half of the
    file, creates `marker` and sleeps: the moment for a test to kill the process mid-write.

    Args:
        step: the first `global_step` whose checkpoint stalls.
        marker: the file created once half is written.
    """

    def __init__(self, step: int, marker: str):
        super().__init__()
        self.step, self.marker = step, Path(marker)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.stall = checkpoint["global_step"] >= self.step
        super().save_checkpoint(checkpoint, path, storage_options)

    def write(self, file, data) -> None:
        if not self.stall:
            return file.write(data)
        file.write(data[:len(data) // 2])
        file.flush()
        self.marker.touch()
        time.sleep(600)


class TornCheckpointIO(StallingCheckpointIO):
    """The negative control of the atomic writer: writes in place, as a plain
    `torch.save(checkpoint, path)` does, and stalls in the middle the same way."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.stall = checkpoint["global_step"] >= self.step
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            self.write(f, buffer.getbuffer())


class ForgetDataOrder(Callback):
    """Leaves the training loader's position out of every checkpoint: a resumed run then
    starts its epoch over (the negative control of the saved data order)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)


class ForgetRandomState(Callback):
    """Leaves the random generators out of every checkpoint (the negative control of
    `lmlab.checkpointing.exact_resume.ExactResume`)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["callbacks"] = {key: state for key, state in checkpoint["callbacks"].items()
                                   if not key.startswith("ExactResume")}


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
