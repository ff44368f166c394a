"""Corpus metrics of generated text, computed by the reference packages themselves.

BLEU is sacreBLEU's corpus BLEU on detokenized text (0-100, its own smoothing and
signature), so a figure equals what the `sacrebleu` command line prints for the same files.
ROUGE is the `rouge-score` package's F-measure per example (the best over an example's
references), averaged over the corpus, with the words of every script (`Words`): its own
tokenizer keeps only `[a-z0-9]`, so that identical Russian texts score 0 and "Größe" matches
"Grüße". torchmetrics' versions differ (a 0-1 BLEU with other smoothing; a ROUGE that needs
nltk), so they are not used.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from functools import cache
from importlib.metadata import version
from itertools import combinations

import regex
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers
from sacrebleu.metrics import BLEU

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Scripts written without spaces between words, where each character (with its marks) is a
# word; elsewhere a word is a run of letters, combining marks and digits, of any script.
UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}"
WORD = regex.compile(rf"[{UNSPACED}]\p{{M}}*|[[\p{{L}}\p{{M}}\p{{N}}]--[{UNSPACED}]]+",
                     regex.V1)


class Words(tokenizers.Tokenizer):
    """ROUGE's words in any script: the text in Unicode's composed form (NFC), lowercased,
    cut into runs of letters, marks and digits (Han, kana, Thai and the other scripts
    without spaces: one character a word), and with `stem` Porter-stemmed where longer than
    3 characters, as rouge-score's own tokenizer does for `[a-z0-9]` alone. Porter's rules
    are English ones: stem English text only."""

    def __init__(self, stem: bool):
        self.stemmer = porter.PorterStemmer() if stem else None

    def tokenize(self, text: str) -> list[str]:
        words = WORD.findall(unicodedata.normalize("NFC", text).lower())
        if self.stemmer is None:
            return words
        return [self.stemmer.stem(w) if len(w) > 3 else w for w in words]


def rouge_signature(stem: bool, references: str = "first") -> str:
    """What a ROUGE figure was computed with, as sacreBLEU's signature says for BLEU."""
    return (f"rouge-score:{version('rouge-score')}|words:letters+marks+digits of any script, NFC"
            f"|lowercase|stem:{'porter' if stem else 'no'}|refs:{references}|f-measure")


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
         lowercase: bool = False, tokenize: str = "13a") -> tuple[float, str]:
    """Corpus BLEU of `hypotheses` against the first reference of each example, and
    sacreBLEU's signature (which says how it was computed).

    Args:
        hypotheses: one detokenized string per example.
        references: the references of each example; the first is used.
        lowercase: compare lowercased text (for comparison with older, tokenized figures).
        tokenize: sacreBLEU's tokenizer (`13a` is its default, `intl`, `none`, ...).
    """
    metric = BLEU(lowercase=lowercase, tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [[refs[0] for refs in references]])
    return score.score, str(metric.get_signature())


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
          stem: bool = True) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-100), each example scored against the best
    of its references, averaged over the examples; words as `Words` cuts them.

    Args:
        hypotheses: one string per example.
        references: one or more reference strings per example.
        stem: Porter-stem the words first (as published English summarization figures do;
            for English text only).
    """
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=Words(stem))
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, refs in zip(hypotheses, references):
        scores = scorer.score_multi(list(refs), hypothesis)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    count = max(len(hypotheses), 1)
    return {name: 100 * total / count for name, total in totals.items()}


def consensus(candidates: Sequence[str], metric: str, stem: bool = True) -> int:
    """The index of the candidate most like the others: the highest mean similarity to the
    rest of `candidates` (minimum Bayes risk decoding, each candidate weighted alike). The
    similarity is the metric's own at sentence level: ROUGE-L F for `rouge` (stemmed with
    `stem`), sacreBLEU's sentence BLEU for `bleu`. Ties go to the earlier candidate.
    """
    if len(candidates) < 3:  # two leave nothing to agree on: keep the better-scored one
        return 0
    similarity, totals = sentence_similarity(metric, stem), [0.0] * len(candidates)
    for i, j in combinations(range(len(candidates)), 2):
        forward = similarity(candidates[i], candidates[j])
        totals[i] += forward  # ROUGE-L's F is symmetric: one score serves both
        totals[j] += forward if metric == "rouge" else similarity(candidates[j], candidates[i])
    return totals.index(max(totals))


@cache
def sentence_similarity(metric: str, stem: bool = True) -> Callable[[str, str], float]:
    """(hypothesis, reference) -> similarity of one pair under `metric` (one scorer a
    metric, made once)."""
    if metric == "rouge":
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words(stem))
        return lambda hypothesis, reference: scorer.score(reference, hypothesis)["rougeL"].fmeasure
    if metric == "bleu":
        sentence = BLEU(effective_order=True)
        return lambda hypothesis, reference: sentence.sentence_score(hypothesis,
                                                                     [reference]).score
    raise ValueError(f"metric must be rouge or bleu, not {metric!r}")


def one_line(text: str) -> str:
    """`text` with every line break (whatever `str.splitlines` breaks at) made a space, so
    that files of texts stay line-aligned."""
    return " ".join(text.splitlines())
