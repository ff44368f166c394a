"""Training throughput of lmlab's LSTM classifier against a plain PyTorch loop.

Both sides train the same model (same initial weights) on the same pre-collated,
length-bucketed batches at 1 thread; they alternate in one process and the median of the
repeats is reported. lmlab's side is `lightning.Trainer` built from `conf/trainer/default.yaml`
with the default CSV logger and progress bar, so the ratio is the framework's whole overhead.

With `--throughput`, a third side runs lmlab with its `Throughput` callback on (tokens/s,
FLOPs, MFU), to measure what measuring costs.

    python -m benchmarks.lstm_throughput [--corpus sst2] [--batches 100] [--repeats 5]
    python -m benchmarks.lstm_throughput --throughput
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
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch import Callback

from lmlab.data.classification import ClassificationDataModule
from lmlab.data.tokenizers import WordTokenizer
from lmlab.models.rnn import RNNClassifier
from lmlab.config.schema import compose
from lmlab.training.kernels import kernels_of
from lmlab.tasks.classification import ClassificationTask
from lmlab.training.callbacks.throughput import Throughput


class TimedThroughput(Throughput):
    """The Throughput callback, timing its own per-step hooks (but the first step's, which
    start and stop the FLOP count)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hook_seconds = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_start(trainer, module, batch, batch_idx)
        self.spent = time.perf_counter() - start

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        self.spent += time.perf_counter() - start
        if batch_idx > 0:
            self.hook_seconds.append(self.spent)


class EpochTimer(Callback):
    """Wall time of the training epoch alone (no setup, no validation)."""

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


def plain_loop(net: RNNClassifier, batches: list[dict]) -> float:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(batch["tokens"], batch["lengths"]), batch["labels"])
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lmlab_loop(net: RNNClassifier, batches: list[dict], num_classes: int, out: str,
               throughput: bool = False) -> float:
    adam = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    task = ClassificationTask(net, num_classes, optimizer=adam)
    cfg = compose(["strategy=cpu", f"paths.output_dir={out}", "paths.data_dir=.",
                   "trainer.max_epochs=1", "trainer.limit_val_batches=0"])
    timer = EpochTimer()
    extra = [TimedThroughput(cpu_peak_file=f"{out}/cpu_peak.json")] if throughput else []
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=[timer, *extra, kernels_of(cfg)], logger=loggers,
                          enable_checkpointing=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
    if throughput:
        spent = statistics.median(extra[0].hook_seconds)
        print(f"throughput callback's hooks: {1e6 * spent:.0f} us a step (median), "
              f"{100 * spent * len(batches) / timer.seconds:.2f}% of the mean step")
    return timer.seconds


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="sst2", help="sst2, trec, ag_news or stdlib_docs")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--throughput", action="store_true",
                        help="also lmlab with the Throughput callback on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = ClassificationDataModule(WordTokenizer(), corpus=args.corpus,
                                    data_dir=os.environ.get("LMLAB_DATA_DIR", "data"),
                                    batch_size=args.batch_size)
    data.setup()
    batches = [b for _, b in zip(range(args.batches), data.train_dataloader())]
    examples = sum(len(b["labels"]) for b in batches)
    torch.manual_seed(0)
    initial = RNNClassifier(data.vocab_size, data.num_classes)
    rates = {"plain": [], "lmlab": [], **({"lmlab+perf": []} if args.throughput else {})}
    with tempfile.TemporaryDirectory() as out:
        plain_loop(copy.deepcopy(initial), batches[:5])  # warm-up
        for _ in range(args.repeats):
            rates["plain"].append(examples / plain_loop(copy.deepcopy(initial), batches))
            seconds = lmlab_loop(copy.deepcopy(initial), batches, data.num_classes, out)
            rates["lmlab"].append(examples / seconds)
            if args.throughput:
                seconds = lmlab_loop(copy.deepcopy(initial), batches, data.num_classes, out, True)
                rates["lmlab+perf"].append(examples / seconds)
    print_rates(rates, "examples/s", f"corpus {args.corpus}: {len(batches)} batches of "
                f"{args.batch_size}, {args.repeats} alternating repeats")


def print_rates(rates: dict[str, list[float]], unit: str, setting: str) -> None:
    """The machine, the setting, each side's median and runs, and the ratios of medians to
    the plain loop's (and, with a third side, to lmlab's)."""
    medians = {name: statistics.median(runs) for name, runs in rates.items()}
    print(f"machine: {machine()}")
    print(setting)
    for name, runs in rates.items():
        print(f"{name:10s} median {medians[name]:8.1f} {unit}   "
              f"runs: {', '.join(f'{r:.0f}' for r in runs)}")
    for name in list(rates)[1:]:
        print(f"ratio {name} / plain: {medians[name] / medians['plain']:.3f}")
    if "lmlab+perf" in rates:
        print(f"ratio lmlab+perf / lmlab: {medians['lmlab+perf'] / medians['lmlab']:.3f}")


if __name__ == "__main__":
    main()
