"""Learning-rate schedules, as `_partial_` configs that take the optimizer."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to `min_lr_ratio` x base at
    `total_steps`, flat after that (nanoGPT's schedule).

    Args:
        optimizer: the optimizer whose LR is scaled.
        warmup_steps: steps of linear warm-up from 0.
        total_steps: step at which the decay ends; tasks fill in the run's length when it
            is None.
        min_lr_ratio: final LR as a share of the base LR.
    """

    if total_steps is None:
        raise ValueError("warmup_cosine needs total_steps (tasks pass the run's length)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step >= total_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - min_lr_ratio)

    return LambdaLR(optimizer, factor)


def warmup_inverse_sqrt(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warm-up to the base LR, then decay with the inverse square root of the step
    (the original Transformer's schedule), so the LR is the base LR at `warmup_steps`.

    Args:
        optimizer: the optimizer whose LR is scaled.
        warmup_steps: steps of linear warm-up from 0.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return math.sqrt(max(warmup_steps, 1) / max(step, 1))

    return LambdaLR(optimizer, factor)
