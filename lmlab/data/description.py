"""What a task may know of its data, whatever the corpus: a typed description.

DataModules describe themselves; they never name a model's arguments. Each task picks what
it needs (`Task.config_from_data`): a classifier its classes and vocabulary, a language
model its vocabulary and characters per token, a sequence-to-sequence model the
vocabularies of its two sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class DataDescription:
    """The data of a run, as a task sees it.

    Attributes:
        tokenizer: the trained tokenizer (its vocabulary and special-token ids); for
            sequence-to-sequence data, the target side's.
        classes: the label set, in class-id order (classification only).
        chars_per_token: characters of text per token of each split, for bits per character.
        source_tokenizer: the source side's tokenizer (sequence-to-sequence); defaults to
            `tokenizer`. The same object as `target_tokenizer` for a joint vocabulary.
        target_tokenizer: the target side's tokenizer; defaults to `tokenizer`. Both are
            plain: the DataModule adds `<bos>`/`<eos>` around targets itself.
        task_type: `translation` or `summarization` for sequence-to-sequence data (how its
            outputs are scored), else empty.
        target_lang: the target language code of translation data, if known (e.g. `de`).
    """

    tokenizer: Tokenizer
    classes: tuple[str, ...] = ()
    chars_per_token: dict[str, float] = field(default_factory=dict)
    source_tokenizer: Tokenizer | None = None
    target_tokenizer: Tokenizer | None = None
    task_type: str = ""
    target_lang: str = ""

    def __post_init__(self):
        # Frozen: fill the defaults through object.__setattr__, as dataclasses do.
        for side in ("source_tokenizer", "target_tokenizer"):
            if getattr(self, side) is None:
                object.__setattr__(self, side, self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def source_vocab_size(self) -> int:
        return self.source_tokenizer.vocab_size

    @property
    def target_vocab_size(self) -> int:
        return self.target_tokenizer.vocab_size

    @property
    def joint_vocab(self) -> bool:
        """Whether both sides share one vocabulary (so embeddings can be tied)."""
        return self.source_tokenizer is self.target_tokenizer

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id
