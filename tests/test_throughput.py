"""The Throughput callback: real tokens only, FLOPs against hand counts, MFU against a known
peak, the CPU peak's cache, and the progress bars in and out of a terminal."""

import csv
import json
import os
import pty
import subprocess
import sys
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import DATA_DIR, ROOT, run_cli
from lmlab.check_parallel import run_subprocess
from lmlab.build import callbacks
from lmlab.loggers import CSVLogger
from lmlab.models.rnn import RNNClassifier
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tasks.classification import ClassificationTask
from lmlab.tasks.seq2seq import Seq2SeqTask
from lmlab.throughput import (StepFlops, Throughput, compute_dtype, cpu_model, peak_flops,
                              progress_bar, rnn_flops)

B, T, EMBED, HIDDEN, CLASSES = 4, 6, 8, 16, 3


def padded_batch() -> dict:
    """Four rows padded to 6 tokens; the last is a copy that pads the batch across ranks."""
    lengths = torch.tensor([6, 3, 2, 1])
    tokens = torch.randint(1, 20, (B, T)) * (torch.arange(T) < lengths[:, None])
    return {"tokens": tokens, "lengths": lengths, "labels": torch.tensor([0, 1, 2, 0]),
            "weight": torch.tensor([4 / 3, 4 / 3, 4 / 3, 0.0])}


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def classifier() -> ClassificationTask:
    torch.manual_seed(0)
    net = RNNClassifier(20, CLASSES, embed_dim=EMBED, hidden_size=HIDDEN, num_layers=1,
                        dropout=0.0)
    return ClassificationTask(net, CLASSES, optimizer=adam)


def test_classifier_counts_real_tokens_only():
    batch = padded_batch()
    assert int(classifier().count_tokens(batch)) == 6 + 3 + 2
    assert int(classifier().count_examples(batch)) == 3
    # Negative controls: what counting padding, or the padding copy, would give.
    assert int(batch["lengths"].sum()) == 12 and batch["tokens"].numel() == 24


def test_lm_and_seq2seq_count_predicted_tokens():
    lm = CausalLMTask(nn.Identity(), optimizer=adam)
    blocks = {"tokens": torch.zeros(3, 5, dtype=torch.long),
              "targets": torch.zeros(3, 5, dtype=torch.long), "weight": torch.tensor([1., 1., 0.])}
    assert int(lm.count_tokens(blocks)) == 2 * 5
    seq2seq = Seq2SeqTask(nn.Identity(), optimizer=adam)
    pairs = {"source": torch.zeros(3, 7, dtype=torch.long),
             "source_lengths": torch.tensor([7, 2, 4]),
             "target": torch.zeros(3, 6, dtype=torch.long),
             "target_lengths": torch.tensor([6, 3, 6]), "weight": torch.tensor([1., 1., 0.])}
    assert int(seq2seq.count_tokens(pairs)) == (6 - 1) + (3 - 1)  # after <bos>; no copy


def test_flops_of_a_linear_layer_equal_the_hand_count():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with StepFlops(linear) as flops:
        linear(x).sum().backward()
    forward = 2 * 3 * 8 * 4
    assert flops.total == forward + forward  # backward: the weight's gradient only
    with StepFlops(linear) as flops:
        linear(x.requires_grad_()).sum().backward()
    assert flops.total == 3 * forward  # and the input's


def lstm_hand_count(tokens: int, inputs: int = EMBED, hidden: int = HIDDEN) -> int:
    forward = tokens * 2 * 4 * hidden * (inputs + hidden)  # 4 gates, input and hidden matmuls
    return 3 * forward


def test_flops_of_an_lstm_equal_the_hand_count():
    lstm = nn.LSTM(EMBED, HIDDEN, batch_first=True)
    x = torch.randn(2, 5, EMBED)
    with FlopCounterMode(display=False) as plain:
        lstm(x)[0].sum().backward()
    assert plain.get_total_flops() == 0  # torch has no formula for the fused kernel
    with StepFlops(lstm) as flops:
        lstm(x)[0].sum().backward()
    assert flops.total == lstm_hand_count(2 * 5) == 3 * rnn_flops(lstm, 10)
    # A packed sequence runs op by op (counted by torch, without the input gradient of the
    # first step); the formula replaces that count, over the real time steps only.
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    with FlopCounterMode(display=False) as plain:
        lstm(packed)[0].data.sum().backward()
    assert 0 < plain.get_total_flops() < lstm_hand_count(5 + 3)
    with StepFlops(lstm) as flops:
        lstm(packed)[0].data.sum().backward()
    assert flops.total == lstm_hand_count(5 + 3)


def test_rnn_formula_per_layer_and_direction():
    gru = nn.GRU(8, 16, num_layers=2, bidirectional=True)
    per_token = 2 * (2 * 3 * 16 * (8 + 16)) + 2 * (2 * 3 * 16 * (32 + 16))
    assert rnn_flops(gru, 7) == 7 * per_token


def train_with_throughput(tmp_path, batches: list[dict], steps: int, peak: float | None):
    peak_file = tmp_path / "peak.json"
    if peak is not None:  # a known peak for this CPU, as if measured before
        key = f"{cpu_model()} | {torch.get_num_threads()} threads | {torch.float32}"
        peak_file.write_text(json.dumps({key: peak}))
    throughput = Throughput(cpu_peak_file=str(peak_file))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, log_every_n_steps=1,
                        callbacks=[throughput], logger=CSVLogger(tmp_path, name="csv", version=""),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2, limit_val_batches=1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    # With a sanity check and a validation in the middle of the epoch, left out of the steps.
    trainer.fit(classifier(), train_dataloaders=loader, val_dataloaders=loader)
    return throughput


