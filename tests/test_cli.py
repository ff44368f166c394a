"""The command lines: `python -m lmlab.run`, `lmlab.evaluate` and `lmlab.generate` end to end
in fresh processes, and the `key=value` parsing of the entry points that are not Hydra apps."""

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import DATA_DIR, ROOT, needs_data, run_cli
from lmlab.check_parallel import parse
from lmlab.config.cli import parse_args, parse_known_args
from lmlab.errors import LmlabError
from lmlab.evaluate import EvaluateArgs
from lmlab.generate import GenerateConfig, search_changes
from lmlab.generate import main as generate_main
from lmlab.training.runs import find_checkpoint, override


def run(tmp_path, *overrides, expect_ok=True, **kwargs):
    result = run_cli(f"hydra.run.dir={tmp_path}", *overrides, cwd=ROOT, **kwargs)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fast_dev_run_of_the_default(tmp_path):
    result = run(tmp_path, "debug=fast_dev_run")
    assert "test metrics" in result.stdout and "test/acc" in result.stdout
    assert f"run files:  {tmp_path}" in result.stdout
    for name in (".hydra/config.yaml", "tokenizer.json", "labels.json", "run.log"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow
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


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_and_config(tmp_path):
    # fast_dev_run would swap loggers for a dummy: run a few real batches instead
    run(tmp_path, "logger=csv_wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2")
    records = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    content = records[0].read_bytes()
    assert b"val/acc" in content and b"hidden_size" in content


@pytest.mark.slow
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


@pytest.mark.slow
def test_overfit_debug_mode_learns_one_batch(tmp_path):
    run(tmp_path, "debug=overfit", "strategy=cpu")
    accuracies = [float(r["train/acc"]) for r in metrics_rows(tmp_path) if r.get("train/acc")]
    assert accuracies[-1] == 1.0


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_run_told_to_test_nothing_ends_cleanly(tmp_path):
    result = run(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=0", "strategy=cpu")
    assert "test/acc" not in result.stdout and (tmp_path / "weights.ckpt").is_file()
    assert '"metrics": {' in (tmp_path / "metrics.json").read_text()


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


@pytest.mark.slow
def test_sweep_runs_every_job(tmp_path):
    result = run_cli(f"hydra.sweep.dir={tmp_path}", "sweep=lstm_cells", "debug=fast_dev_run",
                     "logger=none", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    assert all((tmp_path / j / "tokenizer.json").is_file() for j in jobs)


def start_and_stop(tmp_path, stop: signal.Signals) -> subprocess.Popen:
    """Starts a long run, waits for its first checkpoint, trains on a little, sends `stop`.
    The output goes to files (`out.txt`, `err.txt`), never to a pipe that could fill up and
    block the run."""
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR)}
    args = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={tmp_path}", "strategy=cpu",
            "trainer.max_epochs=50", "logger=none"]
    with open(tmp_path.parent / f"{tmp_path.name}.out.txt", "w") as out, \
            open(tmp_path.parent / f"{tmp_path.name}.err.txt", "w") as err:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
                                   start_new_session=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 180
        while not last.is_file() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let it train on, so the signal lands mid-epoch or mid-save
        os.killpg(process.pid, stop)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process


def stderr_of(tmp_path) -> str:
    return (tmp_path.parent / f"{tmp_path.name}.err.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_saves_the_state_and_says_how_to_resume(tmp_path):
    process = start_and_stop(tmp_path, signal.SIGINT)
    saved = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert process.returncode == 130  # 128 + SIGINT, as a shell reports it
    assert f"hydra.run.dir={tmp_path} resume=auto, or with ckpt_path={saved}" in stderr_of(tmp_path)
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] > 0


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_generate_without_a_checkpoint_explains_itself(tmp_path):
    result = run_cli(f"ckpt={tmp_path}", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "not an lmlab run folder" in result.stderr
    result = run_cli("ckpt=x", "tempreature=1", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "tempreature" in result.stderr


@pytest.mark.slow
def test_pretrained_vectors_through_the_cli_log_their_coverage(tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{w} " + " ".join(["0.1"] * 100) + "\n"
                               for w in ("the", "return", "a", "event", "loop", "zzzz")))
    run(tmp_path / "run", "debug=fast_dev_run", f"model.pretrained_vectors={vectors}",
        "model.net.freeze_embeddings=true")
    log_text = (tmp_path / "run" / "run.log").read_text()
    assert "pretrained vectors" in log_text and "cover 5 of" in log_text


# --- key=value command lines of evaluate, generate and check_parallel -----------------------

TINY_LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=300",
           "trainer.max_steps=3", "trainer.max_epochs=-1", "data.train_batches=3",
           "data.val_batches=2", "model.sample_tokens=0"]
