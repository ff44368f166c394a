"""A GPT-style decoder: pre-norm blocks, causal SDPA attention, an MLP, tied embeddings.

Plain PyTorch, readable top to bottom. Attention is the shared module of
`lmlab.models.attention`. Positions are learned or rotary (RoPE); generation uses a key/value
cache. The defaults are GPT-2's layout; the switches that Llama-family checkpoints
need (RMSNorm, a SwiGLU MLP, grouped-query attention, biases on q/k/v only, RoPE scaling,
an untied output layer) are constructor arguments. The model declares, once, what
parallel strategies need from it: `block_classes` (the FSDP wrap / activation-checkpointing
unit) and `tensor_parallel_plan`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.attention import Attention, rope_frequencies, rope_tables
from lmlab.models.flops import attention, linear
from lmlab.models.output_layer import OutputLayer

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
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | gelu_tanh | swiglu
    mlp_hidden: int | None = None  # the MLP's hidden width (None: 4 * n_embd)
    n_kv_head: int | None = None  # key/value heads (None: n_head)
    qkv_bias: bool | None = None  # biases in q/k/v (None: as bias)
    rope_scaling: dict | None = None  # RoPE scaling (lmlab.models.attention.rope_frequencies)
    tie_embeddings: bool = True  # the output layer is the token embedding

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def kv_width(self) -> int:
        return (self.n_kv_head or self.n_head) * (self.n_embd // self.n_head)


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
MLPS = (*ACTIVATIONS, "swiglu")
NORMS = ("layernorm", "rmsnorm")


class MLP(nn.Module):
    """Widen, activate, narrow: GELU (exact, or GPT-2's tanh approximation)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.activation = ACTIVATIONS[config.mlp]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class SwiGLU(nn.Module):
    """The gated MLP of Llama-family models: proj(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


def norm_layer(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """One pre-norm decoder block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = Attention(config.n_embd, config.n_head, config.dropout, config.bias,
                              n_kv_head=config.n_kv_head, qkv_bias=config.qkv_bias)
        self.ln_2 = norm_layer(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

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
        norm: `layernorm` or `rmsnorm`.
        norm_eps: the norms' epsilon.
        mlp: `gelu`, `gelu_tanh` (GPT-2's approximation) or `swiglu` (gated, Llama).
        mlp_hidden: the MLP's hidden width (None: 4 * n_embd).
        n_kv_head: key/value heads, grouped-query attention (None: n_head).
        qkv_bias: biases in the query/key/value projections (None: as `bias`).
        rope_scaling: RoPE scaling as a checkpoint declares it, e.g. `{rope_type: llama3,
            factor: 8, ...}` (`lmlab.models.attention.rope_frequencies`); None: none.
        tie_embeddings: the output layer shares the token embedding's weight.
    """

    block_classes = (Block,)

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = True,
                 positions: str = "learned", rope_base: float = 10_000.0,
                 norm: str = "layernorm", norm_eps: float = 1e-5, mlp: str = "gelu",
                 mlp_hidden: int | None = None, n_kv_head: int | None = None,
                 qkv_bias: bool | None = None, rope_scaling: dict | None = None,
                 tie_embeddings: bool = True):
        super().__init__()
        self.config = config = GPTConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
            n_embd=n_embd, dropout=dropout, bias=bias, positions=positions, rope_base=rope_base,
            norm=norm, norm_eps=norm_eps, mlp=mlp, mlp_hidden=mlp_hidden, n_kv_head=n_kv_head,
            qkv_bias=qkv_bias, rope_scaling=dict(rope_scaling) if rope_scaling else None,
            tie_embeddings=tie_embeddings)
        self.block_size = config.block_size
        check_switches(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) \
            if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = OutputLayer(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.positions == "rope":
            inv_freq = rope_frequencies(config.n_embd // config.n_head, config.rope_base,
                                        config.rope_scaling)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled residual init (GPT-2)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def tensor_parallel_plan(self) -> dict[str, str]:
        """Tensor-parallel plan, by module path pattern (`lmlab.parallel.sharding` reads the
        roles). Megatron style: the layers that widen are split by output columns (attention
        by heads), the layers that narrow by input rows, so each sublayer needs one
        all-reduce. For sequence parallelism: the residual stream splits after the embeddings
        (`drop`), the norms run on the split, attention and the MLP gather it. For the
        vocabulary-parallel loss: the token embedding and the output layer."""
        widening = ("gate", "up") if self.config.mlp == "swiglu" else ("fc",)
        return {"wte": "embedding", "drop": "split",
                "blocks.*.ln_1": "norm", "blocks.*.attn": "gather",
                "blocks.*.attn.q": "colwise", "blocks.*.attn.k": "colwise",
                "blocks.*.attn.v": "colwise", "blocks.*.attn.proj": "rowwise",
                "blocks.*.ln_2": "norm", "blocks.*.mlp": "gather",
                **{f"blocks.*.mlp.{name}": "colwise" for name in widening},
                "blocks.*.mlp.proj": "rowwise", "ln_f": "norm", "lm_head": "output"}

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
        config, T = self.config, lengths.double()
        d, kv, hidden = config.n_embd, config.kv_width, config.hidden
        widening = 2 if config.mlp == "swiglu" else 1
        block = (linear(T, d, d + 2 * kv) + linear(T, d, d) + attention(T, T, d)
                 + widening * linear(T, d, hidden) + linear(T, hidden, d))
        return config.n_layer * block + linear(T, d, config.vocab_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_switches(config: GPTConfig) -> None:
    """Raises ValueError naming the first switch of `config` that cannot be built."""
    kv_heads = config.n_kv_head or config.n_head
    if config.n_embd % config.n_head or config.n_head % kv_heads:
        raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head "
                         f"({config.n_head}), and n_head a multiple of n_kv_head ({kv_heads})")
    for name, value, known in (("positions", config.positions, ("learned", "rope")),
                               ("norm", config.norm, NORMS), ("mlp", config.mlp, MLPS)):
        if value not in known:
            raise ValueError(f"{name} must be one of {', '.join(known)}, not {value!r}")

