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
