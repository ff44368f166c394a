"""An LSTM encoder-decoder with attention (Luong or Bahdanau): the recurrent baseline.

Encoder: a forward and a backward LSTM stack over the source. As in `lmlab.models.rnn`, the
backward stack reads each sequence reversed within its length (padding stays at the end),
so the right padding never reaches a real position and no packing is needed. The memory is
both directions' outputs (B, S, 2H); the decoder's first hidden state is a tanh bridge of
the two final states.

Decoder, one step at a time (teacher forcing runs the same step over the target):
- `luong`: Luong et al. 2015, "general" score h_t^T W m_s, with input feeding: the LSTM
  reads the embedding and the previous attentional vector, then attends with its new state;
  the attentional vector is tanh(W [context; h_t]).
- `bahdanau`: Bahdanau et al. 2015, additive score v^T tanh(W q + U m_s), attending with
  the previous state; the LSTM reads the embedding and the context.
The attentional vector has the embedding's width, so the output layer is tied to the target
embedding. The "cache" of decoding is the recurrent state and the last attentional vector.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.models.encoder_decoder import EncoderDecoder
from lmlab.models.flops import linear, recurrent
from lmlab.models.output_layer import OutputLayer
from lmlab.models.rnn import reverse_index

ATTENTIONS = ("luong", "bahdanau")


class RNNEncoder(nn.Module):
    """Bidirectional LSTM: embedded source (B, S, E) to memory (B, S, 2H) and final (B, 2H)."""

    def __init__(self, embed_dim: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        args = dict(input_size=embed_dim, hidden_size=hidden_size, num_layers=num_layers,
                    batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.forward_rnn, self.backward_rnn = nn.LSTM(**args), nn.LSTM(**args)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        forward_out = self.forward_rnn(x)[0]  # (B, S, H)
        flip = reverse_index(lengths, x.size(1))[..., None]  # (B, S, 1); its own inverse
        backward_out = self.backward_rnn(x.gather(1, flip.expand_as(x)))[0]
        backward_out = backward_out.gather(1, flip.expand_as(backward_out))  # back in order
        last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, forward_out.size(-1))
        final = torch.cat([forward_out.gather(1, last)[:, 0], backward_out[:, 0]], dim=-1)
        return torch.cat([forward_out, backward_out], dim=-1), final


class RNNDecoder(nn.Module):
    """One decoding step: embedding (B, E) and state to the attentional vector (B, E)."""

    def __init__(self, embed_dim: int, hidden_size: int, num_layers: int, dropout: float,
                 attention: str):
        super().__init__()
        self.attention = attention
        memory_size = 2 * hidden_size
        extra = embed_dim if attention == "luong" else memory_size  # input feeding or context
        self.rnn = nn.LSTM(embed_dim + extra, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.key = nn.Linear(memory_size, hidden_size, bias=False)  # W (luong), U (bahdanau)
        if attention == "bahdanau":
            self.query = nn.Linear(hidden_size, hidden_size)
            self.score = nn.Linear(hidden_size, 1, bias=False)
        self.combine = nn.Linear(memory_size + hidden_size, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embedded: torch.Tensor, encoded: dict, cache: dict
                ) -> tuple[torch.Tensor, dict]:
        state = (cache["h"], cache["c"])  # each (L, B, H)
        if self.attention == "luong":
            h, state = self.rnn(torch.cat([embedded, cache["feed"]], -1)[:, None], state)
            h = h[:, 0]  # (B, H)
            context = self.attend(h, encoded)
        else:
            context = self.attend(state[0][-1], encoded)  # the previous top-layer state
            h, state = self.rnn(torch.cat([embedded, context], -1)[:, None], state)
            h = h[:, 0]
        out = self.dropout(torch.tanh(self.combine(torch.cat([context, h], -1))))  # (B, E)
        return out, {"h": state[0], "c": state[1], "feed": out}

    def attend(self, query: torch.Tensor, encoded: dict) -> torch.Tensor:
        """Context (B, 2H): the memory averaged by the attention weights of `query` (B, H)."""
        keys = encoded["keys"]  # (B, S, H), projected once per sentence
        if self.attention == "luong":
            scores = torch.bmm(keys, query[:, :, None])[..., 0]  # (B, S)
        else:
            scores = self.score(torch.tanh(keys + self.query(query)[:, None]))[..., 0]
        scores = scores.masked_fill(~encoded["memory_mask"], float("-inf"))
        weights = scores.softmax(-1).nan_to_num(0.0)  # (B, S); an empty source reads nothing
        return torch.bmm(weights[:, None], encoded["memory"])[:, 0]  # (B, 2H)


class RNNSeq2Seq(EncoderDecoder):
    """LSTM encoder-decoder with attention: source (B, S) and target input (B, T) to logits
    (B, T, V).

    Args:
        src_vocab_size, tgt_vocab_size, pad_id, bos_id, eos_id: the vocabularies and the
            special ids, as `lmlab.models.encoder_decoder.EncoderDecoder` takes them.
        embed_dim: width of the embeddings and of the attentional vector.
        hidden_size: width of each LSTM (each encoder direction, and the decoder).
        num_layers: stacked LSTM layers in the encoder and in the decoder.
        dropout: on embeddings, between LSTM layers and on the attentional vector.
        attention: `luong` (general score, input feeding) or `bahdanau` (additive).
        share_embeddings: one joint vocabulary: the source and target embeddings (and the
            output layer, always tied to the target embedding) are one matrix.
    """

    block_classes = (RNNEncoder, RNNDecoder)  # FSDP units, activation-checkpointing units

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, pad_id: int, bos_id: int,
                 eos_id: int, embed_dim: int = 256, hidden_size: int = 256, num_layers: int = 1,
                 dropout: float = 0.3, attention: str = "luong", share_embeddings: bool = False):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        super().__init__(src_vocab_size, tgt_vocab_size, pad_id, bos_id, eos_id, embed_dim,
                         share_embeddings)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.encoder = RNNEncoder(embed_dim, hidden_size, num_layers, dropout)
        self.bridge = nn.Linear(2 * hidden_size, num_layers * hidden_size)
        self.decoder = RNNDecoder(embed_dim, hidden_size, num_layers, dropout, attention)
        self.drop = nn.Dropout(dropout)
        self.lm_head = OutputLayer(embed_dim, tgt_vocab_size, bias=False)
        self.lm_head.weight = self.tgt_embed.weight
        for p in self.parameters():  # Luong et al.'s uniform initialisation
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.tgt_embed.weight[pad_id].zero_()
            self.src_embed.weight[pad_id].zero_()

    def forward(self, source: torch.Tensor, target_in: torch.Tensor,
                encoded: dict | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) of the next target token at each position
        (`encoded`: `encode(source)`, if the caller has it)."""
        encoded = encoded if encoded is not None else self.encode(source)
        embedded = self.drop(self.tgt_embed(target_in))  # (B, T, E)
        cache = self.initial_state(encoded)
        outs = []
        for t in range(target_in.size(1)):
            out, cache = self.decoder(embedded[:, t], encoded, cache)
            outs.append(out)
        return self.lm_head(torch.stack(outs, dim=1))  # (B, T, V)

    def encode(self, source: torch.Tensor) -> dict[str, torch.Tensor]:
        """The memory (B, S, 2H), its mask (B, S), its attention keys (B, S, H) and the
        decoder's first hidden state (B, L * H)."""
        mask = source != self.pad_id
        memory, final = self.encoder(self.drop(self.src_embed(source)), mask.sum(1))
        return {"memory": memory, "memory_mask": mask, "keys": self.decoder.key(memory),
                "init": torch.tanh(self.bridge(final))}

    def initial_state(self, encoded: dict) -> dict:
        init = encoded["init"]  # (B, L * H)
        # cuDNN's LSTM takes contiguous states only (zeros_like keeps a transpose's strides)
        h = init.view(init.size(0), self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
        feed = init.new_zeros(init.size(0), self.lm_head.in_features)
        return {"h": h, "c": torch.zeros_like(h), "feed": feed}

    def decode_step(self, tokens: torch.Tensor, encoded: dict, cache: dict | None
                    ) -> tuple[torch.Tensor, dict]:
        """Logits (B, V) of the token after the last of `tokens` (B, 1), and the new state
        (`cache` is None on the first step)."""
        cache = cache or self.initial_state(encoded)
        for t in range(tokens.size(1)):
            out, cache = self.decoder(self.drop(self.tgt_embed(tokens[:, t])), encoded, cache)
        return self.lm_head(out), cache

    def reorder_cache(self, cache: dict, indices: torch.Tensor,
                      within_sentences: bool = False) -> dict:
        """The recurrent state (layers first) and the last attentional vector of rows
        `indices`."""
        return {"h": cache["h"].index_select(1, indices), "c": cache["c"].index_select(1, indices),
                "feed": cache["feed"].index_select(0, indices)}

    def flops(self, source_lengths: torch.Tensor, target_lengths: torch.Tensor
              ) -> torch.Tensor:
        """Forward FLOPs (`lmlab.models.flops`) of each pair: `source_lengths` (B,) source
        tokens, `target_lengths` (B,) target inputs (`<bos> y1 .. yn`)."""
        S, T = source_lengths.double(), target_lengths.double()
        H, E = self.hidden_size, self.lm_head.in_features
        decoder = self.decoder
        encoder = 2 * recurrent(self.encoder.forward_rnn, S) + linear(S, 2 * H, H) \
            + linear(torch.ones_like(S), 2 * H, self.num_layers * H)  # keys, bridge
        # each step: its scores (H wide) and context (2H wide) over the source, and the
        # attentional vector; Bahdanau's query projection besides
        steps = recurrent(decoder.rnn, T) + 6 * T * S * H + linear(T, 3 * H, E)
        if decoder.attention == "bahdanau":
            steps = steps + linear(T, H, H)
        return encoder + steps + linear(T, E, self.lm_head.out_features)
