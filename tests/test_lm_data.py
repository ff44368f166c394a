import functools
import json
import os

import lightning as L
import numpy as np
import pytest
import torch

from lmlab.data import lm
from lmlab.data.blocks import Blocks, RandomOffsets
from lmlab.data.lm import LMDataModule, stdlib_source_files
from lmlab.data.token_cache import cut_at_lines, write_tokens
from lmlab.data.tokenizers import ByteBPETokenizer, CharTokenizer, Tokenizer
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, needs_data

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400))


def module(tmp_path, text=TEXT, setup=True, **kwargs) -> LMDataModule:
    corpus = tmp_path / "corpus.txt"
    if not corpus.is_file() or corpus.read_text() != text:  # a rewrite is a new cache
        corpus.write_text(text)
    args = dict(tokenizer=CharTokenizer(), corpus=None, files=str(corpus),
                cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4,
                train_batches=5)
    dm = LMDataModule(**{**args, **kwargs})
    if setup:
        dm.setup()
    return dm


def split_texts(dm) -> dict[str, str]:
    return {split: dm.tokenizer.decode(tokens.tolist()) for split, tokens in dm.splits.items()}


def test_text_is_cut_at_line_ends_into_train_val_test_in_order(tmp_path):
    dm = module(tmp_path)
    texts = split_texts(dm)
    assert isinstance(dm.splits["train"], np.memmap)
    assert texts["train"] + texts["val"] + texts["test"] == TEXT
    for start, share in ((len(texts["train"]), 0.85), (len(TEXT) - len(texts["test"]), 0.95)):
        cut = round(len(TEXT) * share)  # the split begins at the first line start after it
        assert TEXT[start - 1] == "\n" and cut <= start and "\n" not in TEXT[cut:start - 1]
    assert dm.chars_per_token == {"train": 1.0, "val": 1.0, "test": 1.0}


@pytest.mark.parametrize("cuts", [[0, 0], [5, 5], [7, 30], [12, 14], [15, 19], [22, 22]])
def test_each_part_begins_at_the_first_line_start_after_its_cut(cuts):
    pieces = ["ab\ncd\n", "efgh\n", "ij", "kl\nmn\n"]  # "ij" ends a file without a newline
    text = "".join(pieces)
    file_end = len("".join(pieces[:3]))
    line_starts = {0, len(text), file_end, *(i + 1 for i, c in enumerate(text) if c == "\n")}
    parts = ["", "", ""]
    for part, piece in cut_at_lines(pieces, cuts):
        parts[part] += piece
    assert "".join(parts) == text
    begins = [len(parts[0]), len(parts[0]) + len(parts[1])]
    assert begins == [min(s for s in line_starts if s >= min(cut, len(text))) for cut in cuts]


def test_cut_at_lines_keeps_lines_whole():
    pieces = ["ab\ncd\n", "efgh\n", "ij", "kl\nmn\n"]
    assert list(cut_at_lines(pieces, [1, 4])) == [
        (0, "ab\n"), (1, "cd\n"), (2, "efgh\n"), (2, "ij"), (2, "kl\nmn\n")]
    assert list(cut_at_lines(pieces, [9, 13])) == [
        (0, "ab\ncd\n"), (0, "efgh\n"), (1, "ij"), (2, "kl\nmn\n")]


def test_bits_per_character_use_each_splits_own_characters_per_token(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(300))
    text += "".join(chr(65 + i % 26) * 20 + "\n" for i in range(80))  # never seen in training
    dm = module(tmp_path, text, tokenizer=ByteBPETokenizer(vocab_size=300, min_freq=2))
    texts = split_texts(dm)
    assert "".join(texts.values()) == text
    for split, tokens in dm.splits.items():
        assert dm.chars_per_token[split] == pytest.approx(len(texts[split]) / len(tokens))
    # the code trained the tokenizer, so the held-out capitals are about a byte a token
    assert dm.chars_per_token["val"] < 1.1 and dm.chars_per_token["test"] < 1.1
    assert dm.chars_per_token["train"] > 2.0
    assert dm.describe().chars_per_token == dm.chars_per_token


