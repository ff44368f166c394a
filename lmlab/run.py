"""Entry point: compose -> validate -> seed -> data -> task -> trainer -> fit -> test.

    python -m lmlab.run                                   # LSTM on the embedded corpus
    python -m lmlab.run experiment=sst2_lstm              # a named experiment
    python -m lmlab.run model=lstm strategy=ddp trainer.devices=4
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import signal
import sys
from inspect import signature
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import get_class
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from lmlab.checkpointing.io import disk_full, load_checkpoint, refused
from lmlab.checkpointing.resume import checkpoint_to_resume, plan_resume
from lmlab.checkpointing.weights import (
    check_fits,
    export_weights,
    final_checkpoint,
    load_weights,
    run_folder_of,
    unpack_data_files,
)
from lmlab.config.checks import check_config
from lmlab.config.cli import fail, report
from lmlab.config.redact import redacted
from lmlab.config.schema import CONF_DIR, register_schema, to_yaml
from lmlab.config.typos import suggestion
from lmlab.config.user_dir import with_user_dir
from lmlab.errors import LmlabError
from lmlab.parallel.failures import peer_lost
from lmlab.tracking.console import log_final, quiet_console
from lmlab.tracking.loggers import finish
from lmlab.tracking.run_info import recorded_overrides
from lmlab.training.build import build, load_task
from lmlab.training.callbacks.interrupt import InterruptCheckpoint
from lmlab.training.callbacks.throughput import Throughput
from lmlab.training.dry_run import dry_run
from lmlab.training.sweeps import exit_if_jobs_failed, in_sweep, sweep_job

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one experiment and returns its test metrics (plus the best monitored value)."""
    check_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg)
    L.seed_everything(cfg.seed, workers=True)
    log.info("config %s on rank %d", fingerprint(cfg), rank_zero_only.rank)
    resume, weights = plan_resume(checkpoint_to_resume(cfg), cfg.trainer)
    start = weights or (Path(resume) if resume and Path(resume).exists() else None)
    if start is not None:
        encode_as_trained(cfg, start)
    data, task, trainer = build(cfg, resume)
    if weights is not None:
        load_weights(task, weights, cfg)
    if resume is not None and Path(resume).is_file():  # refused here, in one line, if unfit
        state = load_checkpoint(Path(resume), mmap=True).get("state_dict", {})  # Lightning reads it
        check_fits(task, state, Path(resume), cfg)
    try:
        metrics, best = fit_and_test(trainer, task, data, resume, cfg)
    except BaseException:
        finish(trainer.loggers, exit_code=1)  # a sweep's next job must not log into this run
        raise
    output_dir = Path(cfg.paths.output_dir)
    speed = throughput(trainer)
    rank_zero_only(report)(metrics, output_dir, best, speed)
    rank_zero_only(log_final)(metrics, speed)
    objective = metrics.get(f"best {cfg.monitor}")
    # the overrides tell a finished sweep job from another job of the same folder
    rank_zero_only(write_json)(output_dir / "metrics.json", {
        "metrics": metrics, "objective": objective, "overrides": recorded_overrides(),
        "throughput": speed})
    finish(trainer.loggers)
    return metrics


def encode_as_trained(cfg: DictConfig, checkpoint: Path) -> None:
    """Points `data.load_from` at the run folder of `checkpoint`, unless `data.load_from` is
    set: a run that starts or resumes from trained weights encodes its data with their
    tokenizer (fitting one on other data, as a fine-tuning run's data is, would give other
    token ids, or another vocabulary size). Weights outside any run folder carry their
    tokenizer: it is unpacked into this run's folder and used from there."""
    folder = run_folder_of(checkpoint)
    accepts = "load_from" in signature(get_class(cfg.data._target_)).parameters
    if not accepts or cfg.data.get("load_from"):
        return
    if folder is None and checkpoint.is_file() \
            and unpack_data_files(checkpoint, Path(cfg.paths.output_dir)):
        folder = Path(cfg.paths.output_dir)
    if folder is None:
        log.warning("%s lies in no run folder and carries no tokenizer: the data gets one "
                    "fitted afresh, which gives the weights' ids only if fitted on the same "
                    "texts; set +data.load_from=FOLDER to use the tokenizer saved there",
                    checkpoint)
        return
    log.info("encoding the data with the tokenizer the weights were trained with (%s)", folder)
    with open_dict(cfg):
        cfg.data.load_from = str(folder)


