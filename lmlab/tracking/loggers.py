"""The loggers of lmlab's own: Lightning's, with what a resumed run and a missing package
need.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping

from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch import loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from lmlab.config.redact import redacted_argv
from lmlab.errors import LmlabError
from lmlab.tracking.run_info import launched_as_rank_zero


class _AppendingWriter(ExperimentWriter):
    """Adds to an existing metrics file (Lightning's writer deletes it): takes its columns
    as its own before adding new ones. A run resumed in its folder continues its file."""

    def _check_log_dir_exists(self) -> None:
        pass

    def _record_new_keys(self) -> set[str]:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = header + [k for k in self.metrics_keys if k not in header]
        return super()._record_new_keys()


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger, able to add to a metrics file that another process wrote:
    a resumed run continues its folder's file (Lightning's writer would start it anew,
    without the columns it holds). This one's writer reads the file's header first."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


MODES = (None, "online", "offline", "disabled")


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger, refusing with the fix when TensorBoard is missing."""

    def __init__(self, *args, **kwargs):
        if not (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE):
            raise LmlabError("logger=tensorboard needs the tensorboard package; install it with "
                             "pip install -e \".[tensorboard]\", or pick another logger")
        super().__init__(*args, **kwargs)


class _NoRun(_DummyExperiment):
    """Stands in for the W&B run on the other ranks: any attribute, call or item of it is
    itself, so `experiment.config.update(...)` does nothing."""

    def __getattr__(self, _):
        return self

    def __call__(self, *args, **kwargs):
        return self


class WandbLogger(loggers.WandbLogger):
    """Lightning's WandbLogger with W&B's settings as arguments, only on global rank zero,
    numbering W&B's steps by the trainer's so that a resumed run continues its step axis.

    Args:
        name: the run's display name.
        save_dir: the folder that gets `wandb/`.
        project, entity, group, tags, job_type: where the run goes in W&B, and its labels.
        mode: `online`, `offline` or `disabled`; None: the environment's `WANDB_MODE`.
        id: the run to create or continue; None: a new one.
        log_model: upload checkpoints as artifacts (online only).
        **kwargs: other arguments of `wandb.init` (`notes`, `settings`, ...).
    """

    def __init__(self, name: str | None = None, save_dir: str = ".", project: str = "lmlab",
                 entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, job_type: str | None = None,
                 mode: str | None = None, id: str | None = None, log_model: bool = False,
                 **kwargs):
        if mode not in MODES:
            raise LmlabError(f"logger.wandb.mode={mode} is not a W&B mode; use online, "
                             "offline, disabled, or null for the environment's WANDB_MODE")
        kwargs.update(entity=entity, group=group, job_type=job_type, mode=mode,
                      tags=list(tags) if tags else None)
        super().__init__(name=name, save_dir=save_dir, project=project, id=id,
                         log_model=log_model, **{k: v for k, v in kwargs.items() if v is not None})
        if self._wandb_init.get("anonymous") is None:  # W&B warns about the setting itself
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        # Lightning creates the run where rank_zero_only.rank is 0, which before the strategy
        # has set ranks up is also the first process of every other node
        if not launched_as_rank_zero():
            return _NoRun()
        with redacted_argv():
            return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # W&B counts its own steps from 0 in each process: a resumed run's steps would go
        # back, and W&B drops rows whose step is below one already logged
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        # tables come without a step: they go to the run's current step
        wandb_step = max(step or 0, self.experiment.step)
        if step is not None:
            metrics = {**metrics, "trainer/global_step": wandb_step}
        self.experiment.log(dict(metrics), step=wandb_step)

    @rank_zero_only
    def finish(self, exit_code: int = 0) -> None:
        """Ends the W&B run, so that the next run of the same process (the next job of a
        sweep) gets a run of its own instead of continuing this one."""
        if self._experiment is not None:
            self._experiment.finish(exit_code=exit_code)
            self._experiment = None


def finish(found: list, exit_code: int = 0) -> None:
    """Ends the runs of the loggers that have one to end (W&B); a non-zero `exit_code`
    marks them failed."""
    for logger in found:
        if hasattr(logger, "finish"):
            logger.finish(exit_code)
