"""Causal language modelling: next-token cross-entropy, perplexity, bits per character."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.completions import IGNORE
from lmlab.data.description import DataDescription
from lmlab.models.lora import add_adapters
from lmlab.models.sampling import generate
from lmlab.parallel.sharding import whole
from lmlab.tasks.base import Task, example_weights, real_examples

log = logging.getLogger(__name__)


class CausalLMTask(Task):
    """Trains any net that maps tokens (B, T) to next-token logits (B, T, V).

    Args:
        net: the model, e.g. `lmlab.models.gpt.GPT`.
        optimizer: a partial optimizer, called with parameter groups.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step.
        weight_decay: applied to weight matrices only, never to norms, biases or embeddings.
        sample_tokens: length of the sample printed after each validation (0: none).
        data: the data's description: its tokenizer decodes the sample, and each split's
            characters per token turn the loss into bits per character.
        pretrained: the Hugging Face folder the net starts from (`model=hf_causal_lm`),
            recorded with the run; the net reads it.
        lora: `{rank, alpha, targets}`: train low-rank adapters on the `targets` linear
            layers (by name: q, k, v, proj, fc, gate, up, ...) and freeze everything else
            (`lmlab.models.lora`); rank 0 or None: train the whole net.
    """

    kind = "lm"  # the data it needs

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 weight_decay: float = 0.1, sample_tokens: int = 200,
                 compile: bool = False, compile_mode: str = "default",
                 activation_checkpointing: bool = False,
                 data: DataDescription | None = None, pretrained: str | None = None,
                 lora: dict | None = None):
        lora = plain_lora(lora)  # plain values: the checkpoint's hyperparameters hold them
        if lora:
            adapted = add_adapters(net, **lora)
            log.info("LoRA rank %d on %d layers; the rest of the net is frozen",
                     lora["rank"], len(adapted))
        super().__init__(net, optimizer, scheduler, compile, compile_mode,
                         activation_checkpointing)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "data"])
        self.weight_decay, self.sample_tokens = weight_decay, sample_tokens
        self.tokenizer = data.tokenizer if data is not None else None
        self.chars_per_token = data.chars_per_token if data is not None else {}

    @classmethod
    def config_from_data(cls, data: DataDescription) -> dict:
        return {"net": {"vocab_size": data.vocab_size}}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def decode(self, tokens: torch.Tensor, cache=None, return_cache: bool = False):
        """One decoding step of the net (its key/value cache in and out); logits split by
        vocabulary (`loss_parallel`) are gathered."""
        logits, cache = self.net(tokens, cache=cache, return_cache=True)
        return (whole(logits), cache) if return_cache else whole(logits)

    def step(self, batch: dict, split: str) -> torch.Tensor:
        """Blocks of text score every token alike; padded sequences (prompt/completion data)
        score the targets that are not `IGNORE`, each token counting alike."""
        targets = batch["targets"]
        logits = self(batch["tokens"])  # (B, T, V)
        losses = whole(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE,
                                       reduction="none"))  # split logits: each rank's whole
        weight = example_weights(batch, len(logits), logits.device)
        if "lengths" not in batch:  # blocks are equally long and fully scored
            return self.log_loss(split, losses.mean(dim=1), weight)
        scored = (targets != IGNORE).sum(dim=1)
        return self.log_loss(split, losses.sum(dim=1) / scored.clamp(min=1), weight, scored)

    def count_tokens(self, batch: dict) -> torch.Tensor:
        """Predicted target tokens: a block's all, a padded sequence's scored ones."""
        if "lengths" not in batch:
            return self.count_examples(batch) * batch["targets"].size(1)
        real = real_examples(batch, len(batch["targets"])).to(batch["targets"].device)
        return ((batch["targets"] != IGNORE).sum(dim=1) * real).sum()

    def flop_lengths(self, batch: dict) -> tuple[torch.Tensor, ...]:
        tokens = batch["tokens"]  # blocks of one length, or padded sequences with lengths
        if "lengths" in batch:
            return (batch["lengths"],)
        return (torch.full((len(tokens),), tokens.size(1), device=tokens.device),)

    def log_epoch(self, split: str) -> None:
        """Loss, perplexity and bits per character over the whole split (all ranks)."""
        if split == "train":
            return  # train/loss is logged per step
        loss = self.epoch_loss(split)
        bpc = loss / math.log(2) / self.split_chars_per_token(split)
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss),
                       f"{split}/bpc": bpc}, prog_bar=split == "val")
        if split == "val" and self.sample_tokens and self.tokenizer is not None \
                and not self.trainer.sanity_checking and not self.splits_sequences():
            self.log_sample()

    def splits_sequences(self) -> bool:
        """Whether the strategy splits each sequence among ranks (sequence parallelism),
        which a decoding step's single token cannot be: then no sample is printed."""
        return bool(getattr(self.trainer.strategy, "sharding", {}).get("sequence_parallel"))

    def split_chars_per_token(self, split: str) -> float:
        return self.chars_per_token.get(split, 1.0)  # no data: bits per token

    def log_sample(self) -> None:
        text = self.sample()
        log.info("sample at step %d:\n%s", self.global_step, text)
        for logger in self.loggers:  # W&B shows the samples as a table
            if hasattr(logger, "log_text"):
                logger.log_text("samples", columns=["step", "text"],
                                data=[[self.global_step, text]])

    def sample(self, prompt: str = "\n", temperature: float = 0.8, top_k: int = 200) -> str:
        """Continues `prompt` on every rank in step (sharded strategies gather parameters
        collectively), each decoding step through the strategy's wrapper."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        tokens = torch.tensor([ids], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        step = functools.partial(self.through_strategy, "decode")
        new = list(generate(step, tokens, self.sample_tokens, temperature, top_k,
                            generator=generator, block_size=self.net.block_size))
        return prompt + self.tokenizer.decode(torch.cat(new, dim=1)[0].tolist())

    def optimizer_params(self) -> list[dict]:
        return parameter_groups(self.net, self.weight_decay)


def plain_lora(lora: dict | None) -> dict | None:
    """LoRA's settings as plain values (alpha defaults to the rank, targets to q and v);
    None when off."""
    if not lora or not lora.get("rank"):
        return None
    return {"rank": int(lora["rank"]), "alpha": float(lora.get("alpha") or lora["rank"]),
            "targets": [str(t) for t in lora.get("targets") or ("q", "v")]}


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