def test_callback_counts_flops_tokens_and_mfu_of_a_real_run(tmp_path):
    throughput = train_with_throughput(tmp_path, [padded_batch() for _ in range(4)], 4, 1e9)
    head = 2 * B * HIDDEN * CLASSES  # forward; backward: weight and input gradients
    assert throughput.flops_per_step == lstm_hand_count(B * T) + 3 * head
    assert int(throughput.total.tokens) == 3 * 11  # steps 2-4; the first counts the FLOPs
    summary = throughput.summary
    assert summary["tokens_per_s"] == pytest.approx(11 * summary["samples_per_s"] / 3)
    flops_per_token = throughput.flops_per_step / 11
    assert summary["mfu"] == pytest.approx(flops_per_token * summary["tokens_per_s"] / 1e9)
    assert 0 <= summary["data_wait"] < 1 and summary["peak_mem_gb"] > 0
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["perf/tokens_per_s"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # every logged step after the first
    assert all(float(r["perf/mfu"]) > 0 for r in rows)


def test_no_mfu_where_the_peak_is_unknown(tmp_path):
    throughput = train_with_throughput(tmp_path, [padded_batch() for _ in range(3)], 3, None)
    throughput.peak = None
    figures = throughput.rates(throughput.total, torch.device("cpu"))
    assert "mfu" not in figures and figures["flops_per_step"] > 0


def test_cpu_peak_is_measured_once_and_kept(tmp_path):
    path = tmp_path / "cache" / "cpu_peak.json"
    measured = peak_flops(torch.device("cpu"), torch.float32, path)
    (key, value), = json.loads(path.read_text()).items()
    assert value == measured > 1e8 and "threads" in key and cpu_model() in key
    path.write_text(json.dumps({key: 123.0}))  # read back, not measured again
    assert peak_flops(torch.device("cpu"), torch.float32, path) == 123.0
    path.write_text('{"half written')  # unreadable: measured again, the file rewritten whole
    assert peak_flops(torch.device("cpu"), torch.float32, path) > 1e8
    assert key in json.loads(path.read_text())
    assert compute_dtype("bf16-mixed") == torch.bfloat16
    assert compute_dtype("32-true") == torch.float32


def test_default_callbacks_follow_enable_progress_bar(make_cfg):
    checked = ["monitor=val/acc", "monitor_mode=max"]  # as the run fills them in
    found = callbacks(make_cfg(*checked))
    assert any(isinstance(c, Throughput) for c in found)
    assert any(isinstance(c, ProgressBar) for c in found)
    found = callbacks(make_cfg(*checked, "trainer.enable_progress_bar=false"))
    assert not any(isinstance(c, ProgressBar) for c in found)
    assert progress_bar(False) is None


TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.log_every_n_steps=2", "logger=none"]


@pytest.mark.slow
def test_plain_bar_when_the_output_is_not_a_terminal(tmp_path):
    assert isinstance(progress_bar(), TQDMProgressBar)  # pytest captures the output
    result = run_cli(f"hydra.run.dir={tmp_path}", *TINY,
                     f"callbacks.throughput.cpu_peak_file={tmp_path / 'peak.json'}", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perf/tokens_per_s=" in result.stdout and "train/loss=" in result.stdout  # tqdm
    assert "throughput/tokens_per_s" in result.stdout  # the final table
    speed = json.loads((tmp_path / "metrics.json").read_text())["throughput"]
    assert speed["tokens_per_s"] > 0 and speed["mfu"] > 0


@pytest.mark.slow
def test_rich_bar_in_a_terminal(tmp_path):
    """In a pseudo-terminal the rich bar shows the loss and tokens/s."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "WANDB_MODE": "offline",
           "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={tmp_path}", *TINY,
         f"callbacks.throughput.cpu_peak_file={tmp_path / 'peak.json'}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
        start_new_session=True)
    os.close(terminal)
    chunks = []
    reader = threading.Thread(target=read_all, args=(controller, chunks), daemon=True)
    reader.start()
    try:
        assert process.wait(timeout=300) == 0, b"".join(chunks)[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    reader.join(timeout=10)
    output = b"".join(chunks).decode(errors="replace")
    assert "perf/tokens_per_s" in output and "train/loss" in output
    assert "it/s]" not in output  # tqdm's rate field: the plain bar is not used


def read_all(fd: int, chunks: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed with the process
            return
        if not chunk:
            return
        chunks.append(chunk)



@pytest.mark.slow
@pytest.mark.distributed
def test_only_rank_zero_shows_a_progress_bar(tmp_path):
    """Two DDP processes, each measuring its own device; the bar only on rank 0."""
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={tmp_path / 'run'}", *TINY,
            "strategy=ddp", "trainer.devices=2", "data.batch_size=16",
            f"callbacks.throughput.cpu_peak_file={tmp_path / 'peak.json'}",
            "+callbacks.probe._target_=probes.ProgressProbe", f"+callbacks.probe.folder={tmp_path}"]
    status, output = run_subprocess(args, 300, cwd=ROOT, env=env)
    assert status == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["disabled"] for r in ranks] == [False, True]
    assert ranks[0]["bar"] == "TQDMProgressBar"  # the output is a pipe
    assert all(r["flops_per_step"] > 0 and r["tokens"] > 0 for r in ranks)
