"""Generates text from a language model trained by `lmlab.run`, streaming to the terminal.

    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00 prompt="ROMEO:" max_new_tokens=300
    python -m lmlab.generate ckpt=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt temperature=0

`ckpt` is a run folder (its best checkpoint, else its last, else its `weights.ckpt`) or a
checkpoint file inside one; the run's saved config and tokenizer rebuild the model. Every
`key=value` is the text after the first `=`, exactly: `prompt="ROMEO: hello"` continues
`ROMEO: hello`, `prompt=123` continues `123`. `temperature=0` decodes greedily.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate

from lmlab.checkpoints import read_state_dict
from lmlab.cli import fail, parse_args
from lmlab.data.description import DataDescription
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError
from lmlab.evaluate import find_checkpoint, load_run_config
from lmlab.models.sampling import generate

USAGE = ("python -m lmlab.generate ckpt=RUN_DIR|FILE [prompt=TEXT] [max_new_tokens=N] "
         "[temperature=T] [top_k=K|null] [top_p=P|null] [seed=S] [use_cache=BOOL] [device=D]")


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


def load_model(ckpt: str, device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """The net and tokenizer of a run, from its folder or one of its checkpoint files."""
    path = Path(ckpt)
    run_dir = next((p for p in (path, *path.parents) if (p / ".hydra").is_dir()), path)
    cfg = load_run_config(run_dir)
    command = lambda _, found: f"python -m lmlab.generate ckpt={found or run_dir}"  # noqa: E731
    checkpoint = find_checkpoint(run_dir, None if path == run_dir else str(path), command)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    sizes = get_class(cfg.model._target_).config_from_data(DataDescription(tokenizer))
    net = instantiate(cfg.model.net, **sizes.get("net", {}))
    state = read_state_dict(checkpoint)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()
                         if k.startswith("net.")})
    return net.to(device).eval(), tokenizer


def stream(args: GenerateConfig) -> str:
    """Prints the prompt and then each new piece of text as it is produced; returns it all."""
    net, tokenizer = load_model(args.ckpt, args.device)
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


def main(argv: list[str]) -> None:
    try:
        stream(parse_args(GenerateConfig, argv, USAGE))
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