# Texts that YAML, OmegaConf or a shell-minded parser would read as something else.
TEXTS = ["ROMEO:", "ROMEO: hello", "a: b: c", "123", "null", "[a]", "~", "true", "  spaced  ",
         "1e-3", "", "x=y", "{a: 1}", "'quoted'", "${oc.env:HOME}", "-"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny language-model run with the default callbacks (best and last checkpoints)."""
    folder = tmp_path_factory.mktemp("lm_run")
    run(folder, *TINY_LM, f"paths.cache_dir={folder / 'cache'}")
    return folder


@pytest.fixture(scope="module")
def bare_lm_run(tmp_path_factory):
    """The same run with `callbacks=none`: no best or last checkpoint, only weights.ckpt."""
    folder = tmp_path_factory.mktemp("bare_lm_run")
    run(folder, *TINY_LM, "callbacks=none", f"paths.cache_dir={folder / 'cache'}")
    return folder


@pytest.mark.parametrize("text", TEXTS)
def test_a_text_argument_keeps_exactly_the_text_typed(text):
    args = parse_args(GenerateConfig, [f"ckpt={text}", f"prompt={text}", f"device={text}"], "u")
    assert (args.ckpt, args.prompt, args.device) == (text, text, text)
    own, _ = parse_known_args(EvaluateArgs, [f"run_dir={text}", f"ckpt={text}"], "u")
    assert own.run_dir == text and own.ckpt == (None if text == "null" else text)
    if text and "=" not in text:
        assert parse_args(EvaluateArgs, [text], "u", positional=("run_dir",)).run_dir == text


def test_other_arguments_are_converted_by_their_type():
    args = parse_args(GenerateConfig, ["ckpt=r", "top_k=null", "top_p=0.9", "temperature=0",
                                       "use_cache=false", "max_new_tokens=7"], "u")
    assert (args.top_k, args.top_p, args.temperature, args.use_cache, args.max_new_tokens) == \
        (None, 0.9, 0.0, False, 7)
    options = parse(["strategies=[cpu, fsdp2]", "steps=3", "model=gpt_tiny", "data.x=a: b"])
    assert options["strategies"] == ["cpu", "fsdp2"] and options["steps"] == 3
    assert options["overrides"][1:] == ["model=gpt_tiny", "data.x=a: b"]  # passed on as typed


@pytest.mark.parametrize("argv,message", [
    (["ckpt=r", "max_new_tokens=ten"], "max_new_tokens='ten' is not an integer"),
    (["ckpt=r", "top_k=1.5"], "top_k='1.5' is not an integer or null"),
    (["ckpt=r", "use_cache=maybe"], "use_cache='maybe' is not true or false"),
    (["ckpt=r", "tempreature=1"], "unknown argument 'tempreature' (did you mean 'temperature'?)"),
    (["prompt=hi"], "missing ckpt=..."),
    (["ckpt=r", "hello"], "expected key=value, got 'hello'"),
])
def test_a_bad_argument_is_one_line_naming_it(argv, message):
    with pytest.raises(LmlabError) as caught:
        parse_args(GenerateConfig, argv, "python -m lmlab.generate ckpt=RUN_DIR")
    assert str(caught.value).splitlines()[0] == message


@pytest.mark.parametrize("argv,message", [
    (["steps=5.5"], "steps='5.5' is not an integer"),
    (["strategies=[cpu,dpp]"], "strategies: no strategy 'dpp' (did you mean 'ddp'?)"),
])
def test_check_parallel_refuses_bad_options_before_any_run(argv, message):
    with pytest.raises(LmlabError, match=re.escape(message)):
        parse(argv)


def test_evaluate_overrides_are_typed_by_the_saved_value():
    cfg = OmegaConf.create({"data": {"batch_size": 64, "files": {"train": "a.csv"},
                                     "max_length": None, "shuffle": True}})
    for arg in ("data.batch_size=256", "data.files.train=a: b: c", "data.max_length=128",
                "data.shuffle=false", "+data.files.test=2024.csv"):
        override(cfg, arg)
    assert OmegaConf.to_container(cfg) == {"data": {
        "batch_size": 256, "files": {"train": "a: b: c", "test": "2024.csv"},
        "max_length": 128, "shuffle": False}}
    for arg, message in [("data.bach_size=3", "did you mean 'data.batch_size'?"),
                         ("data.batch_size=x", "data.batch_size='x' is not an integer"),
                         ("data.files=x", "data.files is a group of keys"),
                         ("dta.batch_size=3", "no group of keys 'dta'")]:
        with pytest.raises(LmlabError, match=re.escape(message)):
            override(cfg, arg)


@pytest.mark.slow
def test_the_readme_prompt_example_generates(lm_run):
    # The case: `python -m lmlab.generate ckpt=RUN prompt="ROMEO:"` was refused.
    result = run_cli(f"ckpt={lm_run}", "prompt=ROMEO:", "max_new_tokens=5", "temperature=0",
                     module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ROMEO:") and "5 tokens in" in result.stderr
    assert f"checkpoint: {next((lm_run / 'checkpoints').glob('best-*.ckpt'))} (best)" in \
        result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_every_prompt_is_continued_as_typed(lm_run, capsys, text):
    generate_main([f"ckpt={lm_run}", f"prompt={text}", "max_new_tokens=2", "temperature=0"])
    assert capsys.readouterr().out.startswith(text)


@pytest.mark.slow
def test_a_bad_number_exits_with_one_line(lm_run):
    result = run_cli(f"ckpt={lm_run}", "max_new_tokens=ten", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: max_new_tokens='ten' is not an integer" in result.stderr


@pytest.mark.slow
def test_a_run_without_best_checkpoint_falls_back_to_its_weights(bare_lm_run):
    generated = run_cli(f"ckpt={bare_lm_run}", "prompt=def", "max_new_tokens=3",
                        module="lmlab.generate", cwd=ROOT)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert f"checkpoint: {bare_lm_run / 'weights.ckpt'} (weights; the run has no best or " \
        "last checkpoint)" in generated.stderr
    evaluated = run_cli(str(bare_lm_run), module="lmlab.evaluate", cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "test/loss" in evaluated.stdout
    explicit = run_cli(str(bare_lm_run), "ckpt=best", module="lmlab.evaluate", cwd=ROOT)
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert f"no best checkpoint in {bare_lm_run}; the run has weights.ckpt: run " \
        f"`python -m lmlab.evaluate {bare_lm_run} ckpt=weights`" in explicit.stderr


def test_the_default_checkpoint_is_best_else_last_else_weights(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    command = lambda name, path: f"cmd {name} {path}"  # noqa: E731
    for name in ("weights.ckpt", "checkpoints/last.ckpt", "checkpoints/best-epoch03.ckpt"):
        (tmp_path / name).touch()
        assert find_checkpoint(tmp_path, None, command) == tmp_path / name
    assert "(last; the run has no best checkpoint)" in capsys.readouterr().err
    assert find_checkpoint(tmp_path, "last", command) == tmp_path / "checkpoints/last.ckpt"
    with pytest.raises(LmlabError, match="nothing.ckpt does not exist; the run has "
                       "checkpoints/best-epoch03.ckpt, checkpoints/last.ckpt, weights.ckpt"):
        find_checkpoint(tmp_path, str(tmp_path / "nothing.ckpt"), command)


@pytest.mark.slow
def test_generate_from_a_missing_file_names_the_checkpoints_there(bare_lm_run):
    missing = bare_lm_run / "checkpoints" / "last.ckpt"
    result = run_cli(f"ckpt={missing}", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run `python -m lmlab.generate ckpt={bare_lm_run / 'weights.ckpt'}`" in result.stderr


def test_the_documented_hydra_quoting_keeps_the_text(make_cfg):
    documented = next(line for line in (ROOT / "docs" / "guide.md").read_text().splitlines()
                      if line.startswith("python -m lmlab.run \"task_name='1e-3'\""))
    cfg = make_cfg(*shlex.split(documented)[3:])
    assert cfg.task_name == "1e-3" and list(cfg.tags) == ["2024.10"]
    # what the guide warns of: unquoted, Hydra reads the text as a number
    unquoted = make_cfg("task_name=1e-3", "tags=[2024.10]", "data=files",
                        "data.files.train=2024.10")
    assert (unquoted.task_name, list(unquoted.tags), unquoted.data.files.train) == \
        ("0.001", [2024.1], 2024.1)


def test_generate_changes_only_the_search_settings_the_command_line_gives():
    assert search_changes(GenerateConfig(ckpt="run")) == {}  # the run's own search
    given = search_changes(GenerateConfig(ckpt="run", beam=2, length_penalty=1.0,
                                          no_repeat_ngram_size=0, max_length=7))
    assert given == {"beam": 2, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                     "max_len_a": 0.0, "max_len_b": 7}




def test_a_run_saved_by_the_earlier_layout_loads_with_its_targets_renamed(tmp_path):
    """Run folders written before the modules moved name `lmlab.models.seq2seq`,
    `lmlab.kernels`, `lmlab.resume`, ...: they still evaluate and generate."""
    from omegaconf import OmegaConf

    from lmlab.training.runs import load_run_config

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save({"paths": {"output_dir": "elsewhere"},
                    "model": {"net": {"_target_": "lmlab.models.seq2seq.Seq2SeqTransformer"}},
                    "kernels": {"_target_": "lmlab.kernels.Kernels"},
                    "callbacks": {"last": {"_target_": "lmlab.resume.LastCheckpoint"},
                                  "bar": {"_target_": "lmlab.throughput.progress_bar"}}},
                   tmp_path / ".hydra" / "config.yaml")
    cfg = load_run_config(tmp_path)
    assert cfg.model.net._target_ == "lmlab.models.transformer_seq2seq.Seq2SeqTransformer"
    assert cfg.kernels._target_ == "lmlab.training.kernels.Kernels"
    assert cfg.callbacks.last._target_ == "lmlab.checkpointing.exact_resume.LastCheckpoint"
    assert cfg.callbacks.bar._target_ == "lmlab.training.callbacks.progress.progress_bar"
