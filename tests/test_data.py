import gzip
import json
from pathlib import Path

import pytest
import torch

from lmlab.data.batching import BucketBatchSampler
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.corpora import STDLIB_PACKAGES, stdlib_docstrings
from lmlab.data.tokenizers import WordTokenizer
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, needs_data

ROWS = [("a good film", "pos"), ("a bad film", "neg"), ("truly great", "pos"),
        ("truly awful", "neg"), ("great fun", "pos"), ("dull and slow", "neg")] * 4


def write(path: Path, fmt: str, rows=ROWS) -> Path:
    if fmt == "csv":
        lines = ["label,text"] + [f'{y},"{t}"' for t, y in rows]
    elif fmt == "tsv":
        lines = ["text\tlabel"] + [f"{t}\t{y}" for t, y in rows]
    elif fmt == "jsonl":
        lines = [json.dumps({"text": t, "label": y}) for t, y in rows]
    else:
        lines = [f"{y} {t}" for t, y in rows]
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def module(files, **kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule(WordTokenizer(), corpus=None, files=files, batch_size=4,
                                  **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("name,fmt", [("train.csv", "csv"), ("train.tsv", "tsv"),
                                      ("train.jsonl", "jsonl"), ("train.txt", "label_text"),
                                      ("train.jsonl.gz", "jsonl"), ("train.csv.gz", "csv")])
def test_each_file_format_loads(tmp_path, name, fmt):
    dm = module({"train": str(write(tmp_path / name, fmt)),
                 "test": str(write(tmp_path / f"test{name[5:]}", fmt, ROWS[:6]))})
    assert dm.labels == ["neg", "pos"]
    assert len(dm.datasets["test"]) == 6
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == len(ROWS)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "lengths", "labels"}
    assert batch["tokens"].shape == (len(batch["labels"]), int(batch["lengths"].max()))
    assert 0 < len(batch["labels"]) <= 4


def test_missing_splits_are_carved_reproducibly(tmp_path):
    train = str(write(tmp_path / "train.csv", "csv"))
    a = module({"train": train}, val_fraction=0.25, test_fraction=0.25, seed=3)
    b = module({"train": train}, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert [len(a.datasets[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    for split in ("train", "val", "test"):
        tokens = [[x.tolist() for x, _ in dm.datasets[split]] for dm in (a, b)]
        assert tokens[0] == tokens[1]


@pytest.mark.parametrize("name,content,expected", [
    ("bad.txt", "pos a good film\nneg\npos fine\n", r"bad.txt:2: expected `LABEL<space>text`"),
    ("bad.jsonl", '{"text": "ok", "label": "pos"}\n{"text": "oo', r"bad.jsonl:2: not valid JSON"),
    ("bad.csv", "label,text\npos,fine\n,no label\n", r"bad.csv:3: missing or empty .*\['label'\]"),
    ("bad.tsv", "body\tlabel\nfine\tpos\n", r"bad.tsv:2: missing or empty .*\['text'\]"),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        module({"train": str(path)})


def test_unknown_test_label_names_file_and_line(tmp_path):
    train = write(tmp_path / "train.txt", "label_text")
    test = tmp_path / "test.txt"
    test.write_text("pos nice\nneutral meh\n")
    with pytest.raises(DataError, match=r"test.txt:2: label 'neutral' does not occur"):
        module({"train": str(train), "test": str(test)})


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"(?s)nope.csv: file not found.*LMLAB_DATA_DIR"):
        module({"train": str(tmp_path / "nope.csv")})


def test_unknown_corpus_lists_the_known_ones():
    dm = ClassificationDataModule(WordTokenizer(), corpus="imdb")
    with pytest.raises(LmlabError, match="known: stdlib_docs, sst2, trec, ag_news"):
        dm.setup()


def test_saved_tokenizer_and_labels_are_reused(tmp_path):
    train = str(write(tmp_path / "train.csv", "csv"))
    first = module({"train": train})
    first.save(tmp_path)
    other = write(tmp_path / "other.csv", "csv", [("a good film", "pos"), ("zebra", "neg")] * 3)
    second = module({"train": str(other)}, load_from=str(tmp_path))
    assert second.tokenizer.vocab == first.tokenizer.vocab
    assert second.labels == first.labels


def test_embedded_corpus_is_real_deterministic_and_balanced():
    examples = stdlib_docstrings()
    assert examples == stdlib_docstrings()
    labels = {label for _, label in examples}
    assert labels == set(STDLIB_PACKAGES)
    assert max(sum(1 for _, y in examples if y == p) for p in labels) <= 300
    assert all(len(text.split()) >= 5 for text, _ in examples)
    assert any("event loop" in text for text, y in examples if y == "asyncio")


def test_bucket_sampler_covers_every_example_once_per_epoch():
    lengths = torch.randint(1, 50, (103,)).tolist()
    sampler = BucketBatchSampler(lengths, batch_size=8, shuffle=True, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(i for b in first for i in b) == list(range(103))
    assert first != second  # a new order each epoch
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first]
    assert sum(spread) / len(spread) < 10  # batches hold similar lengths


def test_bucket_sampler_splits_each_global_batch_across_ranks():
    lengths = list(range(1, 52))
    single = list(BucketBatchSampler(lengths, 4, shuffle=True, seed=0))
    ranks = [list(BucketBatchSampler(lengths, 4, shuffle=True, seed=0, num_replicas=2, rank=r))
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 13
    for whole, zero, one in zip(single, *ranks):
        assert sorted(zero + one) == sorted(whole)  # the same examples at every step
    assert ranks[0][-1] and ranks[1][-1]  # the 3-example tail batch still feeds both ranks


def test_evaluation_order_is_sorted_and_complete():
    lengths = [5, 1, 9, 3, 7]
    batches = list(BucketBatchSampler(lengths, 2, shuffle=False))
    assert batches == [[1, 3], [0, 4], [2]]


@needs_data
@pytest.mark.parametrize("corpus,sizes,classes", [
    ("sst2", (6920, 872, 1821), 2), ("trec", (4907, 545, 500), 6),
    ("ag_news", (6080, 760, 760), 4)])
def test_named_corpora_load_from_the_data_dir(corpus, sizes, classes):
    dm = ClassificationDataModule(WordTokenizer(), corpus=corpus, data_dir=str(DATA_DIR))
    dm.setup()
    assert tuple(len(dm.datasets[s]) for s in ("train", "val", "test")) == sizes
    assert dm.num_classes == classes