def test_the_tokenizer_is_trained_on_the_train_split_alone(tmp_path):
    dm = module(tmp_path, TEXT + "Z\n" * 10)  # "Z" only in the held-out end of the text
    assert "Z" not in dm.tokenizer.vocab and "l" in dm.tokenizer.vocab
    assert dm.tokenizer.unk_id in dm.splits["test"]


def test_the_cache_is_reused_and_keyed_by_tokenizer_split_and_format(tmp_path, monkeypatch):
    first = module(tmp_path)
    folder = first.cache_folder
    stamp = (folder / "train.bin").stat().st_mtime_ns
    second = module(tmp_path)
    assert second.cache_folder == folder
    assert (folder / "train.bin").stat().st_mtime_ns == stamp  # not rewritten
    other = module(tmp_path, tokenizer=ByteBPETokenizer(vocab_size=300))
    assert other.cache_folder != folder
    assert other.chars_per_token["train"] > 1.0
    assert module(tmp_path, test_fraction=0.1).cache_folder != folder
    monkeypatch.setattr(lm, "FORMAT", lm.FORMAT + 1)
    assert module(tmp_path).cache_folder != folder


def test_the_cache_is_found_from_the_files_stat_not_their_text(tmp_path, monkeypatch):
    folder = module(tmp_path).cache_folder
    monkeypatch.setattr(LMDataModule, "_texts", lambda *args: pytest.fail("read the text"))
    assert module(tmp_path, setup=False)._find_cache() == folder
    monkeypatch.undo()
    corpus = tmp_path / "corpus.txt"
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    assert module(tmp_path, setup=False)._find_cache() != folder  # touched: built again
    changed = module(tmp_path, text=TEXT.replace("fox", "cat"))
    assert changed.cache_folder != folder and "cat" in split_texts(changed)["train"]


@pytest.mark.parametrize("batch", [1, 3])
def test_the_ids_do_not_depend_on_how_many_pieces_are_encoded_at_once(tmp_path, batch):
    text = "".join(f"{i} " * (i % 7) + "\n" for i in range(3000))
    tokenizer = ByteBPETokenizer(vocab_size=300).fit([text])
    pieces = [(0, text[i:i + 997]) for i in range(0, len(text), 997)]
    folder = tmp_path / str(batch)
    folder.mkdir()
    write_tokens(tokenizer, pieces, folder, batch=batch)
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16).tolist()
    assert ids == [i for _, piece in pieces for i in tokenizer.encode(piece)]


def test_prepare_data_builds_the_cache_and_setup_only_reads_it(tmp_path, monkeypatch):
    dm = module(tmp_path, setup=False)
    dm.prepare_data()
    meta = json.loads((dm.cache_folder / "meta.json").read_text())
    assert meta["format"] == lm.FORMAT and sum(s["chars"] for s in meta["splits"].values()) \
        == len(TEXT)
    reader = module(tmp_path, setup=False)
    monkeypatch.setattr(LMDataModule, "_build_cache", lambda *args: pytest.fail("rebuilt"))
    reader.setup()
    assert reader.cache_folder == dm.cache_folder and len(reader.splits["val"]) > 0


def test_the_cache_folder_appears_whole_and_a_second_builder_keeps_the_first(tmp_path):
    dm = module(tmp_path)
    folder = dm.cache_folder
    stamp = (folder / "meta.json").stat().st_mtime_ns
    dm._build_cache(dm._paths(), folder)  # as a process that lost the race would
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    assert sorted(os.listdir(folder.parent)) == [folder.name]  # no temporary left behind
    assert sorted(os.listdir(folder)) == ["meta.json", "test.bin", "tokenizer.json",
                                          "train.bin", "val.bin"]


def test_load_from_uses_a_runs_saved_tokenizer(tmp_path):
    trained = module(tmp_path, tokenizer=ByteBPETokenizer(vocab_size=300))
    run = tmp_path / "run"
    run.mkdir()
    trained.save(run)
    loaded = module(tmp_path, tokenizer=CharTokenizer(), load_from=str(run))
    assert loaded.tokenizer.vocab == trained.tokenizer.vocab
    assert np.array_equal(loaded.splits["test"], trained.splits["test"])
    with pytest.raises(DataError, match="no saved tokenizer"):
        module(tmp_path, load_from=str(tmp_path / "missing"))


