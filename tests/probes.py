"""Callbacks that record what a run's processes saw, for tests that run it in a subprocess."""

import json
from pathlib import Path

from lightning.pytorch import Callback

from lmlab.training.callbacks.throughput import Throughput


class ProgressProbe(Callback):
    """Writes, per rank, the progress bar's kind and state and the measured throughput to
    `folder/rank<N>.json` when training ends."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        bar = trainer.progress_bar_callback
        speed = next(c for c in trainer.callbacks if isinstance(c, Throughput))
        record = {"bar": type(bar).__name__, "disabled": bar.is_disabled,
                  "flops_per_step": speed.summary.get("flops_per_step", 0),
                  "steps": speed.total.steps,
                  "tokens": int(speed.total.tokens) + int(speed.window.tokens)}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SyncCounter(Callback):
    """Counts, in training step `step` (not one the loggers write), the collectives this
    process issues (the Python calls of `torch.distributed`; DDP's gradient all-reduce runs
    in its C++ reducer and is not counted) and the host reads of tensor values (`item`,
    `tolist`, `bool`, `float`, `int`). A read of an earlier step's values that have already
    arrived (lmlab's `Pending.values`, one step late) is counted apart. Writes
    `folder/rank<N>.json`."""

    COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
                   "reduce_scatter_tensor", "barrier", "all_gather_object",
                   "broadcast_object_list")
    READS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, folder: str, step: int = 5):
        self.folder, self.step = Path(folder), step
        self.counts = {"collectives": [], "host_reads": [], "late_reads": 0}
        self.saved: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.patch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.saved:
            self.unpatch()
            (self.folder / f"rank{trainer.global_rank}.json").write_text(
                json.dumps(self.counts))

    def patch(self) -> None:
        import torch
        import torch.distributed as dist

        from lmlab.training.callbacks import numerics

        for name in self.COLLECTIVES:
            self.wrap(dist, name, lambda n=name: self.counts["collectives"].append(n))
        for name in self.READS:
            self.wrap(torch.Tensor, name, lambda n=name: self.counts["host_reads"].append(
                f"{n} {caller()}"))
        if not hasattr(numerics, "Pending"):  # a version that reads every step at once
            return
        original = numerics.Pending.values

        def late(pending):
            if pending.step == self.step:  # read in the step that made it: at once
                self.counts["host_reads"].append("this step's values")
            else:
                self.counts["late_reads"] += 1
            self.unpatch(reads_only=True)
            try:
                return original(pending)
            finally:
                for name in self.READS:
                    self.wrap(torch.Tensor, name, lambda n=name: self.counts[
                        "host_reads"].append(f"{n} {caller()}"))
        self.saved.append((numerics.Pending, "values", original))
        numerics.Pending.values = late

    def wrap(self, owner, name: str, count) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            count()
            return original(*args, **kwargs)
        self.saved.append((owner, name, original))
        setattr(owner, name, counted)

    def unpatch(self, reads_only: bool = False) -> None:
        import torch

        kept = []
        for owner, name, original in reversed(self.saved):
            if reads_only and owner is not torch.Tensor:
                kept.append((owner, name, original))
                continue
            setattr(owner, name, original)
        self.saved = list(reversed(kept))


def caller() -> str:
    """The file and line outside torch that made the call being counted; `optimizer` for
    an optimizer's reads of its step counts, which it keeps in host memory on any device."""
    import traceback

    stack = traceback.extract_stack()[:-3]
    if "/torch/optim/" in stack[-1].filename:
        return "optimizer"
    for frame in reversed(stack):
        if "/torch/" not in frame.filename and "probes.py" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"
