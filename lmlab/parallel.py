"""What sharded strategies do to a net, from what the net declares (never from its code).

`ModelParallelStrategy` hands the task a device mesh; the task calls `shard` in
`configure_model`. Each module of the net's `block_class` becomes its own FSDP2 unit, then
the whole net does.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def shard(net: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shards `net`'s parameters over the mesh's data-parallel dimension (FSDP2); a net
    that is already sharded (Lightning configures the model again for test) is left as is."""
    if isinstance(net, FSDPModule):
        return net
    dp_mesh = mesh["data_parallel"]
    block_class = getattr(net, "block_class", None)
    if block_class is not None:
        for module in net.modules():
            if isinstance(module, block_class):
                fully_shard(module, mesh=dp_mesh)
    fully_shard(net, mesh=dp_mesh)
    return net
