"""The sequence-to-sequence losses: per token by default, per sentence on request, and the
evaluation loss the mean over the split's tokens (so `exp(val/loss)` is perplexity).
Checked against `cross_entropy` over the real tokens, flattened (no sentence in sight)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.models.transformer_seq2seq import Seq2SeqTransformer
from lmlab.tasks.seq2seq import Seq2SeqTask

PAD, BOS, EOS, VOCAB = 0, 1, 2, 17


def task(loss_per: str = "tokens") -> Seq2SeqTask:
    torch.manual_seed(0)
    net = Seq2SeqTransformer(VOCAB, VOCAB, PAD, BOS, EOS, d_model=16, n_head=2,
                             n_encoder_layers=1, n_decoder_layers=1, d_ff=32, dropout=0.0)
    return Seq2SeqTask(net, optimizer=torch.optim.SGD, val_beam=0, loss_per=loss_per,
                       label_smoothing=0.1)


def batch(target_lengths=(9, 3, 5, 2), weight=None) -> dict:
    """Targets of very different lengths, so the two means differ."""
    g = torch.Generator().manual_seed(1)
    size, longest = len(target_lengths), max(target_lengths)
    target = torch.randint(3, VOCAB, (size, longest), generator=g)
    target[:, 0] = BOS
    for row, length in enumerate(target_lengths):
        target[row, length - 1] = EOS
        target[row, length:] = PAD
    found = {"source": torch.randint(3, VOCAB, (size, 6), generator=g), "target": target}
    if weight is not None:
        found["weight"] = torch.tensor(weight)
    return found


def reference(task: Seq2SeqTask, found: dict, smoothing: float, rows=None) -> torch.Tensor:
    """The mean over every real target token of the batch, flattened."""
    rows = rows if rows is not None else slice(None)
    logits = task(found["source"], found["target"][:, :-1])[rows]
    targets = found["target"][:, 1:][rows]
    real = targets != PAD
    return F.cross_entropy(logits[real], targets[real], label_smoothing=smoothing)


def sentence_means(task: Seq2SeqTask, found: dict, smoothing: float) -> torch.Tensor:
    logits = task(found["source"], found["target"][:, :-1])
    targets = found["target"][:, 1:]
    means = [F.cross_entropy(logits[i][targets[i] != PAD], targets[i][targets[i] != PAD],
                             label_smoothing=smoothing) for i in range(len(targets))]
    return torch.stack(means).mean()


def test_the_training_loss_is_the_mean_over_tokens_by_default():
    t, found = task(), batch()
    torch.testing.assert_close(t.step(found, "train"), reference(t, found, 0.1))
    # negative control: the mean of sentence means is another number here
    assert abs(sentence_means(t, found, 0.1) - reference(t, found, 0.1)) > 1e-2


def test_loss_per_sentences_is_the_mean_of_sentence_means():
    t, found = task("sentences"), batch()
    torch.testing.assert_close(t.step(found, "train"), sentence_means(t, found, 0.1))


@pytest.mark.parametrize("loss_per", ["tokens", "sentences"])
def test_the_evaluation_loss_is_the_token_mean_of_the_split_and_ppl_its_exponential(loss_per):
    t = task(loss_per)
    first, second = batch(), batch((4, 4, 7, 2), weight=[1.0, 1.0, 1.0, 0.0])  # a copy: 0
    for found in (first, second):
        t.step(found, "val")
    counts = [int((first["target"][:, 1:] != PAD).sum()),
              int((second["target"][:3, 1:] != PAD).sum())]
    expected = (reference(t, first, 0.0) * counts[0]
                + reference(t, second, 0.0, rows=slice(0, 3)) * counts[1]) / sum(counts)
    logged = {}
    t.log_dict = lambda values, **kwargs: logged.update(values)
    t.log_epoch("val")
    torch.testing.assert_close(logged["val/loss"], expected)
    assert math.isclose(float(logged["val/ppl"]), math.exp(float(expected)), rel_tol=1e-5)


def test_an_unknown_loss_per_is_refused():
    with pytest.raises(ValueError, match="loss_per must be one of"):
        task("words")
