"""ROUGE of a trained summarization run's checkpoint on the dev split under several search
settings (the table "Decoding does not close the gap" of docs/results.md): P1 against the
original reference, P2 the best of the extra references (AESLC's annotations), stemmed.

    LMLAB_DATA_DIR=../shared/data python -m benchmarks.search_settings --run RUN \\
        "beam=1" "beam=4" "beam=4 length_penalty=2.0" "beam=4 min_length=4"

Each setting is `key=value` words over the run's own test search (`beam`, `length_penalty`,
`min_length`, `no_repeat_ngram_size`, ..., and `mbr=1` for the beam's consensus).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate

from lmlab.training.build import load_task
from lmlab.training.runs import find_checkpoint, load_run_config
from lmlab.tasks.text_metrics import one_line, rouge


def decode_dev(task, data, beam: int) -> list[str]:
    """The dev split's hypotheses under the task's search, in the order of its references."""
    found = {}
    for batch in data.val_dataloader():
        with torch.no_grad():
            tokens = task.decode(batch["source"], beam)
        for index, ids in zip(batch["index"].tolist(), tokens):
            found[index] = one_line(task.tokenizer.decode(ids))
    return [found[i] for i in sorted(found)]


def parse_setting(text: str) -> tuple[int | None, bool | None, dict]:
    """`beam=4 mbr=1 length_penalty=2.0` -> (4, True, {"length_penalty": 2.0}); None: the
    run's own."""
    pairs = dict(word.split("=", 1) for word in text.split())
    beam = int(pairs.pop("beam")) if "beam" in pairs else None
    mbr = pairs.pop("mbr").lower() in ("1", "true") if "mbr" in pairs else None
    return beam, mbr, {key: float(value) if "." in value else int(value)
                       for key, value in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a summarization run folder")
    parser.add_argument("settings", nargs="+", help='e.g. "beam=4 length_penalty=2.0"')
    args = parser.parse_args()
    cfg = load_run_config(args.run)
    data = instantiate(cfg.data, load_from=str(args.run))
    data.setup("validate")
    task = load_task(cfg, data, find_checkpoint(args.run, None, lambda *_: "")).eval()
    references, run_search, run_mbr = data.references("val"), dict(task.search), task.mbr
    print("setting | mean words | P1 ROUGE-1/2/L | P2 ROUGE-1/2/L")
    for text in args.settings:
        beam, mbr, search = parse_setting(text)
        task.search, task.mbr = {**run_search, **search}, run_mbr if mbr is None else mbr
        texts = decode_dev(task, data, beam or task.beams["test"])
        p1 = rouge(texts, [refs[:1] for refs in references])
        p2 = rouge(texts, [refs[1:] or refs[:1] for refs in references])
        words = sum(len(t.split()) for t in texts) / len(texts)
        print(f"{text} | {words:.1f} | {figures(p1)} | {figures(p2)}")


def figures(scores: dict[str, float]) -> str:
    return " / ".join(f"{scores[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))


if __name__ == "__main__":
    main()
