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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import DATA_DIR, ROOT, run_cli
from lmlab.check_parallel import run_subprocess
from lmlab.training.build import callbacks
from lmlab.tracking.loggers import CSVLogger
from lmlab.models.rnn import RNNClassifier
from lmlab.data.completions import IGNORE
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.tasks.classification import ClassificationTask
from lmlab.tasks.seq2seq import Seq2SeqTask
from lmlab.models.flops import recurrent
from lmlab.training.flops import StepFlops, compute_dtype, cpu_model, peak_flops
from lmlab.training.callbacks.throughput import Throughput
from lmlab.training.callbacks.progress import progress_bar

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
    assert int(lm.count_tokens(completions(9))) == (8 - 2) + (5 - 2) + (3 - 2)  # scored, real
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
    assert flops.total == lstm_hand_count(2 * 5) == 3 * recurrent(lstm, 10)
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
    assert recurrent(gru, 7) == 7 * per_token


class WindowsLogged(Throughput):
    """Records how many micro-batches each logged window holds."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.windows = []

    def rates(self, window, device):
        if window is not self.total:
            self.windows.append(window.steps)
        return super().rates(window, device)


def train_with_throughput(tmp_path, batches: list[dict], steps: int, peak: float | None,
                          accumulate: int = 1):
    peak_file = tmp_path / "peak.json"
    if peak is not None:  # a known peak for this CPU, above any measurement: kept
        key = f"{cpu_model()} | {torch.get_num_threads()} threads | {torch.float32}"
        peak_file.write_text(json.dumps({key: peak}))
    throughput = WindowsLogged(cpu_peak_file=str(peak_file))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, log_every_n_steps=1,
                        callbacks=[throughput], logger=CSVLogger(tmp_path, name="csv", version=""),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2 * accumulate,
                        limit_val_batches=1, accumulate_grad_batches=accumulate)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    # With a sanity check and a validation in the middle of the epoch, left out of the steps.
    trainer.fit(classifier(), train_dataloaders=loader, val_dataloaders=loader)
    return throughput


def perf_rows(tmp_path) -> list[dict]:
    with open(tmp_path / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["perf/tokens_per_s"]]


def test_callback_counts_flops_tokens_and_mfu_of_a_real_run(tmp_path):
    throughput = train_with_throughput(tmp_path, [padded_batch() for _ in range(4)], 4, 1e15)
    # the three real rows at their own lengths (6 + 3 + 2 tokens), not the padded 4 x 6
    head = 2 * HIDDEN * CLASSES  # forward, per example; backward: twice that
    real_flops = lstm_hand_count(6 + 3 + 2) + 3 * 3 * head
    summary = throughput.summary
    assert summary["flops_per_step"] == real_flops
    assert int(throughput.total.tokens) == 3 * 11  # steps 2-4; the first has no start
    assert summary["tokens_per_s"] == pytest.approx(11 * summary["samples_per_s"] / 3)
    assert summary["mfu"] == pytest.approx(real_flops / summary["step_time_s"] / 1e15)
    assert 0 <= summary["data_wait"] < 1 and summary["peak_mem_gb"] > 0
    rows = perf_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # every logged step after the first
    assert all(float(r["perf/mfu"]) > 0 for r in rows)


def test_under_gradient_accumulation_perf_is_logged_once_per_optimizer_step(tmp_path):
    """Round 2: `perf/*` came once per micro-batch, and at step 0 before any optimizer step."""
    throughput = train_with_throughput(tmp_path, [padded_batch() for _ in range(8)], 4, 1e15,
                                       accumulate=2)
    rows = perf_rows(tmp_path)
    # one row per optimizer step (Lightning labels it with the optimizer steps before it)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert throughput.windows == [1, 2, 2, 2]  # the run's first micro-batch is not timed
    one_batch = lstm_hand_count(6 + 3 + 2) + 3 * 3 * 2 * HIDDEN * CLASSES
    assert throughput.summary["flops_per_step"] == 2 * one_batch  # two micro-batches a step


def test_no_mfu_where_the_peak_is_unknown(tmp_path):
    throughput = train_with_throughput(tmp_path, [padded_batch() for _ in range(3)], 3, None)
    throughput.peak = None
    figures = throughput.rates(throughput.total, torch.device("cpu"))
    assert "mfu" not in figures and figures["flops_per_step"] > 0


def test_the_cpu_peak_kept_is_the_highest_measured(tmp_path):
    path = tmp_path / "cache" / "cpu_peak.json"
    before = torch.get_rng_state()
    measured = peak_flops(torch.device("cpu"), torch.float32, path)
    # measured as every run starts: a draw from the global generator would change the
    # dropout masks of a resumed run (tests/test_weight_averaging.py saw it)
    assert torch.equal(torch.get_rng_state(), before)
    (key, value), = json.loads(path.read_text()).items()
    assert value == measured > 1e8 and "threads" in key and cpu_model() in key
    path.write_text(json.dumps({key: 1e15}))  # a higher one, kept
    assert peak_flops(torch.device("cpu"), torch.float32, path) == 1e15
    path.write_text(json.dumps({key: 123.0}))  # measured on a busy machine: raised
    assert peak_flops(torch.device("cpu"), torch.float32, path) > 1e8
    assert json.loads(path.read_text())[key] > 1e8
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


def seq2seq_pairs(vocab: int) -> dict:
    """Three pairs of very different lengths, right-padded, and a copy that pads the batch."""
    g = torch.Generator().manual_seed(0)
    sources, targets = [9, 2, 5, 5], [7, 3, 2, 2]
    source = torch.randint(4, vocab, (4, 9), generator=g)
    target = torch.randint(4, vocab, (4, 7), generator=g)
    target[:, 0] = 1
    for row, (s, t) in enumerate(zip(sources, targets)):
        source[row, s:] = 0
        target[row, t - 1], target[row, t:] = 2, 0
    return {"source": source, "source_lengths": torch.tensor(sources), "target": target,
            "target_lengths": torch.tensor(targets), "weight": torch.tensor([1., 1., 1., 0.])}


def flop_tasks():
    """Every built-in net, in its task, with a batch of its task's layout."""
    from lmlab.models.gpt import GPT
    from lmlab.models.rnn_lm import RNNLanguageModel
    from lmlab.models.rnn_seq2seq import RNNSeq2Seq
    from lmlab.models.transformer_seq2seq import Seq2SeqTransformer

    torch.manual_seed(0)
    V = 23
    blocks = {"tokens": torch.randint(0, V, (3, 8)), "targets": torch.randint(0, V, (3, 8)),
              "weight": torch.tensor([1., 1., 0.])}
    transformer = dict(d_model=16, n_head=2, n_encoder_layers=2, n_decoder_layers=1, d_ff=24)
    bilstm = RNNClassifier(20, CLASSES, embed_dim=EMBED, hidden_size=HIDDEN, num_layers=2,
                           bidirectional=True, dropout=0.0)
    return {
        "classifier": (ClassificationTask(bilstm, CLASSES, optimizer=adam), padded_batch()),
        "gpt": (CausalLMTask(GPT(V, 8, n_layer=2, n_head=2, n_embd=16), optimizer=adam), blocks),
        "gpt_llama": (CausalLMTask(GPT(V, 8, n_layer=2, n_head=4, n_embd=16, positions="rope",
                                       norm="rmsnorm", mlp="swiglu", mlp_hidden=24,
                                       n_kv_head=2, bias=False, tie_embeddings=False),
                                   optimizer=adam), completions(V)),
        "rnn_lm": (CausalLMTask(RNNLanguageModel(V, 8, 12, 2), optimizer=adam), blocks),
        "transformer": (Seq2SeqTask(Seq2SeqTransformer(V, V, 0, 1, 2, **transformer),
                                    optimizer=adam), seq2seq_pairs(V)),
        "transformer_copy": (Seq2SeqTask(Seq2SeqTransformer(V, V, 0, 1, 2, copy=True,
                                                            **transformer), optimizer=adam),
                             seq2seq_pairs(V)),
        **{f"lstm_{kind}": (Seq2SeqTask(RNNSeq2Seq(V, V, 0, 1, 2, embed_dim=8, hidden_size=12,
                                                   num_layers=2, attention=kind),
                                        optimizer=adam), seq2seq_pairs(V))
           for kind in ("luong", "bahdanau")},
    }