@pytest.mark.parametrize("fractions", [(0.0, 0.05), (0.1, 0.0), (0.5, 0.5)])
def test_held_out_fractions_out_of_range_are_a_clear_error(tmp_path, fractions):
    with pytest.raises(LmlabError, match="must each be above 0 and together below 1"):
        module(tmp_path, val_fraction=fractions[0], test_fraction=fractions[1])


def test_blocks_are_shifted_by_one():
    blocks = Blocks(np.arange(100, dtype=np.uint16), block_size=8)
    item = blocks[10]
    assert item["tokens"].tolist() == list(range(10, 18))
    assert item["targets"].tolist() == list(range(11, 19))
    assert len(blocks) == 92


def test_random_offsets_are_seeded_per_epoch_and_shared_out_among_ranks():
    sampler = RandomOffsets(1000, num_batches=5, batch_size=4, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and len(first) == len(sampler) == 20
    assert list(RandomOffsets(1000, 5, 4, seed=3)) == first
    ranks = [list(RandomOffsets(1000, 5, 4, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [10, 10]
    for step in range(5):  # each global batch is split between the two ranks
        share = ranks[0][2 * step:2 * step + 2] + ranks[1][2 * step:2 * step + 2]
        assert sorted(share) == sorted(first[4 * step:4 * step + 4])


def test_an_epochs_offsets_do_not_depend_on_the_epochs_drawn_before():
    uninterrupted = RandomOffsets(1000, 5, 4, seed=3)
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        drawn = list(uninterrupted)
    resumed = RandomOffsets(1000, 5, 4, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == drawn


class FirstTokens(L.LightningModule):
    """Records the first token of every training block it sees, by epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = {}

    def training_step(self, batch, index):
        self.seen.setdefault(self.current_epoch, []).append(batch["tokens"][:, 0].tolist())
        return self.weight * batch["weight"].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_resumed_run_trains_on_the_blocks_an_uninterrupted_run_would(tmp_path):
    def fit(epochs, ckpt_path=None):
        dm, task = module(tmp_path, val_fraction=0.1, train_batches=3), FirstTokens()
        trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        return task.seen, trainer

    uninterrupted, _ = fit(3)
    _, first_two = fit(2)
    first_two.save_checkpoint(tmp_path / "two.ckpt")
    resumed, _ = fit(3, str(tmp_path / "two.ckpt"))
    assert list(resumed) == [2] and resumed[2] == uninterrupted[2] != uninterrupted[0]


def test_validation_sweeps_non_overlapping_blocks_in_order(tmp_path):
    dm = module(tmp_path)
    batches = list(dm.val_dataloader())
    val = dm.splits["val"]
    assert batches[0]["tokens"][1].tolist() == val[16:32].astype(int).tolist()
    weights = torch.cat([b["weight"] for b in batches])
    assert weights.dtype == torch.float32
    assert weights.sum() == len(range(0, len(val) - 16, 16))


def test_a_limited_sweep_draws_its_blocks_from_the_whole_split(tmp_path):
    """Round 2: `val_batches` took the split's first blocks; now a fixed sample of all."""
    dm = module(tmp_path, batch_size=4, val_batches=3)
    dm.splits["val"] = np.arange(16 * 100 + 1)  # 100 blocks, each starting with its offset
    starts = [s for b in dm.val_dataloader() for s in b["tokens"][:, 0].tolist()]
    again = [s for b in dm.val_dataloader() for s in b["tokens"][:, 0].tolist()]
    assert starts == again == sorted(starts) and len(set(starts)) == 12
    assert max(starts) > 16 * 50  # not merely the first 12 blocks (0 .. 176)


def sweep_by_rank(dm, split, world):
    return [list(dm._sweep(split, (world, rank))) for rank in range(world)]


def test_every_rank_sweeps_as_many_equal_batches_and_each_block_counts_once(tmp_path):
    dm = module(tmp_path, batch_size=6)
    dm.splits["val"] = np.arange(16 * 13 + 16 + 1)  # 14 blocks: odd, and not a multiple of 6
    ranks = sweep_by_rank(dm, "val", 3)
    shapes = [[tuple(b["tokens"].shape) for b in batches] for batches in ranks]
    assert shapes[0] == shapes[1] == shapes[2] == [(2, 16)] * 3
    real = [start for batches in ranks for b in batches
            for start, w in zip(b["tokens"][:, 0].tolist(), b["weight"].tolist()) if w == 1.0]
    assert sorted(real) == list(range(0, 16 * 14, 16))
    assert sum(b["weight"].tolist().count(0.0) for batches in ranks for b in batches) == 4


@needs_data
def test_uneven_validation_shards_case_gives_both_ranks_the_same_batches(tmp_path):
    # the case's input: the first 4,300 characters of tiny-shakespeare, char level,
    # block 32, global batch 12 on 2 devices (the ranks' shares differed, and FSDP hung)
    text = (DATA_DIR / "lm" / "tinyshakespeare.txt").read_text()[:4300]
    dm = module(tmp_path, text, block_size=32, batch_size=12, val_batches=100)
    blocks = len(range(0, len(dm.splits["val"]) - 32, 32))
    ranks = sweep_by_rank(dm, "val", 2)
    assert [[len(b["weight"]) for b in batches] for batches in ranks] == [[6] * 2, [6] * 2]
    assert sum(b["weight"].sum() for batches in ranks for b in batches) == blocks


def test_training_epoch_has_the_configured_number_of_batches(tmp_path):
    dm = module(tmp_path)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and batches[0]["tokens"].shape == (4, 16)
    assert all(b["weight"].tolist() == [1.0] * 4 for b in batches)


def test_files_accept_globs(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(TEXT[:5000])
    dm = module(tmp_path, files=str(tmp_path / "?.txt"))
    assert sum(len(tokens) for tokens in dm.splits.values()) == 10000


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
    assert sum(len(tokens) for tokens in dm.splits.values()) == 1_115_394
    assert dm.chars_per_token == {"train": 1.0, "val": 1.0, "test": 1.0}


class StopsAfter:
    """`Tokenizer.encode_batch` that counts its calls and, from call `stop` on, raises
    KeyboardInterrupt (a build stopped by Ctrl-C or a dead job); `method` goes on the class."""

    ENCODE = Tokenizer.encode_batch  # the real one, whatever a test has patched in since

    def __init__(self, stop: int | None):
        self.calls, self.stop, encode = 0, stop, StopsAfter.ENCODE

        def method(tokenizer, texts, special_tokens=True):
            if self.stop is not None and self.calls >= self.stop:
                raise KeyboardInterrupt
            self.calls += 1
            return encode(tokenizer, texts, special_tokens)

        self.method = method


def test_an_interrupted_build_resumes_where_its_record_ends(tmp_path, monkeypatch):
    text = "".join(path.read_text() for path in stdlib_source_files()[:40])[:120_000]
    assert len(text) == 120_000
    monkeypatch.setattr(lm, "CHUNK_CHARS", 2_000)  # about 60 pieces, 4 to a batch
    monkeypatch.setattr(lm, "write_tokens", functools.partial(write_tokens, batch=4))
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
    uninterrupted = StopsAfter(None)
    monkeypatch.setattr(Tokenizer, "encode_batch", uninterrupted.method)
    whole = module(tmp_path / "whole", text, tokenizer=ByteBPETokenizer(vocab_size=300))
    stopped = StopsAfter(5)
    monkeypatch.setattr(Tokenizer, "encode_batch", stopped.method)
    with pytest.raises(KeyboardInterrupt):
        module(tmp_path / "resumed", text, tokenizer=ByteBPETokenizer(vocab_size=300))
    partial = next((tmp_path / "resumed" / "cache").glob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["pieces"] == 5 * 4
    with open(partial / "train.bin", "ab") as f:  # a kill after a write, before its record
        f.write(b"\x07" * 1_000_000)  # longer than what the rest of the build writes
    resumed = StopsAfter(None)
    monkeypatch.setattr(Tokenizer, "encode_batch", resumed.method)
    again = module(tmp_path / "resumed", text, tokenizer=ByteBPETokenizer(vocab_size=300))
    assert uninterrupted.calls > 10
    assert resumed.calls == uninterrupted.calls - 5  # the first 5 batches not encoded again
    for split in ("train", "val", "test"):
        assert np.array_equal(again.splits[split], whole.splits[split])
    assert again.counts == whole.counts
    assert not list((tmp_path / "resumed" / "cache").glob("*.partial"))
