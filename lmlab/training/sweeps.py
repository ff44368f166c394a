"""Jobs of a Hydra sweep: skipped when an earlier run of the sweep finished them, kept from
ending the sweep when they fail, and run in a process of their own when multi-process.

A sweep file names a fixed sweep folder (`outputs/sweeps/NAME`), so running the same
command again finds the same job folders: a job whose `metrics.json` was written with
exactly its overrides returns the objective stored there without training; a job that
crashed or was killed has no such file and runs again.

Lightning starts the other ranks by re-running the command line, which under a sweep would
make every rank run the whole sweep again (a Hydra and Lightning bug). A multi-process job
is therefore run as a single run of its own, with exactly its overrides and folder, unless
its ranks were already started by torchrun or SLURM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch import Callback
from omegaconf import DictConfig

from lmlab.config.cli import fail
from lmlab.errors import LmlabError, TrialPruned
from lmlab.parallel.specs import world_size
from lmlab.tracking.run_info import recorded_overrides
from lmlab.tracking.wandb_identity import sweep_overrides

log = logging.getLogger(__name__)


def in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def finished_result(output_dir: Path) -> dict | None:
    """The saved `metrics.json` of this job folder if a run with exactly this job's
    overrides wrote it, else None."""
    path = output_dir / "metrics.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    same = as_mapping(saved.get("overrides") or []) == as_mapping(recorded_overrides())
    return saved if same else None


def as_mapping(overrides: list[str]) -> dict[str, str | None]:
    """Overrides as key -> value, so that the same overrides in another order are the same
    job (`~key` deletions map to None)."""
    return dict((o.split("=", 1) if "=" in o else (o, None)) for o in overrides)


FAILED: list[int] = []  # the numbers of the jobs that failed in this process's sweep
# The Optuna sweeper's trial of each job it runs in this process, by trial (= job) number,
# and the numbers of those its pruner stopped.
TRIALS: dict[int, Any] = {}
PRUNED: set[int] = set()


class PruneTrial(Callback):
    """Reports the monitored metric to the job's Optuna trial after each validation and
    stops the job when the study's pruner says so (`hydra.sweeper.pruner`; added to each
    job by the Optuna sweeper).

    Args:
        trial: the trial's number (the job's).
        monitor: the metric reported.
    """

    def __init__(self, trial: int, monitor: str):
        self.trial, self.monitor = int(trial), monitor

    def on_validation_end(self, trainer, pl_module) -> None:
        trial = TRIALS.get(self.trial)
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        if trial is None:  # a job in a process of its own: the trial is the sweep process's
            log.warning("trial %d is not in this process: not pruned", self.trial)
            return
        trial.report(float(value), step=trainer.global_step)
        if trial.should_prune():
            PRUNED.add(self.trial)
            raise TrialPruned(f"trial {self.trial} pruned at step {trainer.global_step} "
                              f"({self.monitor} = {float(value):.4g})")


def sweep_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, float]]) -> float | None:
    """Runs one job of a sweep with `train` (unless it finished before) and returns its
    objective: the best monitored value, or None when the job failed or diverged, so that
    the sweep goes on and Optuna records the trial as failed. (None, not NaN: the Optuna
    sweeper fails on a NaN while recording the trial.) A failed job's number goes to
    `FAILED`, for `exit_if_jobs_failed`."""
    job = HydraConfig.get()
    output_dir = Path(job.runtime.output_dir)
    saved = finished_result(output_dir)
    if saved is not None:
        log.info("job %s finished in an earlier run of this sweep (objective %s); not run "
                 "again", job.job.num, saved["objective"])
        return finite(saved["objective"], job.job.num)
    try:
        if world_size(cfg.trainer) > 1 and not ranks_started():
            objective = run_in_own_process(sweep_overrides(cfg))  # the sweep's W&B group
            return finite(objective, job.job.num)
        return finite(train(cfg).get(f"best {cfg.monitor}"), job.job.num)
    except TrialPruned as pruned:
        log.info("job %s stopped: %s", job.job.num, pruned)
        return None
    except LmlabError as err:
        log.error("job %s failed: %s", job.job.num, err)
    except Exception:  # noqa: BLE001 - one broken job must not end the sweep
        log.exception("job %s failed; its log is %s", job.job.num, output_dir / "run.log")
    FAILED.append(job.job.num)
    return None


def finite(objective: float | None, job: int) -> float | None:
    """The objective, or None for a non-finite one (a NaN loss is saved as +-inf), which
    counts as a failed job."""
    if objective is not None and not math.isfinite(objective):
        log.error("job %s failed: its objective is %s (the run diverged)", job, objective)
        FAILED.append(job)
        return None
    return objective


def exit_if_jobs_failed() -> None:
    """After a sweep whose jobs ran in this process: exit status 1, naming the failed jobs,
    if any failed (every job has run by then; a re-run of the command re-runs them)."""
    if FAILED:
        jobs = ", ".join(str(n) for n in FAILED)
        fail(f"{len(FAILED)} job(s) of the sweep failed ({jobs}; each logged why above); the "
             "other jobs finished, and the same command re-runs only the failed jobs of a grid",
             1)


def ranks_started() -> bool:
    """Whether torchrun, or SLURM with one task a rank, started this job's ranks already."""
    if TorchElasticEnvironment.detect():
        return True
    return SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def run_in_own_process(extra: list[str] = ()) -> float | None:
    """Runs this sweep job as `python -m lmlab.run` with its overrides (and `extra` ones)
    and output folder; its ranks are then relaunched from that command. Returns its
    objective."""
    job = HydraConfig.get()
    output_dir = Path(job.runtime.output_dir)
    command = [sys.executable, "-m", "lmlab.run", *job.overrides.task, *extra, "hydra.mode=RUN",
               f"hydra.run.dir={output_dir}", "hydra.output_subdir=null"]
    done = subprocess.run(command, cwd=hydra.utils.get_original_cwd())
    if done.returncode:
        raise LmlabError(f"sweep job {job.job.num} failed (exit {done.returncode}); its log "
                         f"is {output_dir / 'run.log'}")
    # the job's own overrides, as a re-run of the sweep compares them (not `extra`)
    path = output_dir / "metrics.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "overrides": recorded_overrides()}, indent=1))
    return result["objective"]