def completions(vocab: int) -> dict:
    """A padded batch of prompt/completion sequences (`data=completions`): lengths 8, 5, 3
    and a copy that pads it across ranks; the prompts' targets are not scored."""
    lengths = torch.tensor([8, 5, 3, 8])
    tokens = torch.randint(1, vocab, (4, 8))
    targets = torch.randint(1, vocab, (4, 8))
    targets[:, :2] = IGNORE  # the prompt
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length:], targets[row, length:] = 0, IGNORE
    return {"tokens": tokens, "targets": targets, "lengths": lengths,
            "weight": torch.tensor([1., 1., 1., 0.])}


def one_example(batch: dict, row: int) -> dict:
    """Row `row` of a batch alone, without its padding."""
    lengths = {"source": "source_lengths", "target": "target_lengths", "tokens": "lengths",
               "targets": "lengths"}
    alone = {}
    for key, value in batch.items():
        value = value[row:row + 1]
        if key in lengths and lengths[key] in batch:
            value = value[:, :int(batch[lengths[key]][row])]
        alone[key] = value
    alone["weight"] = torch.ones(1)
    return alone


@pytest.mark.parametrize("name", ["classifier", "gpt", "gpt_llama", "rnn_lm", "transformer",
                                  "transformer_copy", "lstm_luong", "lstm_bahdanau"])
def test_model_flops_of_a_padded_batch_are_its_real_examples_counted_alone(name):
    """Each net's formula against torch's counter (`StepFlops`: its matmul and attention
    formulas, plus the hand count of recurrent layers) on one real example at a time,
    unpadded, forward and backward; the copies that pad a batch across ranks count nothing."""
    task, batch = flop_tasks()[name]
    reference = 0
    for row in range(len(batch["weight"])):
        # the math path of attention: torch counts nothing for its fused CPU kernels
        with sdpa_kernel(SDPBackend.MATH), StepFlops(task) as counter:
            task.step(one_example(batch, row), "train").backward()
        reference += counter.total if batch["weight"][row] > 0 else 0
    assert float(task.count_flops(batch)) == pytest.approx(reference, rel=0.01)
    with StepFlops(task) as padded:  # negative control: the padded batch, copies included
        task.step(batch, "train").backward()
    assert padded.total > 1.05 * reference


CHILD_PEAK = """
import resource, torch
from lmlab.training.callbacks.throughput import peak_memory
print(peak_memory(torch.device("cpu")), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_the_cpu_peak_of_a_started_process_is_its_own():
    """A rank started by another (DDP's launcher forks and execs) inherits its parent's
    ru_maxrss; the peak reported is the process's own high-water mark."""
    held = torch.ones(600 * 2**20, dtype=torch.uint8)  # this process: 600 MiB more
    status, output = run_subprocess([sys.executable, "-c", CHILD_PEAK], 120)
    assert status == 0, output
    own, inherited = map(int, output.split()[-2:])
    assert own < 500 * 2**20 < 600 * 2**20 < inherited  # the negative control: ru_maxrss
    del held
