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
`ROMEO: hello`, `prompt=123` continues `123`. `temperature=0` decodes greedily.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import track

from lmlab.checkpoints import check_fits, read_state_dict, with_tied_names
from lmlab.cli import fail, parse_args
from lmlab.data.description import DataDescription
from lmlab.data.seq2seq import language_of, metric_of, task_type_of
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError
from lmlab.evaluate import find_checkpoint, load_run_config
from lmlab.kernels import kernels_of
from lmlab.data.batching import pad_batch
from lmlab.models.decoding import best_tokens
from lmlab.models.sampling import generate
from lmlab.tasks.seq2seq import consensus_of, english
from lmlab.tasks.text_metrics import one_line

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


def load_model(ckpt: str, device: str = "cpu"
               ) -> tuple[torch.nn.Module, DataDescription, DictConfig]:
    """The net of a run, its data's description (its tokenizers) and its config, from the
    run folder or one of its checkpoint files; sets the run's kernel choices in this
    process (lmlab/kernels.py)."""
    path = Path(ckpt)
    run_dir = next((p for p in (path, *path.parents) if (p / ".hydra").is_dir()), path)
    cfg = load_run_config(run_dir)
    command = lambda _, found: f"python -m lmlab.generate ckpt={found or run_dir}"  # noqa: E731
    checkpoint = find_checkpoint(run_dir, None if path == run_dir else str(path), command)
    data = saved_description(run_dir)
    sizes = get_class(cfg.model._target_).config_from_data(data)
    net = instantiate(cfg.model.net, **sizes.get("net", {}))
    state = with_tied_names({k.removeprefix("net."): v for k, v in
                             read_state_dict(checkpoint).items() if k.startswith("net.")}, net)
    check_fits(net, state, checkpoint, cfg)
    net.load_state_dict(state)
    kernels_of(cfg).apply()
    return net.to(device).eval(), data, cfg


def saved_description(run_dir: Path) -> DataDescription:
    """The tokenizers a run saved: one `tokenizer.json`, or one a side."""
    sides = [run_dir / f"{side}_tokenizer.json" for side in ("source", "target")]
    if all(p.is_file() for p in sides):
        source, target = (Tokenizer.load(p) for p in sides)
        return DataDescription(target, source_tokenizer=source, target_tokenizer=target)
    return DataDescription(Tokenizer.load(run_dir / "tokenizer.json"))


def stream(net: torch.nn.Module, tokenizer: Tokenizer, args: GenerateConfig) -> str:
    """Prints the prompt and then each new piece of text as it is produced; returns it all."""
    ids = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
    prompt = torch.tensor([ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new: list[int] = []
    text = ""
    sys.stdout.write(args.prompt)
    start = time.perf_counter()
    for token in generate(net, prompt, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.use_cache, generator):
        new.append(int(token[0, 0]))
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


def transduce(net: torch.nn.Module, data: DataDescription, cfg: DictConfig,
              args: GenerateConfig) -> list[str]:
    """Translates or summarizes `input`, or each line of `input_file`, with the run's search
    settings unless the arguments change them; prints or writes one output a line."""
    if (args.input is None) == (args.input_file is None):
        raise LmlabError(f"a sequence-to-sequence run takes input=TEXT or input_file=PATH "
                         f"(one of them)\nusage: {USAGE}")
    lines = [args.input] if args.input is not None else read_lines(Path(args.input_file))
    search = search_settings(cfg.model, args)
    choose = consensus_choice(cfg, data, args)
    longest = cfg.data.get("max_source_length") or None  # cut as in training
    outputs = []
    progress = Console(stderr=True)  # stdout may be the outputs
    for start in track(range(0, len(lines), args.batch_size), description="decoding",
                       disable=args.input_file is None, console=progress):
        batch = [data.source_tokenizer.encode(" ".join(line.split()))[:longest]
                 or [data.source_tokenizer.unk_id]  # as the DataModule encodes it
                 for line in lines[start:start + args.batch_size]]
        source, _ = pad_batch([torch.tensor(ids) for ids in batch], data.pad_id)
        with torch.no_grad():
            found = best_tokens(net, source.to(args.device), choose=choose, **search)
        outputs += [one_line(data.target_tokenizer.decode(tokens)) for tokens in found]
    write_lines(outputs, args.output_file)
    return outputs


def search_settings(model: DictConfig, args: GenerateConfig) -> dict:
    """The run's test search, with what the command line changes."""
    def chosen(name: str, default):
        given = getattr(args, name)
        return model.get(name, default) if given is None else given

    search = {"beam": args.beam or model.get("beam", 5),
              "length_penalty": chosen("length_penalty", 1.0),
              "no_repeat_ngram_size": chosen("no_repeat_ngram_size", 0),
              "max_len_a": model.get("max_len_a", 1.2), "max_len_b": model.get("max_len_b", 10),
              "min_length": chosen("min_length", 1),
              "n_finished": model.get("n_finished"), "use_cache": args.use_cache}
    if args.max_length is not None:
        if search["min_length"] > args.max_length:
            given = "" if args.min_length is not None else " (the run's)"
            raise LmlabError(f"max_length={args.max_length} is below min_length="
                             f"{search['min_length']}{given}: no output can keep both; raise "
                             f"max_length, or pass min_length={args.max_length} or less")
        search.update(max_len_a=0.0, max_len_b=args.max_length)
    return search


def consensus_choice(cfg: DictConfig, data: DataDescription, args: GenerateConfig
                     ) -> Callable | None:
    """With `mbr` (the run's, unless the arguments change it), the chooser of the consensus
    hypothesis under the run's metric; else None (the best-scored)."""
    if not (cfg.model.get("mbr", False) if args.mbr is None else args.mbr):
        return None
    task_type = task_type_of(cfg.data.get("corpus"), cfg.data.get("task_type", ""))
    language = language_of(cfg.data.get("corpus"), cfg.data.get("target_lang"))
    return partial(consensus_of, tokenizer=data.target_tokenizer,
                   metric=metric_of(cfg.model.get("metric"), task_type),
                   stem=english(language))


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


def main(argv: list[str]) -> None:
    try:
        args = parse_args(GenerateConfig, argv, USAGE)
        net, data, cfg = load_model(args.ckpt, args.device)
        if get_class(cfg.model._target_).kind == "seq2seq":
            transduce(net, data, cfg, args)
        else:
            stream(net, data.tokenizer, args)
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
