"""BLEU and ROUGE equal what the reference tools give on the same files."""

import gzip
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from conftest import DATA_DIR, needs_data
from lmlab.tasks.text_metrics import bleu, consensus, rouge, sentence_similarity

HYPS = ["A man rides a horse on the beach .", "Two dogs play in the snow", "a red car",
        "The woman is reading a book in the park."]
REFS = [["A man is riding a horse along the beach."], ["Two dogs are playing in snow."],
        ["A red car parked on the street."], ["A woman reads a book in a park."]]


def sacrebleu_cli(tmp_path, hyps, refs, *flags) -> float:
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(r[0] for r in refs) + "\n")
    done = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                           str(tmp_path / "hyp.txt"), "-b", "-w", "4", *flags],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_equals_the_sacrebleu_command_line(tmp_path, lowercase):
    score, signature = bleu(HYPS, REFS, lowercase=lowercase)
    assert score == pytest.approx(sacrebleu_cli(tmp_path, HYPS, REFS, *["-lc"] * lowercase),
                                  abs=1e-4)  # printed with 4 decimals
    assert "tok:13a" in signature and ("case:lc" in signature) == lowercase
    assert 0 < score < 100


@needs_data
def test_bleu_on_real_multi30k_references(tmp_path):
    with gzip.open(DATA_DIR / "translation/multi30k/val.de.gz", "rt") as f:
        refs = [[line.strip()] for line in f][:200]
    hyps = [" ".join(r[0].split()[:-2]) for r in refs]  # each reference minus its last words
    score, _ = bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu_cli(tmp_path, hyps, refs), abs=1e-4)


def test_rouge_equals_rouge_score_with_the_best_reference():
    refs = [[*r, "a completely different sentence"] for r in REFS]
    got = rouge(HYPS, refs, stem=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(ref, hyp)[name].fmeasure for ref in rs)
                for hyp, rs in zip(HYPS, refs)]
        assert got[name] == pytest.approx(100 * sum(best) / len(best))
    assert rouge(HYPS, REFS, stem=False)["rouge1"] != got["rouge1"]  # stemming counts


def test_a_perfect_hypothesis_scores_100():
    refs = [[h] for h in HYPS]
    assert bleu(HYPS, refs)[0] == pytest.approx(100)
    assert list(rouge(HYPS, refs).values()) == pytest.approx([100, 100, 100])


@pytest.mark.parametrize("metric", ["rouge", "bleu"])
def test_consensus_is_the_candidate_most_like_the_others(metric):
    candidates = ["payroll report due friday", "lunch", "the payroll report is due friday",
                  "payroll report due on friday", "hello"]
    assert consensus(candidates, metric) == 0
    assert consensus(candidates[1:] + candidates[:1], metric) == 4  # not merely the first
    assert consensus(list(reversed(candidates)), metric) == 4


def test_consensus_ties_keep_the_better_scored_and_two_keep_the_first():
    assert consensus(["a", "b", "c"], "rouge") == 0  # nothing shared: all tie
    assert consensus(["lunch", "payroll report due"], "rouge") == 0
    # sentence BLEU is not symmetric: the second would win a comparison of the two
    pair = ["the report is due on friday morning", "the report is due"]
    bleu_of = sentence_similarity("bleu")
    assert bleu_of(pair[1], pair[0]) > bleu_of(pair[0], pair[1])
    assert consensus(pair, "bleu") == 0


def test_consensus_refuses_an_unknown_metric():
    with pytest.raises(ValueError, match="rouge or bleu"):
        consensus(["a", "b", "c"], "meteor")
