"""What sharded strategies do to a net, from what the net declares (never from its code).

A net declares `block_classes`: the modules that are each an FSDP unit and an
activation-checkpointing unit (a decoder's block; an encoder block and a decoder block).
FSDP1 (`strategies.fsdp`) reads them from the net's class before the model exists, FSDP2
from the net itself, both through `block_classes` below.

`ModelParallelStrategy` (strategy=fsdp2 or tp) hands the task a device mesh; the task
calls `shard` in `configure_model`. First the net's `tensor_parallel_plan` splits its layers
over the mesh's tensor-parallel dimension, then each block, and finally the whole net,
become FSDP2 units over the data-parallel dimension.
"""

from __future__ import annotations

import logging

from hydra.utils import get_object
from lightning.pytorch.strategies import (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          Strategy)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

log = logging.getLogger(__name__)
STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def keeps_shards(strategy: Strategy | None) -> bool:
    """Whether `strategy` keeps a net's parameters split across processes between steps
    (FSDP, FSDP2 and tensor parallel, DeepSpeed ZeRO-3): every forward then runs collectives
    that each process must join, so all must take as many decoder steps as the slowest.
    Under DDP and ZeRO 1-2 each process runs its whole net alone."""
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.zero_stage_3
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def block_classes(net: nn.Module | type | str | None) -> tuple[type[nn.Module], ...]:
    """The block classes a net declares: from a net, its class, or its import path."""
    if isinstance(net, str):
        net = get_object(net)
    return tuple(getattr(net, "block_classes", ()) or ())


def shard(net: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shards `net` over `mesh` (tensor parallel, then FSDP2); a net that is already
    sharded (Lightning configures the model again for test) is left as is."""
    if isinstance(net, FSDPModule):
        return net
    tp_mesh = mesh["tensor_parallel"]
    if tp_mesh.size() > 1:
        plan = {pattern: STYLES[style]() for pattern, style in net.tensor_parallel_plan.items()}
        parallelize_module(net, tp_mesh, plan)
    dp_mesh = mesh["data_parallel"]
    blocks = block_classes(net)
    for module in net.modules():
        if blocks and isinstance(module, blocks):
            fully_shard(module, mesh=dp_mesh)
    fully_shard(net, mesh=dp_mesh)
    log.info("sharded %s: tensor parallel over %d ranks, FSDP2 over %d",
             type(net).__name__, tp_mesh.size(), dp_mesh.size())
    return net
