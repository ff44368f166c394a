"""How a W&B run follows resumes and sweeps: its id (the resumed checkpoint's run, else a
new one), its group (one per multirun) and its tags (the run's overrides).
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import torch
from hydra.types import RunMode
from lightning.pytorch import Callback
from omegaconf import DictConfig

from lmlab.config.redact import is_secret_name
from lmlab.tracking.run_info import hydra_overrides, read_run_info

MAX_TAG = 64  # W&B refuses longer tags


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
    """What a sweep job run in a process of its own (lmlab.training.sweeps) needs to stay in its
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
