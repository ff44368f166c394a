"""What a task may know of its data, whatever the corpus: a typed description.

DataModules describe themselves; they never name a model's arguments. Each task picks what
it needs (`Task.config_from_data`): a classifier its classes and vocabulary, a language
model its vocabulary and characters per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class DataDescription:
    """The data of a run, as a task sees it.

    Attributes:
        tokenizer: the trained tokenizer (its vocabulary and special-token ids).
        classes: the label set, in class-id order (classification only).
        chars_per_token: characters of text per token of each split, for bits per character.
    """

    tokenizer: Tokenizer
    classes: tuple[str, ...] = ()
    chars_per_token: dict[str, float] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id
