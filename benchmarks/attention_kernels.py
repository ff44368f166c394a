"""Training step time on one GPU with PyTorch's cuDNN attention kernel allowed and not allowed.

`scaled_dot_product_attention` may pick cuDNN's fused attention on recent GPUs. cuDNN builds an
execution plan for each new shape; length-bucketed seq2seq batches bring a new shape with
almost every batch, the GPT's fixed-length blocks one shape for the whole run. Both cases
train here with cuDNN attention on and off, alternating in one process, on the same batches
from the same initial weights (bf16 autocast, AdamW); the medians of the passes are reported.

    python -m benchmarks.attention_kernels [--batches 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import torch
from hydra.utils import instantiate

from lmlab.build import task_for
from lmlab.config import compose

CASES = {  # name: overrides; the seq2seq one is AESLC's GPU experiment
    "seq2seq (AESLC, bucketed lengths)": ["experiment=aeslc_transformer_gpu"],
    "GPT (tiny-shakespeare, fixed blocks)": ["experiment=shakespeare_char_gpu"],
}


def batches_and_task(overrides: list[str], count: int, out: str, device: str
                     ) -> tuple[list[dict], object]:
    cfg = compose(overrides + [f"paths.output_dir={out}",
                               f"paths.data_dir={os.environ.get('LMLAB_DATA_DIR', 'data')}"])
    data = instantiate(cfg.data)
    data.setup()
    batches = [{k: v.to(device) for k, v in batch.items()}
               for _, batch in zip(range(count), data.train_dataloader())]
    torch.manual_seed(0)
    task = task_for(cfg, data.describe())
    return batches, task


def train_pass(task, batches: list[dict], cudnn: bool) -> float:
    """Seconds per step over `batches`, with cuDNN attention allowed or not."""
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    device = task.device.type
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = task.training_step(batch, 0)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(overrides: list[str], count: int, repeats: int, device: str = "cuda"
            ) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as out:
        batches, initial = batches_and_task(overrides, count, out, device)
    initial.log = lambda *args, **kwargs: None  # no trainer: nothing to log into
    initial.to(device).train()
    times = {"cuDNN on": [], "cuDNN off": []}
    for cudnn in (True, False):  # warm-up: the plans of every shape, each backend's kernels
        train_pass(copy.deepcopy(initial), batches, cudnn)
    for _ in range(repeats):
        for name, cudnn in (("cuDNN on", True), ("cuDNN off", False)):
            times[name].append(train_pass(copy.deepcopy(initial), batches, cudnn))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (it compares GPU attention kernels)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for case, overrides in CASES.items():
            times = measure(overrides, args.batches, args.repeats)
            on, off = (statistics.median(times[k]) for k in ("cuDNN on", "cuDNN off"))
            print(f"{case}: {args.batches} steps x {args.repeats} alternating passes, median "
                  f"step {on * 1e3:.1f} ms with cuDNN attention, {off * 1e3:.1f} ms without "
                  f"(on / off = {on / off:.2f})")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


if __name__ == "__main__":
    main()
