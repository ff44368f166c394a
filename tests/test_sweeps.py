"""Sweeps: a re-run of the same command skips finished jobs and re-runs the others, a failed
job or Optuna trial does not end the sweep, the Optuna study resumes with `n_trials` as its
total, the submitit launcher runs jobs in processes of their own, and the W&B sweep's
command composes with lmlab's config.

The end-to-end sweeps are subprocesses (slow); a job is broken on purpose by
`faults.BreakJob`, which picks its victims from environment variables, so that the
command line, and thus each job's overrides, stays the same between runs.
"""

import json
import math
import os

import optuna
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf, open_dict
from optuna.trial import TrialState
from wandb.sdk.launch.sweeps import utils as wandb_sweeps

from conftest import DATA_DIR, ROOT, run_cli
from hydra_plugins.lmlab_sweepers.optuna_sweeper import (RAN, OptunaSweeper, resume,
                                                         search_space, storage)
from lmlab.config.schema import CONF_DIR, monitor_mode, register_schema
from lmlab.config.checks import check_config

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "logger=none", "trainer.enable_progress_bar=false"]
# Job ${hydra:job.num} crashes if it is $CRASH_JOB, turns to NaN if it is $NAN_JOB.
BREAK = ["+callbacks.fault._target_=faults.BreakJob", "+callbacks.fault.job=${hydra:job.num}",
         "+callbacks.fault.crash=${oc.env:CRASH_JOB,-1}",
         "+callbacks.fault.nan=${oc.env:NAN_JOB,-1}"]


def compose_hydra(*overrides: str):
    """The full config, `hydra` node included, of a command line."""
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def sweep(sweep_dir, *overrides, **env):
    """Runs a sweep in a fresh process; returns the finished process."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **env}
    return run_cli(f"hydra.sweep.dir={sweep_dir}", *overrides, cwd=ROOT, env=env, timeout=600)


def stamps(sweep_dir) -> dict[str, int]:
    """When each job's metrics.json was written, by job folder."""
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}


# -- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm_cells", "lstm_optuna", "seq2seq_regularization"])
def test_a_sweep_file_names_a_fixed_folder(name):
    hydra = compose_hydra(f"sweep={name}").hydra
    assert hydra.sweep.dir == f"outputs/sweeps/{name}"  # the same command finds it again


def test_the_seq2seq_sweep_sets_keys_the_models_take():
    cfg = compose_hydra("experiment=multi30k_transformer", "sweep=seq2seq_regularization")
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key  # a typo would add a new key


def test_the_optuna_study_lives_in_the_sweep_folder_under_a_fixed_name():
    sweeper = compose_hydra("sweep=lstm_optuna", "hydra.sweep.dir=/runs/x").hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.lmlab_sweepers.optuna_sweeper.OptunaSweeper"
    assert sweeper.storage == "/runs/x/optuna.journal"
    assert sweeper.study_name == "lstm_optuna" and sweeper.max_failure_rate == 1.0


def test_the_study_direction_follows_the_monitored_metric():
    from hydra_plugins.lmlab_sweepers.optuna_sweeper import direction_of

    lm = compose_hydra("model=gpt_tiny", "data=stdlib_source")
    assert direction_of(None, lm) == "minimize"  # val/loss, the LM's own
    assert direction_of(None, compose_hydra()) == "maximize"  # val/acc, the classifier's
    with pytest.raises(ValueError, match="direction=minimize"):
        direction_of("maximize", lm)  # would keep the highest loss


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    from optuna import distributions as d

    space, fixed = search_space({"lr": "tag(log, interval(1e-4, 1e-2))", "units": "choice(64, 128)",
                                 "layers": "range(1, 4)", "drop": "interval(0, 0.5)",
                                 "heads": "tag(int, interval(1, 8))", "seed": "7"})
    assert space == {"lr": d.FloatDistribution(1e-4, 1e-2, log=True),
                     "units": d.CategoricalDistribution([64, 128]),
                     "layers": d.IntDistribution(1, 3),
                     "drop": d.FloatDistribution(0, 0.5), "heads": d.IntDistribution(1, 8)}
    assert fixed == ["seed=7"]


