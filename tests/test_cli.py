"""`python -m lmlab.run` and `python -m lmlab.evaluate` end to end, in fresh processes."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DATA_DIR, ROOT, needs_data, run_cli


def run(tmp_path, *overrides, expect_ok=True, **kwargs):
    result = run_cli(f"hydra.run.dir={tmp_path}", *overrides, cwd=ROOT, **kwargs)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fast_dev_run_of_the_default(tmp_path):
    result = run(tmp_path, "debug=fast_dev_run")
    assert "test metrics" in result.stdout and "test/acc" in result.stdout
    assert f"run files:  {tmp_path}" in result.stdout
    for name in (".hydra/config.yaml", "tokenizer.json", "labels.json", "run.log"):
        assert (tmp_path / name).is_file(), name


@needs_data
@pytest.mark.parametrize("overrides", [
    ["model=gru", "data/tokenizer=char", "data=trec", "strategy=cpu", "precision=bf16-mixed",
     "logger=none", "callbacks=none"],
    ["model=bilstm_max", "data/tokenizer=bpe", "data=ag_news", "callbacks=early_stopping",
     "trainer=default"],
    ["experiment=sst2_lstm"],
], ids=["gru-char-trec-bf16", "bilstm-bpe-agnews", "experiment"])
def test_one_override_of_each_group(tmp_path, overrides):
    result = run(tmp_path, "debug=fast_dev_run", *overrides)
    assert "test/acc" in result.stdout


def test_wandb_offline_run_records_metrics_and_config(tmp_path):
    # fast_dev_run would swap loggers for a dummy: run a few real batches instead
    run(tmp_path, "logger=csv_wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2")
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    content = records[0].read_bytes()
    assert b"val/acc" in content and b"hidden_size" in content


def test_dry_run_checks_and_prints_without_training(tmp_path):
    result = run(tmp_path, "dry_run=true", "strategy=ddp", "trainer.devices=4")
    assert "processes: 4 (4 data-parallel x 1 tensor-parallel), per-device batch 16" in \
        result.stdout
    assert "strategy:  DDPStrategy on CPUAccelerator" in result.stdout
    memory = {line.split("│")[1].strip(): float(line.split("│")[2])
              for line in result.stdout.splitlines() if line.count("│") == 3}
    assert memory["optimizer"] == pytest.approx(2 * memory["parameters"], abs=0.02)  # two moments
    assert memory["activations"] > 0 and memory["total"] > sum(
        memory[p] for p in ("parameters", "gradients", "optimizer"))
    assert not (tmp_path / "checkpoints").exists()


def test_overfit_debug_mode_learns_one_batch(tmp_path):
    run(tmp_path, "debug=overfit", "strategy=cpu")
    accuracies = [float(r["train/acc"]) for r in metrics_rows(tmp_path) if r.get("train/acc")]
    assert accuracies[-1] == 1.0


def test_training_writes_checkpoints_and_evaluation_reproduces_the_test_metrics(tmp_path):
    result = run(tmp_path, "trainer.max_epochs=2", "strategy=cpu")
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and list(checkpoints.glob("best-*.ckpt"))
    rows = metrics_rows(tmp_path)
    assert {"val/acc", "val/f1", "val/loss", "train/loss", "train/acc", "test/acc"} <= set(rows[0])
    test_acc = next(float(r["test/acc"]) for r in rows if r.get("test/acc"))
    evaluated = run_cli(str(tmp_path), module="lmlab.evaluate", cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"{test_acc:.4f}" in evaluated.stdout
    assert "test/acc" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["model=lstmm"], "Could not find 'model/lstmm'"),
    (["+model.net.hiden_size=64"], "did you mean 'hidden_size'"),
    (["data=sst2", "paths.data_dir=/nonexistent"], "LMLAB_DATA_DIR"),
    (["strategy=gpu", "data.batch_size=63", "trainer.devices=2"], "2 problem(s)"),
    (["data=files", "data.files.train=/nonexistent/train.csv"], "train.csv: file not found"),
])
def test_bad_input_gets_a_message_not_a_traceback(tmp_path, args, message):
    result = run(tmp_path, *args, expect_ok=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_line_names_file_and_line(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("1 a fine line\n0 another fine line\nbroken\n")
    result = run(tmp_path / "run", "data=files", f"data.files.train={data}", expect_ok=False)
    assert f"{data}:3: expected `LABEL<space>text`" in result.stderr
    assert "Traceback" not in result.stderr


def test_sweep_runs_every_job(tmp_path):
    result = run_cli(f"hydra.sweep.dir={tmp_path}", "sweep=lstm_cells", "debug=fast_dev_run",
                     "logger=none", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    assert all((tmp_path / j / "tokenizer.json").is_file() for j in jobs)


def start_and_stop(tmp_path, stop: signal.Signals) -> subprocess.Popen:
    """Starts a long run, waits for its first checkpoint, trains on a little, sends `stop`."""
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR)}
    args = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={tmp_path}", "strategy=cpu",
            "trainer.max_epochs=50", "logger=none"]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 180
        while not last.is_file() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let it train on, so the signal lands mid-epoch or mid-save
        os.killpg(process.pid, stop)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process


def test_ctrl_c_saves_the_state_and_says_how_to_resume(tmp_path):
    process = start_and_stop(tmp_path, signal.SIGINT)
    saved = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert process.returncode != 0
    assert f"resume with ckpt_path={saved}" in process.stderr.read()
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] > 0


def test_killed_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    start_and_stop(tmp_path, signal.SIGKILL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    epoch = state["epoch"]
    resumed = run(tmp_path / "resumed", "strategy=cpu", f"trainer.max_epochs={epoch + 2}",
                  "logger=none", f"ckpt_path={last}")
    assert "test/acc" in resumed.stdout
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == epoch + 1


def test_language_model_trains_and_generates(tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    run(tmp_path, "model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=500",
        "trainer.max_steps=20", "data.train_batches=10", "data.val_batches=2", cache)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "sample at step" in (tmp_path / "run.log").read_text()
    args = [f"ckpt={tmp_path}", "prompt=def", "max_new_tokens=40", "temperature=0"]
    first = run_cli(*args, module="lmlab.generate", cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("def") and len(first.stdout) > 10
    assert "40 tokens in" in first.stderr
    uncached = run_cli(*args, "use_cache=false", module="lmlab.generate", cwd=ROOT)
    assert uncached.stdout == first.stdout  # greedy: the cache changes nothing


def test_generate_without_a_checkpoint_explains_itself(tmp_path):
    result = run_cli(f"ckpt={tmp_path}", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "not an lmlab run folder" in result.stderr
    result = run_cli("ckpt=x", "tempreature=1", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "tempreature" in result.stderr


def test_pretrained_vectors_through_the_cli_log_their_coverage(tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{w} " + " ".join(["0.1"] * 100) + "\n"
                               for w in ("the", "return", "a", "event", "loop", "zzzz")))
    run(tmp_path / "run", "debug=fast_dev_run", f"model.pretrained_vectors={vectors}",
        "model.net.freeze_embeddings=true")
    log_text = (tmp_path / "run" / "run.log").read_text()
    assert "pretrained vectors" in log_text and "cover 5 of" in log_text
