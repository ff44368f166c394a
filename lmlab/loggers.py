"""Loggers of lmlab's own."""

from __future__ import annotations

import csv

from lightning.pytorch import loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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
    """Lightning's CSVLogger, able to add to a metrics file that another process wrote.

    With `ddp_spawn`, fit and test run in separate processes: Lightning's writer in the test
    processes knows none of the file's columns, rewrites it with a header that lacks them,
    and fails. This one's writer reads the file's header first.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
