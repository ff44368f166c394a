import functools
import gzip
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lmlab.data.corpora import SUMMARY_SOURCE_CHARS, first_sentence, stdlib_summaries
from lmlab.data.seq2seq import Seq2SeqDataModule
from lmlab.data.tokenizers import ByteBPETokenizer, WordTokenizer
from lmlab.errors import DataError, LmlabError

from conftest import DATA_DIR, ROOT, needs_data

PAIRS = [("a small dog runs", "ein kleiner hund rennt"), ("the cat sleeps", "die katze schläft"),
         ("a man reads a book", "ein mann liest ein buch"),
         ("two children play in the park", "zwei kinder spielen im park"),
         ("the woman sings", "die frau singt"), ("a red car", "ein rotes auto")] * 4


def write_pairs(folder: Path, stem: str, pairs=PAIRS) -> dict[str, str]:
    """Line-aligned `stem.en.gz` + `stem.de.gz`, as Multi30k ships them."""
    files = {}
    for side, column in (("source", 0), ("target", 1)):
        path = folder / f"{stem}.{('en', 'de')[column]}.gz"
        with gzip.open(path, "wt") as f:
            f.write("".join(f"{pair[column]}\n" for pair in pairs))
        files[side] = str(path)
    return files


def write_tsv(path: Path, pairs=PAIRS, header="source\ttarget") -> str:
    path.write_text("\n".join([header] + [f"{s}\t{t}" for s, t in pairs]) + "\n")
    return str(path)


def module(files, tokenizer=None, **kwargs) -> Seq2SeqDataModule:
    dm = Seq2SeqDataModule(tokenizer or ByteBPETokenizer(vocab_size=300, min_freq=1),
                           corpus=None, files=files, batch_size=4, **kwargs)
    dm.setup()
    return dm


def decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist())


# -- named corpora ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> str:
    """A run folder with a small joint tokenizer, so the real corpora load without fitting
    one on them (fitting is tested on small files below)."""
    folder = tmp_path_factory.mktemp("run")
    WordTokenizer().fit([text for pair in PAIRS for text in pair]).save(folder / "tokenizer.json")
    return str(folder)


@functools.cache
def named(corpus: str, small_run: str, **settings) -> Seq2SeqDataModule:
    """A named corpus, set up once per test session (the larger ones take seconds)."""
    dm = Seq2SeqDataModule(ByteBPETokenizer(), corpus=corpus, data_dir=str(DATA_DIR),
                           load_from=small_run, **settings)
    dm.setup()
    return dm


@needs_data
@pytest.mark.parametrize("corpus,settings,sizes,fields", [
    ("multi30k", {"source_lang": "en", "target_lang": "de"}, (29_000, 1_014, 1_000),
     ("en", "de")),
    ("multi30k", {"source_lang": "de", "target_lang": "en"}, (29_000, 1_014, 1_000),
     ("de", "en")),
    ("debian_ddtp", {"source_lang": "en", "target_lang": "de", "description": "long"},
     (3_600, 200, 200), ("en_long", "de_long")),
    ("aeslc", {}, (14_436, 1_960, 1_906), ("email", "subject")),
    ("debian_desc", {}, (4_500, 250, 250), ("document", "summary")),
])
def test_named_corpora_load_from_the_data_dir(small_run, corpus, settings, sizes, fields):
    dm = named(corpus, small_run, **settings)
    assert tuple(len(dm.datasets[s]) for s in ("train", "val", "test")) == sizes
    assert (dm.source_field, dm.target_field) == fields
    assert all(len(dm.sources(s)) == len(dm.references(s)) == n
               for s, n in zip(("train", "val", "test"), sizes))
    assert all("\n" not in text for text in dm.sources("test"))  # one line each


@needs_data
def test_multi30k_direction_follows_the_languages(small_run):
    def first_test_pair(source_lang, target_lang):
        dm = named("multi30k", small_run, source_lang=source_lang, target_lang=target_lang)
        return dm.sources("test")[0], dm.references("test")[0]

    english = "A man in an orange hat starring at something."
    german = "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
    assert first_test_pair("en", "de") == (english, [german])
    assert first_test_pair("de", "en") == (german, [english])


