"""docs/extending.md, as a user follows it: its files written into a user directory outside
the package, then each example trained, evaluated, predicted from and resumed.

The runs are tiny (a few steps): what is tested is that lmlab takes the user's code as its
own, not how well it learns. Nothing under lmlab/ is written.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import DATA_DIR, ROOT, doc_files, needs_data, run_cli, write_doc_files

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "strategy=cpu", "logger=csv"]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    return write_doc_files(tmp_path_factory.mktemp("mine"))


def sst2_lines(count: int) -> list[tuple[str, str]]:
    """(label, sentence) of the first `count` SST-2 training lines."""
    lines = (DATA_DIR / "classification" / "sst2" / "train.txt").read_text().splitlines()
    return [tuple(line.split(" ", 1)) for line in lines[:count]]


def train(run_dir: Path, *overrides: str, ok: bool = True):
    result = run_cli(f"hydra.run.dir={run_dir}", *overrides, cwd=ROOT, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def command(module: str, *args: str, ok: bool = True):
    result = run_cli(*args, module=module, cwd=ROOT)
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def predictions(run_dir: Path) -> list[dict]:
    with open(run_dir / "evaluate" / "predictions.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_the_page_holds_the_files_of_three_examples():
    assert set(doc_files()) == {"textcnn.py", "conf/model/textcnn.yaml", "folder_corpus.py",
                                "conf/data/folders.yaml", "regression.py",
                                "conf/model/regressor.yaml", "conf/data/scored.yaml"}


@pytest.fixture(scope="module")
def textcnn_run(user_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("textcnn")
    train(run_dir, f"user_dir={user_dir}", "model=textcnn", *TINY)
    return run_dir


@pytest.mark.slow
def test_a_net_of_your_own_trains_evaluates_predicts_and_resumes(textcnn_run, user_dir):
    config = yaml.safe_load((textcnn_run / ".hydra" / "config.yaml").read_text())
    assert config["model"]["net"]["_target_"] == "textcnn.TextCNN"
    assert config["user_dir"] == str(user_dir)
    evaluated = command("lmlab.evaluate", str(textcnn_run))
    assert "test/acc" in evaluated.stdout
    rows = predictions(textcnn_run)
    predicted = command("lmlab.predict", str(textcnn_run), f"input={rows[0]['text']}")
    assert rows[0]["predicted"] in predicted.stdout
    resumed = train(textcnn_run, f"user_dir={user_dir}", "model=textcnn", "resume=auto",
                    *TINY[1:], "trainer.max_epochs=2")
    assert "resum" in (resumed.stdout + resumed.stderr).lower()


@pytest.mark.slow
@needs_data
def test_a_datamodule_of_your_own_reads_its_format(user_dir, tmp_path):
    root = tmp_path / "corpus"
    for number, (label, sentence) in enumerate(sst2_lines(400)):
        split = "test" if number % 5 == 0 else "train"
        path = root / split / ("pos" if label == "1" else "neg") / f"{number:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sentence)
    run_dir = tmp_path / "run"
    train(run_dir, f"user_dir={user_dir}", "data=folders", f"data.root={root}",
          "model=textcnn", *TINY)
    labels = yaml.safe_load((run_dir / "labels.json").read_text())["labels"]
    assert labels == ["neg", "pos"]
    command("lmlab.evaluate", str(run_dir))
    assert len(predictions(run_dir)) == 80  # every test file, once


@pytest.mark.slow
@needs_data
def test_a_task_of_your_own_trains_evaluates_and_predicts(user_dir, tmp_path):
    scores = tmp_path / "scores.tsv"
    scores.write_text("score\ttext\n" + "".join(f"{label}\t{sentence}\n"
                                                for label, sentence in sst2_lines(300)))
    run_dir = tmp_path / "run"
    trained = train(run_dir, f"user_dir={user_dir}", "model=regressor", "data=scored",
                    f"data.files.train={scores}", *TINY)
    assert "test/mse" in trained.stdout
    evaluated = command("lmlab.evaluate", str(run_dir))
    assert "test/mae" in evaluated.stdout
    predicted = command("lmlab.predict", str(run_dir), "input=an instant classic")
    assert re.search(r"score\s+-?\d", predicted.stdout), predicted.stdout


@pytest.mark.slow
def test_a_module_outside_lmlab_and_the_user_directory_is_still_refused(textcnn_run,
                                                                        tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(textcnn_run, copied)
    saved = copied / ".hydra" / "config.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "other.py").write_text(doc_files()["textcnn.py"])
    saved.write_text(saved.read_text().replace("textcnn.TextCNN", "other.TextCNN"))
    env = {"PYTHONPATH": str(elsewhere)}  # importable, yet not the run's user directory
    for module, args in (("lmlab.evaluate", [str(copied)]),
                         ("lmlab.predict", [str(copied), "input=a film"]),
                         ("lmlab.generate", [f"ckpt={copied}", "input=a film"])):
        result = run_cli(*args, module=module, cwd=ROOT, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "other.TextCNN" in result.stderr and "refused" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_run_whose_user_directory_moved_is_pointed_at_its_new_place(textcnn_run, user_dir,
                                                                      tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(textcnn_run, copied)
    saved = copied / ".hydra" / "config.yaml"
    saved.write_text(saved.read_text().replace(str(user_dir), str(tmp_path / "old_place")))
    refused = command("lmlab.evaluate", str(copied), ok=False)
    assert refused.returncode == 2 and "user_dir=FOLDER" in refused.stderr
    assert "Traceback" not in refused.stderr
    command("lmlab.evaluate", str(copied), f"user_dir={user_dir}")
    predicted = command("lmlab.predict", str(copied), "input=a film", f"user_dir={user_dir}")
    assert predicted.stdout.startswith("label"), predicted.stdout


@pytest.mark.slow
def test_resuming_without_the_user_directory_is_one_line_naming_it(textcnn_run):
    result = train(textcnn_run, "model=classifier", "model.net._target_=textcnn.TextCNN",
                   "resume=auto", *TINY, ok=False)
    assert result.returncode == 2
    assert "cannot import 'textcnn.TextCNN'" in result.stderr and "user_dir=" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_user_directory_is_one_line(tmp_path):
    result = train(tmp_path / "run", f"user_dir={tmp_path / 'absent'}", ok=False)
    assert result.returncode == 2
    assert "user_dir=" in result.stderr and "no such folder" in result.stderr
