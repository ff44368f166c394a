"""Portable weights: one file per run that loads on one device, whatever trained it.

Lightning's checkpoints depend on the strategy: DeepSpeed writes a folder of per-rank
shards, FSDP can write sharded folders. Every run therefore also writes `weights.ckpt` to
its folder: the consolidated float32 `state_dict` of its best checkpoint (else its last,
else its final weights), with the run's resolved config and its data files (tokenizers,
labels), so that a single file is enough to evaluate, sample, fine-tune or resume under
another strategy; and the same tensors as `weights.safetensors` (config, data files and
source as its metadata), a format that holds tensors only. A checkpoint whose tensors do not
fit the model is a one-line error naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmlab.checkpointing.io import (
    SAFE_WEIGHTS,
    WEIGHTS,
    corrupt,
    instead,
    load_checkpoint,
)
from lmlab.config.schema import flatten
from lmlab.models.lora import PARAMETRIZED, merge_adapters, merged_state
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

# What the DataModules save to a run folder: how its texts and labels were encoded.
DATA_FILES = ("tokenizer.json", "tokenizer_config.json", "source_tokenizer.json",
              "target_tokenizer.json", "labels.json")
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA run's adapters, on their own
SHOWN_KEYS = 4  # mismatched tensors or config keys listed in an error, then "and N more"


def final_checkpoint(trainer: L.Trainer, output_dir: Path) -> Path:
    """The best checkpoint, else the last one, else one saved now from the final weights."""
    callback = trainer.checkpoint_callback
    path = callback and (callback.best_model_path or callback.last_model_path)
    if not path:
        path = output_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(path)
    return Path(path)


def export_weights(trainer: L.Trainer, checkpoint: Path, output_dir: Path, config: str) -> Path:
    """Writes `weights.ckpt` and `weights.safetensors` from `checkpoint` (rank 0; the others
    wait) and returns the first."""
    target = output_dir / WEIGHTS
    if trainer.is_global_zero:
        files = {name: (output_dir / name).read_text() for name in DATA_FILES
                 if (output_dir / name).is_file()}
        state = with_tied_names(read_state_dict(checkpoint), trainer.lightning_module)
        adapters = {k: v for k, v in state.items() if PARAMETRIZED in k and "original" not in k}
        if adapters:  # LoRA: the adapters alone, and the weights with them merged
            save_file({k: v.contiguous() for k, v in adapters.items()},
                      output_dir / ADAPTERS_FILE, metadata={"config": config})
            state = merged_state(state)
        extra = {"config": config, "tokenizer": files.get("tokenizer.json"),
                 "source": str(checkpoint)}
        torch.save({"state_dict": state, **extra, "data_files": files}, target)
        # safetensors refuses tensors that share memory (tied embeddings): store copies
        save_file({k: v.clone().contiguous() for k, v in state.items()},
                  output_dir / SAFE_WEIGHTS,
                  metadata={**{k: v for k, v in extra.items() if v is not None},
                            "data_files": json.dumps(files)})
    trainer.strategy.barrier()
    return target


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full float32 state dict of a checkpoint file, a `weights.safetensors` or a
    DeepSpeed ZeRO folder (whose consolidation keeps frozen parameters in their training
    precision).

    Raises:
        LmlabError: the file is corrupt or truncated, holds no state dict, or holds objects
            whose unpickling could run code.
    """
    if checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    elif checkpoint.suffix == ".safetensors":
        try:
            state = load_file(checkpoint)
        except (SafetensorError, OSError, ValueError) as err:
            raise corrupt(checkpoint, err) from None
    else:
        state = load_checkpoint(checkpoint).get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise LmlabError(f"{checkpoint} holds no state_dict: it is not a checkpoint of "
                             f"lmlab or Lightning; {instead(checkpoint)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_weights(task: L.LightningModule, path: Path, config: DictConfig | None = None
                 ) -> L.LightningModule:
    """`task` with the weights of `path` (any checkpoint `read_state_dict` reads).

    Raises:
        LmlabError: see `read_state_dict` and `check_fits` (`config`: the task's).
    """
    state = with_tied_names(read_state_dict(path), task)
    if not any(PARAMETRIZED in name for name in state):  # merged LoRA weights (or none)
        merge_adapters(task)
    check_fits(task, state, path, config)
    task.load_state_dict(state)
    return task


