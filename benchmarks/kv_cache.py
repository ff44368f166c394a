"""Decoding now against before: the self-attention cache written in place (`KeyValueBuffer`)
instead of concatenating every step's keys and values onto a new tensor (`torch.cat`), and
beam search keeping one row of encoder output and cross-attention keys and values a sentence,
read by all its beams together and left where it is while no sentence leaves the batch,
instead of a copy for each beam re-indexed at every step.

In one process, at 1 thread, the two alternating ("before" is the same code with a
concatenating `append` and a `reorder` that re-indexes everything); medians of the repeats.
Random weights, so outputs run to their length limit:
- GPT greedy decoding: 6 x 384, block 1024, one prompt of 16 tokens, 512 new tokens;
- seq2seq beam search (beam 5) of the Multi30k CPU size (4+4 x 128, vocabulary 8,000) on
  16 random sources of 150-250 tokens, up to 1.2 x source + 10 tokens.

    python -m benchmarks.kv_cache [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.decoding_speed import PAD, VOCAB, batches, random_net
from benchmarks.lstm_throughput import machine
from lmlab.models.attention import KeyValueBuffer
from lmlab.models.decoding import beam_search
from lmlab.models.encoder_decoder import EncoderDecoder
from lmlab.models.gpt import GPT
from lmlab.models.sampling import generate


def concatenating_append(self, keys, values):
    """The replaced cache: every step copies all earlier keys and values into new tensors."""
    self.keys = torch.cat([self[0], keys], dim=2)
    self.values = torch.cat([self[1], values], dim=2)
    self.length = self.keys.size(2)
    return self.keys, self.values


REORDER = EncoderDecoder.reorder


def reorder_everything(self, encoded, cache, indices, within_sentences=False):
    """The replaced reorder: every row of everything, at every step."""
    return REORDER(self, encoded, cache, indices)


@contextlib.contextmanager
def decoding(kind: str):
    if kind == "now":
        yield
        return
    kept = KeyValueBuffer.append
    KeyValueBuffer.append, EncoderDecoder.reorder = concatenating_append, reorder_everything
    try:
        yield
    finally:
        KeyValueBuffer.append, EncoderDecoder.reorder = kept, REORDER


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gpt_decoding(new_tokens: int):
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, block_size=1024, n_layer=6, n_head=6, n_embd=384).eval()
    prompt = torch.randint(VOCAB, (1, 16))
    outputs = {}

    def run(kind: str) -> None:
        outputs[kind] = torch.cat(list(generate(model, prompt, new_tokens, temperature=0)), 1)

    return run, outputs


def beam_decoding(sources: int):
    net = random_net("transformer").eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(150, 251, (sources,), generator=g).tolist()
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    source_batches = batches(rows, 8, PAD)
    outputs = {}

    def run(kind: str) -> None:
        net.beams_share_memory = kind == "now"  # before: a copy of the memory for each beam
        with torch.no_grad():
            outputs[kind] = [[h.tokens for h in hyps] for source in source_batches
                             for hyps in beam_search(net, source, beam=5)]

    return run, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print("| decoding | before s | now s | speed-up | same outputs |")
    print("|---|---|---|---|---|")
    for name, (run, outputs) in {"GPT greedy, 512 new tokens": gpt_decoding(512),
                                 "seq2seq beam 5, 150-250-token sources": beam_decoding(16)
                                 }.items():
        times = {"before": [], "now": []}
        for _ in range(args.repeats):
            for kind in times:
                with decoding(kind):
                    times[kind].append(timed(lambda: run(kind)))  # noqa: B023
        old, new = (statistics.median(times[k]) for k in ("before", "now"))
        same = str(outputs["before"]) == str(outputs["now"])
        print(f"| {name} | {old:.2f} | {new:.2f} | {old / new:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
