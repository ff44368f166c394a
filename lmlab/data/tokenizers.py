"""The tokenizer layer shared by every task: word, byte-level BPE and character level, and a
pretrained model's own.

All three are Hugging Face `tokenizers` pipelines behind one small class, so they train on
an iterator of strings, encode in batches in Rust, and save to / load from one
`tokenizer.json` that travels with the run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmlab.errors import DataError

# DataLoader workers are forked: a fork after the library's thread pool has run may deadlock
# (the library then warns and turns itself serial). Serial by default, then; `every_core`
# turns the pool on for a whole-corpus build in the main process, before any worker exists.
PARALLELISM = "TOKENIZERS_PARALLELISM"
os.environ.setdefault(PARALLELISM, "false")
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]  # ids 0..3 in every vocabulary


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Inside the block, the library trains and `encode_batch`es on every core (it reads
    TOKENIZERS_PARALLELISM at each call); after it, the setting is as it was."""
    before = os.environ.get(PARALLELISM)
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PARALLELISM]
        else:
            os.environ[PARALLELISM] = before


OWN_SPECIALS = {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS}


class Tokenizer:
    """A trained tokenizer: text to ids and back.

    Args:
        hf: the underlying Hugging Face tokenizer, already trained.
        specials: a pretrained tokenizer's special tokens by role (`bos`, `eos`, `pad`,
            `unk`: token text, or None); None for lmlab's own (`<pad>`, `<unk>`, ...).
    """

    def __init__(self, hf: HFTokenizer, specials: dict[str, str | None] | None = None):
        self.hf, self.specials = hf, specials
        # Text is text: a corpus line or prompt holding "<eos>" must not end a sequence.
        # The post-processor still adds <bos>/<eos> by id. A pretrained tokenizer encodes as
        # transformers does: its special tokens' text is the token.
        hf.encode_special_tokens = specials is None
        names = specials or OWN_SPECIALS
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            hf.token_to_id(names[role]) if names.get(role) else None
            for role in ("pad", "unk", "bos", "eos"))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def vocab(self) -> list[str]:
        """Tokens ordered by id."""
        by_id = sorted(self.hf.get_vocab().items(), key=lambda item: item[1])
        return [token for token, _ in by_id]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str], special_tokens: bool = True) -> list[list[int]]:
        """The ids of each text; `special_tokens=False`: without what the post-processor
        adds (`<bos>`, ...), for a text that continues another."""
        # the ids alone: no character offsets to compute, and the same ids
        return [encoding.ids for encoding in
                self.hf.encode_batch_fast(texts, add_special_tokens=special_tokens)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids))

    def framed(self, bos: bool = True, eos: bool = True) -> Tokenizer:
        """This tokenizer with `<bos>` and/or `<eos>` added around every text it encodes
        (a `tokenizers` post-processor, saved with it), for tasks that ask for them."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        single = " ".join([BOS] * bos + ["$A"] + [EOS] * eos)
        hf.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)])
        return Tokenizer(hf)

    def save(self, path: str | Path) -> None:
        """Writes `tokenizer.json`, and a pretrained tokenizer's special tokens beside it in
        transformers' `tokenizer_config.json`."""
        self.hf.save(str(path))
        if self.specials is not None:
            config = {f"{role}_token": token for role, token in self.specials.items()}
            special_tokens_file(path).write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        config = special_tokens_file(path)
        specials = special_tokens(json.loads(config.read_text())) if config.is_file() else None
        return cls(HFTokenizer.from_file(str(path)), specials)

    @classmethod
    def pretrained(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face model folder's tokenizer: its `tokenizer.json`, each special token
        (bos, eos, pad, unk) from `tokenizer_config.json`, else `special_tokens_map.json`,
        else the ids of `config.json` (GPT-2's folder names them only there).

        Raises:
            DataError: the folder has no `tokenizer.json`.
        """
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise DataError(folder, "no tokenizer.json", fix="save the model's fast tokenizer "
                            "into the folder (tokenizer.save_pretrained(FOLDER))")
        hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        found = [special_tokens(read_json(folder / name))
                 for name in ("tokenizer_config.json", "special_tokens_map.json")]
        model = read_json(folder / "config.json")
        found.append({role: hf.id_to_token(model[f"{role}_token_id"])
                      for role in ("bos", "eos", "pad", "unk")
                      if isinstance(model.get(f"{role}_token_id"), int)})
        roles = ("bos", "eos", "pad", "unk")
        return cls(hf, {role: next((f[role] for f in found if f.get(role)), None)
                        for role in roles})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def special_tokens_file(path: str | Path) -> Path:
    """`tokenizer_config.json` beside `tokenizer.json`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_config.json")


def special_tokens(config: dict) -> dict[str, str | None]:
    """The special tokens by role of a `tokenizer_config.json` (a token's entry is its text,
    or a dict holding it as `content`)."""
    found = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = config.get(f"{role}_token")
        found[role] = token.get("content") if isinstance(token, dict) else token
    return found


class TokenizerSpec:
    """An untrained tokenizer: what the config describes, until `fit` sees the corpus."""

    lowercase = False

    def build(self) -> tuple[HFTokenizer, trainers.Trainer]:
        raise NotImplementedError

    def loses(self, case_matters: bool = True) -> str | None:
        """What of a text the decoding of its encoding does not give back (None: nothing of
        the text it was trained on); `case_matters`: whether a lowercased text counts as
        lost. Generated text is scored against the original references."""
        return "it lowercases" if self.lowercase and case_matters else None

    def fit(self, texts: Iterable[str]) -> Tokenizer:
        hf, trainer = self.build()
        hf.train_from_iterator(texts, trainer)
        return Tokenizer(hf)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    return normalizers.Sequence(steps)


class PretrainedTokenizer(TokenizerSpec):
    """The tokenizer of a pretrained model's Hugging Face folder, used as it is (never
    trained), encoding as transformers' tokenizer of that folder does.

    Args:
        folder: the model folder holding `tokenizer.json`.
    """

    def __init__(self, folder: str):
        self.folder = folder
        file = Path(folder) / "tokenizer.json"  # a changed file is another tokenizer
        self.version = (file.stat().st_size, file.stat().st_mtime_ns) if file.is_file() else None

    def fit(self, texts: Iterable[str]) -> Tokenizer:
        return Tokenizer.pretrained(self.folder)


class WordTokenizer(TokenizerSpec):
    """Word-level vocabulary: words and punctuation marks, the most frequent kept.

    Args:
        max_size: most words kept, not counting the special tokens (the seed used 25,000).
        min_freq: fewest occurrences for a word to enter the vocabulary.
        lowercase: fold case before counting and encoding.
    """

    def __init__(self, max_size: int = 25_000, min_freq: int = 1, lowercase: bool = True):
        self.max_size, self.min_freq, self.lowercase = max_size, min_freq, lowercase

    def loses(self, case_matters: bool = True) -> str | None:
        lost = "the spacing around punctuation and every word outside its vocabulary"
        return ("case, " if self.lowercase and case_matters else "") + lost

    def build(self):
        hf = HFTokenizer(models.WordLevel(unk_token=UNK))
        hf.normalizer = _normalizer(self.lowercase)
        hf.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
        trainer = trainers.WordLevelTrainer(
            vocab_size=self.max_size + len(SPECIALS),
            min_frequency=self.min_freq,
            special_tokens=SPECIALS,
        )
        return hf, trainer


class CharTokenizer(TokenizerSpec):
    """Character level: every character seen in training is a token.

    Args:
        lowercase: fold case first.
        min_freq: rarer characters map to `<unk>`.
    """

    def __init__(self, lowercase: bool = False, min_freq: int = 1):
        self.lowercase, self.min_freq = lowercase, min_freq

    def build(self):
        hf = HFTokenizer(models.WordLevel(unk_token=UNK))
        if self.lowercase:
            hf.normalizer = normalizers.Lowercase()
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(
            vocab_size=1_000_000, min_frequency=self.min_freq, special_tokens=SPECIALS
        )
        return hf, trainer


class ByteBPETokenizer(TokenizerSpec):
    """Byte-level BPE (GPT-2 style): never produces `<unk>`, any text round-trips.

    Args:
        vocab_size: size of the final vocabulary, special tokens and 256 bytes included.
        min_freq: fewest occurrences for a merge.
        lowercase: fold case first.
    """

    def __init__(self, vocab_size: int = 8_000, min_freq: int = 2, lowercase: bool = False):
        self.vocab_size, self.min_freq, self.lowercase = vocab_size, min_freq, lowercase

    def build(self):
        hf = HFTokenizer(models.BPE())
        if self.lowercase:
            hf.normalizer = normalizers.Lowercase()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_freq,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        return hf, trainer
