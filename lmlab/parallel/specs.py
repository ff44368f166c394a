"""One description per strategy: what it shards and offloads, how its checkpoints hold the
training state, its process mesh, and what it needs before launch.

Every other module (the pre-flight checks, the memory estimate, resume planning, the dry
run) asks `describe(cfg.trainer)` instead of reading the strategy's `_target_` itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.parallel.sharding import SWITCH_ROLES

PARTS = ("parameters", "gradients", "optimizer")
# By the last name of the strategy's `_target_` (lmlab's factories or Lightning's classes).
KINDS = {"fsdp": "fsdp", "FSDPStrategy": "fsdp", "deepspeed": "deepspeed",
         "DeepSpeedStrategy": "deepspeed", "ModelParallelStrategy": "model_parallel",
         "model_parallel": "model_parallel"}
NAMED = {"fsdp": "fsdp", "deepspeed": "deepspeed"}  # Lightning's names: fsdp, deepspeed_stage_3
HYBRID = ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")  # FSDP modes that replicate across nodes


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy does with the model's state, on how many processes.

    Attributes:
        kind: `replicated` (one device, DDP), `fsdp`, `model_parallel` (FSDP2 and tensor
            parallel) or `deepspeed`.
        world: processes in all (devices x nodes).
        tensor_parallel: processes that split each layer; the rest is data parallelism.
        shard_group: data-parallel processes that divide the sharded parts among them (all
            of them, except in the hybrid FSDP modes: the devices of one node).
        sharded: parts of the training state divided among the shard group.
        offloaded: parts kept in CPU memory instead of on the device.
        master_weights: keeps a float32 copy of the weights with the optimizer state.
        bucket_elements: elements of gradient-reduction buffer allocated up front.
        arguments: the strategy's config node (empty for a named strategy such as `auto`).
    """

    kind: str
    world: int
    tensor_parallel: int
    shard_group: int
    sharded: frozenset[str]
    offloaded: frozenset[str]
    master_weights: bool
    bucket_elements: int
    arguments: DictConfig

    @property
    def data_parallel(self) -> int:
        return max(1, self.world // self.tensor_parallel)

    @property
    def checkpoint_family(self) -> str:
        """Checkpoints resume exactly only within one family: DeepSpeed's per-rank shards
        also depend on the stage and the number of processes."""
        if self.kind == "deepspeed":
            return f"deepspeed stage {self.arguments.get('stage')} on {self.world} processes"
        return self.kind


def resolve_accelerator(accelerator: str) -> str:
    """`gpu`, `cpu`, ... for a trainer's accelerator; `auto` is the GPU if there is one."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


def accelerator(trainer: DictConfig) -> str:
    return resolve_accelerator(str(trainer.get("accelerator", "auto")))


def world_size(trainer: DictConfig) -> int:
    """Processes the trainer will start; `auto` devices count as 1 on CPU, all GPUs on GPU."""
    devices = trainer.get("devices", "auto")
    if devices in ("auto", -1, "-1"):
        count = torch.cuda.device_count() if accelerator(trainer) == "gpu" else 1
    elif isinstance(devices, (list, ListConfig)):
        count = len(devices)
    elif "," in str(devices):  # "0,1": a list of device indices
        count = len([d for d in str(devices).split(",") if d.strip()])
    else:
        count = int(devices)
    return max(count, 1) * int(trainer.get("num_nodes", 1))


def describe(trainer: DictConfig) -> StrategySpec:
    """The `StrategySpec` of a trainer config."""
    strategy = trainer.get("strategy")
    arguments = strategy if isinstance(strategy, DictConfig) else OmegaConf.create()
    kind = _kind(strategy)
    if kind == "deepspeed" and isinstance(strategy, str) and strategy[-1].isdigit():
        arguments = OmegaConf.create({"stage": int(strategy[-1])})  # deepspeed_stage_3
    sharded, offloaded = _sharding(kind, arguments)
    bucket = 0
    if kind == "deepspeed" and arguments.get("stage") == 3:
        bucket = int(arguments.get("reduce_bucket_size", 200_000_000))
    world, tp = world_size(trainer), int(arguments.get("tensor_parallel_size", 1))
    group = max(1, world // tp)
    if kind == "fsdp" and arguments.get("sharding_strategy") in HYBRID:
        group = max(1, world // int(trainer.get("num_nodes", 1)))
    return StrategySpec(kind=kind, world=world, tensor_parallel=tp, shard_group=group,
                        sharded=frozenset(sharded), offloaded=frozenset(offloaded),
                        master_weights=kind == "deepspeed", bucket_elements=bucket,
                        arguments=arguments)


def _kind(strategy) -> str:
    if isinstance(strategy, DictConfig):
        return KINDS.get(str(strategy.get("_target_", "")).rsplit(".", 1)[-1], "replicated")
    name = str(strategy or "")
    return next((kind for prefix, kind in NAMED.items() if name.startswith(prefix)),
                "replicated")


def _sharding(kind: str, arguments: DictConfig) -> tuple[set[str], set[str]]:
    if kind == "model_parallel":
        return set(PARTS), set()
    if kind == "fsdp":
        mode = str(arguments.get("sharding_strategy", "FULL_SHARD"))
        by_mode = {"NO_SHARD": set(), "SHARD_GRAD_OP": {"gradients", "optimizer"},
                   "_HYBRID_SHARD_ZERO2": {"gradients", "optimizer"}}
        return by_mode.get(mode, set(PARTS)), set()
    if kind == "deepspeed":
        sharded = set(PARTS[3 - int(arguments.get("stage", 2)):])
        offloaded = {part for part, key in [("optimizer", "offload_optimizer"),
                                            ("parameters", "offload_parameters")]
                     if arguments.get(key)}
        return sharded, offloaded
    return set(), set()


def strategy_problems(cfg: DictConfig) -> list[str]:
    """What the chosen strategy needs that the config or this machine lacks."""
    spec = describe(cfg.trainer)
    if spec.arguments.get("start_method") in ("spawn", "forkserver"):
        return [f"strategy=ddp_spawn (start_method={spec.arguments['start_method']}) is not "
                "offered: use strategy=ddp, which starts one process per device as well"]
    problems = _mesh_problems(spec, cfg)
    if spec.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed is not installed; install it with "
                        "pip install -e \".[deepspeed]\" (or pick strategy=fsdp or fsdp2)")
    if spec.kind == "fsdp" and spec.arguments.get("cpu_offload") \
            and accelerator(cfg.trainer) == "cpu":
        problems.append("trainer.strategy.cpu_offload=true needs a GPU (FSDP pins the offloaded "
                        "memory); drop it on CPU, where everything already is in CPU memory")
    if spec.kind == "fsdp" and spec.arguments.get("sharding_strategy") in HYBRID \
            and not str(cfg.trainer.get("devices")).isdigit():
        problems.append("the hybrid FSDP modes shard over the devices of each node and need "
                        "their number: set trainer.devices=N")
    problems += _averaging_problems(spec, cfg)
    if cfg.model.get("compile") and spec.kind in ("fsdp", "deepspeed"):
        problems.append(f"model.compile=true does not work under this strategy ({spec.kind}: "
                        "it flattens or partitions the parameters the compiled graph reads); "
                        "use strategy=fsdp2, ddp or tp, or model.compile=false")
    batch = cfg.data.get("batch_size")
    if isinstance(batch, int) and batch % spec.data_parallel:
        dp = spec.data_parallel
        problems.append(f"data.batch_size={batch} is the global batch and must divide evenly "
                        f"among {dp} data-parallel processes; use a multiple of {dp}")
    return problems


def _averaging_problems(spec: StrategySpec, cfg: DictConfig) -> list[str]:
    """Lightning's weight averaging (`callbacks=ema`) copies values between the model's own
    parameters and a whole copy of them: FSDP and FSDP2 flatten or shard those parameters,
    DeepSpeed keeps its own master weights, and a half-precision copy rounds each update
    of (1 - decay) away."""
    from lightning.pytorch.callbacks import WeightAveraging

    found = [name for name, node in (cfg.get("callbacks") or {}).items() if node
             and isinstance(target := _importable(node.get("_target_")), type)
             and issubclass(target, WeightAveraging)]
    if not found:
        return []
    problems, precision = [], str(cfg.trainer.get("precision"))
    if spec.kind in ("fsdp", "model_parallel", "deepspeed"):
        problems.append(f"callbacks.{found[0]} averages the model's own parameters, which "
                        f"this strategy ({spec.kind}) wraps or shards; use strategy=ddp or "
                        "one device, or callbacks=default")
    if precision in ("16-true", "bf16-true"):
        problems.append(f"callbacks.{found[0]} with precision={precision} keeps the average "
                        "in half precision, where each small update rounds away; use "
                        f"precision={precision.split('-')[0]}-mixed")
    return problems


def _mesh_problems(spec: StrategySpec, cfg: DictConfig) -> list[str]:
    """ModelParallelStrategy (fsdp2, tp) needs a number of devices that its mesh divides;
    tensor parallelism also needs a model with a plan, whose heads split evenly."""
    devices = str(cfg.trainer.get("devices"))
    if spec.kind != "model_parallel":
        return []
    if not devices.isdigit():
        return [f"this strategy needs a number of devices, not {devices!r}; "
                "set trainer.devices=N"]
    tp, problems = spec.tensor_parallel, []
    if tp == 1:
        return [f"trainer.strategy.{switch}=true splits layers among tensor-parallel ranks, "
                "and trainer.strategy.tensor_parallel_size=1; set it to 2 or more, or the "
                "switch false" for switch in SWITCH_ROLES if spec.arguments.get(switch)]
    if int(devices) % tp:
        problems.append(f"trainer.devices={devices} is not a multiple of "
                        f"trainer.strategy.tensor_parallel_size={tp}; "
                        f"use {tp}, {2 * tp}, ... devices")
    net = cfg.model.get("net") or {}
    plan = getattr(_importable(net.get("_target_")), "tensor_parallel_plan", None)
    if not plan:
        problems.append(f"strategy=tp needs a model that declares a tensor_parallel_plan, and "
                        f"{net.get('_target_')} has none; use strategy=fsdp2 or ddp for it")
    problems += _switch_problems(spec, cfg, plan)
    for key in ("n_head", "n_kv_head"):  # attention is split by heads, keys and values too
        heads = net.get(key)
        if isinstance(heads, int) and heads % tp:
            problems.append(f"model.net.{key}={heads} does not split among "
                            f"trainer.strategy.tensor_parallel_size={tp} ranks; "
                            f"use a divisor of {heads}")
    return problems


def _switch_problems(spec: StrategySpec, cfg: DictConfig, plan) -> list[str]:
    """The tensor-parallel switches need a plan with their roles (a plan that is a property
    is read once the net exists, by `sharding.split_layers`). Sequence parallelism needs
    sequences that split evenly among the ranks, and no dropout: each rank would draw the
    same mask for its own positions."""
    problems, tp = [], spec.tensor_parallel
    for switch, roles in SWITCH_ROLES.items():
        if spec.arguments.get(switch) and isinstance(plan, dict) \
                and not set(roles) <= set(plan.values()):
            problems.append(f"trainer.strategy.{switch}=true needs a model whose "
                            f"tensor_parallel_plan has {'/'.join(roles)} layers, and "
                            f"{cfg.model.net.get('_target_')} has none; set it false")
    if not spec.arguments.get("sequence_parallel"):
        return problems
    data, net = cfg.get("data") or {}, cfg.model.get("net") or {}
    for key, length in (("data.block_size", data.get("block_size")),
                        ("data.max_length", data.get("max_length")),
                        ("model.net.block_size", net.get("block_size"))):
        if isinstance(length, int) and length % tp:
            problems.append(f"trainer.strategy.sequence_parallel=true splits each sequence "
                            f"among {tp} ranks, and {key}={length} does not split; use a "
                            f"multiple of {tp}")
    dropout = net.get("dropout")
    if isinstance(dropout, (int, float)) and dropout > 0:
        problems.append(f"trainer.strategy.sequence_parallel=true with model.net.dropout="
                        f"{dropout}: each rank would drop the same places of its own "
                        "positions; set model.net.dropout=0 or the switch false")
    return problems


def _importable(path: str | None):
    try:
        return get_object(path) if path else None
    except Exception:  # noqa: BLE001 - reported by the constructor-argument check
        return None
