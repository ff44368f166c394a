"""`lmlab.predict` and what `lmlab.evaluate` writes: a classifier's labels and probabilities
agree between the two and with the data's own encoding, the confusion table agrees with the
test accuracy, the other runs are continued; `--help` of every command."""

import json
import re
from collections import Counter

import pytest
from hydra.utils import instantiate

from conftest import ROOT, run_cli
from lmlab import check_parallel, compare, evaluate, generate, predict
from lmlab.predict import encode_texts, tsv_field
from lmlab.training.runs import load_run_config

TINY_CLASSIFIER = ["trainer.max_epochs=1", "trainer.limit_train_batches=3",
                   "model.net.embed_dim=16", "model.net.hidden_size=16", "model.net.num_layers=1"]
TINY_LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=300",
           "trainer.max_steps=3", "trainer.max_epochs=-1", "data.train_batches=3",
           "data.val_batches=2", "model.sample_tokens=0"]
ESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def train(folder, *overrides):
    result = run_cli(f"hydra.run.dir={folder}", *overrides, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny LSTM classifier of the 8-class default data, evaluated by `lmlab.evaluate`."""
    folder = train(tmp_path_factory.mktemp("classifier") / "run", *TINY_CLASSIFIER)
    evaluated = run_cli(str(folder), module="lmlab.evaluate", cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def test_split(classifier_run):
    """The classifier's data, encoded by its DataModule with the run's tokenizer and labels."""
    cfg = load_run_config(classifier_run)
    data = instantiate(cfg.data, load_from=str(classifier_run))
    data.setup("test")
    return cfg, data


def unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda m: ESCAPES[m.group(1)], field)


def read_tsv(path) -> list[dict[str, str]]:
    """The rows of a file `lmlab` wrote, by column, with every field's escapes read back."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header, *rows = ([unescape(f) for f in line.split("\t")] for line in lines)
    assert all(len(row) == len(header) for row in rows)
    return [dict(zip(header, row)) for row in rows]


def test_a_field_keeps_its_text_on_one_line():
    text = "a\tb\nc\\nd\r"
    assert tsv_field(text) == "a\\tb\\nc\\\\nd\\r"
    assert unescape(tsv_field(text)) == text


@pytest.mark.slow
def test_predict_gives_the_labels_evaluate_wrote_for_the_same_texts(classifier_run, tmp_path):
    evaluated = read_tsv(classifier_run / "evaluate" / "predictions.tsv")
    texts = [row["text"] for row in evaluated]
    assert not any("\n" in text or "\r" in text for text in texts)  # one a line of input_file
    (tmp_path / "in.txt").write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    result = run_cli(str(classifier_run), f"input_file={tmp_path / 'in.txt'}",
                     f"output_file={tmp_path / 'out.tsv'}", "batch_size=7",
                     module="lmlab.predict", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = read_tsv(tmp_path / "out.tsv")
    classes = json.loads((classifier_run / "labels.json").read_text())["labels"]
    assert list(predicted[0]) == ["text", "label", "probability",
                                  *(f"p({label})" for label in classes)]
    assert [row["text"] for row in predicted] == texts
    assert [row["label"] for row in predicted] == [row["predicted"] for row in evaluated]
    assert len({row["label"] for row in predicted}) > 1  # not one class for every text
    for ours, theirs in zip(predicted, evaluated):
        p = [float(ours[f"p({label})"]) for label in classes]
        assert sum(p) == pytest.approx(1, abs=1e-5)
        assert float(ours["probability"]) == max(p) == float(ours[f"p({ours['label']})"])
        assert float(ours["probability"]) == pytest.approx(float(theirs["probability"]),
                                                           abs=2e-6)


@pytest.mark.slow
def test_predict_encodes_a_text_as_the_data_module_does(classifier_run, test_split):
    cfg, data = test_split
    texts = [row["text"] for row in read_tsv(classifier_run / "evaluate" / "predictions.tsv")]
    encoded = encode_texts(data.tokenizer, texts, cfg.data.max_length)
    assert [ids.tolist() for ids in encoded] == \
        [example["tokens"].tolist() for example in data.datasets["test"]]


@pytest.mark.slow
def test_the_confusion_table_counts_the_test_split_and_its_accuracy(classifier_run,
                                                                    test_split):
    folder = classifier_run / "evaluate"
    table = read_tsv(folder / "confusion.tsv")
    classes = json.loads((classifier_run / "labels.json").read_text())["labels"]
    assert [row["gold/predicted"] for row in table] == list(table[0])[1:] == classes
    counts = [[int(row[label]) for label in classes] for row in table]
    total = sum(map(sum, counts))
    assert total == len(test_split[1].datasets["test"])
    accuracy = json.loads((folder / "metrics.json").read_text())["metrics"]["test/acc"]
    assert sum(counts[i][i] for i in range(len(classes))) / total == pytest.approx(accuracy,
                                                                                  abs=1e-6)
    pairs = Counter((row["gold"], row["predicted"])
                    for row in read_tsv(folder / "predictions.tsv"))
    assert all(counts[g][p] == pairs[(gold, predicted)] for g, gold in enumerate(classes)
               for p, predicted in enumerate(classes))
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_generate_refuses_a_classifier_in_one_line_naming_predict(classifier_run):
    result = run_cli(f"ckpt={classifier_run}", module="lmlab.generate", cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert f"python -m lmlab.predict {classifier_run} input=" in result.stderr


@pytest.mark.slow
def test_predict_continues_a_language_models_prompt(tmp_path):
    folder = train(tmp_path / "lm", *TINY_LM, f"paths.cache_dir={tmp_path / 'cache'}")
    result = run_cli(str(folder), "input=def ", "max_new_tokens=6", "temperature=0",
                     module="lmlab.predict", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def ") and len(result.stdout) > len("def ")
    assert "6 tokens in" in result.stderr


@pytest.mark.parametrize("command", [evaluate, generate, predict, compare, check_parallel])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help_with_its_usage(command, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        command.main([flag])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and f"python -m {command.__name__}" in out
