"""Strategies that Lightning only builds for GPUs, made to run on CPU too.

Lightning refuses `FSDPStrategy` and `DeepSpeedStrategy` on CPU by a guard, not because
they cannot work there: with gloo both run unchanged once told the device is the CPU. The
two factories below return Lightning's own strategy on a GPU, untouched, and on CPU a
subclass that differs only where the guard is, so that a sharded config can be debugged on
a laptop before it spends GPU hours. Tested with Lightning 2.6 (see pyproject.toml).

The FSDP factory takes the model's class path (`${model.net._target_}`) to read what the
model declares, its `block_classes`: the FSDP wrap units and activation-checkpointing units.
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    StateDictType,
)
from torch.distributed.fsdp.wrap import enable_wrap
from torch.distributed.tensor.parallel import loss_parallel

from lmlab.parallel.sharding import block_classes
from lmlab.parallel.specs import HYBRID, resolve_accelerator

CPU = torch.device("cpu")


def on_gpu(accelerator: str) -> bool:
    return resolve_accelerator(accelerator) == "gpu"


def fsdp(accelerator: str = "auto", net: str | None = None, auto_wrap: bool = True,
         activation_checkpointing: bool = False, num_nodes: int = 1, devices: int | str = 1,
         **kwargs) -> FSDPStrategy:
    """Lightning's `FSDPStrategy` (FSDP1), every declared block its own unit.

    Args:
        accelerator: the trainer's; picks the stock strategy (GPU) or its CPU twin.
        net: import path of the model's net class, for its declared `block_classes`.
        auto_wrap: make each block an FSDP unit (else the whole model is one).
        activation_checkpointing: recompute each block's activations in the backward pass.
        num_nodes, devices: the trainer's; the hybrid modes shard within a node and replicate
            across nodes, on a (num_nodes, devices) mesh unless `device_mesh` is given.
        **kwargs: `FSDPStrategy` arguments: sharding_strategy, cpu_offload, ...
    """
    blocks = set(block_classes(net))
    if blocks and auto_wrap:
        kwargs["auto_wrap_policy"] = blocks
    if blocks and activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = blocks
    if kwargs.get("sharding_strategy") in HYBRID and kwargs.get("device_mesh") is None:
        kwargs["device_mesh"] = (int(num_nodes), int(devices))
    return FSDPStrategy(**kwargs) if on_gpu(accelerator) else CPUFSDPStrategy(**kwargs)


fsdp.passes_to = (FSDPStrategy, FullyShardedDataParallel)  # what **kwargs may hold


class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` on gloo: FSDP is told its device is the CPU (Lightning passes none),
    and a mesh given as a shape is made on the CPU (Lightning makes it on CUDA)."""

    def setup_environment(self) -> None:
        shape = self.kwargs.pop("device_mesh", None)
        super().setup_environment()
        if isinstance(shape, tuple):
            shape = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        if shape is not None:
            self.kwargs["device_mesh"] = shape

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(model, **self._wrap_kwargs())
            self.kwargs.pop("auto_wrap_policy", None)  # applied just now
        return super()._setup_model(model)  # the rest as Lightning does it

    @contextmanager
    def model_sharded_context(self):
        with enable_wrap(wrapper_cls=FullyShardedDataParallel, **self._wrap_kwargs()):
            yield

    # Lightning gathers full state dicts with `offload_to_cpu=True`, which crashes when the
    # parameters already are on the CPU (a segmentation fault in torch 2.13): gather in place.
    def lightning_module_state_dict(self) -> dict:
        with _gather_in_place():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict:
        with _gather_in_place():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        with _gather_in_place():
            return super().load_checkpoint(checkpoint_path, weights_only)

    def _wrap_kwargs(self) -> dict:
        return {"cpu_offload": self.cpu_offload, "mixed_precision": self.mixed_precision_config,
                "sharding_strategy": self.sharding_strategy, "device_id": CPU, **self.kwargs}


