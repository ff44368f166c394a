"""Exports a GPT run as a Hugging Face folder that transformers (and the tools that read its
format) load: config.json, model.safetensors, tokenizer.json and tokenizer_config.json.

    python -m lmlab.export outputs/2026-01-01/12-00-00 out=exported/my-gpt
    python -m lmlab.export outputs/2026-01-01/12-00-00/checkpoints/last.ckpt out=exported/last

then `AutoModelForCausalLM.from_pretrained("exported/my-gpt")`. A net with learned positions
is written in GPT-2's layout, one with RoPE in Llama's (Qwen2's with biases on q/k/v only);
LoRA adapters are merged into the weights. A setting neither layout has (a LayerNorm with
RoPE, grouped-query attention with learned positions, ...) is refused in one line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmlab.config.cli import fail, parse_args
from lmlab.config.user_dir import moved_to
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError
from lmlab.interop.huggingface import export_folder
from lmlab.models.gpt import GPT
from lmlab.models.lora import merge_adapters
from lmlab.training.runs import load_run

USAGE = "python -m lmlab.export RUN_DIR|FILE out=FOLDER"


@dataclass
class ExportArgs:
    """Arguments of `python -m lmlab.export`."""

    run_dir: str  # a run folder (its best checkpoint, else last, else weights) or a file in one
    out: str  # the folder to write
    user_dir: str | None = None  # where the run's user directory is now, if it moved


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """tokenizer.json, and tokenizer_config.json naming its special tokens for transformers."""
    hf = tokenizer.hf
    roles = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
             "unk": tokenizer.unk_id}
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              **{f"{role}_token": hf.id_to_token(i) for role, i in roles.items()
                 if i is not None}}
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}


def export(args: ExportArgs) -> Path:
    """Writes the run's net and tokenizer as a Hugging Face folder; returns it.

    Raises:
        LmlabError: the run's net is not a GPT, or has a setting transformers' layouts lack.
    """
    task, data, _ = load_run(args.run_dir, f"python -m lmlab.export out={args.out}",
                             overrides=moved_to(args.user_dir))
    net = task.net
    if not isinstance(net, GPT):
        raise LmlabError(f"{args.run_dir} is a run of {type(net).__name__}; only GPT runs "
                         "(model=gpt_* or hf_causal_lm) export to a Hugging Face folder")
    merge_adapters(net)
    specials = {"bos": data.tokenizer.bos_id, "eos": data.tokenizer.eos_id,
                "pad": data.tokenizer.pad_id}
    return export_folder(net, tokenizer_files(data.tokenizer), args.out, specials)


def main(argv: list[str]) -> None:
    try:
        folder = export(parse_args(ExportArgs, argv, USAGE, positional=("run_dir",)))
        print(f"written:    {folder}")
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
