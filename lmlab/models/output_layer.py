"""The output layer of the language models and decoders: a linear layer, quicker when decoding
on a CPU."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class OutputLayer(nn.Linear):
    """`nn.Linear` from the model width to the vocabulary, with the same parameters.

    A decoding step multiplies one position a sequence by the weight, and at a vocabulary of
    thousands this is the step's largest product. On a CPU the matrix library computes a row
    times a matrix laid out (in, out) about 3x faster than times the transpose of one laid
    out (out, in), as `nn.Linear` keeps its weight (docs/benchmarks.md). So within
    `decoding(net)`, which lmlab's decoding loops enter, a step on the CPU (one position, no
    gradients, a plain weight) multiplies by a transposed copy of the weight, made at the
    first such step and dropped when the loop ends: the weight's memory once more while
    decoding, and no copy that could outlive a change of the weight. Anything else
    (training, GPUs, sharded weights) is `nn.Linear`'s forward.
    """

    decoding_now = False  # inside `decoding`
    transposed: torch.Tensor | None = None  # the copy of this decoding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (not self.decoding_now or x.dim() < 2 or x.size(-2) != 1
                or x.device.type != "cpu" or torch.is_grad_enabled()
                or type(weight.data) is not torch.Tensor):
            return super().forward(x)
        if self.transposed is None:
            self.transposed = weight.detach().t().contiguous()
        out = x @ self.transposed
        return out if self.bias is None else out + self.bias


@contextmanager
def decoding(net) -> Iterator[None]:
    """One decoding call of `net` (any callable; only a module's `OutputLayer`s change): its
    output layers may keep a transposed copy of their weights until it ends."""
    layers = [m for m in net.modules() if isinstance(m, OutputLayer)] \
        if isinstance(net, nn.Module) else []
    before = [(layer.decoding_now, layer.transposed) for layer in layers]
    for layer in layers:
        layer.decoding_now = True
    try:
        yield
    finally:
        for layer, (now, transposed) in zip(layers, before):
            layer.decoding_now, layer.transposed = now, transposed


def decodes(function: Callable) -> Callable:
    """`function(net, ...)`, run within `decoding(net)`."""

    @functools.wraps(function)
    def within(net, *args, **kwargs):
        with decoding(net):
            return function(net, *args, **kwargs)

    return within
