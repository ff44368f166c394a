"""What a run is, before anything is built: the typed top level of its config, composing it
as `python -m lmlab.run` does, and the helpers that read it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import LmlabError


@dataclass
class RunConfig:
    """Top-level keys of a run; the groups below them are checked by `check_config`."""

    task_name: str = "train"  # names the run in logs and loggers
    seed: int = 42  # seeds Python, NumPy, torch and the data order
    ckpt_path: str | None = None  # resume training from this checkpoint; last: this run's newest
    resume: str | None = None  # auto: continue this run folder's newest checkpoint, if any
    monitor: str | None = None  # metric that picks the best checkpoint; None: the task's
    monitor_mode: str | None = None  # max or min; None: the task's
    dry_run: bool = False  # check and print the config, then stop
    tags: Any = None  # free-form labels for loggers
    user_dir: str | None = None  # a folder of your own modules and conf/ (lmlab/config/user_dir.py)
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    kernels: Any = None
    paths: Any = None


CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose(overrides: list[str] = ()) -> DictConfig:
    """The run config with command-line `overrides`, as `python -m lmlab.run` composes it
    (outside a Hydra app: for tests, benchmarks and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def register_schema() -> None:
    """The top-level schema, and the `div` resolver (data-parallel size = devices / TP)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))


def accepted_arguments(target) -> list[str] | None:
    """The keyword arguments `target` takes; None if it takes any. A target that forwards
    `**kwargs` names where they go in `passes_to` (callables, e.g. a strategy factory's
    strategy class)."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    names = [n for n, p in parameters.items() if p.kind is not p.VAR_KEYWORD]
    if len(names) == len(parameters):
        return names
    if hasattr(target, "passes_to"):  # the named arguments of each, together
        return names + [n for t in target.passes_to for n, p in
                        inspect.signature(t).parameters.items() if p.kind is not p.VAR_KEYWORD]
    return None


def import_object(path: str):
    """The class or function a dotted `_target_` names (`pkg.module.Class`, or a method
    such as `pkg.Class.method`).

    Raises:
        LmlabError: one line naming the target and why it does not import (no such module
            or name, or an error raised by the module itself), with the fix.
    """
    module, _, name = path.rpartition(".")
    try:
        if not module:
            raise ImportError(f"{path!r} names no module; write module.Name")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            parent, _, cls = module.rpartition(".")  # a method such as pkg.Class.method
            if not parent:
                raise
            return getattr(getattr(importlib.import_module(parent), cls), name)
    except Exception as err:  # a module's own error (SyntaxError, NameError ...) too
        where = f" ({err.filename}:{err.lineno})" if isinstance(err, SyntaxError) else ""
        raise LmlabError(f"cannot import {path!r}: {type(err).__name__}: {err}{where}; fix the "
                         "name, or put its module in a folder given as user_dir=FOLDER "
                         "(docs/extending.md)") from None


LOWER_IS_BETTER = ("loss", "ppl", "bpc", "perplexity", "error", "wer", "cer")
HIGHER_IS_BETTER = ("acc", "f1", "bleu", "rouge", "precision", "recall", "auroc", "mfu")


def monitor_mode(metric: str) -> str | None:
    """`min` or `max` for a metric whose name says which is better; None if it does not."""
    name = metric.rsplit("/", 1)[-1].lower()
    if name.startswith(LOWER_IS_BETTER):
        return "min"
    if name.startswith(HIGHER_IS_BETTER):
        return "max"
    return None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Nested dicts as `a.b.c` keys; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                    else {f"{prefix}{key}": value})
    return flat
