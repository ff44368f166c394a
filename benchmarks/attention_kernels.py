"""Training step time on one GPU with PyTorch's cuDNN attention kernel allowed and not allowed.

`scaled_dot_product_attention` may pick cuDNN's fused attention on recent GPUs. cuDNN builds an
execution plan for each new shape; length-bucketed seq2seq batches bring a new shape with
almost every batch, the GPT's fixed-length blocks one shape for the whole run. Both cases
train here with cuDNN attention on and off, alternating in one process, from the same initial
weights (bf16 autocast, AdamW), in two ways: the same batches in every pass (after the
warm-up pass every shape's plan is cached: cuDNN's best case) and batches each pass has not
seen (later ones of the training order, as training meets them). Medians of the passes.

    python -m benchmarks.attention_kernels [--batches 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import statistics
import tempfile
import time

import torch
from hydra.utils import instantiate

from lmlab.training.build import task_for
from lmlab.config.schema import compose

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
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in in_order(data, count)]
    torch.manual_seed(0)
    task = task_for(cfg, data.describe())
    return batches, task


def in_order(data, count: int) -> list[dict]:
    """The first `count` training batches, epoch after epoch, as training draws them."""
    found = []
    for epoch in itertools.count():
        loader = data.train_dataloader()
        bucketed = hasattr(loader.batch_sampler, "set_epoch")  # else batches of a sampler
        (loader.batch_sampler if bucketed else loader.sampler).set_epoch(epoch)
        found += itertools.islice(loader, count - len(found))
        if len(found) == count:
            return found


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
            ) -> dict[tuple[str, bool], list[float]]:
    """Seconds per step of each (batches, cuDNN allowed) pair, one a pass."""
    with tempfile.TemporaryDirectory() as out:
        batches, initial = batches_and_task(overrides, count * (1 + 2 * repeats), out, device)
    initial.log = lambda *args, **kwargs: None  # no trainer: nothing to log into
    initial.to(device).train()
    same, unseen = batches[:count], iter(batches[count:])
    times = {(kind, cudnn): [] for kind in ("same", "new") for cudnn in (True, False)}
    for cudnn in (True, False):  # warm-up: the plans of `same`'s shapes, each backend's kernels
        train_pass(copy.deepcopy(initial), same, cudnn)
    for _ in range(repeats):
        for cudnn in (True, False):
            times["same", cudnn].append(train_pass(copy.deepcopy(initial), same, cudnn))
            new = list(itertools.islice(unseen, count))
            times["new", cudnn].append(train_pass(copy.deepcopy(initial), new, cudnn))
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
            for kind in ("same", "new"):
                on, off = (statistics.median(times[kind, cudnn]) for cudnn in (True, False))
                print(f"{case}, {kind} batches each pass: {args.batches} steps x "
                      f"{args.repeats} alternating passes, median step {on * 1e3:.1f} ms "
                      f"with cuDNN attention, {off * 1e3:.1f} ms without "
                      f"(time on / off = {on / off:.2f})")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


if __name__ == "__main__":
    main()
