"""The seq2seq task end to end: training, decoding, scores from the written files, generate."""

import json
import os
import sys

import pytest
import torch

from conftest import DATA_DIR, ROOT, needs_data, run_cli
from lmlab.check_parallel import check, run_subprocess
from lmlab.data.corpora import stdlib_summaries
from lmlab.generate import GenerateConfig, search_changes
from lmlab.tasks.text_metrics import bleu, rouge
from lmlab.training.runs import load_run, load_run_config, run_description

TINY = ["model=transformer_tiny", "data=stdlib_summaries", "data.tokenizer.vocab_size=600",
        "trainer.max_epochs=2", "trainer.limit_train_batches=8", "data.batch_size=32",
        "model.beam=3", "logger=csv"]
pytestmark = pytest.mark.slow


def run(run_dir, *overrides):
    result = run_cli(f"hydra.run.dir={run_dir}", *overrides, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def summary_run(tmp_path_factory):
    """A tiny transformer trained for a few steps on the embedded summarization corpus."""
    run_dir = tmp_path_factory.mktemp("s2s") / "run"
    run(run_dir, *TINY)
    return run_dir


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_test_scores_equal_the_reference_package_on_the_written_files(summary_run):
    folder = summary_run / "hypotheses"
    hyps, refs, srcs = (lines(folder / f"test.{kind}.txt") for kind in ("hyp", "ref", "src"))
    assert len(hyps) == len(refs) == len(srcs) > 100  # every test example, line-aligned
    metrics = json.loads((summary_run / "metrics.json").read_text())["metrics"]
    recomputed = rouge(hyps, [[r] for r in refs])
    for name in ("rouge1", "rouge2", "rougeL"):
        assert metrics[f"test/{name}"] == pytest.approx(recomputed[name], rel=1e-6)


def test_the_best_checkpoint_is_chosen_by_validation_rouge(summary_run):
    saved = json.loads((summary_run / "metrics.json").read_text())
    assert "best val/rougeL" in saved["metrics"] and saved["objective"] is not None


def test_generate_translates_one_input_and_a_file_line_by_line(summary_run, tmp_path):
    sources = lines(summary_run / "hypotheses" / "test.src.txt")[:5]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    args = [f"ckpt={summary_run}", f"input_file={tmp_path / 'in.txt'}",
            f"output_file={tmp_path / 'out.txt'}", "beam=1", "batch_size=2",
            "no_repeat_ngram_size=2"]
    done = run_cli(*args, module="lmlab.generate", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = lines(tmp_path / "out.txt")
    assert len(outputs) == 5
    one = run_cli(f"ckpt={summary_run}", f"input={sources[2]}", "beam=1",
                  "no_repeat_ngram_size=2", module="lmlab.generate", cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.splitlines() == [outputs[2]]  # alone as in a padded batch


def test_fine_tuning_on_other_data_encodes_it_with_the_weights_tokenizer(summary_run, tmp_path):
    # other texts: each docstring's first sentence back to its function's name and signature
    pairs = [{"document": target, "summary": source.split("\n")[0]}
             for source, target in stdlib_summaries()[:300]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    tuned = tmp_path / "tuned"
    fine_tune = [*TINY, "data=summarization_files", f"data.files.train={train}",
                 "data.source_field=document", "data.target_field=summary"]
    run(tuned, *fine_tune, "trainer.max_epochs=1", f"ckpt_path={summary_run / 'weights.ckpt'}")
    run(tuned, *fine_tune, "trainer.max_epochs=2", "resume=auto")  # and resumed, exactly
    for side in ("source", "target"):
        name = f"{side}_tokenizer.json"
        assert (tuned / name).read_text() == (summary_run / name).read_text()


def test_generate_sets_the_runs_kernel_choices(summary_run):
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        load_run(str(summary_run), "python -m lmlab.generate")
        assert torch.backends.cuda.cudnn_sdp_enabled() is False  # the run's kernels node
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_generate_decodes_with_the_runs_task_as_the_command_line_changes_it(summary_run):
    task, _, cfg = load_run(str(summary_run), "python -m lmlab.generate")
    assert (task.mbr, task.metric, task.beams["test"]) == (False, "rouge", cfg.model.beam)
    changed, _, _ = load_run(str(summary_run), "python -m lmlab.generate",
                             search_changes(GenerateConfig(ckpt="", mbr=True, beam=3)))
    assert (changed.mbr, changed.beams["test"]) == (True, 3)


def test_generate_scores_a_named_corpus_by_its_own_task_type(summary_run):
    cfg = load_run_config(summary_run)
    cfg.data.corpus, cfg.data.task_type = "multi30k", "summarization"  # the corpus decides
    assert run_description(summary_run, cfg).task_type == "translation"


def test_generate_asks_for_an_input(summary_run):
    done = run_cli(f"ckpt={summary_run}", module="lmlab.generate", cwd=ROOT)
    assert done.returncode == 2 and "input=TEXT or input_file=PATH" in done.stderr


@needs_data
@pytest.mark.parametrize("experiment,metric", [("multi30k_transformer", "test/bleu"),
                                               ("multi30k_lstm_attn", "test/bleu"),
                                               ("aeslc_transformer", "test/rougeL_annotated")])
def test_fast_dev_run_of_each_experiment(tmp_path, experiment, metric):
    # each experiment's own search (AESLC's: beam 64 with MBR), on outputs kept short: an
    # untrained net's run on to the length limit
    result = run(tmp_path, f"experiment={experiment}", "debug=fast_dev_run",
                 "model.max_len_a=0.0", "model.max_len_b=6")
    assert metric in result.stdout


@needs_data
def test_translation_bleu_equals_sacrebleu_on_the_written_files(tmp_path):
    run(tmp_path, "experiment=multi30k_transformer", "model=transformer_tiny",
        "model.net.share_embeddings=true", "trainer.max_epochs=1",
        "trainer.limit_train_batches=10", "trainer.limit_val_batches=2", "model.beam=2",
        "data.tokenizer.vocab_size=1000")
    folder = tmp_path / "hypotheses"
    hyps, refs = lines(folder / "test.hyp.txt"), lines(folder / "test.ref.txt")
    assert len(hyps) == len(refs) == 1000  # test_2016_flickr, every sentence
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["test/bleu"] == pytest.approx(bleu(hyps, [[r] for r in refs])[0], rel=1e-9)
    assert "tok:13a" in (folder / "test.bleu-signature.txt").read_text()


SHARED_OUTPUT = ["model=transformer_tiny", "data=stdlib_summaries",
                 "data.tokenizer.vocab_size=600", "data.batch_size=32", "model.net.dropout=0.0",
                 "data.joint_vocab=true",
                 # the experiments' output: one embedding matrix, and copying
                 "model.net.share_embeddings=true", "model.net.copy=true",
                 # outputs of at most a tenth of the source + 4 tokens: the ranks' limits
                 # still differ, so lockstep decoding is exercised, in a third of the time
                 "model.max_len_a=0.1", "model.max_len_b=4"]


@pytest.mark.distributed
def test_two_processes_give_the_losses_of_one_under_data_parallel_and_fsdp():
    """Two processes under DDP, FSDP and FSDP2 follow one process's validation curve and
    decode its hypotheses, line for line (check_parallel raises otherwise); DeepSpeed and
    tensor parallelism are in test_seq2seq_sharded.py, a file of its own so that two test
    workers share the work."""
    strategies = ["cpu", "ddp", "fsdp", "fsdp2"]
    curves = check(strategies, steps=4, overrides=SHARED_OUTPUT, lr=1.0)
    assert all(len(curves[s]) == 4 for s in strategies)


@pytest.mark.distributed
def test_two_processes_score_and_write_what_one_process_does(tmp_path):
    """The test split decoded by two processes, gathered, gives the hypotheses and ROUGE of
    one process decoding it alone with the same weights (lmlab.evaluate)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={run_dir}", *TINY,
               "trainer.max_epochs=1", "strategy=ddp", "trainer.devices=2"]
    status, output = run_subprocess(command, 600, cwd=ROOT, env=env)
    assert status == 0, output[-3000:]
    done = run_cli(str(run_dir), module="lmlab.evaluate", cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    hyps = lines(run_dir / "hypotheses" / "test.hyp.txt")
    assert len(hyps) == len(lines(run_dir / "hypotheses" / "test.src.txt"))
    assert hyps == lines(run_dir / "evaluate" / "hypotheses" / "test.hyp.txt")
    one = rouge(hyps, [[r] for r in lines(run_dir / "hypotheses" / "test.ref.txt")])
    for name in ("rouge1", "rouge2", "rougeL"):
        assert two[f"test/{name}"] == pytest.approx(one[name], rel=1e-6)
