"""The pre-flight checks: every problem of a composed config, before anything is built.

Hydra already rejects an unknown key or group given on the command line at compose time;
the schema (`lmlab.config.schema`) does the same for top-level keys written in YAML
(experiments included), and `check_config` checks every `_target_` node's keys against its
constructor, plus the hardware, precision and batch combination, before anything is built.
All problems are reported together, each with its fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.config.cli import closest
from lmlab.config.schema import accepted_arguments, import_object, monitor_mode
from lmlab.data.corpora import CLASSIFICATION_CORPORA, LM_CORPORA, SEQ2SEQ_CORPORA
from lmlab.data.seq2seq import metric_of, task_type_of
from lmlab.errors import ConfigError, LmlabError
from lmlab.parallel import specs
from lmlab.parallel.specs import strategy_problems


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
    problems += _lora_problems(cfg)
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
    except LmlabError as err:
        yield f"{where}._target_: {err}"
        return
    parameters = accepted_arguments(target)
    if parameters is None:
        return
    for key in node:
        if not str(key).startswith("_") and key not in parameters:
            close = closest(str(key), parameters)
            hint = f"; did you mean {close!r}?" if close else \
                f"; it takes {', '.join(list(parameters)[:12])}"
            yield f"{where}.{key}: {node._target_} has no argument {key!r}{hint}"


def _missing_keys(cfg: DictConfig) -> list[str]:
    """Mandatory values (`???`) that the command line left unset."""
    return [f"{key} is required and has no value; set it on the command line, e.g. "
            f"{key}=..." for key in sorted(unset(OmegaConf.to_container(cfg, resolve=False)))]


def unset(node, where: str = ""):
    """The dotted keys of `???` values, interpolations left unresolved (one pointing at an
    unset key would fail before naming it)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if value == "???":
            yield path
        yield from unset(value, path)


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


def _lora_problems(cfg: DictConfig) -> list[str]:
    """LoRA under tensor parallelism: the plan splits plain linear layers, and an adapted
    layer's weight is a parametrization."""
    lora = cfg.model.get("lora") or {}
    strategy = cfg.trainer.get("strategy")
    parallel = strategy.get("tensor_parallel_size", 1) if isinstance(strategy, DictConfig) else 1
    if not lora.get("rank") or int(parallel) <= 1:
        return []
    return [f"model.lora.rank={lora.rank} with tensor parallelism (tensor_parallel_size="
            f"{parallel}): LoRA's adapted layers are not split by the tensor-parallel plan; "
            "use strategy=fsdp2 or ddp, or model.lora.rank=0"]


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
    except LmlabError:
        return None  # reported by _target_problems


def _kind_problems(cfg: DictConfig) -> list[str]:
    """A task needs data of its kind: classification data cannot train a language model."""
    task, data = _importable(cfg.model._target_), _importable(cfg.data._target_)
    task_kind, data_kind = getattr(task, "kind", None), getattr(data, "kind", None)
    if task_kind and data_kind and task_kind != data_kind:
        return [f"the model ({task.__name__}) needs {task_kind} data, but the data config "
                f"({data.__name__}) gives {data_kind} data; pick a data= option of kind "
                f"{task_kind} (docs/guide.md, Data)"]
    return []
