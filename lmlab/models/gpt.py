"""A GPT-style decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, tied embeddings.

Plain PyTorch, readable top to bottom. Attention is the shared module of
`lmlab.models.attention`. Positions are learned or rotary (RoPE); generation uses a key/value
cache. The model declares, once, what parallel strategies need from it:
`block_classes` (the FSDP wrap / activation-checkpointing unit) and `tensor_parallel_plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.attention import Attention, rope_tables
from lmlab.models.flops import attention, linear

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, H, T, D)


@dataclass
class GPTConfig:
    """Sizes and switches of a GPT, as its constructor takes them."""

    vocab_size: int  # rows of the token embedding (from the tokenizer)
    block_size: int  # longest context
    n_layer: int  # decoder blocks
    n_head: int  # attention heads
    n_embd: int  # model width
    dropout: float  # on attention weights, residual branches and embeddings
    bias: bool  # biases in linear layers and LayerNorms
    positions: str  # learned | rope
    rope_base: float  # RoPE frequency base


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm decoder block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        attended, new_cache = self.attn(self.ln_1(x), causal=True, rope=rope, cache=cache)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), new_cache


class GPT(nn.Module):
    """Decoder-only transformer language model: tokens (B, T) to next-token logits (B, T, V).

    Args:
        vocab_size: rows of the token embedding (from the tokenizer).
        block_size: longest context.
        n_layer: decoder blocks.
        n_head: attention heads.
        n_embd: model width.
        dropout: on attention weights, residual branches and embeddings.
        bias: biases in linear layers and LayerNorms.
        positions: `learned` or `rope` (rotary).
        rope_base: RoPE frequency base.
    """

    block_classes = (Block,)
    # Tensor-parallel plan, by module path pattern (Megatron style): the layers that widen
    # are split by output columns (attention by heads), the layers that narrow by input
    # rows, so each sublayer needs one all-reduce.
    tensor_parallel_plan = {
        "blocks.*.attn.q": "colwise", "blocks.*.attn.k": "colwise",
        "blocks.*.attn.v": "colwise", "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.fc": "colwise", "blocks.*.mlp.proj": "rowwise",
    }

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = True,
                 positions: str = "learned", rope_base: float = 10_000.0):
        super().__init__()
        self.config = config = GPTConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
            n_embd=n_embd, dropout=dropout, bias=bias, positions=positions, rope_base=rope_base)
        self.block_size = config.block_size
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head "
                             f"({config.n_head})")
        if config.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be learned or rope, not {config.positions!r}")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) \
            if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        if config.positions == "rope":
            head_dim = config.n_embd // config.n_head
            inv_freq = 1.0 / config.rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled residual init (GPT-2)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                return_cache: bool = False):
        """Logits (B, T, V); with `return_cache`, also the updated key/value cache."""
        B, T = tokens.shape
        start = cache[0][0].size(2) if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        x = self.wte(tokens)  # (B, T, C)
        positions = torch.arange(start, start + T, device=tokens.device)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = rope_tables(positions, self.inv_freq)
        x = self.drop(x)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, rope, cache[i] if cache else None)
            new_cache.append(layer_cache)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return (logits, new_cache) if return_cache else logits

    def flops(self, lengths: torch.Tensor) -> torch.Tensor:
        """Forward FLOPs (`lmlab.models.flops`) of each sequence of `lengths` (B,) tokens."""
        d, T = self.config.n_embd, lengths.double()
        block = (linear(T, d, 3 * d) + linear(T, d, d) + attention(T, T, d)
                 + linear(T, d, 4 * d) + linear(T, 4 * d, d))
        return self.config.n_layer * block + linear(T, d, self.config.vocab_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

