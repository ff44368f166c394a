"""LoRA (Hu et al., 2021): low-rank adapters beside frozen linear layers.

`add_adapters(net, rank, alpha, targets)` freezes every parameter of `net` and gives each
targeted `nn.Linear` a trainable pair `lora_a` (r, in), `lora_b` (out, r), so the layer
computes `W x + b + (alpha / r) B A x`. B starts at zero: the adapted net starts as the
pretrained one. The adapters are parameters of the layer itself (no wrapper module), so
module paths, FSDP2's block units, activation checkpointing, compile and the key/value
cache see the layers they would see without them (the parameters' names change: the weight
is `x.parametrizations.weight.original`, its adapter `x.parametrizations.weight.0.lora_a`);
`merge_adapters` folds them into the weights, `merged_state` does it in a state dict.
Tensor parallelism splits plain linear layers only: LoRA is refused under it before a run.

lmlab's own rather than `peft`: peft swaps each target for a wrapper module of its own
class, which changes module paths (those of lmlab's block units and export names) and holds
its base layer's weight under another path.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmlab.errors import LmlabError


class LowRankDelta(nn.Module):
    """A parametrization of a linear layer's weight: W + scale * B A."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_a = nn.Parameter(weight.new_empty(rank, in_features))
        self.lora_b = nn.Parameter(weight.new_zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own init
        self.register_buffer("scale", torch.tensor(alpha / rank))  # saved: merging needs it

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.lora_b @ self.lora_a)).to(weight.dtype)


def targeted(name: str, targets: list[str]) -> bool:
    """Whether the layer at module path `name` is one of `targets`, by its last name
    (`q` targets `blocks.3.attn.q`) or by a path suffix (`mlp.proj`)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(net: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Freezes `net` and adds an adapter to each targeted linear layer; returns their paths.

    Raises:
        LmlabError: a target matches no linear layer (naming the layers there are), or
            matches one whose weight is tied to another module's (an output layer that is
            the embedding: merging would untie them).
    """
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    unmatched = [t for t in targets if not any(targeted(name, [t]) for name, _ in layers)]
    if unmatched:
        raise LmlabError(f"model.lora.targets: {', '.join(unmatched)} matches no linear layer "
                         f"of {type(net).__name__}; its linear layers are {', '.join(names)}")
    chosen = [(name, m) for name, m in layers if targeted(name, targets)]
    shared = tied_weights(net)
    tied = [name for name, m in chosen if id(m.weight) in shared]
    if tied:
        raise LmlabError(f"model.lora.targets: {tied[0]}'s weight is tied to another "
                         "module's (the embedding); adapt other layers")
    for p in net.parameters():
        p.requires_grad_(False)
    for _, layer in chosen:
        parametrize.register_parametrization(
            layer, "weight", LowRankDelta(layer.weight, rank, alpha), unsafe=True)
    return [name for name, _ in chosen]


def tied_weights(net: nn.Module) -> set[int]:
    """The ids of the parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for _, p in net.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def merge_adapters(net: nn.Module) -> None:
    """Folds every adapter into its layer's weight (W + scale * B A) and removes it."""
    for module in net.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


PARAMETRIZED = ".parametrizations.weight."


def merged_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with adapters as a plain one: each `x.parametrizations.weight.original`
    with its adapter becomes `x.weight` = W + scale * B A (other entries unchanged)."""
    merged = {}
    for name, tensor in state.items():
        layer, found, part = name.partition(PARAMETRIZED)
        if not found:
            merged[name] = tensor
        elif part == "original":
            adapter = f"{layer}{PARAMETRIZED}0."
            delta = state[adapter + "lora_b"].float() @ state[adapter + "lora_a"].float()
            merged[f"{layer}.weight"] = (tensor.float() + state[adapter + "scale"] * delta
                                         ).to(tensor.dtype)
    return merged
