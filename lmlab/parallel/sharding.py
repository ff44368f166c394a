"""What sharded strategies do to a net, from what the net declares (never from its code).

A net declares `block_classes`: the modules that are each an FSDP unit and an
activation-checkpointing unit (a decoder's block; an encoder block and a decoder block).
FSDP1 (`strategies.fsdp`) reads them from the net's class before the model exists, FSDP2
from the net itself, both through `block_classes` below.

`ModelParallelStrategy` (strategy=fsdp2 or tp) hands the task a device mesh; the task
calls `shard` in `configure_model`. First the net's `tensor_parallel_plan` splits its layers
over the mesh's tensor-parallel dimension, then each block, and finally the whole net,
become FSDP2 units over the data-parallel dimension.

A plan maps module path patterns to roles. `colwise` and `rowwise` layers are always split
(Megatron style). The other roles only act under a switch, as torchtitan lays out Llama:
- sequence parallelism: between the sublayers, the residual stream is split by positions
  across the tensor-parallel ranks (`split` where it starts); the `norm`s run on the split,
  each sublayer (`gather`) all-gathers it, and the narrowing `rowwise` layers
  reduce-scatter instead of all-reducing. What the norms keep for their backward is split
  1/tp (docs/benchmarks.md measures what that saves, and what the gathers add).
- vocabulary parallelism (`loss_parallel`): the token `embedding` and the `output` layer are
  split by vocabulary, and the output's logits stay split into the cross-entropy
  (`torch.distributed.tensor.parallel.loss_parallel`, entered by the strategy), so no rank
  ever holds a whole row of logits.
"""

from __future__ import annotations

import functools
import logging

import torch
from hydra.utils import get_object
from lightning.pytorch.strategies import (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          Strategy)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)
SEQUENCE = Shard(1)  # the residual stream (B, T, C) split by positions
ROLES = ("colwise", "rowwise", "embedding", "output", "norm", "split", "gather")
VOCABULARY_ROLES = ("embedding", "output")  # split only under loss_parallel
# the roles that each switch of strategy=tp needs in a plan
SWITCH_ROLES = {"sequence_parallel": ("split", "norm", "gather"), "loss_parallel": ("output",)}


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


def checkpoint_blocks(net: nn.Module) -> int:
    """Makes each declared block recompute its activations in the backward pass instead of
    keeping them (activation checkpointing); returns how many blocks it changed. The block
    keeps its module path and parameter names (its class becomes a subclass of its own), so
    the tensor-parallel plan, FSDP2's units and checkpoints see it unchanged; under any
    strategy, and before `shard`."""
    blocks = block_classes(net)
    changed = 0
    for module in net.modules():
        if blocks and isinstance(module, blocks) and not getattr(module, "recomputes", False):
            module.__class__ = recomputing(type(module))
            changed += 1
    return changed


@functools.cache
def recomputing(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` whose forward, when gradients are on, keeps its inputs only and runs again in
    the backward pass (`torch.utils.checkpoint`, non-reentrant; the random state of its
    dropout is replayed)."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return cls.forward(self, *args, **kwargs)
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "recomputes": True,
                                       "__module__": cls.__module__})


MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for Lightning's `precision`: under a mixed one, parameters are gathered
    and computed in its half dtype and gradients reduced in float32 (the sharded parameters
    and the optimizer stay float32); otherwise as they are."""
    half = MIXED.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half \
        else MixedPrecisionPolicy()


def style(role: str, sequence_parallel: bool = False,
          loss_parallel: bool = False) -> ParallelStyle | None:
    """The DTensor style of a plan's `role` under the switches (None: left whole)."""
    if role not in ROLES:
        raise ValueError(f"tensor_parallel_plan role {role!r}: choose one of {', '.join(ROLES)}")
    sequence = SEQUENCE if sequence_parallel else Replicate()
    gather = PrepareModuleInput(input_layouts=(SEQUENCE,), desired_input_layouts=(Replicate(),),
                                use_local_output=True)
    if role == "colwise":
        return ColwiseParallel()
    if role == "rowwise":
        return RowwiseParallel(output_layouts=sequence)
    if role == "embedding":
        return RowwiseParallel(input_layouts=Replicate()) if loss_parallel else None
    if role == "output" and loss_parallel:
        return ColwiseParallel(input_layouts=sequence, output_layouts=Shard(-1),
                               use_local_output=False)
    if not sequence_parallel:
        return None
    if role in ("output", "gather"):
        return gather
    if role == "norm":
        return SequenceParallel()
    return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQUENCE,),
                              use_local_output=True)  # split


def split_layers(net: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = False,
                 loss_parallel: bool = False) -> None:
    """Applies the net's `tensor_parallel_plan` over the 1-D `mesh`; weights that the net
    ties (its embedding and output layer) stay one parameter."""
    roles = set(net.tensor_parallel_plan.values())
    for (switch, needs), on in zip(SWITCH_ROLES.items(), (sequence_parallel, loss_parallel)):
        if on and not set(needs) <= roles:
            raise ValueError(f"{switch} needs a tensor_parallel_plan with {'/'.join(needs)} "
                             f"roles, and {type(net).__name__}'s has none")
    styles = {pattern: style(role, sequence_parallel, loss_parallel)
              for pattern, role in net.tensor_parallel_plan.items()}
    ties = tied_parameters(net)
    parallelize_module(net, mesh, {p: s for p, s in styles.items() if s is not None})
    for name, source in ties:
        module, _, attribute = name.rpartition(".")
        setattr(net.get_submodule(module), attribute, net.get_parameter(source))


def tied_parameters(net: nn.Module) -> list[tuple[str, str]]:
    """(name, name of the same parameter met first) for each parameter held twice."""
    first: dict[int, str] = {}
    ties = []
    for name, parameter in net.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            ties.append((name, first[id(parameter)]))
        first.setdefault(id(parameter), name)
    return ties


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a plain tensor, gathered if it is a DTensor (split logits, the loss of
    split logits)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard(net: nn.Module, mesh: DeviceMesh, precision: str = "32-true",
          reshard_after_forward: bool = True, sequence_parallel: bool = False,
          loss_parallel: bool = False) -> nn.Module:
    """Shards `net` over `mesh` (tensor parallel with the switches of `split_layers`, then
    FSDP2 with the `mixed_precision` of `precision`, each block freed after its forward
    unless `reshard_after_forward` is false); a net that is already sharded (Lightning
    configures the model again for test) is left as is."""
    if isinstance(net, FSDPModule):
        return net
    tp_mesh = mesh["tensor_parallel"]
    if tp_mesh.size() > 1:
        split_layers(net, tp_mesh, sequence_parallel, loss_parallel)
    dp_mesh = mesh["data_parallel"]
    blocks = block_classes(net)
    policy = mixed_precision(precision)
    for module in net.modules():
        if blocks and isinstance(module, blocks):
            fully_shard(module, mesh=dp_mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=dp_mesh, mp_policy=policy)  # the root: gathered until the backward
    switches = [name.replace("_", " ") for name, on in (("sequence_parallel", sequence_parallel),
                                                         ("loss_parallel", loss_parallel)) if on]
    log.info("sharded %s: tensor parallel over %d ranks%s, FSDP2 over %d", type(net).__name__,
             tp_mesh.size(), f" ({', '.join(switches)})" if switches and tp_mesh.size() > 1
             else "", dp_mesh.size())
    return net
