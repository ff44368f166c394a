"""Entry point: compose -> validate -> seed -> data -> task -> trainer -> fit -> test.

    python -m lmlab.run                                   # LSTM on the embedded corpus
    python -m lmlab.run experiment=sst2_lstm              # a named experiment
    python -m lmlab.run model=lstm strategy=ddp trainer.devices=4
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from lmlab.checkpoints import export_weights, final_checkpoint, load_weights, plan_resume
from lmlab.cli import fail
from lmlab.config import check_config, register_schema, strategy_config, to_yaml, world_size
from lmlab.errors import LmlabError
from lmlab.memory import estimate, local_batch

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_schema()


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one experiment and returns its test metrics (plus the best monitored value)."""
    check_config(cfg)
    if cfg.dry_run:
        return dry_run(cfg)
    L.seed_everything(cfg.seed, workers=True)
    log.info("config %s on rank %d", fingerprint(cfg), rank_zero_only.rank)
    resume, weights = plan_resume(cfg.ckpt_path, cfg.trainer)
    data, task, trainer = build(cfg)
    if weights is not None:
        load_weights(task, weights)
    trainer.fit(task, datamodule=data, ckpt_path=resume)
    metrics, best = test_best(trainer, cfg, data)
    output_dir = Path(cfg.paths.output_dir)
    rank_zero_only(report)(metrics, output_dir, best)
    objective = metrics.get(f"best {cfg.monitor}")
    rank_zero_only(write_json)(output_dir / "metrics.json",
                               {"metrics": metrics, "objective": objective})
    return metrics


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The DataModule (set up and saved with the run), the task it sizes, and the trainer."""
    data = instantiate(cfg.data)
    data.setup("fit")
    rank_zero_only(data.save)(Path(cfg.paths.output_dir))
    task = build_task(cfg, data)
    cfg.monitor = cfg.monitor or task.monitor[0]
    cfg.monitor_mode = cfg.monitor_mode or task.monitor[1]
    trainer = instantiate(cfg.trainer, callbacks=_callbacks(cfg), logger=_loggers(cfg))
    for logger in trainer.loggers:  # so runs can be compared by any config value
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return data, task, trainer


def test_best(trainer: L.Trainer, cfg: DictConfig, data) -> tuple[dict[str, float], str]:
    """Exports the run's portable weights (from the best checkpoint, else the last, else the
    final weights) and tests them in a fresh task; returns the metrics, with the best
    monitored value, and the checkpoint's path. A fresh task, because sharded strategies
    wrap the model again for testing, and a trained FSDP model holds only its rank's shard."""
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = final_checkpoint(trainer, output_dir)
    weights = export_weights(trainer, checkpoint, output_dir, to_yaml(cfg))
    task = load_task(cfg, data, weights)
    metrics = trainer.test(task, datamodule=data)[0]
    callback = trainer.checkpoint_callback
    if callback and callback.best_model_score is not None:
        metrics[f"best {cfg.monitor}"] = float(callback.best_model_score)
    return metrics, str(checkpoint)


def fingerprint(cfg: DictConfig) -> str:
    """A short hash of the resolved config: every rank of a run must log the same one."""
    return hashlib.sha1(to_yaml(cfg).encode()).hexdigest()[:12]


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=1))


def build_task(cfg: DictConfig, data: L.LightningDataModule) -> L.LightningModule:
    """The task of `cfg`, with the sizes and objects that come from the data."""
    return instantiate(cfg.model, _partial_=True, **data.model_args())(**data.model_objects())


def load_task(cfg: DictConfig, data: L.LightningDataModule, checkpoint: Path) -> L.LightningModule:
    """The task of `cfg`, sized by `data`, with the weights of `checkpoint` (pretrained
    vectors are not read again: the checkpoint holds the trained ones)."""
    if cfg.model.get("pretrained_vectors"):
        cfg = OmegaConf.merge(cfg, {"model": {"pretrained_vectors": None}})
    return load_weights(build_task(cfg, data), checkpoint)


def dry_run(cfg: DictConfig) -> dict:
    """Prints the checked, resolved config, the strategy and precision objects, the process
    layout and the per-device memory estimate; trains nothing. Returns the estimate."""
    console = Console()
    console.print(to_yaml(cfg), markup=False, highlight=False)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    world = world_size(cfg.trainer)
    tp = int(strategy_config(cfg.trainer)[1].get("tensor_parallel_size", 1))
    dp = world // tp
    console.print(f"strategy:  {type(trainer.strategy).__name__} on "
                  f"{type(trainer.accelerator).__name__}\n"
                  f"precision: {type(trainer.precision_plugin).__name__} "
                  f"({cfg.trainer.get('precision', '32-true')})\n"
                  f"processes: {world} ({dp} data-parallel x {tp} tensor-parallel), "
                  f"per-device batch {cfg.data.batch_size // dp}", highlight=False)
    memory = estimate_memory(cfg, dp, tp)
    table = Table(title="memory per device, estimated", min_width=34)
    table.add_column("part")
    table.add_column("MiB", justify="right")
    for part, size in memory.items():
        table.add_row(part, f"{size / 2**20:.2f}")
    console.print(table)
    return memory


def estimate_memory(cfg: DictConfig, dp: int, tp: int) -> dict[str, float]:
    """`lmlab.memory.estimate` for the run's task, on one of its per-device batches."""
    data = instantiate(cfg.data)
    data.setup("fit")
    batch = local_batch(next(iter(data.train_dataloader())), cfg.data.batch_size // dp)
    return estimate(cfg, build_task(cfg, data), batch, dp, tp)


def _callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def _loggers(cfg: DictConfig) -> list | bool:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return loggers or False


def report(metrics: dict[str, float], output_dir: Path, best: str) -> None:
    """Prints the final metrics and where the run's files are."""
    table = Table(title="test metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(metrics.items()):
        table.add_row(name, f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"run files:  {output_dir}")
    if best:
        console.print(f"best model: {best}")


def needs_own_process(cfg: DictConfig) -> bool:
    """A multi-process job of a sweep: Lightning relaunches ranks with the sweep's own
    command line, so each rank would run the whole sweep again (Hydra and Lightning bug)."""
    return HydraConfig.get().mode == RunMode.MULTIRUN and world_size(cfg.trainer) > 1


def run_in_own_process(cfg: DictConfig) -> float | None:
    """Runs this sweep job as a single run of its own, with exactly this job's overrides and
    output folder; its ranks are then relaunched from that command. Returns its objective."""
    job = HydraConfig.get()
    output_dir = Path(job.runtime.output_dir)
    command = [sys.executable, "-m", "lmlab.run", *job.overrides.task, "hydra.mode=RUN",
               f"hydra.run.dir={output_dir}", "hydra.output_subdir=null"]
    done = subprocess.run(command, cwd=hydra.utils.get_original_cwd())
    if done.returncode:
        raise LmlabError(f"sweep job {job.job.num} failed (exit {done.returncode}); its log "
                         f"is {output_dir / 'run.log'}")
    return json.loads((output_dir / "metrics.json").read_text())["objective"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        if needs_own_process(cfg):
            return run_in_own_process(cfg)
        metrics = train(cfg)
    except LmlabError as err:
        fail(str(err))
    except MisconfigurationException as err:
        fail(f"Lightning refused this configuration: {err}")
    return metrics.get(f"best {cfg.monitor}")  # the objective of hyperparameter sweeps


if __name__ == "__main__":
    main()
