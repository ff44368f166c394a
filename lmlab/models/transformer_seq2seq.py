"""A transformer encoder-decoder: pre-LayerNorm blocks, SDPA attention, GELU or ReLU MLP.

Plain PyTorch, readable top to bottom. All attention is `lmlab.models.attention.Attention`:
the encoder's self-attention masks the source padding, the decoder's self-attention is
causal, and its cross-attention masks the source padding. Batches are right-padded, so a
causal query at a real target position only ever sees real target positions: the causal
mask alone keeps the target padding out, and SDPA's causal path stays available.

Decoding uses `encode` once per sentence, then `decode_step` one token at a time with a
cache (the self-attention keys and values so far, and the cross-attention keys and values
of the memory, computed on the first step), and `reorder` to follow beams.

With `copy=true` the output is a pointer-generator's (See et al., 2017): a gate mixes the
vocabulary distribution with an attention distribution over the source tokens, which needs
one joint vocabulary (a source id is then an output id). The net then returns
log-probabilities where it otherwise returns logits; both go through `log_softmax` and
`cross_entropy` unchanged, since log-probabilities are their own `log_softmax`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.attention import Attention, select_rows
from lmlab.models.encoder_decoder import EncoderDecoder
from lmlab.models.flops import attention, linear
from lmlab.models.output_layer import OutputLayer

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
POSITIONS = ("sinusoidal", "learned")


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm self-attention (source padding masked) and MLP."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, activation: str, dropout: float,
                 bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = Attention(d_model, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, d_ff, activation, dropout, bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm causal self-attention, cross-attention to the memory, and MLP."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, activation: str, dropout: float,
                 bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.self_attn = Attention(d_model, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.cross_attn = Attention(d_model, n_head, dropout, bias, cross=True)
        self.ln_3 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, d_ff, activation, dropout, bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                cache: dict | None = None) -> tuple[torch.Tensor, dict]:
        cache = cache or {}
        attended, self_kv = self.self_attn(self.ln_1(x), causal=True, cache=cache.get("self"))
        x = x + attended
        attended, cross_kv = self.cross_attn(self.ln_2(x), memory, key_mask=memory_mask,
                                             cache=cache.get("cross"))
        x = x + attended
        return x + self.mlp(self.ln_3(x)), {"self": self_kv, "cross": cross_kv}


class Seq2SeqTransformer(EncoderDecoder):
    """Encoder-decoder transformer: source (B, S) and target input (B, T) to logits (B, T, V).

    Args:
        src_vocab_size, tgt_vocab_size, pad_id, bos_id, eos_id: the vocabularies and the
            special ids, as `lmlab.models.encoder_decoder.EncoderDecoder` takes them.
        d_model: model width.
        n_head: attention heads.
        n_encoder_layers: encoder blocks.
        n_decoder_layers: decoder blocks.
        d_ff: hidden width of the MLPs.
        dropout: on embeddings, attention weights and residual branches.
        positions: `sinusoidal` or `learned`.
        max_length: longest source and longest target input (the position table).
        share_embeddings: one joint vocabulary: the source embedding, the target embedding and
            the output layer are one matrix (the vocabulary sizes must be equal). Otherwise the
            source has its own embedding and the target embedding is tied to the output layer.
        activation: `gelu` or `relu` in the MLPs.
        bias: biases in linear layers and LayerNorms.
        copy: a pointer-generator output that can copy source tokens (needs
            `share_embeddings`); the net then returns log-probabilities, not logits.
    """

    block_classes = (EncoderBlock, DecoderBlock)  # FSDP units, activation-checkpointing units
    # Tensor-parallel plan (Megatron style): the layers that widen are split by output
    # columns (attention by heads), the layers that narrow by input rows, so each sublayer
    # needs one all-reduce. Cross-attention's keys and values read the (replicated) memory.
    tensor_parallel_plan = {
        **{f"encoder_blocks.*.attn.{n}": "colwise" for n in "qkv"},
        "encoder_blocks.*.attn.proj": "rowwise",
        **{f"decoder_blocks.*.{a}.{n}": "colwise" for a in ("self_attn", "cross_attn")
           for n in "qkv"},
        "decoder_blocks.*.self_attn.proj": "rowwise", "decoder_blocks.*.cross_attn.proj": "rowwise",
        "encoder_blocks.*.mlp.fc": "colwise", "encoder_blocks.*.mlp.proj": "rowwise",
        "decoder_blocks.*.mlp.fc": "colwise", "decoder_blocks.*.mlp.proj": "rowwise",
    }

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, pad_id: int, bos_id: int,
                 eos_id: int, d_model: int = 256, n_head: int = 4, n_encoder_layers: int = 3,
                 n_decoder_layers: int = 3, d_ff: int = 1024, dropout: float = 0.1,
                 positions: str = "sinusoidal", max_length: int = 256,
                 share_embeddings: bool = True, activation: str = "gelu", bias: bool = True,
                 copy: bool = False):
        check_arguments(d_model, n_head, positions, activation)
        if copy and not share_embeddings:
            raise ValueError("copy needs one joint vocabulary shared by source and target: "
                             "set share_embeddings=true (and a joint tokenizer)")
        super().__init__(src_vocab_size, tgt_vocab_size, pad_id, bos_id, eos_id, d_model,
                         share_embeddings)
        self.d_model, self.d_ff, self.max_length = d_model, d_ff, max_length
        if positions == "learned":
            self.positions = nn.Embedding(max_length, d_model)
        else:
            self.register_buffer("sinusoids", sinusoids(max_length, d_model), persistent=False)
            self.positions = None
        self.drop = nn.Dropout(dropout)
        sizes = (d_model, n_head, d_ff, activation, dropout, bias)
        self.encoder_blocks = nn.ModuleList(EncoderBlock(*sizes) for _ in range(n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model, bias=bias)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(*sizes) for _ in range(n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = OutputLayer(d_model, tgt_vocab_size, bias=False)
        self.lm_head.weight = self.tgt_embed.weight  # tied target input/output embeddings
        self.copier = Copier(d_model) if copy else None
        # the copier reads the memory row by row: a copying net gives each beam its own
        self.beams_share_memory = not copy
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # fairseq's transformer: Xavier for projections; embeddings N(0, 1/d), scaled by
        # sqrt(d) on the way in, so tokens and sinusoids are of the same size.
        if isinstance(module, nn.Linear) and module is not self.lm_head:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.d_model ** -0.5)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def embed(self, table: nn.Embedding, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) ids at positions start.. to (B, T, C) scaled embeddings plus positions."""
        end = start + tokens.size(1)
        if end > self.max_length:
            raise ValueError(f"sequence of {end} tokens exceeds max_length {self.max_length}")
        x = table(tokens) * math.sqrt(self.d_model)
        if self.positions is not None:
            x = x + self.positions(torch.arange(start, end, device=tokens.device))
        else:
            x = x + self.sinusoids[start:end]
        return self.drop(x)

    def forward(self, source: torch.Tensor, target_in: torch.Tensor,
                encoded: dict | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) of the next target token at each position
        (`encoded`: `encode(source)`, if the caller has it)."""
        encoded = encoded if encoded is not None else self.encode(source)
        x = self.embed(self.tgt_embed, target_in)  # (B, T, C)
        for block in self.decoder_blocks:
            x, _ = block(x, encoded["memory"], encoded["memory_mask"])
        return self.output(self.decoder_norm(x), encoded)  # (B, T, V)

    def output(self, x: torch.Tensor, encoded: dict) -> torch.Tensor:
        """(B, T, C) decoder states to (B, T, V) logits, or log-probabilities with `copy`."""
        logits = self.lm_head(x)
        if self.copier is None:
            return logits
        return self.copier(x, logits, encoded["memory"], encoded["memory_mask"],
                           encoded["source"])

    def encode(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """The memory (B, S, C) and its mask (B, S), True at real source tokens (and, with
        `copy`, the source ids)."""
        mask = source != self.pad_id  # (B, S)
        x = self.embed(self.src_embed, source)
        for block in self.encoder_blocks:
            x = block(x, mask)
        encoded = {"memory": self.encoder_norm(x), "memory_mask": mask}
        if self.copier is not None:
            encoded["source"] = source
        return encoded

    def decode_step(self, tokens: torch.Tensor, encoded: dict, cache: dict | None
                    ) -> tuple[torch.Tensor, dict]:
        """Logits (B, V) of the token after `tokens` (B, 1), and the extended cache.

        `cache` is None on the first step (`tokens` then holds <bos>); it carries the step
        count, each block's self-attention keys/values so far, and each block's
        cross-attention keys/values of the memory (computed on the first step only).
        """
        step = cache["step"] if cache else 0
        x = self.embed(self.tgt_embed, tokens, start=step)  # (B, 1, C)
        layers = []
        for i, block in enumerate(self.decoder_blocks):
            x, layer = block(x, encoded["memory"], encoded["memory_mask"],
                             cache["layers"][i] if cache else None)
            layers.append(layer)
        logits = self.output(self.decoder_norm(x[:, -1:]), encoded)[:, 0]  # (B, V)
        return logits, {"step": step + tokens.size(1), "layers": layers}

    def reorder_cache(self, cache: dict, indices: torch.Tensor,
                      within_sentences: bool = False, sentences: torch.Tensor | None = None
                      ) -> dict:
        """Each block's self-attention keys and values of rows `indices`, and its
        cross-attention's (of the encoder output alone) of rows `sentences` if given, else
        `indices`; kept as they are `within_sentences`."""
        memory_rows = indices if sentences is None else sentences

        def follow(kind: str, kv):
            if kind == "cross":
                return kv if within_sentences else select_rows(kv, memory_rows)
            return select_rows(kv, indices)

        layers = [{kind: follow(kind, kv) for kind, kv in layer.items()}
                  for layer in cache["layers"]]
        return {"step": cache["step"], "layers": layers}

    def flops(self, source_lengths: torch.Tensor, target_lengths: torch.Tensor
              ) -> torch.Tensor:
        """Forward FLOPs (`lmlab.models.flops`) of each pair: `source_lengths` (B,) source
        tokens, `target_lengths` (B,) target inputs (`<bos> y1 .. yn`)."""
        d, f, S, T = self.d_model, self.d_ff, source_lengths.double(), target_lengths.double()
        encoder = linear(S, d, 4 * d) + attention(S, S, d) + linear(S, d, f) + linear(S, f, d)
        decoder = (linear(T, d, 4 * d) + attention(T, T, d)  # self-attention
                   + linear(T, d, 2 * d) + linear(S, d, 2 * d) + attention(T, S, d)  # cross
                   + linear(T, d, f) + linear(T, f, d))
        flops = (len(self.encoder_blocks) * encoder + len(self.decoder_blocks) * decoder
                 + linear(T, d, self.lm_head.out_features))
        if self.copier is not None:  # its query, attention, gate and per-id sums (T x S x S)
            flops = flops + linear(T, d, d) + attention(T, S, d) + linear(T, 2 * d, 1) \
                + 2 * T * S * S
        return flops


class Copier(nn.Module):
    """A pointer-generator output: p = g * softmax(logits) + (1 - g) * attention over the
    source ids, with the gate g from the decoder state and its source context.
    Returns log p (B, T, V).

    Only the ids a source holds get copy mass, so the mixture is computed at the source
    positions (B, T, S), not over the whole vocabulary: a position's copy mass is the
    attention on every position that holds the same id. An id held at several positions is
    written into the vocabulary once, from its first position: written from each of them,
    its gradient would be counted once per position."""

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(2 * d_model, 1)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, memory: torch.Tensor,
                memory_mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ memory.transpose(1, 2) / math.sqrt(x.size(-1))  # (B, T, S)
        scores = scores.masked_fill(~memory_mask[:, None, :], float("-inf"))
        attention = scores.float().softmax(-1)
        context = attention.to(memory.dtype) @ memory  # (B, T, C)
        gate = self.gate(torch.cat([x, context], -1)).float()  # (B, T, 1)
        generated = F.logsigmoid(gate) + logits.float().log_softmax(-1)  # (B, T, V)
        same_id = source[:, :, None] == source[:, None, :]  # (B, S, S)
        copied = attention @ same_id.float()  # (B, T, S): padding gets none (attention 0)
        ids = source[:, None, :].expand(-1, x.size(1), -1)  # (B, T, S)
        kept = generated.gather(-1, ids)  # (B, T, S)
        # clamped: a padding position (copy mass 0) must not give an infinite gradient
        mixed = torch.logaddexp(kept, F.logsigmoid(-gate) + copied.clamp_min(1e-30).log())
        change = (mixed - kept) * first_occurrences(same_id, memory_mask)[:, None, :]
        return generated.scatter_add(-1, ids, change)  # (B, T, V): one change an id


def first_occurrences(same_id: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1.0 at each real position whose id no earlier position of its row holds,
    from `same_id` (B, S, S), True where two positions hold one id, and the mask (B, S)."""
    earlier = torch.ones_like(same_id[0]).tril(-1)  # (S, S): True where j < i
    return (mask & ~(same_id & earlier).any(-1)).float()


def check_arguments(d_model: int, n_head: int, positions: str, activation: str) -> None:
    if d_model % n_head:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, not {positions!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    """(length, d_model) sinusoidal positions of "Attention is all you need" (sin, cos
    interleaved by pairs of channels)."""
    positions = torch.arange(length).float()[:, None]  # (L, 1)
    inv_freq = 10_000.0 ** (-torch.arange(0, d_model, 2).float() / d_model)  # (C/2,)
    angles = positions * inv_freq  # (L, C/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :d_model]
