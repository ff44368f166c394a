"""The run's config: a typed schema for its top level, and the pre-flight checks.

Hydra already rejects an unknown key or group given on the command line at compose time;
the schema below does the same for top-level keys written in YAML (experiments included),
and `check_config` checks every `_target_` node's keys against its constructor, plus the
hardware, precision and batch combination, before anything is built. All problems are
reported together, each with its fix.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.data.corpora import CLASSIFICATION_CORPORA, LM_CORPORA, SEQ2SEQ_CORPORA
from lmlab.data.seq2seq import metric_of, task_type_of
from lmlab.errors import ConfigError
from lmlab.parallel import specs
from lmlab.parallel.specs import strategy_problems


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
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    kernels: Any = None
    paths: Any = None


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str] = ()) -> DictConfig:
    """The run config with command-line `overrides`, as `python -m lmlab.run` composes it
    (outside a Hydra app: for tests, benchmarks and notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def register_schema() -> None:
    """The top-level schema, and the `div` resolver (data-parallel size = devices / TP)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))


def check_config(cfg: DictConfig) -> None:
    """Raises a `ConfigError` listing every problem found in `cfg`, or returns."""
    missing = _missing_keys(cfg)
    if missing:  # nothing else can be checked while values are absent
        raise ConfigError(missing)
    problems = list(_target_problems(cfg, ""))
    problems += _hardware_problems(cfg.trainer)
    problems += _data_problems(cfg.data)
    problems += _kind_problems(cfg)
    problems += strategy_problems(cfg)
    problems += _monitor_problems(cfg)
    problems += _seq2seq_problems(cfg)
    problems += _lossy_tokenizer_problems(cfg)
    problems += _slurm_problems(cfg.trainer)
    problems += _resume_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _target_problems(node: Any, where: str):
    """Unknown constructor arguments and unimportable targets, anywhere in the tree."""
    if isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _target_problems(child, f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        yield from _unknown_arguments(node, where)
    for key in node:
        if not str(key).startswith("_"):
            yield from _target_problems(node._get_node(key), f"{where}.{key}".lstrip("."))


def _unknown_arguments(node: DictConfig, where: str):
    try:
        target = import_object(node._target_)
    except (ImportError, AttributeError) as err:
        yield f"{where}._target_: cannot import {node._target_!r} ({err})"
        return
    parameters = accepted_arguments(target)
    if parameters is None:
        return
    for key in node:
        if not str(key).startswith("_") and key not in parameters:
            close = difflib.get_close_matches(str(key), list(parameters), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else \
                f"; it takes {', '.join(list(parameters)[:12])}"
            yield f"{where}.{key}: {node._target_} has no argument {key!r}{hint}"


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
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        parent, _, cls = module.rpartition(".")  # a method such as pkg.Class.method
        return getattr(getattr(importlib.import_module(parent), cls), name)


def _missing_keys(cfg: DictConfig) -> list[str]:
    """Mandatory values (`???`) that the command line left unset."""
    return [f"{key} is required and has no value; set it on the command line, e.g. "
            f"{key}=..." for key in sorted(OmegaConf.missing_keys(cfg))]


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


def _monitor_problems(cfg: DictConfig) -> list[str]:
    if cfg.monitor_mode not in (None, "max", "min"):
        return [f"monitor_mode must be max or min, not {cfg.monitor_mode!r}"]
    inferred = monitor_mode(cfg.monitor) if cfg.monitor else None
    if cfg.monitor and cfg.monitor_mode is None and inferred is None:
        return [f"monitor={cfg.monitor}: cannot tell whether higher or lower is better; "
                "set monitor_mode=max or monitor_mode=min"]
    if cfg.monitor_mode and inferred and cfg.monitor_mode != inferred:
        return [f"monitor_mode={cfg.monitor_mode} would keep the worst {cfg.monitor}; "
                f"use monitor_mode={inferred}, or leave it unset"]
    return []


def _seq2seq_problems(cfg: DictConfig) -> list[str]:
    """A sequence-to-sequence net that shares embeddings needs one joint vocabulary, one that
    copies needs shared embeddings, n-gram blocking needs n >= 0, and the position table must
    hold the longest source and target."""
    net, data, problems = cfg.model.get("net") or {}, cfg.data, []
    if net.get("share_embeddings") and data.get("joint_vocab") is False:
        problems.append("model.net.share_embeddings=true needs one joint vocabulary; set "
                        "data.joint_vocab=true, or model.net.share_embeddings=false")
    if net.get("copy") and not net.get("share_embeddings"):
        problems.append("model.net.copy=true copies source ids as output ids: set "
                        "model.net.share_embeddings=true and data.joint_vocab=true")
    if (cfg.model.get("no_repeat_ngram_size") or 0) < 0:
        problems.append(f"model.no_repeat_ngram_size={cfg.model.no_repeat_ngram_size}: set 0 "
                        "(off) or n > 0 (no output repeats an n-gram)")
    table = net.get("max_length")
    for key in ("max_source_length", "max_target_length"):
        if isinstance(table, int) and isinstance(data.get(key), int) and data[key] > table:
            problems.append(f"data.{key}={data[key]} is longer than the model's position "
                            f"table (model.net.max_length={table}); raise model.net.max_length")
    return problems


def _lossy_tokenizer_problems(cfg: DictConfig) -> list[str]:
    """A sequence-to-sequence target tokenizer that cannot give back the text it encodes:
    even a perfect output would score below 100 against the references (BLEU compares
    case; ROUGE folds it)."""
    task = _importable(cfg.model.get("_target_"))
    if getattr(task, "kind", None) != "seq2seq":
        return []
    data = cfg.data
    key = "data.target_tokenizer" if data.get("target_tokenizer") is not None \
        and not data.get("joint_vocab") else "data.tokenizer"
    node = OmegaConf.select(cfg, key)
    spec = _importable(node.get("_target_")) if node is not None else None
    if spec is None or not hasattr(spec, "loses"):
        return []
    metric = metric_of(cfg.model.get("metric"),
                       task_type_of(data.get("corpus"), data.get("task_type")))
    lost = instantiate(node).loses(case_matters=metric == "bleu")
    if lost is None:
        return []
    case_only = lost == "it lowercases"
    return [f"{key}: {spec.__name__} does not give back what it encodes ({lost}), so even a "
            f"perfect output would score below 100 {metric.upper()} against the references; "
            + (f"set {key}.lowercase=false" if case_only else
               "use data/tokenizer=bpe (byte-level BPE gives back any text)")]


def _resume_problems(cfg: DictConfig) -> list[str]:
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        return [f"resume={resume} is not an option; use resume=auto (continue this run "
                "folder's newest checkpoint), or ckpt_path=PATH"]
    if resume and cfg.ckpt_path is not None:
        return [f"resume=auto and ckpt_path={cfg.ckpt_path} both say where to resume from; "
                "keep one"]
    return []


def _hardware_problems(trainer: DictConfig) -> list[str]:
    accelerator, precision = specs.accelerator(trainer), str(trainer.get("precision", "32-true"))
    problems = []
    if accelerator == "gpu" and not torch.cuda.is_available():
        problems.append("a GPU was requested (trainer.accelerator) but CUDA is not available; "
                        "use strategy=cpu, or run on a machine with a GPU")
    devices = trainer.get("devices", "auto")
    if accelerator == "gpu" and torch.cuda.is_available() and str(devices).isdigit() \
            and int(devices) > torch.cuda.device_count():
        problems.append(f"trainer.devices={devices} but this machine has "
                        f"{torch.cuda.device_count()} GPU(s); lower trainer.devices")
    if accelerator == "cpu" and precision.startswith("16"):
        problems.append(f"precision={precision} is not supported on CPU (Lightning silently "
                        "turns 16-mixed into bf16, and 16-true diverges); use precision=bf16-mixed "
                        "or precision=32-true")
    return problems


def _slurm_problems(trainer: DictConfig) -> list[str]:
    """Under `srun`, a trainer layout that is not the job's (Lightning stops on it later,
    with a traceback); `sbatch --nodes` and `--ntasks-per-node` say what it must be."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    problems = []
    for key, variable, option in (("devices", "SLURM_NTASKS_PER_NODE", "--ntasks-per-node"),
                                  ("num_nodes", "SLURM_NNODES", "--nodes")):
        job, run = os.environ.get(variable), str(trainer.get(key))
        if job is not None and job.isdigit() and run.isdigit() and int(job) != int(run):
            problems.append(f"trainer.{key}={run} but the SLURM job has {option}={job} "
                            f"(one task a device); set trainer.{key}={job}")
    return problems


