"""What a run records about itself: its resolved config, the code's git commit, the package
versions and the machine. Written to RUN/run_info.json and logged as the run's config to
every logger (W&B, CSV's hparams.yaml, TensorBoard), with secrets redacted (lmlab.config.redact).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.config.redact import redact, redact_yaml_files, secret_values

RUN_INFO = "run_info.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lmlab", "torch", "lightning", "hydra-core", "omegaconf", "wandb", "torchmetrics",
            "tokenizers", "numpy", "tensorboard", "deepspeed")
# Lightning launches the other ranks with these set; NODE_RANK is set by hand on every node
# but the first, whose first process has no LOCAL_RANK yet.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
                  "JSM_NAMESPACE_RANK")


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank zero, known before the strategy sets ranks up."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0 and all(os.environ.get(v, "0") == "0" for v in RANK_VARIABLES)


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The commit of the checkout lmlab runs from and whether it has uncommitted changes;
    "unknown" for both outside a git checkout or without git."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.strip()


def versions() -> dict[str, str]:
    """Python's version and those of the installed packages that shape a run."""
    found = {"python": "{}.{}.{}".format(*sys.version_info[:3])}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def machine(trainer: L.Trainer) -> dict[str, Any]:
    """The host and the process layout the trainer resolved."""
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if accelerator == "cuda" else []
    return {"hostname": socket.gethostname(), "accelerator": accelerator,
            "strategy": type(trainer.strategy).__name__, "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes, "world_size": trainer.world_size,
            "device_names": names, "cpu_count": os.cpu_count()}


def run_info(cfg: DictConfig, trainer: L.Trainer, wandb: dict | None = None) -> dict[str, Any]:
    """The resolved config and what else a run records, with secrets redacted."""
    config = OmegaConf.to_container(cfg, resolve=True)
    info = {"config": config, "git": git_state(), "versions": versions(),
            "machine": machine(trainer)}
    if wandb:
        info["wandb"] = wandb
    return redact(info, secret_values(config, hydra_overrides()))


def hydra_overrides() -> list[str]:
    """The command line's overrides of this run, when it is a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def recorded_overrides() -> list[str]:
    """The overrides as a run's files record them (metrics.json): secrets redacted."""
    overrides = hydra_overrides()
    return redact(overrides, secret_values(overrides))


def record_run(cfg: DictConfig, trainer: L.Trainer, wandb: dict | None = None) -> dict:
    """Writes RUN/run_info.json, redacts the run's Hydra files (rank zero) and logs the
    config, the git state, the versions and the machine to every logger."""
    info = run_info(cfg, trainer, wandb)
    if launched_as_rank_zero():
        output_dir = Path(cfg.paths.output_dir)
        (output_dir / RUN_INFO).write_text(json.dumps(info, indent=1))
        secrets = secret_values(OmegaConf.to_container(cfg, resolve=True), hydra_overrides())
        redact_yaml_files(hydra_files(output_dir), secrets)
    logged = {**info["config"], **{k: info[k] for k in ("git", "versions", "machine")}}
    for logger in trainer.loggers:  # so runs can be compared by any of these
        logger.log_hyperparams(logged)
    return info


def hydra_files(output_dir: Path) -> list[Path]:
    """The YAML files Hydra wrote for this run (and for its sweep) before it started."""
    from hydra.core.hydra_config import HydraConfig

    files = list((output_dir / ".hydra").glob("*.yaml"))
    files.append(output_dir.parent / "multirun.yaml")  # a sweep job run in a process of its own
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        if hydra.output_subdir:
            files += (Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml")
        if hydra.mode is not None and hydra.mode.name == "MULTIRUN":
            files.append(Path(hydra.sweep.dir) / "multirun.yaml")
    return sorted(set(files))


def read_run_info(run_dir: Path) -> dict | None:
    """The run_info.json of a run folder, or None."""
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else None
