"""Batched greedy and beam search for encoder-decoder nets.

A net provides `encode(source)`, `decode_step(tokens, encoded, cache)`, `reorder(encoded,
cache, indices, within_sentences)` and the ids `pad_id`, `bos_id`, `eos_id` (see
`Seq2SeqTransformer` and `RNNSeq2Seq`). The encoder runs once per sentence; each step feeds
one token per row with a cache (or, with `use_cache=False`, the whole prefix without one, for
comparison).

Rules that hold whatever the batch:
- beams are rows (sentence-major: B * beam rows); each row ends at its own <eos> (in beam
  search, a finished sentence leaves the batch), so padding and neighbours never change a
  result; a net with `beams_share_memory` keeps one row of encoder output a sentence, which
  its beams read together;
- a hypothesis has at most `floor(max_len_a * source_length + max_len_b)` tokens (source
  length without padding; also at most what the net's positions allow, `net.max_length - 1`),
  after which <eos> is forced, and at least `min_length` tokens (<eos> is masked before);
- with `no_repeat_ngram_size` n > 0, no row repeats an n-gram of its own output (a token
  that would complete one it holds is masked; <eos> never is), unless nothing else is left;
- score = summed log-probability / length ** length_penalty, the length counting the
  generated tokens, <eos> included: never the source, <bos> or padding;
- beam search with beam 1 is greedy search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmlab.models.output_layer import decodes


@dataclass
class Hypothesis:
    """One output: token ids without <bos> and <eos>, and its length-normalised score."""

    tokens: list[int]
    score: float


def max_lengths(net, source: torch.Tensor, max_len_a: float, max_len_b: float,
                min_length: int) -> torch.Tensor:
    """(B,) the most tokens each row may produce before <eos>: a * source length + b, at
    least `min_length`, and within the net's position table (`net.max_length` counts <bos>)."""
    lengths = (source != net.pad_id).sum(1).double()
    # A little slack, so that 2.3 * 100 (229.99999999999997 in floating point) gives 230.
    limits = (max_len_a * lengths + max_len_b + 1e-6).floor().long().clamp(min=min_length)
    table = getattr(net, "max_length", None)
    return limits.clamp(max=table - 1) if table else limits


def constrain(logp: torch.Tensor, step: int, limits: torch.Tensor, shortest: int,
              min_length: int, eos_id: int) -> torch.Tensor:
    """Masks <eos> before `min_length` tokens, and everything but <eos> at a row's limit.

    Args:
        logp: (R, V) log-probabilities of the token after `step` generated ones.
        limits: (R,) each row's `max_lengths`.
        shortest: the smallest of `limits` (no row is at its limit before it).
    """
    if step < min_length:
        logp[:, eos_id] = float("-inf")
    if step < shortest:
        return logp
    at_limit = (step >= limits)[:, None]  # (R, 1)
    not_eos = torch.arange(logp.size(-1), device=logp.device) != eos_id  # (V,)
    return logp.masked_fill(at_limit & not_eos, float("-inf"))


