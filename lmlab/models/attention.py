"""Multi-head attention for every transformer here: self-attention (causal or not) and
cross-attention, through `scaled_dot_product_attention`.

One module serves the GPT's decoder blocks and the encoder-decoder's three kinds of
attention. The query, key and value projections are separate layers, so tensor parallelism
splits each by output columns (by heads) and the output projection by input rows; the head
count is read from the tensor, so a rank's share of heads works unchanged.

Caches, for decoding one token at a time:
- self-attention: the keys and values of the positions seen so far, extended each call (from
  the second call on, in place: `KeyValueBuffer`);
- cross-attention: the keys and values of the encoder's memory, computed on the first call
  and reused after it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KeyValues = tuple[torch.Tensor, torch.Tensor]  # keys, values (B, H, S, D)


class KeyValueBuffer:
    """A self-attention cache written in place: keys and values (B, H, S, D) of the positions
    so far, in buffers with room for more. A step writes its new positions after the old
    ones instead of copying them all into a new tensor (`torch.cat`); a full buffer doubles,
    so each position is copied about once over a whole decoding.

    It reads as the `(keys, values)` pair of the positions so far: `kv[0]`, `k, v = kv`.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.keys, self.values, self.length = keys, values, length  # buffers (B, H, room, D)

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> KeyValueBuffer:
        """A buffer of `room` positions (at least those given) holding `keys`, `values`."""
        shape = (*keys.shape[:2], max(room, keys.size(2)), keys.size(3))
        buffers = keys.new_empty(shape), values.new_empty(shape)
        buffer = cls(*buffers, 0)
        buffer.append(keys, values)
        return buffer

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> KeyValues:
        """Writes the new positions' keys and values after the others; returns all so far."""
        end = self.length + keys.size(2)
        if end > self.keys.size(2):
            grown = KeyValueBuffer.holding(*self, room=2 * end)
            self.keys, self.values = grown.keys, grown.values
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return tuple(self)

    def select_rows(self, rows: torch.Tensor) -> KeyValueBuffer:
        """The cache of batch rows `rows` (a beam search's surviving hypotheses)."""
        return KeyValueBuffer(self.keys.index_select(0, rows), self.values.index_select(0, rows),
                              self.length)

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.keys, self.values)[index][:, :, :self.length]

    def __iter__(self):
        return iter((self[0], self[1]))

    def __len__(self) -> int:
        return 2


def select_rows(kv: KeyValues | KeyValueBuffer, rows: torch.Tensor):
    """The keys and values of batch rows `rows`, a buffer staying a buffer."""
    if isinstance(kv, KeyValueBuffer):
        return kv.select_rows(rows)
    return tuple(t.index_select(0, rows) for t in kv)


class Attention(nn.Module):
    """Multi-head attention: (B, T, C) queries to (B, T, C) outputs.

    Args:
        d_model: model width C.
        n_head: attention heads; must divide `d_model`.
        dropout: on the attention weights and on the output (the residual branch).
        bias: biases in the projections.
        cross: keys and values come from a memory (the encoder's output) instead of the
            queries' own sequence.
        n_kv_head: key/value heads (grouped-query attention: each serves `n_head / n_kv_head`
            consecutive query heads); None: one per query head.
        qkv_bias: biases in the query, key and value projections (None: as `bias`; Qwen2
            has them there alone).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 cross: bool = False, n_kv_head: int | None = None,
                 qkv_bias: bool | None = None):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head or n_head % n_kv_head:
            raise ValueError(f"the model width ({d_model}) must be a multiple of the number of "
                             f"heads ({n_head}), and that a multiple of the key/value heads "
                             f"({n_kv_head})")
        self.head_dim, self.dropout, self.cross = d_model // n_head, dropout, cross
        qkv_bias = bias if qkv_bias is None else qkv_bias
        kv_width = n_kv_head * self.head_dim
        self.q = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k, self.v = (nn.Linear(d_model, kv_width, bias=qkv_bias) for _ in range(2))
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.register_load_state_dict_pre_hook(split_fused_qkv)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, *,
                causal: bool = False, key_mask: torch.Tensor | None = None,
                rope: tuple | None = None, cache: KeyValues | None = None
                ) -> tuple[torch.Tensor, KeyValues]:
        """Attends from `x` to itself (self-attention) or to `memory` (cross-attention).

        Args:
            x: (B, T, C) the queries' sequence.
            memory: (B, S, C) what cross-attention reads; unused once `cache` holds its
                keys and values.
            causal: each query sees only the keys at or before its position (self-attention;
                with a cache, every cached position is before the new ones).
            key_mask: (B, S) True at the keys that may be attended (False at padding).
            rope: (cos, sin) rotary tables for the new positions (self-attention).
            cache: the keys and values of earlier positions (self-attention) or of the
                memory (cross-attention).

        Returns:
            The output (B, T, C) and the keys and values to pass as `cache` next time.
        """
        q = self._heads(self.q, x)  # (B, H, T, D)
        if self.cross:
            k, v = cache if cache is not None else (self._heads(self.k, memory),
                                                    self._heads(self.v, memory))
        else:
            k, v = self._heads(self.k, x), self._heads(self.v, x)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if isinstance(cache, KeyValueBuffer):
                k, v = cache.append(k, v)
            elif cache is not None:  # the second step of a decoding: from here, in place
                cache = KeyValueBuffer.holding(*cache, room=2 * (cache[0].size(2) + k.size(2)))
                k, v = cache.append(k, v)
        B, T = x.shape[:2]
        beams = B // k.size(0)  # cross-attention: each memory row may serve several rows
        q = beams_as_queries(q, beams)
        mask, is_causal = attention_mask(q.size(2), k.size(2), causal, key_mask, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=k.size(1) != q.size(1))
        y = beams_as_rows(y, beams)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, H * D)
        kept = cache if isinstance(cache, KeyValueBuffer) and not self.cross else (k, v)
        return self.resid_dropout(self.proj(y)), kept

    def _heads(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) through `layer` to (B, H, T, D), H being this rank's share of heads."""
        B, T, _ = x.shape
        return layer(x).view(B, T, -1, self.head_dim).transpose(1, 2)


