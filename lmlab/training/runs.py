"""A finished run, rebuilt: its saved config, its checkpoints, and its task with their
weights, for `lmlab.evaluate`, `lmlab.generate` and the benchmarks.

A run folder may come from elsewhere (shared, downloaded) or from an earlier version of
lmlab: its `_target_`s are renamed where lmlab's modules moved (`MOVED`), then checked
against the allowed ones (`lmlab.config.safety`) before anything is instantiated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpointing.io import SAFE_WEIGHTS, WEIGHTS
from lmlab.checkpointing.weights import load_weights
from lmlab.config import user_dir
from lmlab.config.cli import convert, did_you_mean
from lmlab.config.safety import check_targets
from lmlab.data.description import DataDescription
from lmlab.data.seq2seq import language_of, task_type_of
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError
from lmlab.config.schema import compose
from lmlab.interop.huggingface import is_pretrained_folder, weights_file
from lmlab.models.lora import merge_adapters
from lmlab.training.build import task_for, weights_come_later
from lmlab.training.kernels import DEFAULT_NODE, kernels_of

NAMES = ("best", "last", "weights")  # the checkpoints of a run, in the order the default tries
# Where the modules that saved run configs name moved, earlier name -> name now
MOVED = {"lmlab.models.seq2seq.": "lmlab.models.transformer_seq2seq.",
         "lmlab.kernels.": "lmlab.training.kernels.",
         "lmlab.throughput.progress_bar": "lmlab.training.callbacks.progress.progress_bar",
         "lmlab.throughput.": "lmlab.training.callbacks.throughput.",
         "lmlab.resume.AtomicCheckpointIO": "lmlab.checkpointing.io.AtomicCheckpointIO",
         "lmlab.resume.": "lmlab.checkpointing.exact_resume.",
         "lmlab.callbacks.InterruptCheckpoint":
             "lmlab.training.callbacks.interrupt.InterruptCheckpoint",
         "lmlab.callbacks.NumericalGuard": "lmlab.training.callbacks.numerics.NumericalGuard",
         "lmlab.callbacks.MovingAverage": "lmlab.training.callbacks.ema.MovingAverage",
         "lmlab.callbacks.TensorMemory": "lmlab.training.callbacks.memory.TensorMemory",
         "lmlab.loggers.": "lmlab.tracking.loggers."}


def renamed(target: str) -> str:
    """A `_target_` under its name now (see `MOVED`)."""
    old = next((o for o in MOVED if target.startswith(o)), None)
    return target if old is None else MOVED[old] + target[len(old):]


def rename_targets(node) -> None:
    """Renames, in place, every `_target_` of a config whose module moved."""
    if isinstance(node, DictConfig):
        for key in node:
            value = node._get_node(key)
            if key == "_target_" and isinstance(node[key], str):
                node[key] = renamed(node[key])
            elif isinstance(value, DictConfig):
                rename_targets(value)


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The saved config of a run, with its paths pointed back at `run_dir` and
    `overrides` (`key=value`, see `override`) applied; `user_dir=FOLDER` among them points
    the run at its user directory's new place before its classes are checked. A Hugging
    Face model folder reads as a run of `model=hf_causal_lm` on the embedded corpus."""
    if is_pretrained_folder(run_dir):
        return pretrained_config(run_dir, overrides)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise LmlabError(f"{run_dir} is not an lmlab run folder (no .hydra/config.yaml); "
                         "pass the folder that `python -m lmlab.run` printed as `run files`")
    cfg = OmegaConf.load(saved)
    moved = [arg for arg in overrides if arg.startswith(f"{user_dir.KEY}=")]
    if moved:
        cfg[user_dir.KEY] = str(Path(moved[-1].partition("=")[2]).expanduser().resolve())
        overrides = [arg for arg in overrides if arg not in moved]
    rename_targets(cfg)  # saved by an earlier layout of lmlab's modules
    check_targets(cfg, saved)  # a run folder may come from elsewhere
    cfg.paths.output_dir = str(run_dir)
    cfg.setdefault("kernels", DEFAULT_NODE)  # a run saved before the node: its defaults
    for arg in overrides:
        override(cfg, arg)
    return cfg


def pretrained_config(folder: Path, overrides: list[str] = ()) -> DictConfig:
    """The config of a Hugging Face folder taken as a run: its weights, its tokenizer, the
    embedded LM corpus (`data.corpus=...` among `overrides` names another); what a command
    writes goes under the folder."""
    cfg = compose(["model=hf_causal_lm", "data=stdlib_source",
                   f"model.pretrained={folder.resolve()}"])
    cfg.paths.output_dir = str(folder)
    OmegaConf.resolve(cfg)  # as a run's saved config is: an override then sees plain values
    for arg in overrides:
        override(cfg, arg)
    return cfg


def override(cfg: DictConfig, arg: str) -> None:
    """Sets `key=value` in an untyped saved config, typed by the value it replaces: a string
    keeps the text exactly, a number or boolean is converted; a null value, or a key added
    with `+key=value`, is read as null, true/false or a number when it looks like one.

    Raises:
        LmlabError: an unknown key (with the closest one), a group of keys or a list, or a
            value of the wrong type.
    """
    key, _, text = arg.partition("=")
    add, key = key.startswith("+"), key.lstrip("+")
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        raise LmlabError(f"the run's config has no group of keys {parent_key!r}")
    if leaf not in parent and not add:
        hint = did_you_mean(leaf, list(parent), f"{parent_key}." if parent_key else "")
        raise LmlabError(f"the run's config has no key {key!r}{hint}; add one with "
                         f"+{key}=...")
    current = OmegaConf.to_container(parent, resolve=False).get(leaf)
    if isinstance(current, dict):
        raise LmlabError(f"{key} is a group of keys; set one of them, as {key}.NAME=VALUE")
    if isinstance(current, list):
        raise LmlabError(f"{key} holds a list, which the command line of evaluate does not set")
    parent[leaf] = _read(key, text, current)


