"""Causal language modelling: next-token cross-entropy, perplexity, bits per character."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.sampling import generate
from lmlab.tasks.base import Task

log = logging.getLogger(__name__)


class CausalLMTask(Task):
    """Trains any net that maps tokens (B, T) to next-token logits (B, T, V).

    Args:
        net: the model, e.g. `lmlab.models.gpt.GPT`.
        optimizer: a partial optimizer, called with parameter groups.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step.
        weight_decay: applied to weight matrices only, never to norms, biases or embeddings.
        chars_per_token: characters of text per token (from the DataModule), for bits per
            character.
        sample_tokens: length of the sample printed after each validation (0: none).
        tokenizer: decodes the sample (from the DataModule).
    """

    kind = "lm"  # the data it needs

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 weight_decay: float = 0.1, chars_per_token: float = 1.0,
                 sample_tokens: int = 200, tokenizer=None):
        super().__init__(net, optimizer, scheduler)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "tokenizer"])
        self.weight_decay, self.chars_per_token = weight_decay, chars_per_token
        self.sample_tokens, self.tokenizer = sample_tokens, tokenizer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def step(self, batch: dict, split: str) -> torch.Tensor:
        logits = self(batch["tokens"])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log_loss(split, loss, batch["targets"].numel())
        return loss

    def log_epoch(self, split: str) -> None:
        """Loss, perplexity and bits per character over the whole split (all ranks)."""
        if split == "train":
            return  # train/loss is logged per step
        loss = self.epoch_loss(split)
        bpc = loss / math.log(2) / self.chars_per_token
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss),
                       f"{split}/bpc": bpc}, prog_bar=split == "val")
        if split == "val" and self.sample_tokens and self.tokenizer is not None \
                and not self.trainer.sanity_checking:
            self.log_sample()

    def log_sample(self) -> None:
        text = self.sample()
        log.info("sample at step %d:\n%s", self.global_step, text)
        for logger in self.loggers:  # W&B shows the samples as a table
            if hasattr(logger, "log_text"):
                logger.log_text("samples", columns=["step", "text"],
                                data=[[self.global_step, text]])

    def sample(self, prompt: str = "\n", temperature: float = 0.8, top_k: int = 200) -> str:
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        tokens = torch.tensor([ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        new = list(generate(self.net, tokens, self.sample_tokens, temperature, top_k,
                            generator=generator))
        return prompt + self.tokenizer.decode(torch.cat(new, dim=1)[0].tolist())

    def optimizer_params(self) -> list[dict]:
        return parameter_groups(self.net, self.weight_decay)


def parameter_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear layers; none on norms, biases, embeddings."""
    embeddings = {id(m.weight) for m in net.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in net.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
