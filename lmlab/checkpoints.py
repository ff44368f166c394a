"""Portable weights: one file per run that loads on one device, whatever trained it.

Lightning's checkpoints depend on the strategy: DeepSpeed writes a folder of per-rank
shards, FSDP can write sharded folders. Every run therefore also writes `weights.ckpt` to
its folder: the consolidated float32 `state_dict` of its best checkpoint (else its last,
else its final weights), with the run's resolved config and tokenizer, so that a single
file is enough to evaluate, sample, fine-tune or resume under another strategy.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

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
    """The full float32 state dict of a checkpoint file or of a DeepSpeed ZeRO folder."""
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        return {k.removeprefix("_forward_module."): v for k, v in state.items()}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_weights(task: L.LightningModule, path: Path) -> L.LightningModule:
    """`task` with the weights of `path` (any checkpoint `read_state_dict` reads)."""
    task.load_state_dict(read_state_dict(path))
    return task