@needs_data
def test_aeslc_keeps_the_three_human_subject_lines_as_extra_references(small_run):
    dm = named("aeslc", small_run)
    first = json.loads(gzip.open(DATA_DIR / "summarization/aeslc/test.jsonl.gz", "rt").readline())
    references = dm.references("test")
    assert references[0] == [first[k] for k in ("subject", "ann0", "ann1", "ann2")]
    assert all(len(refs) == 4 for refs in references + dm.references("val"))
    assert all(len(refs) == 1 for refs in dm.references("train"))  # train has no annotations


@pytest.mark.parametrize("setting,value", [("source_lang", "fr"), ("target_lang", None),
                                           ("description", "medium")])
def test_unknown_language_or_description_fails_at_construction(setting, value):
    settings = {"source_lang": "en", "target_lang": "de", "description": "short",
                setting: value}
    with pytest.raises(LmlabError, match=rf"data.{setting}={value!r} .*debian_ddtp"):
        Seq2SeqDataModule(ByteBPETokenizer(), corpus="debian_ddtp", **settings)


def test_a_translation_into_its_own_language_fails_at_construction():
    with pytest.raises(LmlabError, match=r"both 'de'.*data.target_lang to another of"):
        Seq2SeqDataModule(ByteBPETokenizer(), corpus="multi30k", source_lang="de",
                          target_lang="de")


# -- the embedded corpus ------------------------------------------------------------------

def test_no_embedded_source_holds_a_summary():
    """A nested function's docstring is left out of its outer function's source too, or the
    outer example would carry another example's answer."""
    pairs = stdlib_summaries()
    sources = "\0".join(source for source, _ in pairs)
    leaks = [summary for _, summary in pairs if len(summary) > 40 and summary in sources]
    assert leaks == []


def test_embedded_corpus_is_deterministic_and_needs_no_data_dir(tmp_path):
    pairs = stdlib_summaries()  # the same pairs as each DataModule's below: deterministic
    assert 2_000 <= len(pairs) <= 5_000
    assert all(len(source) <= SUMMARY_SOURCE_CHARS and "\n" not in source
               for source, _ in pairs)
    dumps = [(s, t) for s, t in pairs if s.startswith("def dumps(obj, *, skipkeys=False")]
    assert len(dumps) == 1
    source, summary = dumps[0]
    assert summary == "Serialize ``obj`` to a JSON formatted ``str``."
    assert "Serialize" not in source  # the docstring is left out of the source
    splits, load_from = [], None
    for _ in range(2):  # the second run reuses the first one's tokenizers: reading only
        dm = Seq2SeqDataModule(WordTokenizer(), data_dir=str(tmp_path / "absent"), seed=1,
                               load_from=load_from)
        dm.setup()
        dm.save(tmp_path)
        load_from = str(tmp_path)
        splits.append({s: list(zip(dm.sources(s), dm.references(s))) for s in dm.datasets})
    assert splits[0] == splits[1]
    assert sorted(pair for split in splits[0].values() for pair in split) == \
        sorted((source, [summary]) for source, summary in pairs)


@pytest.mark.parametrize("docstring,sentence", [
    ("Return the value.  More here.", "Return the value."),
    ("Split the\n    path into parts\n\n    Details.", "Split the path into parts"),
    ("Use e.g. this one", "Use e.g. this one"),
])
def test_first_sentence_of_a_docstring(docstring, sentence):
    assert first_sentence(docstring) == sentence


# -- batches ------------------------------------------------------------------------------

def test_batch_holds_sources_framed_targets_weights_and_indices(tmp_path):
    dm = module({"train": write_pairs(tmp_path, "train"),
                 "test": write_pairs(tmp_path, "test", PAIRS[:6])})
    tok = dm.target_tokenizer
    seen = set()
    for batch in dm.test_dataloader():
        assert set(batch) == {"source", "source_lengths", "target", "target_lengths", "weight",
                              "index"}
        assert batch["index"].dtype == batch["source"].dtype == torch.long
        assert batch["weight"].dtype == torch.float32
        for i, index in enumerate(batch["index"].tolist()):
            source = batch["source"][i, :batch["source_lengths"][i]]
            target = batch["target"][i, :batch["target_lengths"][i]]
            assert target[0] == tok.bos_id and target[-1] == tok.eos_id
            assert tok.bos_id not in source and tok.eos_id not in source
            assert (batch["target"][i, batch["target_lengths"][i]:] == tok.pad_id).all()
            assert decode(dm.source_tokenizer, source) == dm.sources("test")[index]
            assert decode(tok, target) == dm.references("test")[index][0]
            seen.add(index)
    assert seen == set(range(6))
    assert dm.sources("test")[0] == PAIRS[0][0]