def test_the_slurm_launcher_asks_for_the_trainers_nodes_and_devices():
    launcher = compose_hydra("hydra/launcher=slurm", "strategy=ddp", "trainer.devices=4",
                             "trainer.num_nodes=2").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


def study_with(path, states: list[TrialState]):
    """A study in a journal file whose trials end in `states` (RUNNING: asked and left, as a
    killed sweep leaves them)."""
    study = optuna.create_study(study_name="s", storage=storage(str(path)))
    for state in states:
        trial = study.ask()
        if state != TrialState.RUNNING:
            trial.set_user_attr(RAN, True)
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    return study


def test_resuming_fails_the_trials_a_killed_sweep_left_running_and_counts_the_finished(tmp_path):
    study = study_with(tmp_path / "optuna.journal", [TrialState.COMPLETE, TrialState.FAIL,
                                                     TrialState.RUNNING])
    assert resume(study) == 2  # the running one is not finished...
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert resume(study) == 2  # ...nor counted once marked failed


def sweeper_on(path) -> OptunaSweeper:
    sampler = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": 42})
    return OptunaSweeper(study_name="s", storage=str(path), direction="maximize", n_trials=6,
                         n_jobs=1, max_failure_rate=1.0, sampler=sampler, pruner=None,
                         params={"lr": "interval(1e-4, 1e-2)"})


def test_a_resumed_study_proposes_new_trials_not_the_first_ones_again(tmp_path):
    """Round 2 case: the sampler was rebuilt with the same seed, so the resumed sweep's
    trials 3, 4, 5 had exactly trials 0, 1, 2's parameters."""
    space, _ = search_space({"lr": "interval(1e-4, 1e-2)"})

    def ask_three(study):
        found = []
        for _ in range(3):
            trial = study.ask(space)
            trial.set_user_attr(RAN, True)
            study.tell(trial, 0.5)
            found.append(trial.params["lr"])
        return found

    sweeper = sweeper_on(tmp_path / "optuna.journal")
    first = ask_three(sweeper.study())
    resumed = ask_three(sweeper.study())  # the same command again
    assert not set(resumed) & set(first)
    # negative control: the sampler seeded as before, with the sweep's seed alone
    again = sweeper.study()
    again.sampler = optuna.samplers.TPESampler(seed=42)
    assert ask_three(again) == first


