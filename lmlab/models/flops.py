"""Forward FLOPs of the nets' parts, by formula: what each net's `flops` adds up.

Model FLOPs count the matrix products a net needs for its real tokens, as torch's
`FlopCounterMode` counts them (a multiply-add is 2 FLOPs; elementwise work, norms and
embedding lookups are left out; attention counts every query-key pair it scores, causal
ones included). Padding is not counted: each example counts at its own length. A net's
`flops` takes tensors of one length per example and returns one count per example, in
float64, so that a batch's count is one expression on its device (no sync).
"""

from __future__ import annotations

from torch import nn

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def linear(tokens, fan_in: int, fan_out: int):
    """A linear layer applied at `tokens` positions."""
    return 2 * tokens * fan_in * fan_out


def attention(queries, keys, width: int):
    """Scores (queries x keys) and the weighted sum of the values, over all heads."""
    return 4 * queries * keys * width


def recurrent(module: nn.RNNBase, tokens):
    """An LSTM, GRU or RNN over `tokens` time steps: per layer and direction, the input and
    hidden projections of every gate, 2 * gates * hidden * (input + hidden) (the gates'
    elementwise arithmetic left out, as matrix-product counts do)."""
    gates, hidden = GATES[type(module)], module.hidden_size
    directions = 2 if module.bidirectional else 1
    per_token = 0
    for layer in range(module.num_layers):
        inputs = module.input_size if layer == 0 else hidden * directions
        per_token += directions * 2 * gates * hidden * (inputs + hidden)
    return per_token * tokens
