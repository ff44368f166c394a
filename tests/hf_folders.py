"""Tiny random Hugging Face model folders, built and saved by transformers itself (no hub):
one per family the import supports, each with a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 320
# initializer_range: weights large enough that a random model's greedy continuation varies
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256,
             initializer_range=0.2)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                            n_positions=256, bos_token_id=0, eos_token_id=0,
                                            initializer_range=0.2),
    "llama": lambda: transformers.LlamaConfig(**SMALL, bos_token_id=1, eos_token_id=2),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **SMALL, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**{**SMALL, "num_key_value_heads": 1},
                                                  sliding_window=128, bos_token_id=1,
                                                  eos_token_id=2),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True,
                                              eos_token_id=0),
}
SPECIALS = {"gpt2": ["<|endoftext|>"], "qwen2": ["<|endoftext|>"]}  # else <unk> <s> </s>


def training_text() -> list[str]:
    """Text to train the tokenizer on: this file's own module docs and source."""
    return [inspect.getsource(json), inspect.getsource(inspect)]


def tokenizer_for(kind: str) -> Tokenizer:
    specials = SPECIALS.get(kind, ["<unk>", "<s>", "</s>"])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    if kind.startswith(("llama", "mistral")):  # these prepend <s>, as their checkpoints do
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return tokenizer


def make_folder(kind: str, folder: Path, seed: int = 0) -> Path:
    """Saves a random `kind` model and its tokenizer into `folder`, as save_pretrained does."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]())
    model.save_pretrained(folder)
    specials = SPECIALS.get(kind, ["<unk>", "<s>", "</s>"])
    roles = {"eos_token": specials[-1]} if len(specials) == 1 else \
        {"unk_token": specials[0], "bos_token": specials[1], "eos_token": specials[2]}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer_for(kind), **roles)
    fast.save_pretrained(folder)
    # saved again through the family's own tokenizer class, which sets its pre-tokenizer
    # (Qwen2's regex split, for one), as a real checkpoint's tokenizer.json holds it
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
