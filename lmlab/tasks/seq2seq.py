"""Sequence to sequence: teacher-forced training, decoding and BLEU or ROUGE in evaluation."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmlab.data.description import DataDescription
from lmlab.data.seq2seq import metric_of
from lmlab.models.decoding import Hypothesis, best_tokens, max_lengths
from lmlab.parallel.sharding import keeps_shards
from lmlab.tasks.base import Task, example_weights, real_examples
from lmlab.tasks.causal_lm import parameter_groups
from lmlab.tasks.text_metrics import bleu, consensus, one_line, rouge, rouge_signature

log = logging.getLogger(__name__)
METRICS = ("bleu", "rouge")
LOSS_PER = ("tokens", "sentences")


class Seq2SeqTask(Task):
    """Trains an encoder-decoder net (`lmlab.models.transformer_seq2seq`,
    `lmlab.models.rnn_seq2seq`) with teacher forcing; validation and test decode their
    sources with the configured search and score the text against the references.

    Args:
        net: the model; it maps (source, target_in) to logits and decodes step by step.
        optimizer: a partial optimizer, called with parameter groups.
        scheduler: a partial LR scheduler, called with the optimizer, stepped every step.
        weight_decay: applied to weight matrices only, never to norms, biases or embeddings.
        label_smoothing: share of each target's probability spread over the vocabulary, in
            training (evaluation losses are the plain cross-entropy).
        loss_per: what the training loss averages over: `tokens` (every target token of
            the batch alike, as fairseq and Marian do) or `sentences` (each sentence's mean
            over its tokens, then the mean over the sentences). Evaluation's `loss` is always
            the mean over the split's tokens, and `ppl` its exponential.
        metric: `bleu` (sacreBLEU) or `rouge` (ROUGE-1/2/L); null: the data's own (BLEU for
            translation, ROUGE for summarization).
        beam: beam size of the test decode (1: greedy).
        val_beam: beam size of each validation's decode (1: greedy, the cheap default; 0:
            none, and the best checkpoint is chosen by `val/loss`).
        length_penalty: alpha of score = summed log-probability / length**alpha.
        max_len_a, max_len_b: a hypothesis stops at a * source length + b tokens.
        min_length: fewest tokens before `<eos>` may end a hypothesis.
        n_finished: finished hypotheses at which a sentence's beam search stops (null: the
            beam size).
        no_repeat_ngram_size: n > 0: no hypothesis repeats an n-gram of its own (0: off).
        mbr: output, of a beam's finished hypotheses, the one most like the others under the
            metric (minimum Bayes risk decoding, `text_metrics.consensus`) instead of the
            best-scored; for beams above 1 (each keeps `n_finished` hypotheses to choose
            from).
        data: the data's description: the target tokenizer decodes hypotheses.
    """

    kind = "seq2seq"  # the data it needs

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 weight_decay: float = 0.0, label_smoothing: float = 0.1,
                 loss_per: str = "tokens", metric: str | None = None, beam: int = 5,
                 val_beam: int = 1, length_penalty: float = 1.0, max_len_a: float = 1.2,
                 max_len_b: int = 10, min_length: int = 1, n_finished: int | None = None,
                 no_repeat_ngram_size: int = 0, mbr: bool = False,
                 compile: bool = False, compile_mode: str = "default",
                 activation_checkpointing: bool = False,
                 data: DataDescription | None = None):
        super().__init__(net, optimizer, scheduler, compile, compile_mode,
                         activation_checkpointing)
        metric = metric_of(metric, getattr(data, "task_type", None))
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        if loss_per not in LOSS_PER:
            raise ValueError(f"loss_per must be one of {LOSS_PER}, not {loss_per!r}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "data"])
        self.weight_decay, self.label_smoothing, self.metric = weight_decay, label_smoothing, metric
        self.loss_per = loss_per
        self.beams = {"val": val_beam, "test": beam}
        self.search = {"length_penalty": length_penalty, "max_len_a": max_len_a,
                       "max_len_b": max_len_b, "min_length": min_length,
                       "n_finished": n_finished, "no_repeat_ngram_size": no_repeat_ngram_size}
        self.tokenizer = data.target_tokenizer if data is not None else None
        # Porter's rules are English ones: ROUGE stems the words of English targets only
        self.stem = english(getattr(data, "target_lang", ""))
        self.mbr = mbr
        self.signatures: list[str] = []
        self.hypotheses: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}

    @property
    def monitor(self) -> tuple[str, str]:
        if not self.beams["val"]:
            return "val/loss", "min"
        return ("val/bleu" if self.metric == "bleu" else "val/rougeL"), "max"

    @classmethod
    def config_from_data(cls, data: DataDescription) -> dict:
        target = data.target_tokenizer
        return {"net": {"src_vocab_size": data.source_vocab_size,
                        "tgt_vocab_size": data.target_vocab_size, "pad_id": target.pad_id,
                        "bos_id": target.bos_id, "eos_id": target.eos_id}}

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        return self.net(source, target_in)

    def step(self, batch: dict, split: str) -> torch.Tensor:
        """The loss of a batch; in evaluation with decoding, the hypotheses too, from the
        same encoder output (`shares_encoding`)."""
        targets = batch["target"][:, 1:]  # (B, T - 1): predict each token after <bos>
        decodes = split != "train" and self.beams[split] and self.tokenizer is not None
        shared = decodes and self.shares_encoding()
        encoded = self.net.encode(batch["source"]) if shared else None
        extra = {"encoded": encoded} if shared else {}
        logits = self.net(batch["source"], batch["target"][:, :-1], **extra)  # (B, T - 1, V)
        smoothing = self.label_smoothing if split == "train" else 0.0
        losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=self.net.pad_id,
                                 label_smoothing=smoothing, reduction="none")  # (B, T - 1)
        tokens = (targets != self.net.pad_id).sum(dim=1)  # (B,)
        means = losses.sum(dim=1) / tokens.clamp(min=1)  # (B,): each sentence's mean
        weight = example_weights(batch, len(targets), targets.device)
        per_token = split != "train" or self.loss_per == "tokens"
        loss = self.log_loss(split, means, weight, tokens if per_token else None)
        if decodes:
            self.collect(batch, split, weight, encoded)
        return loss

    def shares_encoding(self) -> bool:
        """Whether a validation step may decode from the encoder output of its loss pass: the
        net's `forward` takes `encoded=`, and the strategy does not keep parameters sharded
        (there, `encode` called apart from the net's own forward would find them sharded)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return "encoded" in inspect.signature(self.net.forward).parameters \
            and not keeps_shards(strategy)

    def count_tokens(self, batch: dict) -> torch.Tensor:
        """Predicted target tokens: the target's after `<bos>`, up to `<eos>`, no padding
        (the source tokens are not counted)."""
        lengths = batch["target_lengths"] - 1
        return (lengths * real_examples(batch, len(lengths)).to(lengths.device)).sum()

    def flop_lengths(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """Source tokens, and target inputs (`<bos> y1 .. yn`, the target without `<eos>`)."""
        return batch["source_lengths"], batch["target_lengths"] - 1

    def collect(self, batch: dict, split: str, weight: torch.Tensor,
                encoded: dict | None = None) -> None:
        """Decodes the batch's sources (through the strategy's wrapper: sharded parameters
        are gathered) from their encoder output if given, and keeps the text of the real
        examples by index."""
        steps = self.lockstep_steps(batch["source"])
        found = self.through_strategy("decode", batch["source"], self.beams[split], steps,
                                      encoded)
        for index, tokens, w in zip(batch["index"].tolist(), found, weight.tolist()):
            if w > 0:
                self.hypotheses[split].append((index, one_line(self.tokenizer.decode(tokens))))

    @torch.no_grad()
    def decode(self, source: torch.Tensor, beam: int, steps: int | None = None,
               encoded: dict | None = None) -> list[list[int]]:
        """The output tokens for each source row (beam 1: greedy search): the best-scored
        hypothesis's, or with `mbr` the consensus of the beam's; `encoded`: the source's
        encoder output, if computed already."""
        choose = partial(consensus_of, tokenizer=self.tokenizer, metric=self.metric,
                         stem=self.stem) if self.mbr else None
        return best_tokens(self.net, source, beam, steps=steps, choose=choose,
                           encoded=encoded, **self.search)

    def lockstep_steps(self, source: torch.Tensor) -> int | None:
        """Under a strategy that keeps the parameters sharded, the most decoder steps any
        rank's batch may take: each step gathers parameters collectively, so every rank must
        take as many steps as the others. None (each rank stops when its batch is done)
        on one process, and under DDP or ZeRO 1-2, whose ranks decode alone."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not keeps_shards(strategy) or not (dist.is_available() and dist.is_initialized()) \
                or dist.get_world_size() == 1:
            return None
        limits = max_lengths(self.net, source, self.search["max_len_a"],
                             self.search["max_len_b"], self.search["min_length"])
        steps = limits.max() + 1
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        return int(steps)

    def log_epoch(self, split: str) -> None:
        if split == "train":
            return  # train/loss is logged per step
        loss = self.epoch_loss(split)  # the mean over the split's target tokens
        self.log_dict({f"{split}/loss": loss, f"{split}/ppl": torch.exp(loss)},
                      prog_bar=split == "val")
        found = gather(self.hypotheses[split])
        self.hypotheses[split] = []
        if not found:
            return
        indices, texts = zip(*sorted(dict(found).items()))
        references = self.trainer.datamodule.references(split)
        references = [references[i] for i in indices]
        for name, value in self.score(list(texts), references).items():
            self.log(f"{split}/{name}", value, prog_bar=split == "val")  # equal on every rank
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.write(split, indices, texts, references)

    def score(self, texts: list[str], references: list[list[str]]) -> dict[str, float]:
        """BLEU against the first reference; or ROUGE against the first reference (as
        published summarization figures are), and, where examples carry more references
        (AESLC's annotations), also against the best of those (`..._annotated`)."""
        if self.metric == "bleu":
            value, signature = bleu(texts, references)
            self.signatures = [signature]
            log.info("BLEU %.2f (%s)", value, signature)
            return {"bleu": value}
        scores = rouge(texts, [refs[:1] for refs in references], stem=self.stem)
        self.signatures = [rouge_signature(self.stem, "first")]
        annotated = [i for i, refs in enumerate(references) if len(refs) > 1]
        if annotated:  # over the examples that carry annotations
            extra = rouge([texts[i] for i in annotated], [references[i][1:] for i in annotated],
                          stem=self.stem)
            scores.update({f"{name}_annotated": value for name, value in extra.items()})
            self.signatures.append(rouge_signature(self.stem, "best of the others"))
        return scores

    def write(self, split: str, indices, texts, references) -> None:
        """Writes the hypotheses, line-aligned with their sources and references, to the run
        folder's `hypotheses/` (validation: the latest one)."""
        folder = Path(self.trainer.default_root_dir) / "hypotheses"
        folder.mkdir(parents=True, exist_ok=True)
        sources = self.trainer.datamodule.sources(split)
        files = {f"{split}.hyp.txt": texts, f"{split}.ref.txt": [r[0] for r in references],
                 f"{split}.src.txt": [sources[i] for i in indices]}
        for k in range(1, max(len(r) for r in references)):  # more references, if any
            files[f"{split}.ref{k}.txt"] = [r[k] if k < len(r) else "" for r in references]
        for name, lines in files.items():
            (folder / name).write_text("".join(one_line(line) + "\n" for line in lines))
        (folder / f"{split}.{self.metric}-signature.txt").write_text(
            "".join(line + "\n" for line in self.signatures))

    def optimizer_params(self) -> list[dict]:
        return parameter_groups(self.net, self.weight_decay)


def gather(items: list) -> list:
    """Every rank's `items`, concatenated, on every rank (one process: `items` itself)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def consensus_of(hypotheses: list[Hypothesis], tokenizer, metric: str, stem: bool) -> int:
    """The index of the hypothesis whose text is most like the others' under `metric`
    (`bleu` or `rouge`, stemmed with `stem`): minimum Bayes risk decoding."""
    return consensus([tokenizer.decode(h.tokens) for h in hypotheses], metric, stem)


def english(language: str | None) -> bool:
    """Whether a language code (`en`, `en-US`, `en_GB`, `eng`) or name names English."""
    return (language or "").lower().replace("_", "-").split("-")[0] in ("en", "eng", "english")