def test_the_wandb_sweep_command_with_sampled_values_composes_with_lmlab():
    config = wandb_sweeps.load_sweep_config(str(ROOT / "sweeps" / "wandb" / "lstm.yaml"))
    sample = {key: {"value": spec["values"][-1] if "values" in spec else spec["max"]}
              for key, spec in config["parameters"].items()}
    # what `wandb agent` does with a run's values (wandb/wandb_agent.py, _command_run)
    variables = {**wandb_sweeps.create_sweep_command_args({"args": sample}),
                 "env": ["/usr/bin/env"], "interpreter": ["python"]}
    argv = []
    for chunk in wandb_sweeps.create_sweep_command(config["command"]):
        argv += variables[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    assert argv[:4] == ["/usr/bin/env", "python", "-m", "lmlab.run"]
    overrides = argv[4:]
    assert "model.optimizer.lr=0.01" in overrides and "model.net.cell=gru" in overrides
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.data_dir = "outputs/example", str(DATA_DIR)
    check_config(cfg)
    assert (cfg.model.net.cell, cfg.model.net.hidden_size) == ("gru", 256)
    assert OmegaConf.select(cfg, "logger.wandb._target_").endswith("WandbLogger")
    metric = config["metric"]
    assert {"max": "maximize", "min": "minimize"}[monitor_mode(metric["name"])] == metric["goal"]


# -- end to end ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_rerun_skips_finished_jobs_and_reruns_the_failed_one(tmp_path):
    command = ["hydra.mode=MULTIRUN", "model.optimizer.lr=1e-3,3e-3,1e-2", *TINY, *BREAK]
    first = sweep(tmp_path, *command, CRASH_JOB="1")
    assert first.returncode == 1, first.stderr[-3000:]  # job 1 crashed, job 2 still ran
    assert "job 1 failed" in first.stdout + first.stderr
    assert "error: 1 job(s) of the sweep failed (1;" in first.stderr
    assert set(stamps(tmp_path)) == {"0", "2"}
    before = stamps(tmp_path)

    second = sweep(tmp_path, *command)  # the same command, nothing broken this time
    assert second.returncode == 0, second.stderr[-3000:]
    after = stamps(tmp_path)
    assert set(after) == {"0", "1", "2"}
    assert after["0"] == before["0"] and after["2"] == before["2"]  # not run again
    log = second.stdout + second.stderr
    assert "job 0 finished in an earlier run" in log and "job 1 finished" not in log

    # Round 2 case: the same overrides in another order are the same jobs
    reordered = sweep(tmp_path, *reversed(command))
    assert reordered.returncode == 0, reordered.stderr[-3000:]
    assert stamps(tmp_path) == after

    # Negative control: another command in the same folder runs every job again.
    third = sweep(tmp_path, *command, "trainer.limit_val_batches=1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(stamps(tmp_path)[job] > after[job] for job in after)


@pytest.mark.slow
def test_optuna_records_failed_trials_goes_on_and_resumes_up_to_n_trials(tmp_path):
    command = ["sweep=lstm_optuna", "monitor=val/loss", "hydra.sweeper.direction=minimize",
               *TINY, *BREAK]
    first = sweep(tmp_path, *command, "hydra.sweeper.n_trials=3", CRASH_JOB="1", NAN_JOB="2")
    assert first.returncode == 1, first.stderr[-3000:]
    assert "error: 2 job(s) of the sweep failed (1, 2;" in first.stderr
    journal = storage(str(tmp_path / "optuna.journal"))

    def trials():
        return optuna.load_study(study_name="lstm_optuna", storage=journal).trials

    def states():
        return [t.state for t in trials()]

    assert states() == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    # the NaN job is stopped at its step by the numerical guard: no results, a failed trial
    assert not (tmp_path / "2" / "metrics.json").exists()
    assert (tmp_path / "1" / ".hydra").is_dir() and (tmp_path / "2" / ".hydra").is_dir()
    before = stamps(tmp_path)

    second = sweep(tmp_path, *command, "hydra.sweeper.n_trials=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert states() == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                        TrialState.COMPLETE]  # one more: 4 in all
    assert stamps(tmp_path) == {**before, "3": stamps(tmp_path)["3"]}  # 0-2 left alone
    assert trials()[3].params not in [t.params for t in trials()[:3]]  # new, not trial 0's

    third = sweep(tmp_path, *command, "hydra.sweeper.n_trials=4")
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(states()) == 4 and not (tmp_path / "4").exists()
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.best_value == optuna.load_study(study_name="lstm_optuna",
                                                   storage=journal).best_value


@pytest.mark.slow
def test_a_pruned_trial_stops_at_its_validation_and_is_recorded_pruned(tmp_path):
    # a pruner that prunes every trial at its first report: an accuracy is never above 1.1
    done = sweep(tmp_path, "sweep=lstm_optuna", "hydra.sweeper.n_trials=2", *TINY,
                 "trainer.max_epochs=3",
                 "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 1.1}")
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="lstm_optuna",
                              storage=storage(str(tmp_path / "optuna.journal")))
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert [list(t.intermediate_values) for t in study.trials] == [[2], [2]]  # epoch 0's
    assert not list(tmp_path.glob("*/metrics.json"))  # neither ran on to its test


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_a_process_of_its_own(tmp_path):
    done = sweep(tmp_path, "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local",
                 "model.optimizer.lr=1e-3,3e-3", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        saved = json.loads((tmp_path / job / "metrics.json").read_text())
        assert f"model.optimizer.lr={lr}" in saved["overrides"]
        assert math.isfinite(saved["objective"])
    assert list((tmp_path / ".submitit").iterdir())  # submitted through submitit
