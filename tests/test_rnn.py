import pytest
import torch
import torch.nn.functional as F

from lmlab.data.batching import pad_batch
from lmlab.errors import DataError
from lmlab.models.rnn import RNNClassifier, reverse_index
from lmlab.tasks.classification import load_pretrained

VOCAB, CLASSES = 50, 3


def tiny(**kwargs) -> RNNClassifier:
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=8, hidden_size=12)
    return RNNClassifier(**{**args, **kwargs}).eval()


def ragged_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [7, 1, 4, 9, 2]
    return [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]


VARIANTS = [dict(cell=c, pooling=p, bidirectional=b)
            for c in ("lstm", "gru", "rnn") for p in ("last", "max", "mean") for b in (False, True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_output_shape(variant):
    tokens, lengths = pad_batch(ragged_batch(), pad_id=0)
    assert tiny(**variant)(tokens, lengths).shape == (5, CLASSES)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_padded_batch_equals_each_sequence_alone(variant):
    model, sequences = tiny(**variant), ragged_batch()
    tokens, lengths = pad_batch(sequences, pad_id=0)
    batched = model(tokens, lengths)
    alone = torch.cat([model(s[None], torch.tensor([len(s)])) for s in sequences])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_content_does_not_change_the_result(bidirectional):
    model = tiny(bidirectional=bidirectional)
    tokens, lengths = pad_batch(ragged_batch(), pad_id=0)
    noisy = tokens.clone()
    padding = torch.arange(tokens.size(1))[None] >= lengths[:, None]
    noisy[padding] = 7  # any real token id in the padded slots
    torch.testing.assert_close(model(tokens, lengths), model(noisy, lengths))


def test_reverse_index_keeps_padding_in_place():
    index = reverse_index(torch.tensor([3, 5, 1]), 5)
    assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("variant", [dict(), dict(bidirectional=True, pooling="max")])
def test_one_batch_overfits_to_full_accuracy(variant):
    model = tiny(dropout=0.0, **variant).train()
    tokens, lengths = pad_batch(ragged_batch(seed=3) + ragged_batch(seed=4), pad_id=0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens, lengths), labels).backward()
        optimizer.step()
    assert (model.eval()(tokens, lengths).argmax(-1) == labels).all()


def test_unknown_cell_and_pooling_are_refused():
    with pytest.raises(ValueError, match="cell"):
        tiny(cell="transformer")
    with pytest.raises(ValueError, match="pooling"):
        tiny(pooling="attention")


def test_frozen_embeddings_get_no_gradient():
    model = tiny(freeze_embeddings=True)
    assert not model.embedding.weight.requires_grad
    assert model.head.weight.requires_grad


@pytest.mark.parametrize("header", ["", "3 4\n"])
def test_pretrained_vectors_land_in_the_right_rows(tmp_path, header):
    path = tmp_path / "vectors.txt"
    path.write_text(header + "cat 1 2 3 4\nzebra 9 9 9 9\ndog 0.5 0.5 0.5 -1\n")
    vocab = ["<pad>", "<unk>", "dog", "the", "cat"]
    model = RNNClassifier(len(vocab), 2, embed_dim=4, hidden_size=4)
    before = model.embedding.weight.detach().clone()
    coverage = load_pretrained(model.embedding, str(path), vocab)
    weight = model.embedding.weight.detach()
    assert coverage == pytest.approx(2 / 5)
    assert weight[4].tolist() == [1, 2, 3, 4]
    assert weight[2].tolist() == [0.5, 0.5, 0.5, -1]
    torch.testing.assert_close(weight[[0, 1, 3]], before[[0, 1, 3]])


def test_vectors_of_the_wrong_width_name_the_line(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("cat 1 2 3 4\ndog 1 2 3\n")
    model = RNNClassifier(3, 2, embed_dim=4, hidden_size=4)
    with pytest.raises(DataError, match=r"(?s)vectors.txt:2: expected 4 values.*embed_dim"):
        load_pretrained(model.embedding, str(path), ["<pad>", "cat", "dog"])
