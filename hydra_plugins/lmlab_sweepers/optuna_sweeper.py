"""lmlab's Optuna sweeper, resumable: `hydra/sweeper=lmlab_optuna` (Optuna 4 or 5).

It asks Optuna for trials and tells it their results (`Study.ask` / `Study.tell`, public API
only) and launches each trial as a Hydra job. The study lives in the sweep folder (by
default Optuna's journal file, `${hydra.sweep.dir}/optuna.journal`, safe on a shared file
system; an RDB URL such as `sqlite:///...` works too), under a fixed `study_name`, so
running the same command again continues it:

- `n_trials` counts the trials of the whole study: a study with 5 finished trials and
  `n_trials=8` runs 3 more; finished trials (complete, pruned or failed) are never redone.
- The sampler continues too: it is seeded with the sweep's seed plus the number of trials
  the study holds, so a resumed sweep proposes new trials, not the first ones again.
- A trial left running by a killed sweep is marked failed and does not count, so another
  trial takes its place. Job folders are numbered by trial, so none is overwritten.
- A trial that fails (an exception, or a NaN or infinite objective: `lmlab.training.sweeps`) is
  recorded as failed and the sweep goes on (`max_failure_rate: 1.0` by default here).
- With a `pruner`, each trial reports its monitored metric at every validation, and one
  the pruner stops is recorded as pruned (jobs run in the sweep's process: the basic
  launcher, one process a job).

Optuna is imported when a sweep starts, so that Hydra's plugin scan finds this module
without it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
RAN = "lmlab:ran"  # user attribute of a trial whose job ran to its end (not killed with it)
DIRECTIONS = ("minimize", "maximize")


class OptunaSweeper(Sweeper):
    """Searches `params` with Optuna, one Hydra job a trial.

    Args:
        study_name: the study's name in its storage.
        storage: a journal file path, or an RDB URL (`sqlite:///PATH`); null: in memory.
        direction: `minimize` or `maximize` the jobs' objective (the best monitored value).
        n_trials: trials of the whole study, those of earlier runs of the sweep included.
        n_jobs: trials launched together (the launcher may run them in parallel).
        max_failure_rate: the share of failed trials above which the sweep stops.
        sampler: an Optuna sampler's config (`_target_`, and `seed`: the sweep's seed).
        pruner: an Optuna pruner's config, or null (no pruning).
        params: key -> search space, in Hydra's sweep syntax (`choice(64, 128)`,
            `interval(1e-4, 1e-2)`, `tag(log, interval(1e-4, 1e-2))`,
            `tag(int, interval(1, 8))`, `range(1, 5)`).
    """

    def __init__(self, study_name: str, storage: str | None, direction: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float,
                 sampler: DictConfig | None, pruner: DictConfig | None,
                 params: DictConfig | None):
        if direction not in (None, *DIRECTIONS):
            raise ValueError(f"hydra.sweeper.direction must be minimize or maximize, "
                             f"not {direction!r}")
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.sampler_config, self.pruner_config = sampler, pruner
        self.params = dict(params or {})

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.direction = direction_of(self.direction, config)

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = search_space({**self.params, **as_params(arguments)})
        self.sweep_dir.mkdir(parents=True, exist_ok=True)  # holds the journal file
        study = self.study()
        finished = resume(study)
        log.info("study %s: %d trial(s) finished before, %d to run", self.study_name, finished,
                 max(0, self.n_trials - finished))
        while finished < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - finished))]
            self.run(study, trials, fixed)
            finished += len(trials)
            self.check_failures(study)
        self.write_results(study)

    def study(self):
        """The study, created or loaded, with the sampler continued (see the module)."""
        import optuna

        return optuna.create_study(study_name=self.study_name, storage=storage(self.storage),
                                   sampler=self.sampler(), pruner=self.pruner(),
                                   direction=self.direction, load_if_exists=True)

    def sampler(self):
        """The configured sampler, seeded with the seed plus the trials the study holds."""
        config = self.sampler_config
        if config is None:
            return None
        seed = config.get("seed")
        if seed is not None:
            seed += trial_count(self.study_name, storage(self.storage))
        return instantiate(config, seed=seed) if "seed" in config else instantiate(config)

    def pruner(self):
        import optuna

        return instantiate(self.pruner_config) if self.pruner_config else \
            optuna.pruners.NopPruner()

    def run(self, study, trials: list, fixed: list[str]) -> None:
        """Launches one job a trial (its folder: the trial's number) and tells the results."""
        from optuna.trial import TrialState

        from lmlab.training import sweeps as jobs

        batch = [tuple([*fixed, *(f"{k}={v}" for k, v in trial.params.items()),
                        *self.pruning_overrides(trial)]) for trial in trials]
        self.validate_batch_is_legal(batch)
        for trial in trials:
            jobs.TRIALS[trial.number] = trial
        returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
        for trial, done in zip(trials, returns):
            jobs.TRIALS.pop(trial.number, None)
            value = done.return_value if done.status.name == "COMPLETED" else None
            trial.set_user_attr(RAN, True)
            if trial.number in jobs.PRUNED:
                study.tell(trial, state=TrialState.PRUNED)
            elif value is None or not math.isfinite(value):
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)

    def pruning_overrides(self, trial) -> list[str]:
        """With a pruner, the callback that reports each validation to the trial."""
        if not self.pruner_config:
            return []
        return ["+callbacks.optuna_pruning._target_=lmlab.training.sweeps.PruneTrial",
                f"+callbacks.optuna_pruning.trial={trial.number}",
                "+callbacks.optuna_pruning.monitor=${monitor}"]

    def check_failures(self, study) -> None:
        from optuna.trial import TrialState

        trials = [t for t in study.trials if t.user_attrs.get(RAN)]
        failed = sum(t.state == TrialState.FAIL for t in trials)
        if trials and failed / len(trials) > self.max_failure_rate:
            raise RuntimeError(f"{failed} of {len(trials)} trials failed, more than "
                               f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")

    def write_results(self, study) -> None:
        """The best trial's parameters and value, to `optimization_results.yaml`."""
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.error("no trial of the study %s completed; each job's run.log says why",
                      self.study_name)
            return
        best = study.best_trial
        results = {"name": "optuna", "best_trial": best.number, "best_params": best.params,
                   "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: %s = %s", best.number, best.params, best.value)


def direction_of(direction: str | None, config: DictConfig) -> str:
    """The study's direction: the one given, checked against the monitored metric's, else
    that metric's (a loss is minimised, an accuracy maximised).

    Raises:
        ValueError: the direction would keep the worst trials, or none can be told.
    """
    from hydra.utils import get_class

    from lmlab.config.schema import monitor_mode

    monitor = config.get("monitor")
    mode = config.get("monitor_mode") or (monitor_mode(monitor) if monitor else None)
    if mode is None and not monitor:  # the task's own metric, where its class states it
        own = getattr(get_class(config.model._target_), "monitor", None)
        mode = own[1] if isinstance(own, tuple) else None
    wanted = {"min": "minimize", "max": "maximize"}.get(mode)
    if direction and wanted and direction != wanted:
        raise ValueError(f"hydra.sweeper.direction={direction} would keep the worst trials of "
                         f"{monitor or 'the monitored metric'} ({mode} is best); set "
                         f"hydra.sweeper.direction={wanted}")
    if not (direction or wanted):
        raise ValueError("cannot tell whether the monitored metric is minimized or maximized; "
                         "set hydra.sweeper.direction=minimize or maximize")
    return direction or wanted


def storage(path: str | None):
    """Optuna's storage for `path`: a journal file (with a lock that works on shared file
    systems), an RDB URL as it is, or None (in memory)."""
    if path is None or "://" in path:
        return path
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def trial_count(study_name: str, where) -> int:
    """How many trials the study holds (0 before it exists)."""
    import optuna

    if where is None:
        return 0
    try:
        return len(optuna.load_study(study_name=study_name, storage=where).trials)
    except KeyError:  # no such study yet
        return 0


def resume(study) -> int:
    """Marks the trials a killed sweep left running as failed (they ran to no end: they do
    not count); returns how many trials the study finished before."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # one sweep process owns the study: a trial still running belongs to a dead one
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("trial %d was interrupted; marked failed, another takes its place",
                    trial.number)
    return sum(t.state.is_finished() and bool(t.user_attrs.get(RAN))
               for t in study.get_trials(deepcopy=False))


def as_params(arguments: list[str]) -> dict[str, str]:
    """The command line's key=value overrides, as `params` are written."""
    overrides = OverridesParser.create().parse_overrides(arguments)
    return {o.get_key_element(): o.get_value_element_as_str() for o in overrides}


def search_space(params: dict[str, Any]) -> tuple[dict, list[str]]:
    """The Optuna distributions of the sweep overrides among `params`, and the other
    overrides as they are (the same in every job)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    space, fixed = {}, []
    for override in parsed:
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(f"{override.get_key_element()}={override.get_value_element_as_str()}")
    return space, fixed


def distribution(override: Override):
    """An Optuna distribution for a Hydra sweep: `choice` and `range` are categorical (a
    `range` of integers with a step an integer one), `interval` a float range (integers
    with the `int` tag: `tag(int, interval(1, 8))`), log-scaled with the `log` tag."""
    from optuna import distributions as d

    value = override.value()
    if override.is_choice_sweep():
        return d.CategoricalDistribution(list(override.sweep_iterator(
            transformer=Transformer.encode)))
    if override.is_range_sweep():
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return d.IntDistribution(value.start, value.stop - 1, step=value.step)
        return d.CategoricalDistribution(list(override.sweep_iterator(
            transformer=Transformer.encode)))
    if override.is_interval_sweep():  # Hydra reads its bounds as floats: `int` tags integers
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return d.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return d.FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.input_line}: not a sweep Optuna can search (choice, range, "
                     "interval)")
