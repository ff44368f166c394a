"""Decoding speed against Hugging Face transformers' `generate`, same sizes, same inputs.

- Sequence to sequence: lmlab's `Seq2SeqTransformer` (4+4 layers x 128, 4 heads, feed-forward
  512, joint vocabulary 8,000) against a `MarianMTModel` of the same sizes; beam 5 and greedy,
  on short (12-20 tokens) and long (150-250 tokens) random sources, in batches of 16;
  sentences/s.
- Causal LM: lmlab's `GPT` (6 layers x 384, 6 heads, GPT-2's tanh GELU, vocabulary 8,000)
  against a `GPT2LMHeadModel` of the same sizes; greedy and sampling (temperature 0.8,
  top-k 200) with the key/value cache, 256 new tokens after a 16-token prompt, batch 1;
  tokens/s.

Both sides have random weights, and every output is forced to the same length (a minimum
equal to the maximum), so each decodes the same number of steps. At 1 thread; the variants
alternate in one process; medians of `--repeats`. A ratio above 1 means lmlab is faster.

    python -m benchmarks.against_transformers [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.lstm_throughput import machine
from lmlab.models.decoding import beam_search, greedy
from lmlab.models.gpt import GPT
from lmlab.models.sampling import generate
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer

VOCAB, PAD, BOS, EOS = 8_000, 0, 1, 2
BATCH, BEAM = 16, 5
SOURCES = {"short": (12, 20, 24), "long": (150, 250, 48)}  # source lengths, output tokens
NEW_TOKENS, PROMPT = 256, 16


def transformers_module():
    try:
        import transformers
    except ImportError as err:
        raise SystemExit("this benchmark compares with transformers: "
                         "pip install -e '.[bench]'") from err
    transformers.logging.set_verbosity_error()
    return transformers


def seq2seq_pair(hf):
    torch.manual_seed(0)
    ours = Seq2SeqTransformer(VOCAB, VOCAB, PAD, BOS, EOS, d_model=128, n_head=4,
                              n_encoder_layers=4, n_decoder_layers=4, d_ff=512,
                              max_length=512).eval()
    config = hf.MarianConfig(vocab_size=VOCAB, d_model=128, encoder_layers=4, decoder_layers=4,
                             encoder_attention_heads=4, decoder_attention_heads=4,
                             encoder_ffn_dim=512, decoder_ffn_dim=512,
                             max_position_embeddings=512, pad_token_id=PAD, eos_token_id=EOS,
                             decoder_start_token_id=BOS, forced_eos_token_id=None)
    return ours, hf.MarianMTModel(config).eval()


def gpt_pair(hf):
    torch.manual_seed(0)
    ours = GPT(VOCAB, 1024, n_layer=6, n_head=6, n_embd=384, mlp="gelu_tanh").eval()
    config = hf.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_layer=6, n_head=6,
                           n_embd=384, bos_token_id=BOS, eos_token_id=EOS)
    return ours, hf.GPT2LMHeadModel(config).eval()


def sources(kind: str) -> torch.Tensor:
    shortest, longest, _ = SOURCES[kind]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (BATCH,), generator=g)
    batch = torch.full((BATCH, int(lengths.max())), PAD, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        batch[row, :length] = torch.randint(3, VOCAB, (length,), generator=g)
    return batch


def seq2seq_variants(ours, theirs) -> dict:
    """name -> (lmlab's call, transformers' call), each decoding one batch; every output
    has exactly the kind's number of tokens, then <eos>."""
    variants = {}
    for kind, (_, _, tokens) in SOURCES.items():
        source = sources(kind)
        mask = source != PAD
        fixed = dict(max_len_a=0.0, max_len_b=tokens, min_length=tokens)
        hf_fixed = dict(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)
        for beam in (BEAM, 1):
            name = f"seq2seq beam {beam}, {kind} sources"
            search = (lambda s=source, b=beam, f=fixed: beam_search(ours, s, beam=b, **f)) \
                if beam > 1 else (lambda s=source, f=fixed: greedy(ours, s, **f))
            variants[name] = (search, lambda s=source, m=mask, b=beam, f=hf_fixed:
                              theirs.generate(input_ids=s, attention_mask=m, num_beams=b, **f))
    return variants


def gpt_variants(ours, theirs) -> dict:
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    fixed = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    variants = {}
    for name, temperature in (("greedy", 0.0), ("sampling", 0.8)):
        def mine(t=temperature):
            g = torch.Generator().manual_seed(0)
            for _ in generate(ours, prompt, NEW_TOKENS, t, top_k=200 if t else None,
                              generator=g):
                pass

        sample = dict(do_sample=True, temperature=temperature, top_k=200) if temperature \
            else dict(do_sample=False)
        variants[f"gpt {name}, {NEW_TOKENS} new tokens"] = (
            mine, lambda s=sample: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                   pad_token_id=PAD, **fixed, **s))
    return variants


def timed(call) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf = transformers_module()
    torch.set_num_threads(1)
    variants = {**seq2seq_variants(*seq2seq_pair(hf)), **gpt_variants(*gpt_pair(hf))}
    print(f"{machine()}; transformers {hf.__version__}; 1 thread, {args.repeats} repeats, "
          "medians")
    print(f"{'':40} {'lmlab s':>9} {'transformers s':>15} {'ratio':>7}")
    for name, (mine, theirs) in variants.items():
        mine(), theirs()  # warm-up
        times = {"mine": [], "theirs": []}
        for _ in range(args.repeats):
            times["mine"].append(timed(mine))
            times["theirs"].append(timed(theirs))
        ours, other = (statistics.median(times[k]) for k in ("mine", "theirs"))
        print(f"{name:40} {ours:9.3f} {other:15.3f} {other / ours:7.2f}x")


if __name__ == "__main__":
    main()