def with_tied_names(state: dict[str, torch.Tensor], module: torch.nn.Module
                    ) -> dict[str, torch.Tensor]:
    """`state` with every name under which `module` shares a tensor (tied embeddings) that
    it lacks: DeepSpeed's consolidation of a ZeRO checkpoint keeps some names of a tied
    matrix only."""
    names = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    state = dict(state)
    for aliases in names.values():
        present = next((name for name in aliases if name in state), None)
        if present is not None:
            for name in aliases:
                state.setdefault(name, state[present])
    return state


def check_fits(module: torch.nn.Module, state: dict, path: Path,
               config: DictConfig | None = None) -> None:
    """Refuses a state dict whose tensors are not the module's: lists the missing,
    unexpected and differently shaped ones, and the model and data keys whose values differ
    between `config` and the checkpoint's own config (its run's `.hydra/config.yaml`).

    Raises:
        LmlabError: the checkpoint does not fit the module.
    """
    own = module.state_dict()
    problems = [f"{k} {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems += [f"{k} missing" for k in own if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in own]
    if not problems:
        return
    message = f"{path} does not fit this model: {_few(problems)}"
    differ = config_differences(config, path) if config is not None else []
    if differ:
        message += f"; its run's config differs in {_few(differ)}"
    raise LmlabError(message + "; build the model with the config of the run that wrote it "
                     "(pass that run's folder or a checkpoint of this model's config)")


def config_differences(config: DictConfig, checkpoint: Path) -> list[str]:
    """`key: theirs -> ours` for every model and data key whose value differs between
    `config` and the saved config of the run that wrote `checkpoint` (none if not found)."""
    saved = next((p / ".hydra" / "config.yaml" for p in checkpoint.parents
                  if (p / ".hydra" / "config.yaml").is_file()), None)
    if saved is None:
        return []
    theirs, ours = (flatten(OmegaConf.to_container(c, resolve=False))
                    for c in (OmegaConf.load(saved), config))
    keys = sorted(k for k in set(theirs) | set(ours)
                  if k.startswith(("model.", "data.")) and theirs.get(k) != ours.get(k)
                  and not k.endswith(("_dir", "load_from")))
    return [f"{k}={theirs.get(k)} there, {ours.get(k)} here" for k in keys]


def _few(items: list[str]) -> str:
    more = len(items) - SHOWN_KEYS
    return ", ".join(items[:SHOWN_KEYS]) + (f" and {more} more" if more > 0 else "")


def unpack_data_files(weights: Path, folder: Path) -> bool:
    """Writes the data files that weights exported by a run carry (`weights.ckpt` or
    `weights.safetensors`, whatever their names now: its tokenizer and labels) into
    `folder`; False when they carry none (a Lightning checkpoint, or weights written before
    they were carried)."""
    if weights.suffix == ".safetensors":
        try:
            with safe_open(weights, "pt") as f:
                files = json.loads((f.metadata() or {}).get("data_files", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise corrupt(weights, err) from None
    else:
        content = load_checkpoint(weights, mmap=True)
        files = content.get("data_files") or ({"tokenizer.json": content["tokenizer"]}
                                              if content.get("tokenizer") else {})
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if name in DATA_FILES:  # every rank writes the same text: whole files, renamed
            partial = folder / f".{name}.{os.getpid()}"
            partial.write_text(text)
            os.replace(partial, folder / name)
    return bool(files)


def run_folder_of(path: Path) -> Path | None:
    """The run folder a checkpoint lies in (the nearest one above with a saved config)."""
    return next((p for p in path.parents if (p / ".hydra" / "config.yaml").is_file()), None)
