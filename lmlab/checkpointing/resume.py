"""Which checkpoint a run continues, and how: `resume=auto` and `ckpt_path=last` mean the
newest checkpoint of the run's own folder (`hydra.run.dir=...` names it, so that a second
start finds it); `plan_resume` decides whether it resumes exactly or by its weights alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmlab.checkpointing.io import WEIGHTS_FILES
from lmlab.checkpointing.weights import run_folder_of
from lmlab.errors import LmlabError
from lmlab.parallel.specs import describe

log = logging.getLogger(__name__)


def plan_resume(ckpt_path: str | None, trainer: DictConfig) -> tuple[str | None, Path | None]:
    """(checkpoint for Lightning to resume exactly, or weights to start from instead).

    A checkpoint resumes exactly under a strategy that keeps training state the same way;
    otherwise, and for a `weights.ckpt`, only its weights carry over, with a warning."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc"):  # Lightning's own names
        return ckpt_path, None
    path = Path(ckpt_path)
    if not path.exists():
        raise LmlabError(f"ckpt_path={ckpt_path} does not exist; pass a checkpoint file or "
                         "DeepSpeed checkpoint folder of an earlier run")
    folder = run_folder_of(path)
    if path.name not in WEIGHTS_FILES and folder is not None:
        before = describe(OmegaConf.load(folder / ".hydra" / "config.yaml").trainer
                          ).checkpoint_family
        now = describe(trainer).checkpoint_family
        if before == now:
            return ckpt_path, None
        reason = f"it was written under {before} and this run is {now}"
    else:
        reason = "it holds weights only" if path.name in WEIGHTS_FILES else "its run is unknown"
    log.warning("resuming from %s: %s, so only its weights carry over; the optimizer state, "
                "learning-rate schedule and step count start afresh", ckpt_path, reason)
    return None, path


log = logging.getLogger(__name__)


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written checkpoint (file, or DeepSpeed folder) in `folder`."""
    found = [p for p in folder.glob("*.ckpt")] if folder.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The `ckpt_path` to give `plan_resume`: `resume=auto` and `ckpt_path=last` become the
    newest checkpoint of this run's folder; `resume=auto` without one starts afresh (what a
    requeued job does the first time), `ckpt_path=last` without one is an error."""
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    if cfg.get("resume") == "auto":
        newest = newest_checkpoint(folder)
        log.info("resume=auto: %s", f"resuming from {newest}" if newest else
                 f"no checkpoint in {folder} yet, starting afresh")
        return None if newest is None else str(newest)
    if cfg.ckpt_path == "last":
        newest = newest_checkpoint(folder)
        if newest is None:
            raise LmlabError(f"ckpt_path=last: no checkpoint in {folder}; name the run folder "
                             "of the run to continue with hydra.run.dir=..., or use resume=auto "
                             "to start afresh when there is none")
        return str(newest)
    return cfg.ckpt_path
