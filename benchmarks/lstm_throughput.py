"""Training throughput of lmlab's LSTM classifier against a plain PyTorch loop.

Both sides train the same model (same initial weights) on the same pre-collated,
length-bucketed batches at 1 thread; they alternate in one process and the median of the
repeats is reported. lmlab's side is `lightning.Trainer` built from `conf/trainer/default.yaml`
with the default CSV logger and progress bar, so the ratio is the framework's whole overhead.

    python -m benchmarks.lstm_throughput [--corpus sst2] [--batches 100] [--repeats 5]
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
from lmlab.config import compose
from lmlab.tasks.classification import ClassificationTask


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


def lmlab_loop(net: RNNClassifier, batches: list[dict], num_classes: int, out: str) -> float:
    adam = lambda params: torch.optim.Adam(params, lr=1e-3)  # noqa: E731
    task = ClassificationTask(net, num_classes, optimizer=adam)
    cfg = compose(["strategy=cpu", f"paths.output_dir={out}", "paths.data_dir=.",
                   "trainer.max_epochs=1", "trainer.limit_val_batches=0"])
    timer = EpochTimer()
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=loggers,
                          enable_checkpointing=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(task, train_dataloaders=loader)
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
    rates = {"plain": [], "lmlab": []}
    with tempfile.TemporaryDirectory() as out:
        plain_loop(copy.deepcopy(initial), batches[:5])  # warm-up
        for _ in range(args.repeats):
            rates["plain"].append(examples / plain_loop(copy.deepcopy(initial), batches))
            seconds = lmlab_loop(copy.deepcopy(initial), batches, data.num_classes, out)
            rates["lmlab"].append(examples / seconds)
    print_rates(rates, "examples/s", f"corpus {args.corpus}: {len(batches)} batches of "
                f"{args.batch_size}, {args.repeats} alternating repeats")


def print_rates(rates: dict[str, list[float]], unit: str, setting: str) -> None:
    """The machine, the setting, each side's median and runs, and the ratio of medians."""
    plain, lmlab = (statistics.median(rates[k]) for k in ("plain", "lmlab"))
    print(f"machine: {machine()}")
    print(setting)
    for name in ("plain", "lmlab"):
        print(f"{name:6s} median {statistics.median(rates[name]):8.1f} {unit}   "
              f"runs: {', '.join(f'{r:.0f}' for r in rates[name])}")
    print(f"ratio lmlab / plain: {lmlab / plain:.3f}")


if __name__ == "__main__":
    main()