def fit_and_test(trainer: L.Trainer, task, data, resume: str | None,
                 cfg: DictConfig) -> tuple[dict[str, float], str]:
    """Trains, then tests the best checkpoint; a signal's stop exits with its status, and a
    lost peer of a multi-process run is one line."""
    try:
        # weights_only: a checkpoint from elsewhere must not run code as it loads
        trainer.fit(task, datamodule=data, ckpt_path=resume, weights_only=True)
        return test_best(trainer, cfg, data)
    except SystemExit as stop:
        raise SystemExit(signal_status(trainer, stop)) from None
    except RuntimeError as err:  # how gloo and NCCL report a lost peer
        lost = peer_lost(trainer, err)
        if lost is None:
            raise
        raise lost from err


def test_best(trainer: L.Trainer, cfg: DictConfig, data) -> tuple[dict[str, float], str]:
    """Exports the run's portable weights (from the best checkpoint, else the last, else the
    final weights) and tests them in a fresh task; returns the metrics, with the best
    monitored value, and the checkpoint's path. A fresh task, because sharded strategies
    wrap the model again for testing, and a trained FSDP model holds only its rank's shard."""
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = final_checkpoint(trainer, output_dir)
    weights = export_weights(trainer, checkpoint, output_dir, to_yaml(redacted(cfg)))
    task = load_task(cfg, data, weights)
    tested = trainer.test(task, datamodule=data, verbose=False)  # `report` prints them
    metrics = tested[0] if tested else {}  # none with trainer.limit_test_batches=0
    best = best_score(trainer.checkpoint_callback)
    if best is not None:
        metrics[f"best {cfg.monitor}"] = best
    return metrics, str(checkpoint)


def signal_status(trainer: L.Trainer, stop: SystemExit) -> int | str | None:
    """The exit status of a run stopped by a signal: 128 + its number, as shells report it
    (Lightning itself exits with 1 after Ctrl-C, and with 0 after its own SIGTERM stop)."""
    received = next((c.received for c in trainer.callbacks
                     if isinstance(c, InterruptCheckpoint) and c.received), None)
    if received is not None:
        return 128 + received
    if trainer.received_sigterm:
        return 128 + signal.SIGTERM
    if trainer.interrupted and stop.code == 1:
        return 128 + signal.SIGINT
    return stop.code


def best_score(callback) -> float | None:
    """The best monitored value, if a checkpoint callback kept one."""
    score = getattr(callback, "best_model_score", None)
    return None if score is None else float(score)


def throughput(trainer: L.Trainer) -> dict[str, float]:
    """The training speed the `Throughput` callback measured over the run (none without
    it)."""
    found = [c for c in trainer.callbacks if isinstance(c, Throughput)]
    return found[0].summary if found else {}


def fingerprint(cfg: DictConfig) -> str:
    """A short hash of the resolved config: every rank of a run must log the same one."""
    return hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:12]


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_console()
    if in_sweep():
        return sweep_job(cfg, train)
    try:
        metrics = train(cfg)
    except LmlabError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:  # before or after training: nothing to save
        fail("interrupted (Ctrl-C) outside training: nothing was saved", 128 + signal.SIGINT)
    except MisconfigurationException as err:
        fail(f"Lightning refused this configuration: {err}")
    except pickle.UnpicklingError as err:  # a checkpoint Lightning found and refused itself
        fail(refused(checkpoint_to_resume(cfg), err))
    except OSError as err:
        message = disk_full(err, Path(cfg.paths.output_dir))
        if message is None:
            raise
        fail(message)
    return metrics.get(f"best {cfg.monitor}")  # the objective of hyperparameter sweeps


if __name__ == "__main__":
    register_schema()
    try:
        sys.argv[1:] = with_user_dir(sys.argv[1:])
    except LmlabError as err:
        fail(str(err))
    try:
        main()
    except SystemExit as stop:  # Hydra exits with 1 after printing why it could not compose
        hint = suggestion(sys.argv[1:]) if stop.code == 1 else None
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        raise
    exit_if_jobs_failed()