def _data_problems(data: DictConfig) -> list[str]:
    """A named corpus that is not under the data directory."""
    files = {**{name: c.all_files() for name, c in
                {**CLASSIFICATION_CORPORA, **SEQ2SEQ_CORPORA}.items()},
             **{name: [path] for name, path in LM_CORPORA.items()}}
    corpus = data.get("corpus")
    if corpus not in files:
        return []
    data_dir = Path(data.data_dir)
    missing = [f for f in files[corpus] if not (data_dir / f).is_file()]
    if not missing:
        return []
    return [f"corpus {corpus!r} not found under data directory {str(data_dir)!r} (missing "
            f"{missing[0]}); point LMLAB_DATA_DIR or paths.data_dir at the folder holding it"]


def _importable(path: str | None):
    try:
        return import_object(path) if path else None
    except (ImportError, AttributeError):
        return None  # reported by _target_problems


def _kind_problems(cfg: DictConfig) -> list[str]:
    """A task needs data of its kind: classification data cannot train a language model."""
    task, data = _importable(cfg.model._target_), _importable(cfg.data._target_)
    task_kind, data_kind = getattr(task, "kind", None), getattr(data, "kind", None)
    if task_kind and data_kind and task_kind != data_kind:
        return [f"the model ({task.__name__}) needs {task_kind} data, but the data config "
                f"({data.__name__}) gives {data_kind} data; pick a data= option of kind "
                f"{task_kind} (see the README's Data section)"]
    return []


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
