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
  counted. MFU is the model FLOPs per second over the device's peak FLOP/s;
- the figures are of this process's device (per device, not summed over ranks), averaged
  over the micro-batches since the last time they were logged; the run's first micro-batch,
  which has no previous end to time it from, is left out.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmlab.models.flops import GATES, recurrent

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


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


class StepFlops:
    """Counts the FLOPs of what runs inside it (forward and backward) with torch's
    `FlopCounterMode`, except in LSTM, GRU and RNN layers: their fused kernels have no
    formula there (an unpacked LSTM counts 0 on CPU), and a packed sequence's steps are counted
    op by op; theirs come from `lmlab.models.flops.recurrent`, the backward twice the
    forward. A count of whatever runs, padding included: the nets' `flops` formulas are
    checked against it, one unpadded example at a time.

    Args:
        model: the module whose recurrent layers are counted by formula.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.total = 0

    def __enter__(self) -> StepFlops:
        self.rnn_tokens: dict[nn.Module, int] = {}
        self.hooks = [m.register_forward_pre_hook(self.count_rnn_input)
                      for m in self.model.modules() if type(m) in GATES]
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()
        return self

    def count_rnn_input(self, module: nn.Module, args: tuple) -> None:
        self.rnn_tokens[module] = self.rnn_tokens.get(module, 0) + input_tokens(module, args[0])

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)
        for hook in self.hooks:
            hook.remove()
        names = self.counter.mod_tracker._known_modules  # module -> the name of its counts
        counts = self.counter.get_flop_counts()
        total = self.counter.get_total_flops()
        for module, tokens in self.rnn_tokens.items():
            total -= sum(counts.get(names.get(module), {}).values())
            total += 3 * recurrent(module, tokens)
        self.total = total


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


def input_tokens(module: nn.RNNBase, x) -> int:
    """Time steps times batch rows a recurrent layer reads: a packed sequence's real ones."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x.data.size(0)
    return x.size(0) * x.size(1) if x.dim() == 3 else x.size(0)


def peak_memory(device: torch.device) -> int:
    """Bytes: the most CUDA memory allocated on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under Lightning's `precision` ("bf16-mixed", "32-true")."""
    return DTYPES.get(str(precision).split("-")[0], torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype, cpu_peak_file: Path) -> float | None:
    """FLOP/s the device can do in `dtype`: a GPU's from Lightning's table (None for a GPU
    it does not know); a CPU's measured once and kept in `cpu_peak_file`."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        return get_available_flops(device, dtype)
    if device.type != "cpu":
        return None
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | {dtype}"
    known = read_peaks(cpu_peak_file)
    if key not in known:
        known[key] = matmul_peak(dtype)
        cpu_peak_file.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: the ranks of a run may all measure at once.
        partial = cpu_peak_file.with_name(f"{cpu_peak_file.name}.{os.getpid()}")
        partial.write_text(json.dumps({**read_peaks(cpu_peak_file), **known}, indent=1))
        os.replace(partial, cpu_peak_file)
        log.info("measured this CPU's matmul peak: %.1f GFLOP/s (%s)", known[key] / 1e9, key)
    return known[key]


def read_peaks(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or not readable: measure again
        return {}


def matmul_peak(dtype: torch.dtype, size: int = 512, repeats: int = 50) -> float:
    """FLOP/s of the fastest of `repeats` square matmuls at the current thread count. The
    fastest of many short ones: on a machine shared with other work, a matmul long enough
    to be interrupted is (1024 x 1024 at 1 thread on this 2-core machine under load: 23
    GFLOP/s, against 101 for 512 x 512 in the same minute, and 90 for 1024 x 1024 unloaded)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def progress_bar(enabled: bool = True) -> TQDMProgressBar | RichProgressBar | None:
    """Rich's progress bar in a terminal; the plain one when the output goes to a file or
    a pipe, where rich's live display shows nothing until the end; none when the trainer's
    `enable_progress_bar` is false. Ranks other than 0 disable theirs (Lightning)."""
    if not enabled:
        return None
    return RichProgressBar() if os.isatty(1) else TQDMProgressBar()
