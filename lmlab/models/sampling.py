"""Token-by-token generation for causal language models: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmlab.models.output_layer import decoding


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
                  ) -> torch.Tensor:
    """Sets to -inf every logit outside the top k and outside the nucleus of mass top_p.

    Args:
        logits: (B, V) scores.
        top_k: keep the k highest; None or 0 keeps all.
        top_p: keep the smallest set of highest-probability tokens whose mass reaches top_p
            (the token that crosses it included); None or 1.0 keeps all.
    """
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # tokens after the mass is already reached
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position to (B, 1) chosen ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, stop_id: int | None = None,
             block_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yields (B, 1) new tokens one at a time, so callers can stream them.

    With `use_cache`, each step feeds only the newest token and reuses the keys and values
    of the earlier ones; when the context outgrows `model.block_size`, it is cut to the last
    block and the cache is rebuilt.

    Args:
        model: a `GPT` or `RNNLanguageModel`, or any callable like their forward, which
            takes `cache` and `return_cache`.
        prompt: (B, T) token ids, T >= 1.
        max_new_tokens: how many tokens to produce.
        temperature: 0 for greedy decoding; higher is more random.
        top_k, top_p: sampling filters, see `filter_logits`.
        use_cache: reuse keys/values between steps.
        generator: seeds the sampling.
        stop_id: stop after producing this token (batch size 1).
        block_size: the longest context; by default `model.block_size` (None: no limit).
    """
    block_size = block_size or getattr(model, "block_size", None)
    block = block_size or max_new_tokens + prompt.size(1)
    tokens, cache = prompt, None
    with decoding(model):
        for _ in range(max_new_tokens):
            if use_cache and cache is not None:
                logits, cache = model(tokens[:, -1:], cache=cache, return_cache=True)
            elif use_cache:
                logits, cache = model(tokens[:, -block:], return_cache=True)
            else:
                logits = model(tokens[:, -block:])
            new = next_token(logits[:, -1], temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, new], dim=1)
            if use_cache and tokens.size(1) > block:
                cache = None  # the window slides: positions shift, so the cache is rebuilt
            yield new
            if stop_id is not None and int(new[0, 0]) == stop_id:
                return
