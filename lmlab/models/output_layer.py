"""The output layer of the language models and decoders: a linear layer, quicker when decoding
on a CPU."""

from __future__ import annotations

import torch
from torch import nn


class OutputLayer(nn.Linear):
    """`nn.Linear` from the model width to the vocabulary, with the same parameters.

    A decoding step multiplies one position a sequence by the weight, and at a vocabulary of
    thousands this is the step's largest product. On a CPU the matrix library computes a row
    times a matrix laid out (in, out) about 3x faster than times the transpose of one laid
    out (out, in), as `nn.Linear` keeps its weight (`benchmarks/against_transformers.py`,
    docs/benchmarks.md). So a decoding step (one position, no gradients, a plain weight on
    the CPU) multiplies by a transposed copy of the weight, made again whenever the weight has
    changed and dropped when training resumes: the weight's memory once more while decoding.
    Anything else (training, GPUs, sharded weights) is `nn.Linear`'s forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dim() < 2 or x.size(-2) != 1 or x.device.type != "cpu" or torch.is_grad_enabled()
                or type(weight.data) is not torch.Tensor or torch.is_inference(weight)):
            return super().forward(x)
        out = x @ self.transposed()
        return out if self.bias is None else out + self.bias

    def transposed(self) -> torch.Tensor:
        # `_version` counts the in-place changes of a tensor (an optimizer step, a loaded
        # state dict); torch has no public equivalent (2.13). Autograd checks saved tensors
        # with it.
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_transposed_key", None) != key:
            self._transposed = self.weight.detach().t().contiguous()
            self._transposed_key = key
        return self._transposed

    def train(self, mode: bool = True) -> OutputLayer:
        if mode:
            self._transposed = self._transposed_key = None
        return super().train(mode)
