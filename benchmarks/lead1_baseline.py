"""The lead-1 baseline of AESLC: each e-mail's first sentence as its subject line, scored
with lmlab's ROUGE under the two protocols of docs/results.md.

P1: against the original subject only (as published systems report it); P2: the best
over the three human annotations ann0..ann2. Sentences end at a line break or at `.!?`
followed by a space, as the corpus's e-mails are written one sentence a line. The original
subject lines are scored under P2 too: what a system that wrote each e-mail's real subject
(perfect under P1) would get against the annotators; and each annotation against the other
two, which shows how much closer the annotators are to each other than to the authors.
With `--run`, a trained run's test hypotheses (RUN/hypotheses/test.hyp.txt) are scored the
same way, from the reference files written beside them, and set against lead-1 e-mail by
e-mail: a paired bootstrap gives the share of 1,000 resamples of the e-mails in which the
run's stemmed ROUGE-L is above lead-1's.

    LMLAB_DATA_DIR=../shared/data python -m benchmarks.lead1_baseline [--split test] [--run RUN]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from pathlib import Path

import torch
from rouge_score import rouge_scorer

from lmlab.tasks.text_metrics import Words, rouge

SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s")


def lead(email: str) -> str:
    """The first sentence of an e-mail, white space folded."""
    first = next((s for s in SENTENCE_END.split(email.strip()) if s.strip()), "")
    return " ".join(first.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test", help="dev or test")
    parser.add_argument("--run", type=Path, help="a trained aeslc run folder to score too")
    args = parser.parse_args()
    rows = aeslc_rows(args.split)
    leads = [lead(row["email"]) for row in rows]
    protocols = {"P1 (original subject)": [[row["subject"]] for row in rows],
                 "P2 (best of ann0..ann2)": [[row[f"ann{i}"] for i in range(3)] for row in rows]}
    print(f"AESLC {args.split}: {len(rows)} e-mails, lead-1 baseline, ROUGE-1/2/L F (0-100)")
    table(leads, protocols)
    print("the original subject lines as the output (P1 would be 100)")
    p2 = "P2 (best of ann0..ann2)"
    table([row["subject"] for row in rows], {p2: protocols[p2]})
    print("against the best of two annotations, each left out in turn (stemmed ROUGE-L):")
    agreement(rows, leads)
    if args.run is not None:
        folder = args.run / "hypotheses"
        split = "test" if args.split == "test" else "val"
        hypotheses = lines(folder / f"{split}.hyp.txt")
        if len(hypotheses) != len(rows):
            raise SystemExit(f"{folder / f'{split}.hyp.txt'} has {len(hypotheses)} lines and "
                             f"the {args.split} split {len(rows)} e-mails: score a run tested "
                             "on the whole split")
        annotations = zip(*(lines(folder / f"{split}.ref{k}.txt") for k in (1, 2, 3)))
        print(f"{args.run}: {len(hypotheses)} hypotheses")
        references = {"P1 (original subject)": [[r] for r in lines(folder / f"{split}.ref.txt")],
                      "P2 (best of ann0..ann2)": [list(refs) for refs in annotations]}
        table(hypotheses, references)
        for name, refs in references.items():
            above = paired_bootstrap(rouge_l_each(hypotheses, refs), rouge_l_each(leads, refs))
            print(f"  {name:26s} the run above lead-1 in {above:.1%} of 1,000 resamples")


def aeslc_rows(split: str) -> list[dict]:
    """The records of an AESLC split (train, dev or test) from the data directory."""
    path = Path(os.environ.get("LMLAB_DATA_DIR", "data")) / "summarization" / "aeslc" / \
        f"{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def agreement(rows: list[dict], leads: list[str]) -> None:
    """How well the annotators agree: each annotation scored against the best of the other
    two, beside lead-1 and the original subject against the same two (means over the three
    left out)."""
    outputs = {"the left-out annotation": None, "lead-1": leads,
               "the original subject": [row["subject"] for row in rows]}
    for name, texts in outputs.items():
        scores = []
        for left_out in range(3):
            others = [[row[f"ann{i}"] for i in range(3) if i != left_out] for row in rows]
            own = texts or [row[f"ann{left_out}"] for row in rows]
            scores.append(rouge(own, others, stem=True)["rougeL"])
        print(f"  {name:26s} {sum(scores) / 3:.1f}")


def rouge_l_each(texts: list[str], references: list[list[str]]) -> list[float]:
    """Each text's stemmed ROUGE-L F against the best of its references."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words(stem=True))  # as the runs'
    return [scorer.score_multi(refs, text)["rougeL"].fmeasure
            for text, refs in zip(texts, references)]


def paired_bootstrap(ours: list[float], theirs: list[float], samples: int = 1000,
                     seed: int = 0) -> float:
    """The share of `samples` resamples of the examples (drawn with replacement) in which
    the mean of `ours` is above the mean of `theirs`."""
    differences = torch.tensor(ours, dtype=torch.float64) - torch.tensor(theirs,
                                                                        dtype=torch.float64)
    draws = torch.randint(len(differences), (samples, len(differences)),
                          generator=torch.Generator().manual_seed(seed))
    return (differences[draws].sum(dim=1) > 0).double().mean().item()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def table(texts: list[str], protocols: dict[str, list[list[str]]]) -> None:
    for name, references in protocols.items():
        for stem in (False, True):
            scores = rouge(texts, references, stem=stem)
            figures = " / ".join(f"{scores[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))
            print(f"  {name:26s} {'stemmed' if stem else 'unstemmed':9s} {figures}")


if __name__ == "__main__":
    main()
