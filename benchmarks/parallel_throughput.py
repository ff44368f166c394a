"""Throughput and memory of each strategy: 2 processes x 1 thread against 1 process x 1 thread.

Every run is `python -m lmlab.run` with the same global batch, dropout off, no validation
and no checkpoints, in its own process group. `StepTimer` below times the training steps
after a warm-up on rank 0, and records each rank's peak resident memory (RSS) and the bytes
of its live tensors after the first optimizer step (parameters, gradients and optimizer
state as the strategy shards them). Rounds alternate the single-process baseline and every
strategy, and each figure is the median of its rounds.

    python -m benchmarks.parallel_throughput [--steps 60] [--repeats 3] [--models lstm gpt]
    python -m benchmarks.parallel_throughput --memory    # estimate against measurement

Scaling efficiency = global throughput with 2 processes / (2 x single-process throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lmlab.check_parallel import run_subprocess
from lmlab.training.callbacks.memory import TensorMemory

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "lstm": ["model=lstm", "data.batch_size=256", "model.net.dropout=0.0"],
    "gpt": ["model=gpt_tiny", "data=stdlib_source", "data.batch_size=32",
            "model.sample_tokens=0", "model.net.dropout=0.0"],
}
STRATEGIES = {"lstm": ["ddp", "fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"],
              "gpt": ["ddp", "fsdp", "fsdp2", "tp", "deepspeed_zero2", "deepspeed_zero3"]}
WARMUP = 10


class StepTimer(TensorMemory):
    """Writes `bench-rank{r}.json`: step times after the warm-up, peak RSS, live tensors."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.times = Path(path), []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, module):
        steps = [b - a for a, b in zip(self.times[WARMUP:], self.times[WARMUP + 1:])]
        report = {"step_s": statistics.median(steps), "tensors": self.bytes,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (self.path / f"bench-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def run(overrides: list[str], strategy: str, steps: int, folder: Path) -> dict:
    """One timed run; its median step time, largest peak RSS and live tensors over ranks."""
    devices = [] if strategy == "cpu" else ["trainer.devices=2", "trainer.accelerator=cpu"]
    command = [sys.executable, "-m", "lmlab.run", *overrides, f"strategy={strategy}",
               *devices, f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
               "callbacks=none", "logger=none", "trainer.limit_val_batches=0",
               "trainer.enable_progress_bar=false",
               "+callbacks.timer._target_=benchmarks.parallel_throughput.StepTimer",
               f"+callbacks.timer.path={folder}", f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    status, output = run_subprocess(command, 900, cwd=ROOT, env=env)
    if status != 0:
        raise RuntimeError(f"{strategy} {overrides} failed:\n{output[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("bench-rank*.json"))]
    return {"step_s": ranks[0]["step_s"], "rss": max(r["rss"] for r in ranks),
            "tensors": max(r["tensors"] for r in ranks)}


MEMORY_GPT = ["model=gpt_tiny", "data=stdlib_source", "data.batch_size=8",
              "model.net.n_embd=384", "model.net.n_layer=6", "model.net.n_head=6",
              "model.sample_tokens=0", "model.net.dropout=0.0"]


BUCKETS = ["trainer.strategy.reduce_bucket_size=1000000",
           "trainer.strategy.allgather_bucket_size=1000000"]


def estimated(overrides: list[str]) -> dict[str, float]:
    """The dry run's memory table (MiB per device)."""
    command = [sys.executable, "-m", "lmlab.run", *overrides, "dry_run=true"]
    status, output = run_subprocess(command, 300, cwd=ROOT)
    return {line.split("│")[1].strip(): float(line.split("│")[2])
            for line in output.splitlines() if line.count("│") == 3}


def memory_rows(root: Path) -> list[str]:
    """Estimate against measurement for the medium GPT, 2 processes, each precision."""
    rows = []
    for precision in ("32-true", "bf16-mixed"):
        ddp = None
        for strategy in ("ddp", "fsdp2", "deepspeed_zero3"):
            overrides = [*MEMORY_GPT, f"precision={precision}",
                         *(BUCKETS if strategy.startswith("deepspeed") else [])]
            measured = run(overrides, strategy, WARMUP + 3, root / f"{strategy}-{precision}")
            estimate = estimated([*overrides, f"strategy={strategy}", "trainer.devices=2",
                                  "trainer.accelerator=cpu"])
            state = sum(estimate[p] for p in ("parameters", "gradients", "optimizer"))
            tensors = measured["tensors"] / 2**20
            ddp = ddp or (state, tensors)
            rows.append(f"| {strategy} | {precision} | {state:.1f} | {state / ddp[0]:.2f} | "
                        f"{estimate['buffers']:.1f} | {tensors:.1f} | {tensors / ddp[1]:.2f} |")
    return rows


def batch_size(model: str) -> int:
    return int(next(o for o in MODELS[model] if o.startswith("data.batch_size")).split("=")[1])


def measure(model: str, steps: int, repeats: int, root: Path) -> list[dict]:
    """Rows for one model: the baseline, then each strategy, with ratios to the baseline.
    Rounds alternate the baseline and every strategy; each figure is the median of its
    rounds (peak memory: the largest)."""
    variants = ["cpu", *STRATEGIES[model]]
    rounds = [{v: run(MODELS[model], v, steps, root / f"{model}-{v}-{i}") for v in variants}
              for i in range(repeats)]
    results = {v: {"step_s": statistics.median(r[v]["step_s"] for r in rounds),
                   "rss": max(r[v]["rss"] for r in rounds),
                   "tensors": max(r[v]["tensors"] for r in rounds)} for v in variants}
    one = results["cpu"]["step_s"]
    rows = []
    for variant, result in results.items():
        layout = "1 x 1" if variant == "cpu" else "2 x 1"
        rows.append({"model": model, "strategy": f"{variant} ({layout})", **result,
                     "efficiency": one / result["step_s"] / (1 if variant == "cpu" else 2),
                     "throughput": batch_size(model) / result["step_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--memory", action="store_true",
                        help="only the memory table: estimate against measurement")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}; 1 thread per process")
    if args.memory:
        print("| strategy | precision | estimated parameters + gradients + optimizer (MiB) "
              "| x ddp | estimated buffers (MiB) | measured live tensors (MiB) | x ddp |")
        print("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as root:
            print("\n".join(memory_rows(Path(root))))
        return
    print("| model | strategy | examples/s (global) | scaling efficiency | peak RSS per rank "
          "(MiB) | live tensors per rank after one step (MiB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            for row in measure(model, args.steps, args.repeats, Path(root)):
                print(f"| {row['model']} | {row['strategy']} | {row['throughput']:.0f} | "
                      f"{row['efficiency']:.0%} | {row['rss'] / 2**20:.0f} | "
                      f"{row['tensors'] / 2**20:.2f} |", flush=True)


if __name__ == "__main__":
    main()