def beams_as_queries(q: torch.Tensor, beams: int) -> torch.Tensor:
    """(E * beams, H, T, D) queries as (E, H, beams * T, D): the beams of a sentence that
    share one memory row (a beam search's cross-attention) become more queries of it, so its
    keys and values are read once for them all."""
    if beams == 1:
        return q
    rows, heads, length, dim = q.shape
    grouped = q.view(rows // beams, beams, heads, length, dim).transpose(1, 2)
    return grouped.reshape(rows // beams, heads, beams * length, dim)


def beams_as_rows(y: torch.Tensor, beams: int) -> torch.Tensor:
    """The inverse of `beams_as_queries`."""
    if beams == 1:
        return y
    sentences, heads, queries, dim = y.shape
    grouped = y.view(sentences, heads, beams, queries // beams, dim).transpose(1, 2)
    return grouped.reshape(sentences * beams, heads, queries // beams, dim)


def attention_mask(n_queries: int, n_keys: int, causal: bool, key_mask: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The boolean mask (True: attend) and `is_causal` flag for SDPA.

    Without a key mask, plain causal attention uses SDPA's own causal path. New queries
    after a cache see every cached key and, among themselves, the keys up to their own
    position; a single new query sees everything, so it needs no mask.
    """
    mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, S)
    if not causal or n_queries == 1:
        return mask, False
    past = n_keys - n_queries
    if mask is None and past == 0:
        return None, True
    order = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(past)
    return (order if mask is None else mask & order), False


def split_fused_qkv(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loads checkpoints of the earlier fused `qkv` projection into `q`, `k` and `v`."""
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            for name, part in zip("qkv", fused.chunk(3, dim=0)):
                state_dict[f"{prefix}{name}.{kind}"] = part


def rope_frequencies(head_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """RoPE's inverse frequency of each channel pair (D/2,), as a checkpoint's config declares
    them: `scaling` is None, or `{"rope_type": "linear", "factor": F}` (positions divided by
    F), or Llama 3's `{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}` (long wavelengths stretched)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_frequencies(inv_freq, **{k: v for k, v in scaling.items()
                                               if k != "rope_type"})
    raise ValueError(f"RoPE scaling {kind!r} is not supported (default, linear, llama3)")


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_max_position_embeddings: int
                       ) -> torch.Tensor:
    """Llama 3.1's RoPE: wavelengths above the original context / `low_freq_factor` are
    stretched `factor` times, those below context / `high_freq_factor` kept, and the ones
    between interpolated smoothly."""
    context = original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (wavelength >= context / high_freq_factor) & (wavelength <= context / low_freq_factor)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    return torch.where(between, blended, stretched)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple:
    """(cos, sin) of each position's angles, each (T, D/2)."""
    angles = positions[:, None].float() * inv_freq[None, :]  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel pairs (x[2i], x[2i+1]) of (B, H, T, D) by position-dependent angles."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
