"""FLOPs and peaks: what MFU divides by (a device's peak FLOP/s in a dtype: a GPU's from
Lightning's table, a CPU's measured once), and a counter of what runs (`StepFlops`), which
the nets' formulas (`lmlab.models.flops`) are checked against.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmlab.models.flops import GATES, recurrent

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


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


def input_tokens(module: nn.RNNBase, x) -> int:
    """Time steps times batch rows a recurrent layer reads: a packed sequence's real ones."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x.data.size(0)
    return x.size(0) * x.size(1) if x.dim() == 3 else x.size(0)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under Lightning's `precision` ("bf16-mixed", "32-true")."""
    return DTYPES.get(str(precision).split("-")[0], torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype, cpu_peak_file: Path) -> float | None:
    """FLOP/s the device can do in `dtype`: a GPU's from Lightning's table (None for a GPU
    it does not know); a CPU's measured as each run starts (about 0.2 s), the highest of its
    measurements kept in `cpu_peak_file`. A machine busy with other work measures low, and a
    low peak kept once would inflate every later MFU (to 4.0, seen: a peak of 18 GFLOP/s
    measured under load, against 205 quiet): a later measurement raises it."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        return get_available_flops(device, dtype)
    if device.type != "cpu":
        return None
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | {dtype}"
    measured = matmul_peak(dtype)
    known = read_peaks(cpu_peak_file)
    if measured > known.get(key, 0.0):
        known[key] = measured
        cpu_peak_file.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then renamed: the ranks of a run may all measure at once.
        partial = cpu_peak_file.with_name(f"{cpu_peak_file.name}.{os.getpid()}")
        partial.write_text(json.dumps({**read_peaks(cpu_peak_file), **known}, indent=1))
        os.replace(partial, cpu_peak_file)
        log.info("this CPU's matmul peak: %.1f GFLOP/s (%s)", known[key] / 1e9, key)
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
    # a generator of its own: drawing from the global one, measured as a run starts, would
    # change the dropout masks a resumed run draws from its restored state
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
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