def test_batches_are_bucketed_by_the_longer_side(tmp_path):
    pairs = [("x", " ".join(["lang"] * n)) for n in range(1, 25)]  # lengths only in targets
    dm = module({"train": write_pairs(tmp_path, "train", pairs)}, val_fraction=0.5,
                tokenizer=WordTokenizer())
    lengths = [batch["target_lengths"].tolist() for batch in dm.val_dataloader()]
    assert [sorted(b) for b in lengths] == lengths  # sorted by target length
    assert max(lengths[0]) <= min(lengths[-1])


def test_truncation_keeps_the_eos(tmp_path):
    dm = module({"train": write_tsv(tmp_path / "train.tsv")}, tokenizer=WordTokenizer(),
                max_source_length=2, max_target_length=3)
    tok = dm.target_tokenizer
    examples = [ex for split in dm.datasets.values() for ex in split]
    assert all(len(ex["source"]) == 2 for ex in examples)  # every source has 2+ words
    assert all(ex["target"].tolist() == [tok.bos_id, ex["target"][1], tok.eos_id]
               for ex in examples)  # every target has 2+ words: <bos> y1 <eos>
    references = [r[0] for s in ("train", "val", "test") for r in dm.references(s)]
    assert max(len(r.split()) for r in references) == 5  # references stay whole


@pytest.mark.parametrize("lengths", [{"max_target_length": 2}, {"max_source_length": 0}])
def test_too_short_lengths_are_refused(lengths):
    with pytest.raises(LmlabError, match="too short"):
        Seq2SeqDataModule(ByteBPETokenizer(), **lengths)