def _read(key: str, text: str, current: object) -> object:
    if current is None:  # no type to go by
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"null": None, "true": True, "false": False}.get(text, text)
    return convert(key, text, type(current))


def run_checkpoints(run_dir: Path) -> dict[str, Path]:
    """The checkpoints `run_dir` holds (files, or DeepSpeed folders), by name, in the order
    the default tries them; `weights` is `weights.ckpt`, else `weights.safetensors`."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)  # newest last
    weights = run_dir / WEIGHTS
    paths = {"best": best[-1] if best else None, "last": folder / "last.ckpt",
             "weights": weights if weights.exists() else run_dir / SAFE_WEIGHTS}
    return {name: path for name, path in paths.items() if path and path.exists()}


def find_checkpoint(run_dir: Path, ckpt: str | None,
                    command: Callable[[str | None, Path | None], str]) -> Path:
    """The checkpoint `ckpt` names in `run_dir`: `best`, `last`, `weights` or a path; None
    takes the best, else the last, else `weights.ckpt`, and says which on stderr.

    Args:
        run_dir: the run's folder.
        ckpt: a name, a path, or None.
        command: the command line that uses the checkpoint of a name and path (None, None:
            the default one), shown when `ckpt` is absent.

    Raises:
        LmlabError: `ckpt` does not exist; names the checkpoints there are, with the command.
    """
    if is_pretrained_folder(run_dir):
        return weights_file(run_dir)
    found = run_checkpoints(run_dir)
    if not ckpt and found:
        name, path = next(iter(found.items()))
        skipped = " or ".join(NAMES[:NAMES.index(name)])
        sys.stderr.write(f"checkpoint: {path} ({name}"
                         + (f"; the run has no {skipped} checkpoint)\n" if skipped else ")\n"))
        return path
    path = found.get(ckpt) if ckpt in NAMES else Path(ckpt) if ckpt else None
    if path is not None and path.exists():
        return path
    if not found:
        raise LmlabError(f"{run_dir} holds no checkpoint (no checkpoints/best-*.ckpt, "
                         f"checkpoints/last.ckpt or {WEIGHTS}): it stopped before saving one")
    missing = f"no {ckpt} checkpoint in {run_dir}" if ckpt in NAMES else f"{ckpt} does not exist"
    there = ", ".join(str(p.relative_to(run_dir)) for p in found.values())
    name, path = next(iter(found.items()))
    raise LmlabError(f"{missing}; the run has {there}: run `{command(name, path)}`, or "
                     f"`{command(None, None)}` for the best, else the last, else {WEIGHTS}")


def run_folder(path: Path) -> Path:
    """The run folder of `path`: itself, or the nearest folder above it with a saved config."""
    return next((p for p in (path, *path.parents) if (p / ".hydra").is_dir()), path)


def run_description(run_dir: Path, cfg: DictConfig) -> DataDescription:
    """What a task needs of a run's data, from the files it saved: its tokenizer (one, or
    one a side), its labels, and how its outputs are scored."""
    sides = [run_dir / f"{side}_tokenizer.json" for side in ("source", "target")]
    labels = run_dir / "labels.json"
    data = cfg.data
    facts = {"classes": tuple(json.loads(labels.read_text())["labels"]) if labels.is_file()
             else ()}
    if get_class(cfg.model._target_).kind == "seq2seq":
        facts.update(task_type=task_type_of(data.get("corpus"), data.get("task_type")),
                     target_lang=language_of(data.get("corpus"), data.get("target_lang")))
    if all(p.is_file() for p in sides):
        source, target = (Tokenizer.load(p) for p in sides)
        return DataDescription(target, source_tokenizer=source, target_tokenizer=target, **facts)
    if is_pretrained_folder(run_dir):  # its special tokens, as training reads them
        return DataDescription(Tokenizer.pretrained(run_dir), **facts)
    return DataDescription(Tokenizer.load(run_dir / "tokenizer.json"), **facts)


def load_run(ckpt: str, command: str, changes: dict | None = None, device: str = "cpu",
             overrides: list[str] = ()):
    """The task of a run (its folder, or a checkpoint file in one) with the checkpoint's
    weights, in eval mode on `device`, its data's description and its config; `changes` are
    model keys set first (a search setting, ...). Sets the run's kernel choices in this
    process (`lmlab.training.kernels`).

    Args:
        ckpt: a run folder (its best checkpoint, else its last, else its weights) or a
            checkpoint file in one.
        command: the command that takes `ckpt=`, for the hint of a missing checkpoint.
        changes: model keys and values.
        device: where the task goes.
        overrides: `key=value`s of the saved config (see `load_run_config`).
    """
    path = Path(ckpt)
    run_dir = run_folder(path)
    cfg = load_run_config(run_dir, overrides)
    cfg.model = OmegaConf.merge(cfg.model, changes or {})
    checkpoint = find_checkpoint(run_dir, None if path == run_dir else str(path),
                                 lambda _, found: f"{command} ckpt={found or run_dir}")
    description = run_description(run_dir, cfg)
    if is_pretrained_folder(checkpoint.parent):  # a pretrained net reads its folder's weights
        task = task_for(cfg, description)
    else:
        task = load_weights(task_for(weights_come_later(cfg, run_dir), description), checkpoint,
                            cfg)
    merge_adapters(task.net)  # LoRA's: one weight a layer, as decoding wants
    kernels_of(cfg).apply()
    return task.to(device).eval(), description, cfg
