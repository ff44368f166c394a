"""A recurrent language model (the seed's RNN LM): embedding, LSTM/GRU stack, tied output."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.models.flops import linear, recurrent
from lmlab.models.rnn import CELLS


class RNNLanguageModel(nn.Module):
    """Tokens (B, T) to next-token logits (B, T, V); the recurrent state is the "cache".

    Args:
        vocab_size: rows of the embedding and of the output layer.
        embed_dim: width of the embeddings (and of the output projection's input).
        hidden_size: width of the recurrent layers.
        num_layers: stacked recurrent layers.
        dropout: on embeddings, between layers and before the output.
        cell: `lstm`, `gru` or `rnn`.
        tie_weights: share the embedding with the output layer.
    """

    block_size = None  # no context limit

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_size: int = 512,
                 num_layers: int = 2, dropout: float = 0.2, cell: str = "lstm",
                 tie_weights: bool = True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = CELLS[cell](embed_dim, hidden_size, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.down = nn.Linear(hidden_size, embed_dim) if hidden_size != embed_dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embedding.weight

    def flops(self, lengths: torch.Tensor) -> torch.Tensor:
        """Forward FLOPs (`lmlab.models.flops`) of each sequence of `lengths` (B,) tokens."""
        T = lengths.double()
        down = linear(T, self.down.in_features, self.down.out_features) \
            if isinstance(self.down, nn.Linear) else 0
        return recurrent(self.rnn, T) + down + linear(T, self.head.in_features,
                                                      self.head.out_features)

    def forward(self, tokens: torch.Tensor, cache=None, return_cache: bool = False):
        x = self.dropout(self.embedding(tokens))  # (B, T, E)
        out, state = self.rnn(x, cache)  # (B, T, H)
        logits = self.head(self.dropout(self.down(out)))  # (B, T, V)
        return (logits, state) if return_cache else logits