@contextmanager
def _gather_in_place():
    """Lightning's full-state-dict context, without offloading to the CPU."""

    def full_state_dict_context(module, world_size, rank0_only=True):
        return FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    original = lightning_fsdp._get_full_state_dict_context
    lightning_fsdp._get_full_state_dict_context = full_state_dict_context
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original


def model_parallel(reshard_after_forward: bool = True, sequence_parallel: bool = False,
                   loss_parallel: bool = False, **kwargs) -> ModelParallelStrategy:
    """Lightning's `ModelParallelStrategy` (FSDP2 and tensor parallelism): the task shards
    the net in `configure_model` (`lmlab.parallel.sharding.shard`) with these options.

    Args:
        reshard_after_forward: FSDP2 frees each unit's gathered parameters after its forward
            and gathers them again for the backward (less memory); false keeps them from the
            forward to the backward (less communication). The net as a whole keeps its own
            gathered until the backward either way.
        sequence_parallel: between attention and the MLP, split the residual stream by
            positions across the tensor-parallel ranks (the norms run on 1/tp of it; the
            net's dropout must be 0).
        loss_parallel: split the token embedding and the output layer by vocabulary, and
            compute the cross-entropy on the split logits.
        **kwargs: `ModelParallelStrategy` arguments: data_parallel_size,
            tensor_parallel_size, ...
    """
    return ModelParallel(dict(reshard_after_forward=reshard_after_forward,
                              sequence_parallel=sequence_parallel,
                              loss_parallel=loss_parallel), **kwargs)


class ModelParallel(ModelParallelStrategy):
    """`ModelParallelStrategy` that carries the sharding options to the task, and runs each
    step and its backward in torch's `loss_parallel` context when the logits are split by
    vocabulary (the context must hold for both)."""

    def __init__(self, sharding: dict, **kwargs):
        super().__init__(**kwargs)
        self.sharding = sharding  # read by the task's configure_model
        self.in_split_loss = False

    @contextmanager
    def split_loss(self):
        """torch's `loss_parallel` under that switch, entered once: a backward inside a step
        (manual optimization) is already within it, and torch's context does not nest."""
        if not self.sharding["loss_parallel"] or self.in_split_loss:
            yield
            return
        self.in_split_loss = True
        try:
            with loss_parallel():
                yield
        finally:
            self.in_split_loss = False

    def training_step(self, *args, **kwargs):
        with self.split_loss():
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args, **kwargs):
        with self.split_loss():
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        with self.split_loss():
            return super().test_step(*args, **kwargs)

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        with self.split_loss():
            return super().backward(closure_loss, optimizer, *args, **kwargs)


model_parallel.passes_to = (ModelParallelStrategy,)


def deepspeed(accelerator: str = "auto", any_optimizer: bool = False,
              **kwargs) -> DeepSpeedStrategy:
    """Lightning's `DeepSpeedStrategy` (ZeRO stage 1, 2 or 3, optional CPU offload).

    Args:
        accelerator: the trainer's; picks the stock strategy (GPU) or its CPU twin.
        any_optimizer: let ZeRO-Offload step the model's own optimizer (e.g. torch's AdamW)
            instead of requiring DeepSpeed's compiled CPU Adam.
        **kwargs: `DeepSpeedStrategy` arguments: stage, offload_optimizer, ...
    """
    strategy = DeepSpeedStrategy(**kwargs) if on_gpu(accelerator) \
        else CPUDeepSpeedStrategy(**kwargs)
    if any_optimizer:
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


deepspeed.passes_to = (DeepSpeedStrategy,)  # what **kwargs may hold


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` on gloo: without Lightning's CUDA check and device-index check
    (CPU devices have no index), and with a CPU root device that carries the local rank,
    which DeepSpeed reads as its device index."""

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()  # DDP's: skips the CUDA check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

