"""GPT speed on this machine: framework overhead, MFU, a Hugging Face comparison, KV cache.

All at 1 thread, the compared variants alternating in one process, medians of the repeats:

1. training step of lmlab (Trainer from `experiment=shakespeare_char_cpu`) against a plain
   PyTorch loop with the same model, batches, AdamW groups, schedule and clipping;
2. MFU of both against this CPU's fp32 matmul peak, measured here first;
3. lmlab's GPT against `transformers`' GPT2LMHeadModel of the same size, both in a plain
   loop (skipped if transformers is not installed: pip install -e ".[bench]");
4. generation of 256 tokens with and without the KV cache (gpt_baby size, block 256).

    python -m benchmarks.gpt_speed [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from benchmarks.lstm_throughput import EpochTimer, machine
from lmlab.data.lm import LMDataModule
from lmlab.data.tokenizers import CharTokenizer
from lmlab.models.gpt import GPT
from lmlab.models.sampling import generate
from lmlab.config.schema import compose
from lmlab.training.kernels import kernels_of
from lmlab.tasks.base import TRAINING_PASSES
from lmlab.tasks.causal_lm import parameter_groups
from lmlab.tasks.schedules import warmup_cosine

SIZE = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)  # the CPU recipe


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """fp32 FLOP/s of a square matmul, the best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_step(model: GPT, batch: int) -> float:
    """Model FLOPs of a training step on `batch` full blocks: 3 x the net's forward formula,
    as the runs' MFU counts them."""
    lengths = torch.full((batch,), model.config.block_size)
    return TRAINING_PASSES * float(model.flops(lengths).sum())


def plain_step_fn(model, batches, hf: bool = False):
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
    schedule = warmup_cosine(optimizer, 100, 2000, 0.1)

    def run() -> float:
        model.train()
        start = time.perf_counter()
        for batch in batches:
            logits = model(batch["tokens"]).logits if hf else model(batch["tokens"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        return (time.perf_counter() - start) / len(batches)

    return run


def lmlab_step(model: GPT, batches, out: str) -> float:
    cfg = compose(["experiment=shakespeare_char_cpu", "strategy=cpu",
                   f"paths.output_dir={out}", "paths.data_dir=.",
                   f"trainer.max_steps={len(batches)}", "trainer.limit_val_batches=0",
                   "model.sample_tokens=0"])
    task = instantiate(cfg.model, _partial_=True, net=None)(net=model)
    timer = EpochTimer()
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=[timer, kernels_of(cfg)], logger=loggers,
                          enable_checkpointing=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    return timer.seconds / len(batches)


def hf_gpt2(vocab_size: int):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    config = GPT2Config(vocab_size=vocab_size, n_positions=SIZE["block_size"],
                        n_embd=SIZE["n_embd"], n_layer=SIZE["n_layer"], n_head=SIZE["n_head"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def generation_rates(vocab_size: int, new_tokens: int = 256, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = GPT(vocab_size=vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    rates = {"cache": [], "no cache": []}
    for _ in range(repeats):
        for name, use_cache in (("cache", True), ("no cache", False)):
            seconds = _timed(lambda: list(generate(model, prompt, new_tokens, temperature=0,
                                                   use_cache=use_cache)))  # noqa: B023
            rates[name].append(new_tokens / seconds)
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    peak = matmul_peak()
    corpus = "tinyshakespeare" if os.environ.get("LMLAB_DATA_DIR") else "stdlib_source"
    data = LMDataModule(CharTokenizer(), corpus=corpus, block_size=SIZE["block_size"],
                        data_dir=os.environ.get("LMLAB_DATA_DIR", "data"),
                        batch_size=args.batch_size, train_batches=args.steps,
                        cache_dir=tempfile.mkdtemp())
    data.setup()
    batches = list(data.train_dataloader())
    torch.manual_seed(0)
    initial = GPT(vocab_size=data.vocab_size, bias=False, **SIZE)
    hf_initial = hf_gpt2(data.vocab_size)
    ours_same_size = GPT(vocab_size=data.vocab_size, bias=True, **SIZE)
    times = {"plain": [], "lmlab": [], "gpt (bias)": [], "hf gpt2": []}
    with tempfile.TemporaryDirectory() as out:
        plain_step_fn(copy.deepcopy(initial), batches[:5])()  # warm-up
        for _ in range(args.repeats):
            times["plain"].append(plain_step_fn(copy.deepcopy(initial), batches)())
            times["lmlab"].append(lmlab_step(copy.deepcopy(initial), batches, out))
            if hf_initial is not None:
                ours = plain_step_fn(copy.deepcopy(ours_same_size), batches)
                times["gpt (bias)"].append(ours())
                hf = plain_step_fn(copy.deepcopy(hf_initial), batches, hf=True)
                times["hf gpt2"].append(hf())
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    flops = flops_per_step(initial, args.batch_size)
    print(f"machine: {machine()}")
    print(f"fp32 matmul peak (1024^3, 1 thread): {peak / 1e9:.1f} GFLOP/s")
    print(f"model: {initial.num_parameters() / 1e6:.2f}M parameters, batch {args.batch_size} x "
          f"{SIZE['block_size']} tokens, {corpus}; {args.steps} steps x {args.repeats} repeats")
    for name, seconds in medians.items():
        runs = ", ".join(f"{t * 1e3:.1f}" for t in times[name])
        mfu = f"{flops / seconds / peak:6.1%}" if name in ("plain", "lmlab") else "     -"
        print(f"{name:10s} median {seconds * 1e3:7.2f} ms/step   MFU {mfu}   runs: {runs}")
    print(f"ratio lmlab / plain (throughput): {medians['plain'] / medians['lmlab']:.3f}")
    if "hf gpt2" in medians:
        print(f"ratio lmlab GPT / HF GPT2 (throughput, same size, plain loop): "
              f"{medians['hf gpt2'] / medians['gpt (bias)']:.3f}")
    rates = generation_rates(data.vocab_size)
    print(f"generation, 256 tokens, 6x384 block 256: {rates['cache']:.1f} tokens/s with cache, "
          f"{rates['no cache']:.1f} without: {rates['cache'] / rates['no cache']:.1f}x")


if __name__ == "__main__":
    main()
