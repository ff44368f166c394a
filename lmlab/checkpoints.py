"""Portable weights: one file per run that loads on one device, whatever trained it.

Lightning's checkpoints depend on the strategy: DeepSpeed writes a folder of per-rank
shards, FSDP can write sharded folders. Every run therefore also writes `weights.ckpt` to
its folder: the consolidated float32 `state_dict` of its best checkpoint (else its last,
else its final weights), with the run's resolved config and tokenizer, so that a single
file is enough to evaluate, sample, fine-tune or resume under another strategy.
`plan_resume` decides whether a checkpoint resumes exactly or by its weights alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.parallel.specs import describe
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)
WEIGHTS = "weights.ckpt"


def final_checkpoint(trainer: L.Trainer, output_dir: Path) -> Path:
    """The best checkpoint, else the last one, else one saved now from the final weights."""
    callback = trainer.checkpoint_callback
    path = callback and (callback.best_model_path or callback.last_model_path)
    if not path:
        path = output_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(path)
    return Path(path)


def export_weights(trainer: L.Trainer, checkpoint: Path, output_dir: Path, config: str) -> Path:
    """Writes `weights.ckpt` from `checkpoint` (rank 0; the others wait) and returns it."""
    target = output_dir / WEIGHTS
    if trainer.is_global_zero:
        tokenizer = output_dir / "tokenizer.json"
        torch.save({"state_dict": read_state_dict(checkpoint), "config": config,
                    "tokenizer": tokenizer.read_text() if tokenizer.is_file() else None,
                    "source": str(checkpoint)}, target)
    trainer.strategy.barrier()
    return target


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full float32 state dict of a checkpoint file or of a DeepSpeed ZeRO folder
    (whose consolidation keeps frozen parameters in their training precision)."""
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_weights(task: L.LightningModule, path: Path) -> L.LightningModule:
    """`task` with the weights of `path` (any checkpoint `read_state_dict` reads)."""
    task.load_state_dict(read_state_dict(path))
    return task


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
    saved = next((p / ".hydra" / "config.yaml" for p in path.parents
                  if (p / ".hydra" / "config.yaml").is_file()), None)
    if path.name != WEIGHTS and saved is not None:
        before = describe(OmegaConf.load(saved).trainer).checkpoint_family
        now = describe(trainer).checkpoint_family
        if before == now:
            return ckpt_path, None
        reason = f"it was written under {before} and this run is {now}"
    else:
        reason = "it holds weights only" if path.name == WEIGHTS else "its run is unknown"
    log.warning("resuming from %s: %s, so only its weights carry over; the optimizer state, "
                "learning-rate schedule and step count start afresh", ckpt_path, reason)
    return None, path
