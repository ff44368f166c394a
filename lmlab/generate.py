"""Generates text from a run of `lmlab.run`: a language model continues a prompt, streaming
to the terminal; a sequence-to-sequence model translates or summarizes its input.

    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00 prompt="ROMEO:" max_new_tokens=300
    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt temperature=0
    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00 input="A man rides a horse."
    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00 input_file=in.txt \\
        output_file=out.txt beam=5

`ckpt` is a run folder (its best checkpoint, else its last, else its `weights.ckpt`) or a
checkpoint file inside one; the run's saved config and tokenizer rebuild the model. Every
`key=value` is the text after the first `=`, exactly: `prompt="ROMEO: hello"` continues
`ROMEO: hello`, `prompt=123` continues `123`. `temperature=0` decodes greedily. A
classifier's run labels text with `lmlab.predict` instead.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from lmlab.config.cli import fail, parse_args
from lmlab.data.batching import pad_batch
from lmlab.data.description import DataDescription
from lmlab.data.seq2seq import encode_sources
from lmlab.data.tokenizers import Tokenizer
from lmlab.config.user_dir import moved_to
from lmlab.errors import LmlabError
from lmlab.models.sampling import generate
from lmlab.tasks.text_metrics import one_line
from lmlab.training.runs import load_run, load_run_config, run_folder

COMMAND = "python -m lmlab.generate"
GENERATES = ("lm", "seq2seq")  # the kinds of task that produce text
USAGE = ("python -m lmlab.generate ckpt=RUN_DIR|FILE [prompt=TEXT] [max_new_tokens=N] "
         "[temperature=T] [top_k=K|null] [top_p=P|null] [seed=S] [use_cache=BOOL] [device=D]; "
         "for a sequence-to-sequence run: input=TEXT | input_file=IN output_file=OUT "
         "[beam=N] [length_penalty=A] [max_length=N] [min_length=N] [no_repeat_ngram_size=N] "
         "[mbr=BOOL] [batch_size=N]")


@dataclass
class GenerateConfig:
    """Arguments of `python -m lmlab.generate`, given as key=value."""

    ckpt: str  # a run folder or a checkpoint file in one
    prompt: str = "\n"  # text to continue
    max_new_tokens: int = 200  # how many tokens to produce
    temperature: float = 0.8  # 0 for greedy decoding
    top_k: int | None = 200  # sample among the k most likely tokens (null: all)
    top_p: float | None = None  # nucleus sampling mass (null: off)
    seed: int = 0  # seeds the sampling
    stop_at_eos: bool = True  # a language model stops at the tokenizer's end token
    use_cache: bool = True  # reuse keys/values between steps
    device: str = "cpu"  # cpu or cuda
    input: str | None = None  # sequence to sequence: the text to translate or summarize
    input_file: str | None = None  # ... or a file of them, one a line
    output_file: str | None = None  # where input_file's outputs go, one a line (else stdout)
    beam: int | None = None  # beam size (1: greedy); null: the run's test setting
    length_penalty: float | None = None  # alpha of log-probability / length ** alpha
    max_length: int | None = None  # most tokens of an output; null: a * source length + b
    min_length: int | None = None  # fewest tokens before <eos> may end an output; null: the run's
    no_repeat_ngram_size: int | None = None  # never repeat an n-gram (0: off); null: the run's
    mbr: bool | None = None  # output the consensus of the beam's hypotheses; null: the run's
    batch_size: int = 32  # input_file lines decoded together
    user_dir: str | None = None  # where the run's user directory is now, if it moved


def stream(net: torch.nn.Module, tokenizer: Tokenizer, args: GenerateConfig) -> str:
    """Prints the prompt and then each new piece of text as it is produced; returns it all."""
    ids = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
    prompt = torch.tensor([ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new: list[int] = []
    text = ""
    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    stop = tokenizer.eos_id if args.stop_at_eos else None
    for token in generate(net, prompt, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.use_cache, generator, stop_id=stop):
        token_id = int(token[0, 0])
        if token_id == stop:
            break  # the end token ends the text; it is not printed
        new.append(token_id)
        # Decode the whole sequence and hold back a trailing partial UTF-8 character, which
        # byte-level tokens can split.
        decoded = tokenizer.decode(new).rstrip("\ufffd")
        sys.stdout.write(decoded[len(text):])
        sys.stdout.flush()
        text = decoded
    seconds = time.perf_counter() - start
    rest = tokenizer.decode(new)[len(text):]
    sys.stdout.write(rest)
    text += rest
    rate = len(new) / seconds
    sys.stderr.write(f"\n[{len(new)} tokens in {seconds:.2f} s, {rate:.1f} tokens/s]\n")
    return args.prompt + text


SEARCH_KEYS = ("beam", "length_penalty", "min_length", "no_repeat_ngram_size", "mbr")


def search_changes(args: GenerateConfig) -> dict:
    """The run's model keys the command line changes: the test search's settings, and
    `max_length` as a fixed limit (`max_len_a=0`, `max_len_b`)."""
    changes = {key: getattr(args, key) for key in SEARCH_KEYS if getattr(args, key) is not None}
    if args.max_length is not None:
        changes.update(max_len_a=0.0, max_len_b=args.max_length)
    return changes


def check_limits(task, args: GenerateConfig) -> None:
    """Refuses a `max_length` below the search's `min_length` (the run's, or the one given):
    no output could keep both."""
    shortest = task.search["min_length"]
    if args.max_length is not None and shortest > args.max_length:
        given = "" if args.min_length is not None else " (the run's)"
        raise LmlabError(f"max_length={args.max_length} is below min_length={shortest}{given}: "
                         f"no output can keep both; raise max_length, or pass "
                         f"min_length={args.max_length} or less")


def transduce(task, data: DataDescription, cfg: DictConfig, args: GenerateConfig) -> list[str]:
    """Translates or summarizes `input`, or each line of `input_file`, with the run's task
    and its test search (as the command line changes it); prints or writes one output a
    line."""
    if (args.input is None) == (args.input_file is None):
        raise LmlabError(f"a sequence-to-sequence run takes input=TEXT or input_file=PATH "
                         f"(one of them)\nusage: {USAGE}")
    check_limits(task, args)
    lines = [args.input] if args.input is not None else read_lines(Path(args.input_file))
    longest = cfg.data.get("max_source_length") or None  # cut as in training
    outputs = []
    progress = Console(stderr=True)  # stdout may be the outputs
    for start in track(range(0, len(lines), args.batch_size), description="decoding",
                       disable=args.input_file is None, console=progress):
        batch = encode_sources(data.source_tokenizer, lines[start:start + args.batch_size],
                               longest)
        source, _ = pad_batch([torch.tensor(ids) for ids in batch], data.pad_id)
        found = task.decode(source.to(args.device), task.beams["test"])
        outputs += [one_line(data.target_tokenizer.decode(tokens)) for tokens in found]
    write_lines(outputs, args.output_file)
    return outputs


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise LmlabError(f"input_file={path}: no such file")
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n").split("\n")  # line feeds only: one line in, one out


def write_lines(lines: list[str], path: str | None) -> None:
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")


def run_kind(ckpt: str, overrides: list[str] = ()) -> str:
    """The kind of task (`classification`, `lm`, `seq2seq`) of a run folder, or of the run
    of a checkpoint file, read from its saved config (with `overrides`)."""
    cfg = load_run_config(run_folder(Path(ckpt)), overrides)
    return get_class(cfg.model._target_).kind


def generate_from(args: GenerateConfig, command: str = COMMAND) -> None:
    """Continues `args.prompt` with a language model's run, or translates or summarizes
    `args.input` or `args.input_file` with a sequence-to-sequence one.

    Raises:
        LmlabError: the run of a task that generates no text, such as a classifier's
            (refused before its weights are read; it names `lmlab.predict`), a missing
            checkpoint, or arguments the run cannot use.
    """
    overrides = moved_to(args.user_dir)
    kind = run_kind(args.ckpt, overrides)
    if kind not in GENERATES:
        raise LmlabError(f"{args.ckpt} is a {kind} run, which generates no text: run "
                         f"`python -m lmlab.predict {args.ckpt} input=TEXT` (or input_file=IN) "
                         f"for its predictions")
    task, data, cfg = load_run(args.ckpt, command, search_changes(args), args.device,
                               overrides)
    if task.kind == "seq2seq":
        transduce(task, data, cfg, args)
    else:
        stream(task.net, data.tokenizer, args)


def main(argv: list[str]) -> None:
    try:
        generate_from(parse_args(GenerateConfig, argv, USAGE))
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
