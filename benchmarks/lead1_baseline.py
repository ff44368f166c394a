"""The lead-1 baseline of AESLC: each e-mail's first sentence as its subject line, scored
with lmlab's ROUGE under the two protocols of docs/results.md.

P1: against the original subject only (as published systems report it); P2: the best
over the three human annotations ann0..ann2. Sentences end at a line break or at `.!?`
followed by a space, as the corpus's e-mails are written one sentence a line.

    LMLAB_DATA_DIR=../shared/data python -m benchmarks.lead1_baseline [--split test]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from pathlib import Path

from lmlab.tasks.text_metrics import rouge

SENTENCE_END = re.compile(r"\n|(?<=[.!?])\s")


def lead(email: str) -> str:
    """The first sentence of an e-mail, white space folded."""
    first = next((s for s in SENTENCE_END.split(email.strip()) if s.strip()), "")
    return " ".join(first.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test", help="dev or test")
    args = parser.parse_args()
    path = Path(os.environ.get("LMLAB_DATA_DIR", "data")) / "summarization" / "aeslc" / \
        f"{args.split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    leads = [lead(row["email"]) for row in rows]
    protocols = {"P1 (original subject)": [[row["subject"]] for row in rows],
                 "P2 (best of ann0..ann2)": [[row[f"ann{i}"] for i in range(3)] for row in rows]}
    print(f"AESLC {args.split}: {len(rows)} e-mails, lead-1 baseline, ROUGE-1/2/L F (0-100)")
    for name, references in protocols.items():
        for stem in (False, True):
            scores = rouge(leads, references, stem=stem)
            figures = " / ".join(f"{scores[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))
            print(f"  {name:26s} {'stemmed' if stem else 'unstemmed':9s} {figures}")


if __name__ == "__main__":
    main()
