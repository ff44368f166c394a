"""GPT-2 small on one GPU: lmlab's training step against a plain PyTorch loop, tokens/s and MFU.

Both sides train the same net (`model=gpt2_small`: 12 x 768, block 1024, vocabulary 50,257) on
the same batches of random token ids (speed does not depend on their values), at bf16-mixed
precision, with `torch.compile` of the net and SDPA (its flash kernel on a recent GPU), AdamW
with the weight-decay split, and gradient clipping at 1.0:
- plain: the loop a user would write (autocast, backward, clip, step);
- lmlab: the Trainer of `python -m lmlab.run model=gpt2_small precision=bf16-mixed
  model.compile=true strategy=gpu`, with the default callbacks that act at every step (the
  numerical guard, throughput); none that writes checkpoints.
The two alternate, `--repeats` times, after a warm-up that compiles each; medians. MFU is the
model FLOPs (3 x `GPT.flops`, the runs' count) over the GPU's bf16 peak from Lightning's
table.

    python -m benchmarks.gpu_gpt2 [--steps 30] [--repeats 3] [--batch-size 8]
    python -m benchmarks.gpu_gpt2 --size tiny --device cpu --precision 32-true --steps 3 \\
        --repeats 1    # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from benchmarks.lstm_throughput import EpochTimer
from lmlab.config.schema import compose
from lmlab.models.gpt import GPT
from lmlab.tasks.base import TRAINING_PASSES
from lmlab.tasks.causal_lm import parameter_groups
from lmlab.training.flops import compute_dtype, peak_flops

SIZES = {"gpt2_small": dict(vocab_size=50_257, block_size=1024, n_layer=12, n_head=12,
                            n_embd=768),
         "tiny": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)}


# the default callbacks that act at every step (those that write checkpoints are left out)
PER_STEP_CALLBACKS = ("numerics", "throughput")


def random_batches(size: dict, batch: int, steps: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, size["vocab_size"], (steps, batch, size["block_size"] + 1),
                           generator=g)
    return [{"tokens": b[:, :-1].to(device), "targets": b[:, 1:].to(device)} for b in blocks]


def plain_loop(net: GPT, batches: list[dict], precision: str, compiled: bool) -> float:
    """Seconds a step of the loop a user would write."""
    model = torch.compile(net) if compiled else net
    optimizer = torch.optim.AdamW(parameter_groups(net, 0.1), lr=6e-4, betas=(0.9, 0.95))
    dtype = compute_dtype(precision)
    device_type = batches[0]["tokens"].device.type
    net.train()
    synchronize(device_type)
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch["tokens"])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
    synchronize(device_type)
    return (time.perf_counter() - start) / len(batches)


def lmlab_loop(net: GPT, batches: list[dict], precision: str, compiled: bool, device: str,
               out: str) -> float:
    """Seconds a step of the Trainer that `lmlab.run` builds for this config."""
    strategy = "gpu" if device == "cuda" else "cpu"
    cfg = compose(["model=gpt2_small", f"strategy={strategy}", f"precision={precision}",
                   f"model.compile={str(compiled).lower()}", f"paths.output_dir={out}",
                   f"trainer.max_steps={len(batches)}", "trainer.limit_val_batches=0",
                   "model.sample_tokens=0", "logger=none", "model.scheduler.total_steps=null"])
    task = instantiate(cfg.model, _partial_=True, net=None)(net=net)
    timer = EpochTimer()
    callbacks = [instantiate(cfg.callbacks[name]) for name in PER_STEP_CALLBACKS]
    trainer = instantiate(cfg.trainer, callbacks=[timer, *callbacks], logger=False,
                          enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    return timer.seconds / len(batches)


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="gpt2_small")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    compiled, size = not args.no_compile, SIZES[args.size]
    torch.manual_seed(0)
    initial = GPT(**size, dropout=0.0).to(args.device)
    batches = random_batches(size, args.batch_size, args.steps, args.device)
    times = {"plain": [], "lmlab": []}
    with tempfile.TemporaryDirectory() as out:
        plain_loop(copy.deepcopy(initial), batches[:3], args.precision, compiled)  # compiles
        lmlab_loop(copy.deepcopy(initial), batches[:3], args.precision, compiled, args.device,
                   out)
        for _ in range(args.repeats):
            times["plain"].append(plain_loop(copy.deepcopy(initial), batches, args.precision,
                                             compiled))
            times["lmlab"].append(lmlab_loop(copy.deepcopy(initial), batches, args.precision,
                                             compiled, args.device, out))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(device, compute_dtype(args.precision), None) if device.type == "cuda" \
        else None
    tokens = args.batch_size * size["block_size"]
    flops = TRAINING_PASSES * float(initial.flops(torch.full((args.batch_size,),
                                                             size["block_size"])).sum())
    print(f"{name}; {args.size} ({initial.num_parameters() / 1e6:.1f}M parameters), batch "
          f"{args.batch_size} x {size['block_size']}, {args.precision}, compile {compiled}; "
          f"{args.steps} steps x {args.repeats} repeats, medians")
    print("| | ms/step | tokens/s | MFU |\n|---|---:|---:|---:|")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for variant, seconds in medians.items():
        mfu = f"{flops / seconds / peak:.1%}" if peak else "-"
        print(f"| {variant} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {mfu} |")
    print(f"| lmlab / plain (throughput) | {medians['plain'] / medians['lmlab']:.3f} | | |")


if __name__ == "__main__":
    main()
