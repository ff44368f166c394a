"""Process-wide choices among PyTorch's kernels: the config's `kernels` node.

They are global switches of torch, so they are set in each process as it sets up (a
callback's `setup` runs on every rank, spawned ones included) and put back at teardown.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import DictConfig


class Kernels(Callback):
    """Which kernels attention may use on CUDA.

    Args:
        cudnn_attention: let `scaled_dot_product_attention` pick cuDNN's fused attention.
            Off by default: cuDNN builds an execution plan for each new shape, which costs
            milliseconds of host time per call when batches change length from step to step
            (bucketed seq2seq batches, decoding); docs/benchmarks.md has the measurement.
            PyTorch's flash and memory-efficient kernels serve instead.
    """

    def __init__(self, cudnn_attention: bool = False):
        self.cudnn_attention = cudnn_attention
        self.previous: bool | None = None

    def apply(self) -> None:
        """Sets the switches in this process."""
        torch.backends.cuda.enable_cudnn_sdp(self.cudnn_attention)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.previous = torch.backends.cuda.cudnn_sdp_enabled()
        self.apply()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()  # Lightning skips teardown after an exception

    def restore(self) -> None:
        """Puts back the setting the process had before `setup`."""
        if self.previous is not None:
            torch.backends.cuda.enable_cudnn_sdp(self.previous)
            self.previous = None


# The node of conf/config.yaml, for runs saved before it existed.
DEFAULT_NODE = {"_target_": "lmlab.training.kernels.Kernels", "cudnn_attention": False}


def kernels_of(cfg: DictConfig) -> Kernels:
    """The run's kernel choices (the defaults for a run saved before they were settable)."""
    return instantiate(cfg.get("kernels") or DEFAULT_NODE)
