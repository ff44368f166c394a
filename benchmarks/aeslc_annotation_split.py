"""AESLC's dev split as fine-tuning data in the annotators' style: the human subject lines
ann0..ann2 of the dev e-mails, which the training split does not have.

The dev e-mails are split in two, by position: the first `--train` e-mails give one
training pair per annotation (`email`, `subject` = that annotation), the rest stay as they
are (`email`, `subject`, `ann0..ann2`) to choose the checkpoint on. The test split is not
touched. With `--original` the same e-mails give the same number of pairs with their
authors' subject lines: the control, same e-mails and updates without the annotations.
docs/results.md fine-tunes the AESLC experiment's run on them:

    LMLAB_DATA_DIR=../shared/data python -m benchmarks.aeslc_annotation_split OUT [--train 980]
        [--original]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.lead1_baseline import aeslc_rows

ANNOTATIONS = ("ann0", "ann1", "ann2")


def split(rows: list[dict], train: int, original: bool = False
          ) -> tuple[list[dict], list[dict]]:
    """(one pair per annotation of the first `train` rows, the other rows unchanged); with
    `original`, each pair holds the author's subject instead (the control)."""
    pairs = [{"email": row["email"], "subject": row["subject" if original else name]}
             for row in rows[:train] for name in ANNOTATIONS]
    return pairs, rows[train:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--train", type=int, default=980, help="dev e-mails to train on")
    parser.add_argument("--original", action="store_true",
                        help="the control: the author's subject in each of the three pairs")
    args = parser.parse_args()
    rows = aeslc_rows("dev")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in zip(("train", "val"), split(rows, args.train, args.original)):
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        print(f"{args.out / f'{name}.jsonl'}: {len(records)} records")


if __name__ == "__main__":
    main()
