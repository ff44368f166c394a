"""What lmlab's encoder-decoders share (`Seq2SeqTransformer`, `RNNSeq2Seq`): the special
ids, the embeddings of the two sides (one matrix for a joint vocabulary), following the
beams of a search, and the parameter count. Each net adds its encoder and decoder
(`forward`, `encode`, `decode_step`) and says how its decoder's cache follows the beams
(`reorder_cache`)."""

from __future__ import annotations

import torch
from torch import nn


class EncoderDecoder(nn.Module):
    """The base of lmlab's encoder-decoders.

    A net whose `beams_share_memory` is true decodes the beams of a sentence against one row
    of the encoder output: a beam search gives its `decode_step` `beam` rows of tokens for
    each row of `encoded`, and the net's cross-attention reads a sentence's keys and values
    once for all its beams (`lmlab.models.attention.beams_as_queries`).

    Args:
        src_vocab_size: rows of the source embedding.
        tgt_vocab_size: rows of the target embedding (and of the output layer).
        pad_id: padding id (source and target); its embedding stays zero.
        bos_id: the id that starts every target.
        eos_id: the id that ends every target.
        embed_dim: the embeddings' width.
        share_embeddings: one joint vocabulary: the source embedding is the target one (the
            vocabulary sizes must be equal).

    Raises:
        ValueError: shared embeddings of vocabularies of different sizes.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, pad_id: int, bos_id: int,
                 eos_id: int, embed_dim: int, share_embeddings: bool):
        super().__init__()
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"share_embeddings needs one joint vocabulary, but the source has "
                             f"{src_vocab_size} ids and the target {tgt_vocab_size}: use a joint "
                             f"tokenizer or share_embeddings=false")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.tgt_embed = nn.Embedding(tgt_vocab_size, embed_dim, padding_idx=pad_id)
        self.src_embed = self.tgt_embed if share_embeddings else \
            nn.Embedding(src_vocab_size, embed_dim, padding_idx=pad_id)

    beams_share_memory = False

    def reorder(self, encoded: dict, cache: dict | None, indices: torch.Tensor,
                within_sentences: bool = False, sentences: torch.Tensor | None = None
                ) -> tuple[dict, dict | None]:
        """Keeps rows `indices` (B',) of the decoder's cache, in that order, and the encoder
        output of rows `sentences` (one row a sentence, with `beams_share_memory`), else of
        rows `indices`.

        `within_sentences`: each row moves only among the rows of its own sentence (a beam
        search in which no sentence left), whose encoder output, and what is computed from
        it alone, are the same: those are kept as they are, not copied.
        """
        memory_rows = indices if sentences is None else sentences
        if not within_sentences:
            encoded = {name: t.index_select(0, memory_rows) for name, t in encoded.items()}
        if cache is None:
            return encoded, None
        if sentences is None:
            return encoded, self.reorder_cache(cache, indices, within_sentences)
        return encoded, self.reorder_cache(cache, indices, within_sentences, sentences)

    def reorder_cache(self, cache: dict, indices: torch.Tensor,
                      within_sentences: bool = False, sentences: torch.Tensor | None = None
                      ) -> dict:
        """The decoder's cache with rows `indices` (B',) only, in that order, and what it
        computed from the encoder output alone of rows `sentences` if given (see `reorder`)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
