"""A memory-saving switch against none, under a sharded strategy, on this CPU.

Two runs of `python -m lmlab.run` that differ only in one boolean key (by default
`model.activation_checkpointing`): nanoGPT's baby GPT (6 x 384, block 256) on the embedded
corpus, `strategy=fsdp2` over 2 processes (gloo), global batch 32, 4 steps. Each run's
`throughput/peak_mem_gb` is its first rank's peak resident memory (VmHWM: parameters,
optimizer state, activations and the process itself); the step time shows what the switch
costs.

    python -m benchmarks.activation_memory [--strategy fsdp2] [--devices 2] [--key KEY]
    python -m benchmarks.activation_memory --strategy tp --key trainer.strategy.sequence_parallel
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.lstm_throughput import machine

RUN = ["model=gpt_baby", "data=stdlib_source", "data.batch_size=32", "data.train_batches=4",
       "data.val_batches=1", "trainer.max_steps=4", "trainer.max_epochs=-1",
       "model.sample_tokens=0", "model.net.dropout=0.0", "logger=csv", "callbacks=default",
       "trainer.accelerator=cpu"]


def run(folder: Path, strategy: str, devices: int, key: str, on: bool) -> dict:
    command = [sys.executable, "-m", "lmlab.run", f"strategy={strategy}",
               f"trainer.devices={devices}", *RUN, f"paths.cache_dir={folder / 'cache'}",
               f"{key}={str(on).lower()}", f"hydra.run.dir={folder / str(on)}"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((folder / str(on) / "metrics.json").read_text())["throughput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="fsdp2")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--key", default="model.activation_checkpointing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        found = {on: run(Path(folder), args.strategy, args.devices, args.key, on)
                 for on in (False, True)}
    print(f"{machine()}; strategy={args.strategy}, {args.devices} processes, gpt_baby, "
          "batch 32 x 256")
    for on, row in found.items():
        print(f"{args.key}={str(on).lower()}: peak "
              f"{row['peak_mem_gb']:.2f} GB, step {row['step_time_s']:.2f} s")
    off, on = found[False], found[True]
    print(f"on / off: {on['peak_mem_gb'] / off['peak_mem_gb']:.2f}x the peak memory "
          f"({off['peak_mem_gb'] - on['peak_mem_gb']:.2f} GB less), "
          f"{on['step_time_s'] / off['step_time_s']:.2f}x the step time")


if __name__ == "__main__":
    main()
