"""Predicts with a run of `lmlab.run`: a classifier's label for a text, with the probability
of every class (any task with a `predict` method: what it gives for each text); a language
model's run continues the text and a sequence-to-sequence run translates or summarizes it, as
`lmlab.generate` does.

    python -m lmlab.predict outputs/2026-01-01/12-00-00 input="Create a new event loop."
    python -m lmlab.predict outputs/2026-01-01/12-00-00 input_file=in.txt output_file=out.tsv
    python -m lmlab.predict outputs/2026-01-01/12-00-00/checkpoints/last.ckpt input="ROMEO:" \\
        max_new_tokens=50 temperature=0    # a language model: generate's options

The run is a run folder (its best checkpoint, else its last, else its `weights.ckpt`) or a
checkpoint file inside one. A text is encoded as the run's training texts were: stripped,
through the run's tokenizer, cut to its DataModule's `max_length` tokens. `input_file` holds
one text a line. One `input` prints each value the task gives, a line each (a classifier's
`label`, its `probability`, then `p(LABEL)` for every class); `input_file` gives a
tab-separated table with a header, printed or written to `output_file`: the text, then those
values. A backslash, tab or line break in a text is written `\\\\`, `\\t`, `\\n` (`\\r`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.fabric.utilities import move_data_to_device

from lmlab.config.cli import fail, parse_args, parse_known_args, unknown_key
from lmlab.data.batching import pad_batch
from lmlab.data.records import lengths_key
from lmlab.data.tokenizers import Tokenizer
from lmlab.config.user_dir import moved_to
from lmlab.errors import LmlabError
from lmlab.generate import GENERATES, GenerateConfig, generate_from, read_lines, run_kind
from lmlab.training.runs import load_run, load_run_config, run_folder

COMMAND = "python -m lmlab.predict"
USAGE = ("python -m lmlab.predict RUN_DIR|FILE input=TEXT | input_file=IN [output_file=OUT] "
         "[batch_size=N] [device=D]; for a language model's or a sequence-to-sequence run, "
         "also the options of python -m lmlab.generate (max_new_tokens=N temperature=T beam=N "
         "...)")


@dataclass
class PredictArgs:
    """Arguments of `python -m lmlab.predict`, after the run."""

    ckpt: str  # a run folder or a checkpoint file in one
    input: str | None = None  # a text to label (continue, translate, summarize)
    input_file: str | None = None  # ... or a file of them, one a line
    output_file: str | None = None  # where the outputs go (else stdout)
    batch_size: int = 32  # texts predicted (or decoded) together
    device: str = "cpu"  # cpu or cuda
    user_dir: str | None = None  # where the run's user directory is now, if it moved


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[torch.Tensor]:
    """The token ids of each text, as a text-records DataModule encodes its records'
    (`lmlab.data.records.TextRecordsDataModule._encode` of `text_of`): stripped, tokenized,
    cut to `max_length`; a text that encodes to nothing is one unknown token."""
    unk = [tokenizer.unk_id]
    encoded = tokenizer.encode_batch([text.strip() for text in texts])
    return [torch.tensor(ids[:max_length] or unk) for ids in encoded]


def predict_texts(task, tokenizer: Tokenizer, texts: list[str], key: str, max_length: int,
                  batch_size: int, device: str) -> list[dict]:
    """What `task.predict` gives for each text, encoded under the batch key `key` (with its
    lengths) as its run's data encodes a text."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = encode_texts(tokenizer, texts[start:start + batch_size], max_length)
            tokens, lengths = pad_batch(ids, tokenizer.pad_id)  # (B, T), (B,)
            batch = {key: tokens, lengths_key(key): lengths}
            rows += task.predict(move_data_to_device(batch, device))
    return rows


def shown(value) -> str:
    """A value of a prediction as a table shows it: numbers to 6 significant digits."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def tsv_field(text: str) -> str:
    """`text` as one field of a tab-separated line: backslash, tab and line breaks escaped."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def tsv(header: list[str], rows: list[list]) -> str:
    """A tab-separated table with a header line; each field `shown` and escaped."""
    return "".join("\t".join(tsv_field(shown(f)) for f in row) + "\n"
                   for row in [header, *rows])


