"""From a checked config to the objects of a run: DataModule, task and Trainer.

Shared by every entry point (`run`, `evaluate`, the dry run), so that a config key means
the same thing wherever it is read.
"""

from __future__ import annotations

import inspect
import logging
import math
import shutil
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_object, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.checkpointing.weights import load_weights
from lmlab.config.schema import monitor_mode
from lmlab.data.description import DataDescription
from lmlab.errors import ConfigError, LmlabError
from lmlab.interop.huggingface import is_pretrained_folder
from lmlab.tracking.loggers import WandbLogger
from lmlab.tracking.run_info import record_run
from lmlab.tracking.wandb_identity import WandbIdInCheckpoint, wandb_arguments
from lmlab.training.kernels import kernels_of

log = logging.getLogger(__name__)
PRETRAINED_CONFIG = "pretrained_config.json"  # a fine-tuning run's copy of its folder's


def build(cfg: DictConfig, resume: str | None = None
          ) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The DataModule (set up and saved with the run), the task it sizes, and the trainer;
    `resume` is the checkpoint that training resumes from, whose W&B run continues."""
    data = built(cfg.data)
    data.setup("fit")
    if hasattr(data, "summary"):  # a DataModule of one's own may have none
        rank_zero_only(log.info)("data: %s", data.summary())
    check_schedule(cfg, len(data.train_dataloader()))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank_zero_only(data.save)(output_dir)
    task = build_task(cfg, data)
    check_context(data, task.net)
    rank_zero_only(keep_pretrained_config)(task.net, output_dir)
    choose_monitor(cfg, task.monitor)
    found = loggers(cfg, resume)
    trainer = instantiate(cfg.trainer, callbacks=callbacks(cfg) + logger_callbacks(found),
                          logger=found)
    record_run(cfg, trainer, wandb_record(found))
    return data, task, trainer


def build_task(cfg: DictConfig, data: L.LightningDataModule) -> L.LightningModule:
    """The task of `cfg`, with what it takes from the data's description."""
    return task_for(cfg, data.describe())


def task_for(cfg: DictConfig, description: DataDescription) -> L.LightningModule:
    """The task of `cfg` for data of this description (given as `data=` to a task whose
    constructor takes it: a task of one's own may not)."""
    task_class = get_class(cfg.model._target_)
    sizes = task_class.config_from_data(description)
    takes_data = "data" in inspect.signature(task_class).parameters
    task = built(cfg.model, _partial_=True, **sizes)  # a description is no config value
    return task(data=description) if takes_data else task()


def built(node: DictConfig, *args, **kwargs):
    """`instantiate(node, ...)`, with an `LmlabError` that a constructor raised re-raised as
    itself: Hydra wraps whatever a target raises in its own exception, which the commands
    would print as a traceback instead of the one-line message."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, LmlabError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def load_task(cfg: DictConfig, data: L.LightningDataModule, checkpoint: Path) -> L.LightningModule:
    """The task of `cfg`, sized by `data`, with the weights of `checkpoint` (pretrained
    vectors and weights are not read again: the checkpoint holds the trained ones); a
    Hugging Face folder's own weights file is read by its net."""
    if is_pretrained_folder(checkpoint.parent):
        return build_task(cfg, data)
    if cfg.model.get("pretrained_vectors"):
        cfg = OmegaConf.merge(cfg, {"model": {"pretrained_vectors": None}})
    return load_weights(build_task(weights_come_later(cfg, Path(cfg.paths.output_dir)), data),
                        checkpoint, cfg)


