"""Training throughput of lmlab's seq2seq task against a plain PyTorch loop.

Both sides train the same encoder-decoder (same initial weights) on the same pre-collated,
length-bucketed batches at 1 thread, alternating in one process; the medians are reported.
The plain side is teacher-forced cross-entropy with label smoothing, backward and an AdamW
step; lmlab's is `lightning.Trainer` from `conf/trainer/default.yaml` with the CSV logger
and progress bar, and `Seq2SeqTask`'s step.

    python -m benchmarks.seq2seq_throughput [--corpus multi30k] [--batches 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from benchmarks.lstm_throughput import EpochTimer, print_rates
from lmlab.training.build import task_for
from lmlab.config.schema import compose
from lmlab.training.kernels import kernels_of

MODEL = "transformer_small"


def plain_loop(net, batches: list[dict]) -> float:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98))
    net.train()
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        logits = net(batch["source"], batch["target"][:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), batch["target"][:, 1:],
                               ignore_index=net.pad_id, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lmlab_loop(cfg, task, batches: list[dict]) -> float:
    timer = EpochTimer()
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=[timer, kernels_of(cfg)], logger=loggers,
                          enable_checkpointing=False, enable_model_summary=False,
                          limit_val_batches=0, max_epochs=1)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="multi30k", help="multi30k or stdlib_summaries")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose([f"model={MODEL}", f"data={args.corpus}", "strategy=cpu",
                       f"paths.output_dir={out}",
                       f"paths.data_dir={os.environ.get('LMLAB_DATA_DIR', 'data')}",
                       "model.scheduler=null", "model.weight_decay=0.0",
                       "data.joint_vocab=true"])  # the model shares one embedding matrix
        data = instantiate(cfg.data)
        data.setup()
        batches = [b for _, b in zip(range(args.batches), data.train_dataloader())]
        torch.manual_seed(0)
        initial = task_for(cfg, data.describe()).net
        tokens = sum(int((b["target"][:, 1:] != initial.pad_id).sum()) for b in batches)
        rates = {"plain": [], "lmlab": []}
        plain_loop(copy.deepcopy(initial), batches[:3])  # warm-up
        for _ in range(args.repeats):
            rates["plain"].append(tokens / plain_loop(copy.deepcopy(initial), batches))
            task = task_for(cfg, data.describe())
            task.net = copy.deepcopy(initial)
            rates["lmlab"].append(tokens / lmlab_loop(cfg, task, batches))
    print_rates(rates, "target tokens/s", f"corpus {args.corpus}, model={MODEL}: "
                f"{len(batches)} batches of {cfg.data.batch_size}, {args.repeats} "
                "alternating repeats")


if __name__ == "__main__":
    main()
