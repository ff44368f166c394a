"""The baselines of benchmarks/ that docs/results.md quotes."""

import gzip
import json
import sys

import pytest

from conftest import DATA_DIR, needs_data
from benchmarks import lead1_baseline
from benchmarks.aeslc_annotation_split import split
from benchmarks.lead1_baseline import lead
from benchmarks.search_settings import parse_setting
from lmlab.tasks.text_metrics import rouge


def test_lead_1_is_the_first_sentence_or_line():
    assert lead("Hi all.  The meeting moved to 3 pm. Bring slides") == "Hi all."
    assert lead("\n\nPlease review\nthe attached draft") == "Please review"
    assert lead("No end mark at all") == "No end mark at all"


@needs_data
def test_a_run_that_wrote_lead_1_scores_as_lead_1(tmp_path, monkeypatch, capsys):
    # the run's files (hypotheses and references) against the corpus read directly
    with gzip.open(DATA_DIR / "summarization" / "aeslc" / "dev.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    folder = tmp_path / "hypotheses"
    folder.mkdir()
    files = {"val.hyp.txt": [lead(r["email"]) for r in rows],
             "val.ref.txt": [r["subject"] for r in rows],
             **{f"val.ref{k + 1}.txt": [r[f"ann{k}"] for r in rows] for k in range(3)}}
    for name, lines in files.items():
        (folder / name).write_text("".join(f"{line}\n" for line in lines))
    monkeypatch.setenv("LMLAB_DATA_DIR", str(DATA_DIR))
    monkeypatch.setattr(sys, "argv", ["lead1_baseline", "--split", "dev", "--run", str(tmp_path)])
    lead1_baseline.main()
    printed = capsys.readouterr().out.splitlines()
    start = printed.index(f"{tmp_path}: {len(rows)} hypotheses")
    assert printed[1:5] == printed[start + 1:start + 5]  # the same four rows of figures
    bootstrap = printed[start + 5:start + 7]
    assert [line.split()[-4] for line in bootstrap] == ["0.0%", "0.0%"]  # never above itself


@needs_data
def test_a_run_tested_on_part_of_the_split_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "hypotheses"
    folder.mkdir()
    for name in ("val.hyp.txt", "val.ref.txt", "val.ref1.txt", "val.ref2.txt", "val.ref3.txt"):
        (folder / name).write_text("hello\n" * 10)
    monkeypatch.setenv("LMLAB_DATA_DIR", str(DATA_DIR))
    monkeypatch.setattr(sys, "argv", ["lead1_baseline", "--split", "dev", "--run", str(tmp_path)])
    with pytest.raises(SystemExit, match="has 10 lines and the dev split 1960 e-mails"):
        lead1_baseline.main()


def test_the_paired_bootstrap_counts_the_resamples_where_one_side_is_above():
    ours, theirs = [0.5, 0.1, 0.3, 0.2], [0.4, 0.0, 0.2, 0.1]
    assert lead1_baseline.paired_bootstrap(ours, theirs) == 1.0
    assert lead1_baseline.paired_bootstrap(theirs, ours) == 0.0
    assert lead1_baseline.paired_bootstrap(ours, ours) == 0.0  # equal is not above
    mixed = lead1_baseline.paired_bootstrap([1.0, 0.0] * 20, [0.0, 0.9] * 20)
    assert 0.5 < mixed < 1.0  # ahead by 0.05 a pair on average, with spread


def rouge_l(row: str) -> float:
    return float(row.split(" / ")[-1])


@needs_data
def test_the_original_subjects_are_scored_against_the_annotations(monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_DATA_DIR", str(DATA_DIR))
    monkeypatch.setattr(sys, "argv", ["lead1_baseline", "--split", "dev"])
    lead1_baseline.main()
    printed = capsys.readouterr().out.splitlines()
    assert printed[6].split()[0] == printed[7].split()[0] == "P2"
    subject, lead_1 = rouge_l(printed[7]), rouge_l(printed[4])  # stemmed, P2
    assert lead_1 < subject < 100  # against the annotators, not against itself
    with gzip.open(DATA_DIR / "summarization" / "aeslc" / "dev.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    expected = rouge([r["subject"] for r in rows], [[r[f"ann{k}"] for k in range(3)]
                                                    for r in rows])["rougeL"]
    assert subject == round(expected, 1)
    assert printed[8].startswith("against the best of two annotations")
    annotation, lead_1, subject = (float(line.split()[-1]) for line in printed[9:12])
    assert max(lead_1, subject) < annotation < 100  # not scored against itself


def test_a_search_setting_is_read_from_its_words():
    assert parse_setting("beam=4 length_penalty=2.0 min_length=3") == \
        (4, None, {"length_penalty": 2.0, "min_length": 3})
    assert parse_setting("no_repeat_ngram_size=2") == (None, None, {"no_repeat_ngram_size": 2})
    assert parse_setting("beam=16 mbr=1") == (16, True, {})
    assert parse_setting("mbr=0") == (None, False, {})
    assert parse_setting("mbr=true") == (None, True, {})


def test_the_annotation_split_trains_on_each_annotation_and_keeps_the_rest_whole():
    rows = [{"email": f"e{i}", "subject": f"s{i}", "ann0": f"a{i}", "ann1": f"b{i}",
             "ann2": f"c{i}"} for i in range(5)]
    pairs, kept = split(rows, 2)
    assert pairs == [{"email": f"e{i}", "subject": f"{a}{i}"} for i in range(2) for a in "abc"]
    assert kept == rows[2:]  # checkpoint choice on e-mails never trained on
    control, _ = split(rows, 2, original=True)
    assert control == [{"email": f"e{i}", "subject": f"s{i}"} for i in range(2) for _ in "abc"]
