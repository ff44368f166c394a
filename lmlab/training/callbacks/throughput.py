"""Training speed of a run: tokens and samples per second, step time and the share of it
spent waiting for data, peak memory, model FLOPs per step and MFU.

Definitions (docs/workflow.md, "Throughput and MFU"):

- a step is one optimizer step (with gradient accumulation, its micro-batches together);
  the figures are logged once per optimizer step, at the loggers' cadence;
- tokens are the task's real tokens (`Task.count_tokens`), samples its real examples:
  padding and the copies that pad a batch across ranks are never counted;
- a micro-batch's time runs from one `on_train_batch_end` to the next; the data wait is the
  part of it from `on_train_batch_end` to the next `on_train_batch_start` (fetching and
  collating the batch, moving it to the device);
- model FLOPs are counted for every micro-batch from its real examples' lengths, by the
  net's own formula (`flops`, `lmlab.models.flops`), forward and backward: padding is not
  counted. MFU is the model FLOPs per second over the device's peak FLOP/s
  (`lmlab.training.flops`);
- the figures are of this process's device (per device, not summed over ranks), averaged
  over the micro-batches since the last time they were logged; the run's first micro-batch,
  which has no previous end to time it from, is left out.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lmlab.training.flops import compute_dtype, peak_flops

log = logging.getLogger(__name__)


class Throughput(Callback):
    """Measures the run's training speed and logs it as `perf/*` once per optimizer step, at
    the loggers' cadence (`trainer.log_every_n_steps`); `tokens_per_s` is also shown on the
    progress bar. `summary` holds the averages over the whole run, for its final report.

    Args:
        flops: count the model FLOPs of every micro-batch (the task's `count_flops`) and log
            them with the MFU.
        cpu_peak_file: where the measured matmul peak of a CPU is kept (JSON, keyed by CPU
            model, thread count and dtype), so that it is measured once per machine.
    """

    def __init__(self, flops: bool = True, cpu_peak_file: str = "~/.cache/lmlab/cpu_peak.json"):
        self.flops = flops
        self.cpu_peak_file = Path(cpu_peak_file).expanduser()
        self.last_end: float | None = None  # when the last training micro-batch ended
        self.peak: float | None = None
        self.summary: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.window = Window(pl_module.device)
        self.total = Window(torch.device("cpu"))  # the run's, added up when logging
        self.last_end = None
        self.batch_start = 0.0
        self.last_step = trainer.global_step
        self.accumulate = trainer.accumulate_grad_batches
        self.peak = peak_flops(pl_module.device, compute_dtype(trainer.precision),
                               self.cpu_peak_file) if self.flops else None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.last_end = None  # the pause since the last step held validation and checkpoints

    def on_validation_start(self, trainer, pl_module) -> None:
        self.paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.last_end is not None:  # mid-epoch (or the epoch's last): the pause is left out
            self.last_end += time.perf_counter() - self.paused

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            flops = pl_module.count_flops(batch) if self.flops else None
            self.window.add(now - self.last_end, self.batch_start - self.last_end,
                            pl_module.count_tokens(batch), pl_module.count_examples(batch), flops)
        self.last_end = now
        stepped, self.last_step = trainer.global_step != self.last_step, trainer.global_step
        every = trainer.log_every_n_steps
        if stepped and every > 0 and trainer.global_step % every == 0 and self.window.steps:
            # Reading the counts syncs with the device: only on the steps that are logged.
            rates = self.rates(self.window, pl_module.device)
            self.total.merge(self.window)
            self.window = Window(pl_module.device)
            pl_module.log_dict({f"perf/{k}": v for k, v in rates.items() if k != "tokens_per_s"},
                               batch_size=1)
            pl_module.log("perf/tokens_per_s", rates["tokens_per_s"], prog_bar=True,
                          batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.total.merge(self.window)
        if self.total.steps:
            self.summary = self.rates(self.total, pl_module.device)

    def rates(self, window: Window, device: torch.device) -> dict[str, float]:
        seconds = window.seconds
        figures = {"tokens_per_s": float(window.tokens) / seconds,
                   "samples_per_s": float(window.samples) / seconds,
                   "step_time_s": seconds / window.steps * self.accumulate,
                   "data_wait": window.wait / seconds,
                   "peak_mem_gb": peak_memory(device) / 1e9}
        if window.flops is not None:
            figures["flops_per_step"] = float(window.flops) / window.steps * self.accumulate
            if self.peak:
                figures["mfu"] = float(window.flops) / seconds / self.peak
        return figures


class Window:
    """What the micro-batches since the last logging add up to; the counts stay on the
    device. `flops` stays None while the task counts none."""

    def __init__(self, device: torch.device):
        self.steps, self.seconds, self.wait = 0, 0.0, 0.0
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.samples = torch.zeros((), dtype=torch.long, device=device)
        self.flops: torch.Tensor | None = None

    def add(self, seconds: float, wait: float, tokens: torch.Tensor, samples: torch.Tensor,
            flops: torch.Tensor | None = None) -> None:
        self.steps += 1
        self.seconds += seconds
        self.wait += wait
        self.tokens += tokens.to(self.tokens.device)
        self.samples += samples.to(self.samples.device)
        if flops is not None:
            flops = flops.to(self.tokens.device, torch.float64)
            self.flops = flops if self.flops is None else self.flops + flops

    def merge(self, other: Window) -> None:
        """Adds up `other`'s micro-batches (reading its counts: a sync with its device)."""
        self.steps += other.steps
        self.seconds += other.seconds
        self.wait += other.wait
        self.tokens += int(other.tokens)
        self.samples += int(other.samples)
        if other.flops is not None:
            self.flops = float(other.flops) + (0.0 if self.flops is None else self.flops)


STATUS = Path("/proc/self/status")


def peak_memory(device: torch.device) -> int:
    """Bytes: the most CUDA memory allocated on a GPU, the process's peak RSS on a CPU.

    On Linux the peak is the process's own (`VmHWM`): `ru_maxrss` of a process started by
    another (every rank but the first) starts from its parent's peak at the fork."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if STATUS.is_file():
        line = next(x for x in STATUS.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
