"""Per-device memory of a run under its strategy: estimated before launch, measured during.

The estimate (`dry_run=true`) counts the model's parameters, gradients and optimizer
state at the precision's width, divides what the strategy shards among the data-parallel
ranks (and the layers of the tensor-parallel plan among the tensor-parallel ones), moves
what it offloads to CPU memory, and measures activations as the bytes autograd saves for
backward in one forward pass of a per-device batch.
"""

from __future__ import annotations

import fnmatch
import gc
import warnings

import torch
from omegaconf import DictConfig
from torch import nn

from lmlab.parallel.sharding import VOCABULARY_ROLES
from lmlab.parallel.specs import PARTS, describe


def optimizer_states(optimizer: DictConfig) -> int:
    """Tensors of optimizer state kept per parameter tensor."""
    name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1].lower()
    if "adam" in name:
        return 2  # first and second moments
    if name == "sgd":
        return 1 if optimizer.get("momentum") else 0
    return 2


def parameter_counts(net: nn.Module, tp: int, loss_parallel: bool = False) -> tuple[int, int]:
    """(all parameters, parameters in layers the tensor-parallel plan splits when tp > 1:
    its colwise and rowwise layers, and under `loss_parallel` its embedding and output)."""
    plan = (getattr(net, "tensor_parallel_plan", None) or {}) if tp > 1 else {}
    roles = ("colwise", "rowwise") + (VOCABULARY_ROLES if loss_parallel else ())
    patterns = [pattern for pattern, role in plan.items() if role in roles]
    split = {id(p): p.numel() for name, module in net.named_modules()
             if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
             for p in module.parameters(recurse=False)}  # a tied weight once
    return sum(p.numel() for p in net.parameters()), sum(split.values())


def bytes_per_parameter(cfg: DictConfig) -> dict[str, int]:
    """Bytes each parameter costs in each part, by precision and strategy. DeepSpeed keeps a
    float32 master copy of the weights with the optimizer state, even in float32 training."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    states = optimizer_states(cfg.model.optimizer)
    if describe(cfg.trainer).master_weights:
        width = 2 if precision.startswith(("bf16", "16")) else 4
        return {"parameters": width, "gradients": width, "optimizer": 4 * (states + 1)}
    width = 2 if precision in ("bf16-true", "16-true") else 4
    return {"parameters": width, "gradients": width, "optimizer": width * states}


def estimate(cfg: DictConfig, task, batch: dict) -> dict[str, float]:
    """Bytes per device of each part, plus `activations`, `buffers`, `total` and
    `cpu_offloaded` (in CPU memory instead), for a per-device `batch`."""
    spec = describe(cfg.trainer)
    tp = spec.tensor_parallel
    total, split = parameter_counts(task.net, tp, bool(spec.arguments.get("loss_parallel")))
    per_rank = (total - split) + split / tp
    widths = bytes_per_parameter(cfg)
    result = dict.fromkeys((*PARTS, "cpu_offloaded"), 0.0)
    for part in PARTS:
        size = per_rank * widths[part] / (spec.shard_group if part in spec.sharded else 1)
        result["cpu_offloaded" if part in spec.offloaded else part] += size
    precision = str(cfg.trainer.get("precision", "32-true"))
    result["activations"] = activation_bytes(task, batch) / (2 if "bf16" in precision else 1)
    result["buffers"] = float(spec.bucket_elements * widths["gradients"])
    result["total"] = sum(result[k] for k in (*PARTS, "activations", "buffers"))
    return result


def activation_bytes(task, batch: dict) -> int:
    """Bytes autograd saves for backward in one training forward of `batch` (fp32)."""
    parameters = {p.untyped_storage().data_ptr() for p in task.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    task.train()
    with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        warnings.simplefilter("ignore")  # self.log outside a trainer
        task.step(batch, "train")
    return sum(saved.values())


def local_batch(batch: dict, size: int) -> dict:
    """The first `size` examples of a collated batch."""
    return {k: v[:size] if isinstance(v, torch.Tensor) and v.dim() else v
            for k, v in batch.items()}


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python in this process, and of
    the parameters' gradients (which autograd makes without a Python object). Garbage is
    collected first: a tensor held only by a reference cycle is not live, but is reachable
    until the collector happens to run (a whole parameter copy, seen under ZeRO-2)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
            continue
        grad = obj.grad if isinstance(obj, nn.Parameter) else None
        for tensor in (obj, grad) if grad is not None else (obj,):
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
