"""LoRA against full fine-tuning of a GPT-2 small-size folder: trainable parameters, peak
memory and step time, on this machine's CPU.

The folder holds a random GPT-2 124M (12 x 768, vocabulary 50,257) written by
`lmlab.interop.huggingface.export_folder`, so no download is needed. Each variant trains in a
process of its own (peak memory is per process): `PretrainedGPT` of the folder, LoRA adapters
or not, AdamW on the trainable parameters, a few steps of batch 4 x 256 tokens at 1 thread.
Peak memory is the process's VmHWM after the steps, less its resident memory before the net
was built.

    python -m benchmarks.lora_memory [--steps 4] [--rank 8] [--targets q,v]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.lstm_throughput import machine
from lmlab.interop.huggingface import PretrainedGPT, export_folder
from lmlab.models.gpt import GPT
from lmlab.models.lora import add_adapters

GPT2_SMALL = dict(vocab_size=50_257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                  mlp="gelu_tanh")


def kib(field: str) -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith(field))
    return int(line.split()[1]) * 1024


def train(folder: str, steps: int, rank: int, targets: list[str]) -> dict:
    """One variant, in this process: trainable parameters, peak memory growth, step time."""
    torch.set_num_threads(1)
    before = kib("VmRSS:")
    net = PretrainedGPT(folder)
    if rank:
        add_adapters(net, rank, 2.0 * rank, targets)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, 50_257, (4, 257), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(tokens[:, :-1]).flatten(0, 1),
                                                 tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"trainable": sum(p.numel() for p in trainable),
            "total": sum(p.numel() for p in net.parameters()),
            "peak_gb": (kib("VmHWM:") - before) / 1e9, "step_s": sorted(times)[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process's job
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    targets = args.targets.split(",")
    if args.variant:
        rank = args.rank if args.variant == "lora" else 0
        print(json.dumps(train(args.folder, args.steps, rank, targets)))
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        export_folder(GPT(**GPT2_SMALL), {}, folder, {})
        found = {}
        for variant in ("full", "lora"):
            command = [sys.executable, "-m", "benchmarks.lora_memory", "--variant", variant,
                       "--folder", folder, "--steps", str(args.steps), "--rank", str(args.rank),
                       "--targets", args.targets]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            found[variant] = json.loads(output.strip().splitlines()[-1])
    print(f"{machine()}; GPT-2 small size, batch 4 x 256, AdamW, {args.steps} steps, 1 thread")
    print(f"{'':>6} {'trainable':>12} {'share':>8} {'peak GB':>8} {'step s':>7}")
    for variant, row in found.items():
        print(f"{variant:>6} {row['trainable']:>12,} {row['trainable'] / row['total']:>8.3%} "
              f"{row['peak_gb']:>8.2f} {row['step_s']:>7.2f}")
    full, lora = found["full"], found["lora"]
    print(f"LoRA rank {args.rank} on {args.targets}: {lora['trainable'] / full['trainable']:.4%} "
          f"of the trainable parameters, {lora['peak_gb'] / full['peak_gb']:.2f}x the peak "
          f"memory, {lora['step_s'] / full['step_s']:.2f}x the step time")


if __name__ == "__main__":
    main()