def block_repeats(logp: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Masks, in each row, every token that would complete an n-gram its `history` (R, L)
    already holds: the tokens that followed an earlier occurrence of its last n - 1 (n = 1:
    every token it produced). A row that would have no token left is not masked.

    Raises:
        ValueError: n is negative (0 is off).
    """
    if n < 0:
        raise ValueError(f"no_repeat_ngram_size must be 0 (off) or more, not {n}")
    if n == 0 or history.size(1) < n:
        return logp
    grams = history.unfold(1, n, 1)  # (R, L - n + 1, n)
    recent = history[:, history.size(1) - n + 1:]  # (R, n - 1)
    seen = (grams[:, :, :-1] == recent[:, None, :]).all(-1)  # (R, G)
    ban = torch.zeros(seen.shape, dtype=logp.dtype, device=logp.device)
    blocked = logp.scatter_add(1, grams[:, :, -1], ban.masked_fill(seen, float("-inf")))
    stuck = blocked.isneginf().all(-1, keepdim=True)  # e.g. <eos> masked by min_length
    return torch.where(stuck, logp, blocked)


def _step(net, tokens: torch.Tensor, history: torch.Tensor, encoded: dict, cache,
          use_cache: bool) -> tuple[torch.Tensor, object]:
    """Log-probabilities (R, V) of the next token: from the newest token and the cache, or
    from the whole prefix (<bos> and `history`) without one."""
    if use_cache:
        logits, cache = net.decode_step(tokens, encoded, cache)
    else:
        prefix = torch.cat([torch.full_like(tokens, net.bos_id), history], dim=1)
        logits, _ = net.decode_step(prefix, encoded, None)
    return logits.float().log_softmax(-1), cache


@torch.no_grad()
@decodes
def greedy(net, source: torch.Tensor, max_len_a: float = 1.2, max_len_b: float = 10,
           min_length: int = 1, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
           use_cache: bool = True, steps: int | None = None, encoded: dict | None = None
           ) -> list[list[Hypothesis]]:
    """Greedy search: the most likely token at each step, each row until its own <eos>.

    Args:
        net: an encoder-decoder net (see the module docstring).
        source: (B, S) right-padded source ids.
        max_len_a, max_len_b: at most floor(a * source length + b) tokens before <eos>.
        min_length: at least this many tokens before <eos>.
        length_penalty: alpha of the score, summed log-probability / length ** alpha.
        no_repeat_ngram_size: n > 0: never repeat an n-gram of the output (0: off).
        use_cache: decode from the cache (False recomputes the prefix at every step).
        steps: run the decoder exactly this many steps, even after every row has ended
            (for callers that must keep several decoders in step); at least the longest
            row's limit + 1. None: stop when every row has ended.
        encoded: `net.encode(source)`, when the caller has it already (a validation step
            that computed the loss with it); None: encoded here.

    Returns:
        For each row, one hypothesis in a list (the shape `beam_search` returns).
    """
    limits = max_lengths(net, source, max_len_a, max_len_b, min_length)
    B, device = source.size(0), source.device
    encoded, cache = encoded if encoded is not None else net.encode(source), None
    tokens = torch.full((B, 1), net.bos_id, dtype=torch.long, device=device)
    history = tokens[:, :0]
    shortest = int(limits.min())
    total = torch.zeros(B, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(fixed_steps(steps, limits)):
        logp, cache = _step(net, tokens, history, encoded, cache, use_cache)
        if done.all():
            continue  # the caller asked for a fixed number of steps
        logp = constrain(logp, step, limits, shortest, min_length, net.eos_id)
        logp = block_repeats(logp, history, no_repeat_ngram_size)
        best_logp, best = logp.max(-1)
        total += best_logp.masked_fill(done, 0.0)
        length += (~done).long()
        done |= best == net.eos_id
        tokens = best[:, None]
        history = torch.cat([history, tokens], dim=1)
        if done.all() and steps is None:  # a sync per step: decoding, not the hot path
            break
    scores = (total / length.double() ** length_penalty).tolist()
    rows = history.tolist()
    return [[Hypothesis(row[:n - 1], score)]
            for row, n, score in zip(rows, length.tolist(), scores)]


@torch.no_grad()
@decodes
def beam_search(net, source: torch.Tensor, beam: int = 5, length_penalty: float = 1.0,
                max_len_a: float = 1.2, max_len_b: float = 10, min_length: int = 1,
                n_finished: int | None = None, no_repeat_ngram_size: int = 0,
                use_cache: bool = True, steps: int | None = None, encoded: dict | None = None
                ) -> list[list[Hypothesis]]:
    """Batched beam search; each sentence stops when it has `n_finished` hypotheses.

    At each step, the 2 * beam best continuations of a sentence's beams are ranked; those
    among the first `beam` that end in <eos> become finished hypotheses, and the first
    `beam` that do not are the next beams.

    Args:
        net: an encoder-decoder net (see the module docstring).
        source: (B, S) right-padded source ids.
        beam: hypotheses kept per sentence.
        length_penalty: alpha of the score, summed log-probability / length ** alpha.
        max_len_a, max_len_b: at most floor(a * source length + b) tokens before <eos>.
        min_length: at least this many tokens before <eos>.
        n_finished: finished hypotheses at which a sentence stops; None: `beam`.
        no_repeat_ngram_size: n > 0: never repeat an n-gram of the output (0: off).
        use_cache: decode from the cache (False recomputes the prefix at every step).
        steps: run the decoder exactly this many steps (see `greedy`); None: stop when
            every sentence is done.
        encoded: `net.encode(source)` if the caller has it (see `greedy`).

    Returns:
        For each row of `source`, its finished hypotheses, best score first.
    """
    if beam < 1:
        raise ValueError(f"beam must be at least 1, not {beam}")
    n_finished = n_finished or beam
    limits = max_lengths(net, source, max_len_a, max_len_b, min_length)
    B, device = source.size(0), source.device
    encoded, cache = encoded if encoded is not None else net.encode(source), None
    shared = getattr(net, "beams_share_memory", False)  # else every beam gets its own copy
    if not shared:
        encoded, _ = net.reorder(encoded, None,
                                 torch.arange(B, device=device).repeat_interleave(beam))
    search = _Beams(B, beam, limits, net.bos_id)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    total = fixed_steps(steps, limits)
    for step in range(total):
        logp, cache = _step(net, search.tokens, search.history, encoded, cache, use_cache)
        shortest = min(search.limits[s] for s in search.sentences)
        logp = constrain(logp, step, search.row_limits, shortest, min_length, net.eos_id)
        logp = block_repeats(logp, search.history, no_repeat_ngram_size)
        candidates = search.rank(logp)
        for sentence, hypothesis in search.ended(candidates, net.eos_id, step, length_penalty):
            if len(finished[sentence]) < n_finished:
                finished[sentence].append(hypothesis)
        done = [len(finished[s]) >= n_finished or step >= search.limits[s]
                for s in search.sentences]
        rows = search.advance(candidates, net.eos_id, done)
        if rows is None:
            idle(net, search, encoded, cache, use_cache, total - step - 1)
            break
        # while every sentence stays, a row's beams are rows of its sentence: its encoder
        # output need not move
        sentences = {"sentences": rows[::beam] // beam} if shared else {}
        encoded, cache = net.reorder(encoded, cache, rows, within_sentences=not any(done),
                                     **sentences)
    return [sorted(hyps, key=lambda h: -h.score) for hyps in finished]


def fixed_steps(steps: int | None, limits: torch.Tensor) -> int:
    """The decoder steps to take: `steps`, or as many as the longest row may need."""
    needed = int(limits.max()) + 1
    if steps is not None and steps < needed:
        raise ValueError(f"steps={steps} is fewer than the {needed} a row may need")
    return steps or needed


def idle(net, search: _Beams, encoded: dict, cache, use_cache: bool, steps: int) -> None:
    """Runs the decoder `steps` more times on the last beams, discarding what it says (see
    `greedy`'s `steps`)."""
    for _ in range(steps):
        _, cache = _step(net, search.tokens, search.history, encoded, cache, use_cache)


class _Beams:
    """The live sentences of a beam search: their beams' scores, tokens and histories."""

    def __init__(self, batch: int, beam: int, limits: torch.Tensor, bos_id: int):
        device = limits.device
        self.beam, self.limits = beam, limits.tolist()
        self.sentences = list(range(batch))  # original row of each live sentence
        self.row_limits = limits.repeat_interleave(beam)  # (R,) R = live sentences * beam
        self.scores = torch.full((batch, beam), float("-inf"), device=device)
        self.scores[:, 0] = 0.0  # all beams start equal: only the first one is expanded
        self.tokens = torch.full((batch * beam, 1), bos_id, dtype=torch.long, device=device)
        self.history = self.tokens[:, :0]  # (R, step) generated tokens

    def rank(self, logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 2 * beam best continuations of each live sentence, best first."""
        n, vocab = len(self.sentences), logp.size(-1)
        scores = (self.scores[:, :, None] + logp.view(n, self.beam, vocab)).view(n, -1)
        top, index = scores.topk(min(2 * self.beam, scores.size(1)), dim=1)  # (n, 2k)
        base = torch.arange(n, device=logp.device)[:, None] * self.beam
        return {"scores": top, "rows": base + index // vocab, "tokens": index % vocab}

    def ended(self, candidates: dict, eos_id: int, step: int, alpha: float):
        """(sentence, hypothesis) for each candidate among the first `beam` that ends."""
        ends = (candidates["tokens"][:, :self.beam] == eos_id) \
            & candidates["scores"][:, :self.beam].isfinite()
        where = ends.nonzero()  # (E, 2) sorted: by sentence, then best first
        if not len(where):
            return []
        i, rank = where[:, 0], where[:, 1]
        histories = self.history[candidates["rows"][i, rank]].tolist()
        scores = (candidates["scores"][i, rank].double() / (step + 1) ** alpha).tolist()
        return [(self.sentences[s], Hypothesis(tokens, score))
                for s, tokens, score in zip(i.tolist(), histories, scores)]

    def advance(self, candidates: dict, eos_id: int, done: list[bool]) -> torch.Tensor | None:
        """Keeps the first `beam` candidates not ending in <eos> for the sentences not done;
        returns the rows they continue (for `reorder`), or None when no sentence is left."""
        width = candidates["tokens"].size(1)
        ends = (candidates["tokens"] == eos_id) & candidates["scores"].isfinite()
        order = (ends.long() * width + torch.arange(width, device=ends.device))
        order = order.topk(self.beam, dim=1, largest=False).indices  # (n, beam) best first
        picked = {name: t.gather(1, order) for name, t in candidates.items()}
        if any(done):
            keep = torch.tensor([not d for d in done], device=ends.device)
            picked = {name: t[keep] for name, t in picked.items()}
            self.sentences = [s for s, d in zip(self.sentences, done) if not d]
            self.row_limits = self.row_limits.view(-1, self.beam)[keep].flatten()
        if not self.sentences:
            return None
        rows = picked["rows"].flatten()
        self.scores = picked["scores"]
        self.tokens = picked["tokens"].reshape(-1, 1)
        self.history = torch.cat([self.history[rows], self.tokens], dim=1)
        return rows


def best_tokens(net, source: torch.Tensor, beam: int = 5, n_finished: int | None = None,
                choose: Callable[[list[Hypothesis]], int] | None = None,
                **settings) -> list[list[int]]:
    """The best hypothesis's tokens for each source row: greedy search for beam 1, else beam
    search; `settings` are their shared arguments (length_penalty, max_len_a, ...).
    `choose` picks, from a sentence's finished hypotheses (best score first), the index of
    the one to output (None: the best-scored)."""
    if beam == 1:
        found = greedy(net, source, **settings)
    else:
        found = beam_search(net, source, beam, n_finished=n_finished, **settings)
    if choose is None:
        return [hypotheses[0].tokens for hypotheses in found]
    return [hypotheses[choose(hypotheses)].tokens for hypotheses in found]