@pytest.mark.parametrize("examples,batch,world", [(31, 4, 3), (7, 4, 3), (29, 6, 3)])
def test_three_ranks_get_equal_batches_and_count_each_example_once(tmp_path, examples, batch,
                                                                  world):
    pairs = [(f"{'word ' * (i % 7)}source {i}", f"target {i} {'wort ' * (i % 5)}")
             for i in range(examples)]
    dm = module({"train": write_tsv(tmp_path / "train.tsv", PAIRS),
                 "test": write_tsv(tmp_path / "test.tsv", pairs)})
    dm.batch_size = batch
    ranks = []
    for rank in range(world):
        dm.world = lambda rank=rank: (world, rank)
        ranks.append(list(dm.test_dataloader()))
    sizes = [[len(b["index"]) for b in batches] for batches in ranks]
    assert all(s == sizes[0] for s in sizes) and len(sizes[0]) == -(-examples // batch)
    real = [i for batches in ranks for b in batches
            for i, w in zip(b["index"].tolist(), b["weight"].tolist()) if w > 0]
    assert sorted(real) == list(range(examples))


# -- tokenizers: joint or separate, saved and reloaded ------------------------------------

def test_joint_vocabulary_is_saved_once_and_reloaded(tmp_path):
    files = {"train": write_pairs(tmp_path, "train")}
    first = module(files, tokenizer=WordTokenizer(), joint_vocab=True)
    description = first.describe()
    assert description.source_tokenizer is description.target_tokenizer is description.tokenizer
    assert description.joint_vocab
    unk = first.source_tokenizer.unk_id
    assert unk not in first.source_tokenizer.encode("katze")  # the target side's word
    run = tmp_path / "run"
    run.mkdir()
    first.save(run)
    assert sorted(p.name for p in run.iterdir()) == ["tokenizer.json"]
    second = module(files, tokenizer=WordTokenizer(max_size=3), joint_vocab=True,
                    load_from=str(run))
    assert second.source_tokenizer.vocab == first.source_tokenizer.vocab
    assert second.describe().joint_vocab
    assert [ex["target"].tolist() for ex in second.datasets["train"]] == \
        [ex["target"].tolist() for ex in first.datasets["train"]]


def test_separate_vocabularies_are_saved_as_two_files_and_reloaded(tmp_path):
    files = {"train": write_pairs(tmp_path, "train")}
    first = module(files, tokenizer=WordTokenizer(), joint_vocab=False,
                   target_tokenizer=WordTokenizer(max_size=5))
    description = first.describe()
    assert not description.joint_vocab
    assert description.tokenizer is description.target_tokenizer
    assert description.target_vocab_size == 5 + 4  # the target side's own settings
    assert description.source_vocab_size > description.target_vocab_size
    assert first.source_tokenizer.unk_id in first.source_tokenizer.encode("katze")
    run = tmp_path / "run"
    run.mkdir()
    first.save(run)
    assert sorted(p.name for p in run.iterdir()) == ["source_tokenizer.json",
                                                      "target_tokenizer.json"]
    second = module(files, tokenizer=WordTokenizer(), joint_vocab=False, load_from=str(run))
    assert second.source_tokenizer.vocab == first.source_tokenizer.vocab
    assert second.target_tokenizer.vocab == first.target_tokenizer.vocab
    assert second.tokenizer is second.target_tokenizer


def test_load_from_a_folder_without_tokenizers_names_it(tmp_path):
    with pytest.raises(DataError, match=r"(?s)empty: no tokenizer.json.*load_from"):
        module({"train": write_pairs(tmp_path, "train")}, load_from=str(tmp_path / "empty"))


def test_target_tokenizer_with_a_joint_vocabulary_is_refused():
    with pytest.raises(LmlabError, match="data.joint_vocab=false"):
        Seq2SeqDataModule(ByteBPETokenizer(), joint_vocab=True,
                          target_tokenizer=ByteBPETokenizer())


# -- bad input: one message naming the file and the line ----------------------------------

def test_pair_of_files_with_different_line_counts_names_both(tmp_path):
    files = write_pairs(tmp_path, "train")
    with gzip.open(files["target"], "at") as f:
        f.write("ein satz zu viel\n")
    with pytest.raises(DataError, match=r"train.de.gz:25: has no counterpart in .*train.en.gz: "
                                        r".* has 25 lines, .* has 24"):
        module({"train": files})


@pytest.mark.parametrize("name,content,expected", [
    ("empty.tsv", "source\ttarget\nhello\thallo\n\twelt\n",
     r"empty.tsv:3: missing or empty field\(s\) \['source'\]"),
    ("missing.jsonl", '{"source": "hello", "target": "hallo"}\n{"source": "world"}\n',
     r"missing.jsonl:2: missing or empty field\(s\) \['target'\].*data.source_field / "
     r"data.target_field"),
])
def test_empty_or_missing_side_names_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"(?s){expected}"):
        module({"train": str(tmp_path / name)})


def test_empty_line_in_aligned_files_names_file_and_line(tmp_path):
    files = write_pairs(tmp_path, "train", PAIRS[:3] + [("a dog", "")] + PAIRS[3:])
    with pytest.raises(DataError, match=r"train.de.gz:4: empty line \(field 'target'\)"):
        module({"train": files})


def test_extra_reference_fields_are_kept_where_a_record_has_them(tmp_path):
    rows = [{"doc": f"text number {i}", "sum": f"summary {i}", "alt": f"other {i}"}
            for i in range(12)]
    rows[1]["alt"] = ""
    del rows[2]["alt"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = module({"train": str(path), "test": str(path)}, source_field="doc",
                target_field="sum", reference_fields=["alt"])
    assert dm.references("test")[:3] == [["summary 0", "other 0"], ["summary 1"], ["summary 2"]]
    assert dm.sources("test")[0] == "text number 0"


def test_whitespace_runs_become_one_space(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"source": "line one\n  line\ttwo", "target": "a\nb"}) + "\n")
    dm = module({"train": str(path), "test": str(path), "val": str(path)})
    assert dm.sources("test") == ["line one line two"]
    assert dm.references("test") == [["a b"]]


