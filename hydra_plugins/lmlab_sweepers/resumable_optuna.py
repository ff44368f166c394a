"""Hydra's Optuna sweeper, resumable: `hydra/sweeper=lmlab_optuna`.

The study lives in the sweep folder (`storage: sqlite:///${hydra.sweep.dir}/optuna.db`,
a fixed `study_name`), so running the same command again continues it:

- `n_trials` counts the trials of the whole study: a study with 5 finished trials and
  `n_trials=8` runs 3 more; finished trials (complete, pruned or failed) are never redone.
- A trial left running by a killed sweep is marked failed and does not count, so another
  trial takes its place. Job folders are numbered by trial, so none is overwritten.
- A trial that fails (an exception, or a NaN or infinite objective: `lmlab.sweep`) is recorded as
  failed and the sweep goes on (`max_failure_rate: 1.0` by default here).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from optuna import create_study
from optuna.trial import TrialState

log = logging.getLogger(__name__)
INTERRUPTED = "lmlab:interrupted"  # system attribute of a trial a killed sweep left running


class ResumableOptunaSweeper(OptunaSweeper):
    """The Optuna sweeper, continuing its study in place of starting it over."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage is not None:
            Path(impl.sweep_dir).mkdir(parents=True, exist_ok=True)  # holds the SQLite file
            finished, total = self._resume()
            impl.n_trials = max(0, impl.n_trials - finished)
            impl.job_idx = total  # job folder = trial number
            log.info("study %s: %d trial(s) finished before, %d to run", impl.study_name,
                     finished, impl.n_trials)
        try:
            return impl.sweep(arguments)
        except ValueError:  # raised by `study.best_trial` when no trial completed
            if impl.storage is None or self._study().get_trials(states=(TrialState.COMPLETE,)):
                raise
            log.error("no trial of the study %s completed; each job's run.log says why",
                      impl.study_name)

    def _study(self):
        impl = self.sweeper
        return create_study(study_name=impl.study_name, storage=impl.storage,
                            directions=impl._get_directions(), load_if_exists=True)

    def _resume(self) -> tuple[int, int]:
        """Marks trials left running as failed; returns (finished trials, all trials)."""
        study = self._study()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # a single sweep process owns the study, so a running trial is a dead one
            study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
            study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
            log.warning("trial %d was interrupted; marked failed, another takes its place",
                        trial.number)
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()
                    and not t.system_attrs.get(INTERRUPTED)]
        return len(finished), len(trials)
