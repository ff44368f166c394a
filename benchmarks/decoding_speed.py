"""Decoding speed of an encoder-decoder: sentences/s of beam search with the cache on and
off, and of greedy search, over the same source sentences.

The net is a trained run's (`--run`, loaded as `lmlab.generate` loads it; `--sources` is then
a text file, one source sentence a line, encoded with the run's tokenizer), or a random one
of the Multi30k CPU size (4+4 layers x 128, joint vocabulary of 8,000; `--net lstm` for the
LSTM with attention) decoding random sources of 8-20 tokens. A random net rarely ends early,
so it decodes to the length limit: the slowest case. Each variant runs `--repeats` times,
alternating; the medians are reported.

    python -m benchmarks.decoding_speed [--net transformer|lstm] [--sentences 200]
    python -m benchmarks.decoding_speed --run outputs/DATE/TIME --sources test.en
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.lstm_throughput import machine
from lmlab.models.decoding import beam_search, greedy
from lmlab.models.rnn_seq2seq import RNNSeq2Seq
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer

VOCAB, PAD, BOS, EOS = 8_000, 0, 1, 2


def random_net(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "lstm":
        return RNNSeq2Seq(VOCAB, VOCAB, PAD, BOS, EOS, embed_dim=128, hidden_size=256,
                          share_embeddings=True)
    return Seq2SeqTransformer(VOCAB, VOCAB, PAD, BOS, EOS, d_model=128, n_head=4,
                              n_encoder_layers=4, n_decoder_layers=4, d_ff=512)


def random_sources(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 21, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for length in lengths]


def batches(sources: list[list[int]], size: int, pad_id: int) -> list[torch.Tensor]:
    """Right-padded (B, S) batches of consecutive sources."""
    out = []
    for start in range(0, len(sources), size):
        chunk = sources[start:start + size]
        batch = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
        for i, ids in enumerate(chunk):
            batch[i, :len(ids)] = torch.tensor(ids)
        out.append(batch)
    return out


def rate(decode, source_batches: list[torch.Tensor]) -> tuple[float, int]:
    """(sentences/s, generated tokens of the best hypotheses) of one pass."""
    start, tokens, sentences = time.perf_counter(), 0, 0
    for source in source_batches:
        results = decode(source)
        tokens += sum(len(hyps[0].tokens) for hyps in results)
        sentences += len(results)
    return sentences / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder or checkpoint (default: a random net)")
    parser.add_argument("--sources", type=Path, help="source sentences, one a line (with --run)")
    parser.add_argument("--net", choices=("transformer", "lstm"), default="transformer")
    parser.add_argument("--sentences", type=int, default=200, help="random sources to decode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        from lmlab.training.runs import load_run
        task, data, _ = load_run(args.run, "python -m benchmarks.decoding_speed --run")
        net = task.net
        if args.sources is None:
            parser.error("--run needs --sources, the sentences to decode")
        lines = args.sources.read_text(encoding="utf-8").splitlines()
        sources = [data.source_tokenizer.encode(line) for line in lines]
    else:
        net, sources = random_net(args.net), random_sources(args.sentences)
    net.eval()
    source_batches = batches(sources, args.batch_size, net.pad_id)
    variants = {
        f"beam {args.beam}, cache": lambda s: beam_search(net, s, beam=args.beam),
        f"beam {args.beam}, no cache": lambda s: beam_search(net, s, beam=args.beam,
                                                             use_cache=False),
        "greedy, cache": lambda s: greedy(net, s),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    lengths = {}
    for _ in range(args.repeats):
        for name, decode in variants.items():
            sentences_per_s, lengths[name] = rate(decode, source_batches)
            rates[name].append(sentences_per_s)
    print(f"machine: {machine()}")
    print(f"net: {type(net).__name__}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
          f"parameters; {len(sources)} sentences in batches of {args.batch_size}, "
          f"{args.repeats} repeats")
    for name, runs in rates.items():
        print(f"{name:22s} median {statistics.median(runs):8.1f} sentences/s   "
              f"({lengths[name] / len(sources):.1f} tokens per best output)   runs: "
              + ", ".join(f"{r:.1f}" for r in runs))
    cached, uncached = (statistics.median(rates[n]) for n in list(variants)[:2])
    print(f"beam {args.beam}: the cache is {cached / uncached:.1f}x faster")


if __name__ == "__main__":
    main()