# -- configs ------------------------------------------------------------------------------

def usage(name: str) -> list[list[str]]:
    """The example command lines of a data config's comments, as override lists."""
    text = (ROOT / "conf" / "data" / f"{name}.yaml").read_text()
    return [line.split("python -m lmlab.run ")[1].split()
            for line in text.splitlines() if "python -m lmlab.run " in line]


def test_translation_files_usage_lines_read_one_file_or_a_pair(make_cfg, tmp_path):
    one_file, pair = usage("translation_files")
    write_tsv(tmp_path / "train.tsv")
    for name, column in (("train.en", 0), ("train.de", 1)):
        (tmp_path / name).write_text("".join(f"{row[column]}\n" for row in PAIRS))
    loaded = []
    for overrides in (one_file, pair):
        cfg = make_cfg(*overrides, "data.tokenizer.vocab_size=300")
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)  # the usage lines name files relative to the working directory
            dm = instantiate(cfg.data)
            dm.setup()
        assert dm.task_type == "translation" and dm.describe().joint_vocab
        loaded.append(sorted(ref[0] for s in ("train", "val", "test") for ref in
                             dm.references(s)))
    assert loaded[0] == loaded[1] == sorted(t for _, t in PAIRS)


def test_summarization_files_usage_line_names_the_fields(make_cfg, tmp_path):
    (overrides,) = usage("summarization_files")
    rows = [{"document": f"a long text number {i}", "summary": f"text {i}"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(*overrides, "data.tokenizer.vocab_size=300")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        dm = instantiate(cfg.data)
        dm.setup()
    assert dm.task_type == "summarization" and dm.describe().joint_vocab  # as the line asks
    assert sum(len(dm.sources(s)) for s in ("train", "val", "test")) == 20


@pytest.mark.parametrize("name,corpus,task_type", [
    ("stdlib_summaries", "stdlib_summaries", "summarization"),
    ("multi30k", "multi30k", "translation"), ("debian_ddtp", "debian_ddtp", "translation"),
    ("aeslc", "aeslc", "summarization"), ("debian_desc", "debian_desc", "summarization")])
def test_named_data_configs_instantiate(make_cfg, name, corpus, task_type):
    dm = instantiate(make_cfg(f"data={name}").data)
    assert isinstance(dm, Seq2SeqDataModule)
    assert (dm.corpus, dm.task_type) == (corpus, task_type)
    assert dm.joint_vocab == (task_type == "translation")


def test_a_val_pair_is_added_with_plus(make_cfg):
    cfg = make_cfg("data=translation_files", "data.files.train.source=a.en",
                   "data.files.train.target=a.de", "+data.files.val.source=v.en",
                   "+data.files.val.target=v.de")
    assert dict(cfg.data.files.val) == {"source": "v.en", "target": "v.de"}


def test_examples_packed_chunk_by_chunk_are_the_examples_encoded_at_once(tmp_path,
                                                                         monkeypatch):
    """Records are encoded and packed a chunk at a time: the examples, and the index that
    names each example's references, are those of one pass over the whole split."""
    files = {"train": write_tsv(tmp_path / "train.tsv"), "val": write_tsv(tmp_path / "val.tsv"),
             "test": write_tsv(tmp_path / "test.tsv")}
    whole = module(files)
    monkeypatch.setattr("lmlab.data.records.ENCODE_CHUNK", 5)  # 24 records: 5 chunks
    chunked = module(files)
    for split in ("train", "test"):
        expected = [{k: v.tolist() if torch.is_tensor(v) else v for k, v in ex.items()}
                    for ex in whole.datasets[split]]
        assert [ex["index"] for ex in chunked.datasets[split]] == list(range(len(PAIRS)))
        assert [{k: v.tolist() if torch.is_tensor(v) else v for k, v in ex.items()}
                for ex in chunked.datasets[split]] == expected
        # the same tensors as the unpacked examples: ids as int64, lengths per example
        first = chunked.datasets[split][0]
        assert first["source"].dtype == torch.int64 and isinstance(first["index"], int)
    assert chunked.datasets["train"].lengths().tolist() == \
        [max(len(ex["source"]), len(ex["target"])) for ex in whole.datasets["train"]]
