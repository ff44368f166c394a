import numpy as np
import pytest

from lmlab.data.lm import Blocks, LMDataModule, RandomOffsets, stdlib_source_files
from lmlab.data.tokenizers import ByteBPETokenizer, CharTokenizer
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, needs_data

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400))


def module(tmp_path, **kwargs) -> LMDataModule:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    args = dict(tokenizer=CharTokenizer(), corpus=None, files=str(corpus),
                cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4,
                train_batches=5)
    dm = LMDataModule(**{**args, **kwargs})
    dm.setup()
    return dm


def test_tokens_round_trip_through_the_memmap(tmp_path):
    dm = module(tmp_path)
    tokens = np.concatenate([dm.splits["train"], dm.splits["val"]])
    assert isinstance(dm.splits["train"], np.memmap)
    assert dm.tokenizer.decode(tokens.tolist()) == TEXT
    assert len(dm.splits["val"]) == len(tokens) - int(len(tokens) * 0.9)
    assert dm.chars_per_token == pytest.approx(1.0)


def test_the_cache_is_reused_and_keyed_by_tokenizer(tmp_path):
    first = module(tmp_path)
    folder = first.cache_folder
    stamp = (folder / "tokens.bin").stat().st_mtime_ns
    second = module(tmp_path)
    assert second.cache_folder == folder
    assert (folder / "tokens.bin").stat().st_mtime_ns == stamp  # not rewritten
    other = module(tmp_path, tokenizer=ByteBPETokenizer(vocab_size=300))
    assert other.cache_folder != folder
    assert other.chars_per_token > 1.0


def test_blocks_are_shifted_by_one():
    blocks = Blocks(np.arange(100, dtype=np.uint16), block_size=8)
    item = blocks[10]
    assert item["tokens"].tolist() == list(range(10, 18))
    assert item["targets"].tolist() == list(range(11, 19))
    assert len(blocks) == 92


def test_random_offsets_are_seeded_per_epoch_and_shared_out_among_ranks():
    sampler = RandomOffsets(1000, num_batches=5, batch_size=4, seed=3)
    first, second = list(sampler), list(sampler)
    assert first != second and len(first) == len(sampler) == 20
    assert list(RandomOffsets(1000, 5, 4, seed=3)) == first
    ranks = [list(RandomOffsets(1000, 5, 4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [10, 10]
    for step in range(5):  # each global batch is split between the two ranks
        share = ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2]
        assert sorted(share) == sorted(first[4 * step:4 * step + 4])


def test_validation_sweeps_non_overlapping_blocks_in_order(tmp_path):
    dm = module(tmp_path)
    batches = list(dm.val_dataloader())
    starts = [b["tokens"][:, 0] for b in batches]
    val = dm.splits["val"]
    assert batches[0]["tokens"][1].tolist() == val[16:32].astype(int).tolist()
    assert sum(len(s) for s in starts) == len(range(0, len(val) - 16, 16))


def test_training_epoch_has_the_configured_number_of_batches(tmp_path):
    dm = module(tmp_path)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0]["tokens"].shape == (4, 16)


def test_files_accept_globs(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(TEXT[:5000])
    dm = module(tmp_path, files=str(tmp_path / "?.txt"))
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 10000


def test_no_matching_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        module(tmp_path, files=str(tmp_path / "missing/*.txt"))


def test_too_little_text_for_a_block_is_a_clear_error(tmp_path):
    with pytest.raises(LmlabError, match="fewer than one block"):
        module(tmp_path, block_size=4000)


def test_embedded_corpus_is_python_source():
    files = stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert files == stdlib_source_files()  # the same order every time
    assert any(f.parts[-2:] == ("asyncio", "events.py") for f in files)


@needs_data
def test_tinyshakespeare_is_character_level(tmp_path):
    dm = LMDataModule(CharTokenizer(), corpus="tinyshakespeare", data_dir=str(DATA_DIR),
                      cache_dir=str(tmp_path), block_size=64)
    dm.setup()
    assert dm.vocab_size == 65 + 4  # 65 characters and the 4 special tokens
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 1_115_394
