import os

import pytest

from lmlab.data.tokenizers import (
    PARALLELISM,
    SPECIALS,
    ByteBPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    every_core,
)

TEXTS = ["The cat sat on the mat.", "A dog ate the cat's dinner!", "Ünïcode wörks too\ttabs",
         "the the the cat cat dog"] * 5


@pytest.mark.parametrize("spec", [WordTokenizer(), CharTokenizer(), ByteBPETokenizer(300)])
def test_specials_come_first(spec):
    tok = spec.fit(TEXTS)
    assert tok.vocab[:4] == SPECIALS
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("spec", [CharTokenizer(), ByteBPETokenizer(300)])
def test_char_and_bpe_round_trip_exactly(spec):
    tok = spec.fit(TEXTS)
    for text in TEXTS[:3]:
        assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trips_unseen_text_without_unk():
    tok = ByteBPETokenizer(300).fit(TEXTS)
    text = "Never seen: ✓ 日本語 ½"
    assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(text)


def test_word_tokenizer_lowercases_splits_punctuation_and_maps_unknowns():
    tok = WordTokenizer(lowercase=True).fit(TEXTS)
    ids = tok.encode("THE CAT. zebra!")
    assert [tok.vocab[i] for i in ids] == ["the", "cat", ".", "<unk>", "!"]
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"


def test_word_tokenizer_respects_max_size_and_min_freq():
    by_size = WordTokenizer(max_size=3).fit(TEXTS)
    assert by_size.vocab_size == 3 + len(SPECIALS)
    assert by_size.vocab[4] == "the"  # the most frequent word
    by_freq = WordTokenizer(min_freq=11).fit(TEXTS)
    assert set(by_freq.vocab[4:]) == {"the", "cat"}  # 30 and 20 times; dog only 10
    assert "mat" not in by_freq.vocab


def test_char_tokenizer_keeps_whitespace():
    tok = CharTokenizer().fit(TEXTS)
    assert tok.decode(tok.encode("a\tb c")) == "a\tb c"
    assert len(tok.encode("a\tb c")) == 5


@pytest.mark.parametrize("spec", [WordTokenizer(), CharTokenizer(), ByteBPETokenizer(300)])
def test_save_and_load_give_the_same_ids(spec, tmp_path):
    tok = spec.fit(TEXTS)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab == tok.vocab
    for text in TEXTS[:3] + ["unseen words here"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]


@pytest.mark.parametrize("bos,eos", [(True, True), (True, False), (False, True)])
def test_framed_tokenizer_adds_the_specials_a_task_asks_for(tmp_path, bos, eos):
    plain = WordTokenizer().fit(["a small corpus of words", "more words here"])
    framed = plain.framed(bos=bos, eos=eos)
    ids = framed.encode("small words")
    expected = [plain.bos_id] * bos + plain.encode("small words") + [plain.eos_id] * eos
    assert ids == expected and plain.encode("small words") != ids
    assert framed.decode(ids) == plain.decode(plain.encode("small words"))
    framed.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json").encode("small words") == expected


def test_the_tokenizer_library_is_serial_except_inside_a_whole_corpus_build(monkeypatch):
    """Serial by default (DataLoader workers fork); on every core inside `every_core`, and
    as before after it, whether the variable was set or not."""
    monkeypatch.setenv(PARALLELISM, "false")
    with every_core():
        assert os.environ[PARALLELISM] == "true"
    assert os.environ[PARALLELISM] == "false"
    monkeypatch.delenv(PARALLELISM)
    with every_core():
        assert os.environ[PARALLELISM] == "true"
    assert PARALLELISM not in os.environ


def test_a_batch_encodes_to_the_ids_of_each_text_alone():
    tokenizer = ByteBPETokenizer(vocab_size=300, min_freq=1).fit(["a small dog runs\n" * 50])
    texts = ["a small dog", "runs runs", ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
