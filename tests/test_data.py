import gzip
import json
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.data import _set_sampler_epoch

from lmlab.data.batching import BucketBatchSampler
from lmlab.data.classification import ClassificationDataModule
from lmlab.data.corpora import STDLIB_PACKAGES, stdlib_docstrings
from lmlab.data.tokenizers import WordTokenizer
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, ROOT, needs_data

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


def indices(sampler, real_only: bool = False) -> list[list[int]]:
    """One epoch of a sampler, as the example indices of each batch."""
    return [[i for i, real in batch if real or not real_only] for batch in sampler]


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
    assert set(batch) == {"tokens", "lengths", "labels", "weight"}
    assert batch["weight"].tolist() == [1.0] * len(batch["labels"])  # one process: no padding
    assert batch["tokens"].shape == (len(batch["labels"]), int(batch["lengths"].max()))
    assert 0 < len(batch["labels"]) <= 4


def test_missing_splits_are_carved_reproducibly(tmp_path):
    train = str(write(tmp_path / "train.csv", "csv"))
    a = module({"train": train}, val_fraction=0.25, test_fraction=0.25, seed=3)
    b = module({"train": train}, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert [len(a.datasets[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    for split in ("train", "val", "test"):
        tokens = [[ex["tokens"].tolist() for ex in dm.datasets[split]] for dm in (a, b)]
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
    first = indices(sampler)
    sampler.set_epoch(1)
    second = indices(sampler)
    assert sorted(i for b in first for i in b) == list(range(103))
    assert first != second  # a new order each epoch
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first]
    assert sum(spread) / len(spread) < 10  # batches hold similar lengths


def test_bucket_sampler_splits_each_global_batch_across_ranks():
    lengths = list(range(1, 52))
    single = indices(BucketBatchSampler(lengths, 4, shuffle=True, seed=0))
    ranks = [indices(BucketBatchSampler(lengths, 4, shuffle=True, seed=0, num_replicas=2, rank=r),
                     real_only=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 13
    for whole, zero, one in zip(single, *ranks):
        assert sorted(zero + one) == sorted(whole)  # the same real examples at every step


def test_evaluation_batches_hold_similar_lengths_and_every_example_once():
    lengths = [5, 1, 9, 3, 7]
    batches = list(BucketBatchSampler(lengths, 2, shuffle=False))
    assert sorted(batches) == [[(0, True), (4, True)], [(1, True), (3, True)], [(2, True)]]


def test_a_limited_evaluation_scores_a_fixed_sample_of_every_length_not_the_shortest():
    """Round 2: evaluation batches were sorted by length, so `trainer.limit_val_batches`
    scored the shortest sentences only."""
    lengths = torch.randint(1, 200, (2000,), generator=torch.Generator().manual_seed(3))
    first = [i for batch in indices(BucketBatchSampler(lengths.tolist(), 20, shuffle=False,
                                                       seed=0))[:20] for i in batch]
    sample, shortest = lengths[first].float(), lengths.sort()[0][:400].float()
    assert abs(sample.mean() - lengths.float().mean()) < 0.1 * lengths.float().mean()
    assert sample.mean() > 2 * shortest.mean()  # the earlier order's sample


@needs_data
@pytest.mark.parametrize("corpus,sizes,classes", [
    ("sst2", (6920, 872, 1821), 2), ("trec", (4907, 545, 500), 6),
    ("ag_news", (6080, 760, 760), 4)])
def test_named_corpora_load_from_the_data_dir(corpus, sizes, classes):
    dm = ClassificationDataModule(WordTokenizer(), corpus=corpus, data_dir=str(DATA_DIR))
    dm.setup()
    assert tuple(len(dm.datasets[s]) for s in ("train", "val", "test")) == sizes
    assert dm.num_classes == classes


# -- data faults, found in setup ----------------------------------------------------------

CASES = ROOT.parent / "shared" / "cases"
needs_cases = pytest.mark.skipif(not (CASES / "README.md").is_file(),
                                 reason=f"the failing-cases folder {CASES} is not present")
WORDS3 = {split: str(CASES / "words3" / f"{split}.csv") for split in ("train", "val", "test")}


@needs_cases
@pytest.mark.parametrize("split", ["val", "test"])
def test_empty_split_names_the_file_and_offers_carving(split):
    files = {**WORDS3, split: str(CASES / "empty_split.csv")}
    pattern = rf"empty_split.csv: the {split} split has no records.*remove data.files.{split}"
    with pytest.raises(DataError, match=f"(?s){pattern}"):
        module(files)


def test_file_without_lines_is_an_empty_split(tmp_path):
    (tmp_path / "test.jsonl").write_text("")
    train = write(tmp_path / "train.csv", "csv")
    with pytest.raises(DataError, match=r"test.jsonl: the test split has no records"):
        module({"train": str(train), "test": str(tmp_path / "test.jsonl")})


@needs_cases
def test_empty_labels_stop_the_run_by_default_at_the_first_one():
    files = {"train": str(CASES / "empty_labels.jsonl")}
    with pytest.raises(DataError, match=r"(?s)empty_labels.jsonl:6: missing or empty field\(s\) "
                                        r"\['section'\].*data.on_bad_record=skip"):
        module(files, text_field="document", label_field="section")


@needs_cases
def test_empty_labels_skipped_on_request_with_one_warning(caplog):
    files = {"train": str(CASES / "empty_labels.jsonl")}
    with caplog.at_level(logging.WARNING):
        dm = module(files, text_field="document", label_field="section", on_bad_record="skip")
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == 21
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 in " in warnings[0]
    assert all(f"empty_labels.jsonl:{line}" in warnings[0] for line in (6, 14, 21))


@needs_cases
def test_on_bad_record_is_a_data_config_key(make_cfg):
    cfg = make_cfg("data=files", f"data.files.train={CASES / 'empty_labels.jsonl'}",
                   "data.text_field=document", "data.label_field=section",
                   "data.on_bad_record=skip")
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.labels and len(dm.datasets["train"]) + len(dm.datasets["val"]) < 21


def test_unknown_bad_record_policy_fails_at_construction():
    with pytest.raises(LmlabError, match="on_bad_record='drop'"):
        ClassificationDataModule(WordTokenizer(), on_bad_record="drop")


@needs_cases
def test_byte_order_mark_and_literal_tsv_quotes_load_every_row():
    for path, rows in ((CASES / "excel_bom.csv", 180), (CASES / "unclosed_quote.tsv", 60)):
        dm = module({"train": str(path)})
        assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == rows


def test_unknown_split_name_is_refused(tmp_path):
    train = str(write(tmp_path / "train.csv", "csv"))
    with pytest.raises(LmlabError, match="data.files.dev is not a split"):
        module({"train": train, "dev": train})


def test_too_small_to_carve_is_refused(tmp_path):
    train = write(tmp_path / "train.txt", "label_text", ROWS[:2])
    with pytest.raises(LmlabError, match="has 2 record"):
        module({"train": str(train)})


def test_line_aligned_files_can_hold_texts_and_labels(tmp_path):
    texts = tmp_path / "train.txt"
    texts.write_text("".join(f"{t}\n" for t, _ in ROWS))
    labels = tmp_path / "train.labels"
    labels.write_text("".join(f"{y}\n" for _, y in ROWS))
    dm = module({"train": {"text": str(texts), "label": str(labels)}})
    assert dm.labels == ["neg", "pos"]
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == len(ROWS)


def test_files_config_usage_lines_compose(make_cfg, tmp_path):
    text = (ROOT / "conf" / "data" / "files.yaml").read_text()
    command = text.splitlines()[0].split("python -m lmlab.run ")[1]
    assert dict(make_cfg(*command.split()).data.files) == {"train": "train.csv",
                                                             "test": "test.csv"}
    aligned = re.search(r"data.files.train='(.*)'", text).group(1)
    assert aligned == "{text: train.txt, label: train.labels}"
    for name, column in (("train.txt", 0), ("train.labels", 1)):
        (tmp_path / name).write_text("".join(f"{row[column]}\n" for row in ROWS))
    cfg = make_cfg("data=files", f"data.files.train={aligned}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)  # the usage line names files relative to the working directory
        dm = instantiate(cfg.data)
        dm.setup()
    assert dm.labels == ["neg", "pos"]


# -- every rank the same batches; padding weighted out ------------------------------------

@pytest.mark.parametrize("examples,batch,world", [(29, 4, 2), (29, 4, 3), (29, 6, 3),
                                                  (7, 4, 3), (24, 4, 2), (2, 2, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_rank_gets_equal_batches_and_each_example_counts_once(examples, batch, world,
                                                                    shuffle):
    lengths = torch.randint(1, 30, (examples,), generator=torch.Generator().manual_seed(0))
    ranks = [list(BucketBatchSampler(lengths.tolist(), batch, shuffle, seed=1,
                                     num_replicas=world, rank=r)) for r in range(world)]
    sizes = [[len(b) for b in batches] for batches in ranks]
    assert all(s == sizes[0] for s in sizes)  # as many batches, as many examples in each
    assert len(sizes[0]) == -(-examples // batch)
    real = [i for batches in ranks for b in batches for i, weight in b if weight > 0]
    assert sorted(real) == list(range(examples))


@pytest.mark.parametrize("examples,batch,world", [(29, 4, 2), (29, 4, 3), (7, 4, 3),
                                                  (2, 2, 4)])
def test_weighted_rank_means_averaged_over_ranks_are_the_global_batch_mean(examples, batch,
                                                                          world):
    losses = torch.rand(examples, generator=torch.Generator().manual_seed(0))
    ranks = [list(BucketBatchSampler([5] * examples, batch, True, seed=1, num_replicas=world,
                                     rank=r)) for r in range(world)]
    for step in zip(*ranks):  # one global batch: what DDP's gradient average sees
        ddp = sum(torch.tensor([w * losses[i] for i, w in items]).mean()
                  for items in step) / world
        real = [i for items in step for i, w in items if w > 0]
        assert float(ddp) == pytest.approx(float(losses[real].mean()), rel=1e-6)


@needs_cases
def test_duplicated_eval_examples_are_weighted_out_under_ddp():
    dm = module({"train": WORDS3["train"], "test": str(CASES / "test29.csv")})
    counted = []
    for rank in (0, 1):
        dm.world = lambda rank=rank: (2, rank)
        batches = list(dm.test_dataloader())
        assert len(batches) == 8
        for batch in batches:
            assert batch["weight"].dtype == torch.float32
            assert batch["weight"].shape == batch["labels"].shape
            counted += [tuple(x[:n].tolist()) for x, n, w in
                        zip(batch["tokens"], batch["lengths"], batch["weight"]) if w > 0]
    assert sorted(counted) == sorted(tuple(ex["tokens"].tolist()) for ex in dm.datasets["test"])
    assert len(counted) == 29


# -- resume: the epoch comes from Lightning, not from a counter ---------------------------

def test_training_order_depends_on_the_epoch_alone():
    lengths = torch.randint(1, 30, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    fresh = BucketBatchSampler(lengths, 4, shuffle=True, seed=3)
    fresh.set_epoch(2)
    replayed = BucketBatchSampler(lengths, 4, shuffle=True, seed=3)
    for epoch in (0, 1):
        replayed.set_epoch(epoch)
        list(replayed)
    replayed.set_epoch(2)
    assert list(fresh) == list(replayed)
    assert list(fresh) == list(fresh)  # only set_epoch moves the epoch, not iterating
    fresh.set_epoch(0)
    assert list(fresh) != list(replayed)


def test_lightning_sets_the_epoch_of_the_bucket_sampler(tmp_path):
    dm = module({"train": str(write(tmp_path / "train.csv", "csv"))})
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 5)
    assert loader.batch_sampler.epoch == 5


class BatchRecorder(L.LightningModule):
    """Records the token batches of each training epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list] = {}

    def training_step(self, batch, index):
        self.seen.setdefault(self.current_epoch, []).append(batch["tokens"].tolist())
        return self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, epochs: int, ckpt_path=None, save=None) -> BatchRecorder:
    model = BatchRecorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_sees_the_batches_of_its_epoch(tmp_path, workers):
    train = str(write(tmp_path / "train.csv", "csv", ROWS * 2))
    make = lambda: module({"train": train}, num_workers=workers)  # noqa: E731
    whole = fit(make(), epochs=3)
    fit(make(), epochs=2, save=tmp_path / "two.ckpt")
    resumed = fit(make(), epochs=3, ckpt_path=tmp_path / "two.ckpt")
    assert list(resumed.seen) == [2]
    assert resumed.seen[2] == whole.seen[2]
    assert whole.seen[2] != whole.seen[0]