def label_texts(args: PredictArgs) -> list[dict]:
    """Predicts, with the run's task, for `args.input` or each line of `args.input_file`;
    prints or writes the predictions and returns them, one dict a text."""
    texts = [args.input] if args.input is not None else read_lines(Path(args.input_file))
    overrides = moved_to(args.user_dir)
    saved = load_run_config(run_folder(Path(args.ckpt)), overrides)
    # The trained vectors are in the checkpoint: the file they came from is not read again.
    changes = {"pretrained_vectors": None} if saved.model.get("pretrained_vectors") else {}
    task, data, cfg = load_run(args.ckpt, COMMAND, changes, args.device, overrides)
    if not callable(getattr(task, "predict", None)):
        raise LmlabError(f"the run's task, {type(task).__name__}, has no `predict` method: "
                         "it predicts nothing for a text (docs/extending.md)")
    module = instantiate(cfg.data, load_from=cfg.paths.output_dir)  # how its texts were cut
    keys = list(module.texts)
    if len(keys) != 1:
        raise LmlabError(f"the run's examples have {len(keys)} texts ({', '.join(keys)}); "
                         "lmlab.predict gives one")
    rows = predict_texts(task, data.tokenizer, texts, keys[0], module.max_length,
                         args.batch_size, args.device)
    if args.input is not None and args.output_file is None:
        width = max(len(name) for name in rows[0])
        print("".join(f"{name:<{width}}  {shown(value)}\n" for name, value in rows[0].items()),
              end="")
        return rows
    table = tsv(["text", *rows[0]], [[text, *row.values()] for text, row in zip(texts, rows)])
    if args.output_file is None:
        sys.stdout.write(table)
    else:
        Path(args.output_file).write_text(table, encoding="utf-8")
        sys.stderr.write(f"predictions: {args.output_file}\n")
    return rows


def generation_args(args: PredictArgs, kind: str, rest: list[str]) -> GenerateConfig:
    """`lmlab.generate`'s arguments for a language model's run (it continues `input`) or a
    sequence-to-sequence one (it translates or summarizes `input` or `input_file`); `rest`
    are generate's own options."""
    given = parse_args(GenerateConfig, [f"ckpt={args.ckpt}", *rest], USAGE)
    given = replace(given, device=args.device, user_dir=args.user_dir)
    if kind == "seq2seq":
        return replace(given, input=args.input, input_file=args.input_file,
                       output_file=args.output_file, batch_size=args.batch_size)
    if args.input is None or args.output_file is not None:
        raise LmlabError(f"a language model continues one text, printed as it comes: give "
                         f"input=TEXT, without input_file or output_file\nusage: {USAGE}")
    return replace(given, prompt=args.input)


def refuse_options(rest: list[str]) -> None:
    """Refuses, for a run that does not generate (a classifier's), any key that is not one of
    `PredictArgs`: generate's options included, which it has no use for."""
    if not rest:
        return
    key = rest[0].partition("=")[0]
    if key in {f.name for f in fields(GenerateConfig)}:
        raise LmlabError(f"{key} is an option of generation, and the run's task (a "
                         f"classifier's, ...) generates no text\nusage: {USAGE}")
    raise unknown_key(key, PredictArgs, USAGE)


def main(argv: list[str]) -> None:
    try:
        args, rest = parse_known_args(PredictArgs, argv, USAGE, positional=("ckpt",))
        if (args.input is None) == (args.input_file is None):
            raise LmlabError(f"give input=TEXT or input_file=IN (one of them)\nusage: {USAGE}")
        kind = run_kind(args.ckpt, moved_to(args.user_dir))
        if kind in GENERATES:
            generate_from(generation_args(args, kind, rest), COMMAND)
        else:
            refuse_options(rest)
            label_texts(args)
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
