"""Loggers of lmlab's own, and how a W&B run follows resumes and sweeps: its id (the
resumed checkpoint's run, else a new one), its group (one per multirun) and its tags (the
run's overrides)."""

from __future__ import annotations

import csv
import secrets
import string
from collections.abc import Mapping
from pathlib import Path

import torch
from hydra.types import RunMode
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch import Callback, loggers
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from lmlab.errors import LmlabError
from lmlab.redact import is_secret_name, redacted_argv
from lmlab.run_info import hydra_overrides, launched_as_rank_zero, read_run_info


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


MODES = (None, "online", "offline", "disabled")
MAX_TAG = 64  # W&B refuses longer tags


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
        # tables come without a step, and a test in processes of their own (ddp_spawn)
        # restarts Lightning's count at 0: both go to the run's current step
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


class WandbIdInCheckpoint(Callback):
    """Stores the W&B run's id in every checkpoint, so a run resumed from one continues
    the same W&B run wherever the checkpoint has been copied."""

    KEY = "wandb_id"

    def __init__(self, run_id: str):
        self.run_id = run_id

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = self.run_id


def wandb_arguments(cfg: DictConfig, node: DictConfig, resume: str | None) -> dict:
    """The run id, group and tags of a W&B logger: the resumed checkpoint's run (else a new
    one), the sweep's group unless `group` is set, and the run's overrides as tags."""
    run_id = node.get("id") or resumed_wandb_id(resume, Path(cfg.paths.output_dir))
    tags = list(dict.fromkeys([*(node.get("tags") or []), *override_tags(hydra_overrides())]))
    return {"id": run_id or new_wandb_id(), "group": node.get("group") or sweep_group(cfg),
            "tags": [shorten_tag(str(tag)) for tag in tags]}


def new_wandb_id() -> str:
    """Eight lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def resumed_wandb_id(resume: str | None, output_dir: Path) -> str | None:
    """The W&B id of the run a resume continues: from the checkpoint itself, else from the
    run_info.json of the checkpoint's run folder. Lightning's own names (`last`, `hpc`)
    resume from this run's folder."""
    if resume is None:
        return None
    path = Path(resume)
    if resume in ("last", "best", "hpc") or not path.exists():
        folders = [output_dir]
    else:
        found = _id_in_checkpoint(path)
        if found:
            return found
        folders = list(path.parents)
    for folder in folders:
        info = read_run_info(folder)
        if info and info.get("wandb", {}).get("id"):
            return info["wandb"]["id"]
    return None


def _id_in_checkpoint(path: Path) -> str | None:
    if not path.is_file():  # a DeepSpeed folder: its run folder says
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: refused later, in one line
        return None
    return checkpoint.get(WandbIdInCheckpoint.KEY) if isinstance(checkpoint, dict) else None


def sweep_group(cfg: DictConfig) -> str | None:
    """For the jobs of a multirun: the task name and the sweep folder's last two parts
    (its date and time by default), the same for every job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    return f"{cfg.task_name}-{'_'.join(sweep.parts[-2:])}"


def sweep_overrides(cfg: DictConfig) -> list[str]:
    """What a sweep job run in a process of its own (lmlab.sweep) needs to stay in its
    sweep's W&B group, which that process cannot tell."""
    group = sweep_group(cfg)
    return [f"logger.{name}.group='{group}'" for name, node in (cfg.get("logger") or {}).items()
            if node is not None and str(node.get("_target_", "")).endswith("WandbLogger")
            and group and not node.get("group")]


def override_tags(overrides: list[str]) -> list[str]:
    """The run's command-line overrides as tags, but the logger's own and secret ones."""
    tags = []
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key.split(".")[0].split("/")[0] == "logger" or is_secret_name(key.rsplit(".", 1)[-1]):
            continue
        tags.append(override.lstrip("+~"))
    return tags


def shorten_tag(tag: str) -> str:
    """`tag` in at most 64 characters: a long key loses its leading parts first
    (`…optimizer.lr=0.003`), then a long value its end."""
    key, equals, value = tag.partition("=")
    parts = key.split(".")
    while len(tag) > MAX_TAG and len(parts) > 1:
        parts.pop(0)
        tag = "…" + ".".join(parts) + equals + value
    return tag if len(tag) <= MAX_TAG else tag[:MAX_TAG - 1] + "…"


def finish(found: list, exit_code: int = 0) -> None:
    """Ends the runs of the loggers that have one to end (W&B); a non-zero `exit_code`
    marks them failed."""
    for logger in found:
        if hasattr(logger, "finish"):
            logger.finish(exit_code)
