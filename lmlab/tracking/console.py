"""What a run prints: lmlab's lines, the progress bar, and the warnings that concern the run.
Lightning's tips and boilerplate lines go to `run.log` only, with everything else.
"""

from __future__ import annotations

import logging
import re

# Lines that say nothing about this run: kept in run.log, off the console
QUIET = re.compile("|".join([
    r"💡 Tip:",  # Lightning's advertisements
    r"^(GPU|TPU|HPU) available:", r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r"^`Trainer\(limit_\w+_batches=1\.0\)` was configured",  # the default, restated
    r"`weights_only` was not set",
    r"^`Trainer\.fit` stopped: `max_(epochs|steps)=\d+` reached",  # the run's planned end
    # Lightning's fault-tolerant default on a fresh run (lmlab.training.callbacks.interrupt
    # extends OnExceptionCheckpoint): "no last checkpoint" is expected, not a failed resume
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint",
    r"isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 against torch 2.13
]))
# Libraries that print through handlers of their own when imported before logging is set up
OWN_HANDLERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")


class Quiet(logging.Filter):
    """Keeps `QUIET` lines, and records logged with `extra={"console": False}`, off a
    handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True) and not QUIET.search(record.getMessage())


def quiet_console() -> None:
    """Routes Lightning's log lines and Python's warnings through the run's logging (the
    console and run.log), and keeps the quiet ones off the console. Call it once logging is
    configured (in a Hydra job)."""
    logging.captureWarnings(True)
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and \
                not any(isinstance(f, Quiet) for f in handler.filters):
            handler.addFilter(Quiet())


def log_final(metrics: dict[str, float], throughput: dict[str, float]) -> None:
    """Writes the final metrics, as the console's table shows them, to run.log only."""
    rows = {**metrics, **{f"throughput/{k}": v for k, v in throughput.items()}}
    lines = "\n".join(f"  {name:<28} {value:.6g}" for name, value in rows.items())
    logging.getLogger(__name__).info("final metrics:\n%s", lines, extra={"console": False})
