"""Prompt/completion records for a causal language model: fine-tuning data such as
`{"prompt": "Q: ...\\nA:", "completion": " ..."}` a line of JSONL (or CSV/TSV columns).

Each example is the prompt's tokens, then the completion's, then the end token, cut to
`max_length + 1`; the model reads all but the last token and predicts each next one.
`loss_on=completion` scores the completion's tokens (and the end token) alone: the prompt
is context, not text to learn. The two are encoded apart, so the completion's first token
starts at its first character whatever the prompt ends with; a prompt that ends in a space
and a completion that starts with a word are encoded as the tokenizer splits them apart.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.batching import pad_batch
from lmlab.data.description import DataDescription
from lmlab.data.readers import Record
from lmlab.data.records import SPLITS, TextRecordsDataModule
from lmlab.data.tokenizers import TokenizerSpec
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)
IGNORE = -100  # a target the loss leaves out (F.cross_entropy's ignore_index)
LOSS_ON = ("completion", "all")


class CompletionsDataModule(TextRecordsDataModule):
    """Prompt/completion records as padded token sequences with their targets.

    Every batch holds `tokens` (B, T): the model's input, `targets` (B, T): the next token
    at each position, `IGNORE` on padding (and on the prompt with `loss_on=completion`),
    `lengths` (B,): the inputs' real lengths, and `weight` (B,) (see `TextRecordsDataModule`).

    Args:
        tokenizer: the tokenizer (a pretrained model's own, with `model=hf_causal_lm`).
        files: split -> a JSONL, CSV or TSV file (`train` required).
        prompt_field, completion_field: the records' fields.
        loss_on: `completion` (the prompt's tokens are not scored) or `all`.
        max_length: longest input in tokens; a longer example loses its end.
        pad_to_multiple: batches are padded to a length that is a multiple of this (the
            tensor-parallel ranks, which sequence parallelism splits each sequence among),
            never beyond `max_length`.
        Others: as `TextRecordsDataModule`.
    """

    kind = "lm"

    def __init__(self, tokenizer: TokenizerSpec, corpus: str | None = None,
                 files: dict | None = None, format: str = "auto",
                 prompt_field: str = "prompt", completion_field: str = "completion",
                 loss_on: str = "completion", data_dir: str = "data", batch_size: int = 16,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, max_length: int = 512,
                 num_workers: int = 0, seed: int = 0, load_from: str | None = None,
                 on_bad_record: str = "error", pad_to_multiple: int = 1):
        if loss_on not in LOSS_ON:
            raise LmlabError(f"data.loss_on={loss_on!r}: choose completion (score the "
                             "completion's tokens alone) or all")
        super().__init__(tokenizer, corpus, files, format, data_dir, batch_size, val_fraction,
                         test_fraction, max_length, num_workers, seed, load_from, on_bad_record)
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self.loss_on, self.pad_to_multiple = loss_on, max(1, int(pad_to_multiple))

    @property
    def texts(self) -> dict[str, list[str]]:
        return {"tokens": [self.prompt_field, self.completion_field]}

    @property
    def field_keys(self) -> dict[str, list[str]]:
        return {"prompt_field": [self.prompt_field],
                "completion_field": [self.completion_field]}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for split, examples in self.datasets.items():
            empty = int(np.sum(examples.column("scored") == 0))
            if empty:
                log.warning("%d of the %d %s records keep no %s token within data.max_length="
                            "%d: they teach nothing; raise data.max_length or shorten their "
                            "prompts", empty, len(examples), split,
                            "completion" if self.loss_on == "completion" else "scored",
                            self.max_length)

    def describe(self) -> DataDescription:
        """The tokenizer, and each split's characters per scored token (bits per character)."""
        return DataDescription(self.tokenizer, chars_per_token={
            split: self.chars_per_token(split) for split in SPLITS if split in self.datasets})

    def chars_per_token(self, split: str) -> float:
        examples = self.datasets[split]
        return float(np.sum(examples.column("chars")) / max(1, np.sum(examples.column("scored"))))

    def _encode(self, records: list[Record], first: int = 0) -> list[dict]:
        prompts = self.tokenizer.encode_batch([r.fields[self.prompt_field] for r in records])
        completions = self.tokenizer.encode_batch(
            [r.fields[self.completion_field] for r in records], special_tokens=False)
        end = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        examples = []
        for record, prompt, completion in zip(records, prompts, completions):
            ids = (prompt + completion + end)[:self.max_length + 1]
            context = len(prompt) if self.loss_on == "completion" else 1
            scored = max(0, len(ids) - max(context, 1))
            text = record.fields[self.completion_field] if self.loss_on == "completion" \
                else record.fields[self.prompt_field] + record.fields[self.completion_field]
            examples.append({"tokens": torch.tensor(ids), "context": context, "scored": scored,
                             "chars": len(text)})
        return examples

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Inputs (all but each sequence's last token), targets (all but its first), the
        unscored ones set to `IGNORE`."""
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        tokens, lengths = pad_batch([ex["tokens"] for ex in examples], pad)
        inputs = tokens.size(1) - 1  # one token shorter: the last is only a target
        wanted = min(inputs + -inputs % self.pad_to_multiple, max(inputs, self.max_length))
        tokens = F.pad(tokens, (0, wanted - inputs), value=pad)
        positions = torch.arange(tokens.size(1) - 1)
        context = torch.tensor([ex["context"] for ex in examples])
        scored = (positions >= context[:, None] - 1) & (positions < lengths[:, None] - 1)
        targets = tokens[:, 1:].masked_fill(~scored, IGNORE)
        return {"tokens": tokens[:, :-1], "targets": targets, "lengths": lengths - 1,
                "weight": torch.tensor([ex["weight"] for ex in examples])}