def weights_come_later(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """`cfg` for a net whose weights a checkpoint will give: a pretrained net reads only the
    shape of its folder, from the copy of `config.json` its run kept (the folder may have
    moved since)."""
    net = cfg.model.get("net") or {}
    if "load_weights" not in signature_of(net):
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model.net.load_weights = False
        if (run_dir / PRETRAINED_CONFIG).is_file():
            cfg.model.net.folder = str(run_dir / PRETRAINED_CONFIG)
    return cfg


def check_context(data: L.LightningDataModule, net) -> None:
    """Refuses language-model sequences longer than the net's context (`block_size`), before
    training: they would fail at the first batch that long.

    Raises:
        ConfigError: naming the data key and the longest value the net takes.
    """
    context = getattr(net, "block_size", None)
    if context is None or getattr(data, "kind", None) != "lm":
        return
    key = "block_size" if hasattr(data, "block_size") else "max_length"
    longest = getattr(data, key, None)
    if longest is not None and longest > context:
        raise ConfigError([f"data.{key}={longest} is longer than the model's context "
                           f"({context} tokens); set data.{key}={context} or less"])


def keep_pretrained_config(net, output_dir: Path) -> None:
    """Copies a pretrained net's `config.json` into its run, which then rebuilds the net
    from it wherever the folder has gone (`weights_come_later`)."""
    folder = getattr(net, "folder", None)
    if folder is not None and (Path(folder) / "config.json").is_file():
        shutil.copyfile(Path(folder) / "config.json", output_dir / PRETRAINED_CONFIG)


def signature_of(node: DictConfig) -> dict:
    """The parameters of the constructor a config node targets."""
    return dict(inspect.signature(get_object(node._target_)).parameters) \
        if node.get("_target_") else {}


def choose_monitor(cfg: DictConfig, task_monitor: tuple[str, str]) -> None:
    """Fills in `monitor` (the task's own by default) and its mode, which follows the
    metric: a loss is minimised whatever the task's own metric is."""
    metric, mode = task_monitor
    cfg.monitor = cfg.monitor or metric
    if not cfg.monitor_mode:
        cfg.monitor_mode = mode if cfg.monitor == metric else monitor_mode(cfg.monitor)


def planned_steps(trainer: DictConfig, batches_per_epoch: int) -> float | None:
    """Optimizer steps the trainer will take, as Lightning counts them: `inf` for a run
    with no limit on epochs or steps, None in the debug modes (Lightning counts them its
    own way)."""
    if trainer.get("fast_dev_run") or trainer.get("overfit_batches"):
        return None
    limit = trainer.get("limit_train_batches")
    limit = 1.0 if limit is None else limit
    per_epoch = int(batches_per_epoch * limit) if isinstance(limit, float) \
        else min(int(limit), batches_per_epoch)
    per_epoch = math.ceil(per_epoch / int(trainer.get("accumulate_grad_batches") or 1))
    epochs, max_steps = trainer.get("max_epochs"), int(trainer.get("max_steps") or -1)
    steps = per_epoch * epochs if epochs not in (None, -1) else math.inf
    return min(steps, max_steps) if max_steps > 0 else steps


def check_schedule(cfg: DictConfig, batches_per_epoch: int) -> None:
    """A learning-rate schedule whose set length is not the run's, or that must follow a
    run without a set length, is refused before training (its decay would end early, or
    never); a warm-up as long as the run is told."""
    scheduler = cfg.model.get("scheduler") or {}
    steps = planned_steps(cfg.trainer, batches_per_epoch)
    if steps is None or "total_steps" not in scheduler:
        return
    total, warmup = scheduler.get("total_steps"), scheduler.get("warmup_steps")
    if total is None and steps == math.inf:
        raise ConfigError(["model.scheduler.total_steps=null follows the run's length, and "
                           "this run has none (trainer.max_epochs=-1, trainer.max_steps=-1); "
                           "set trainer.max_steps or model.scheduler.total_steps"])
    if total is not None and total != steps:
        raise ConfigError([f"model.scheduler.total_steps={total} but this run takes {steps} "
                           "optimizer steps; set model.scheduler.total_steps=null to follow "
                           f"the run, or {steps}"])
    if warmup is not None and warmup >= (total or steps):  # fine for a smoke run
        log.warning("model.scheduler.warmup_steps=%d is not shorter than the run (%d steps): "
                    "the learning rate never reaches its peak", warmup, total or steps)


def callbacks(cfg: DictConfig) -> list:
    """The callbacks group's, and the kernel choices (lmlab/training/kernels.py)."""
    found = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return [c for c in found if c is not None] + [kernels_of(cfg)]  # a factory may decide on none


def loggers(cfg: DictConfig, resume: str | None = None) -> list | bool:
    """The loggers of `cfg`; a W&B one continues the run of the `resume` checkpoint, is
    grouped with its sweep and tagged with the overrides
    (`lmlab.tracking.wandb_identity.wandb_arguments`)."""
    found = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        wandb = str(node.get("_target_", "")).endswith("WandbLogger")
        found.append(instantiate(node, **(wandb_arguments(cfg, node, resume) if wandb else {})))
    return found or False


def logger_callbacks(found: list | bool) -> list:
    """What the loggers need in the checkpoints: the W&B run's id."""
    return [WandbIdInCheckpoint(logger.version) for logger in found or []
            if isinstance(logger, WandbLogger)]


def wandb_record(found: list | bool) -> dict | None:
    """The W&B run's id, project, group and tags, for run_info.json."""
    logger = next((x for x in found or [] if isinstance(x, WandbLogger)), None)
    if logger is None:
        return None
    init = logger._wandb_init
    return {"id": logger.version, **{k: init.get(k) for k in ("project", "group", "tags")}}
