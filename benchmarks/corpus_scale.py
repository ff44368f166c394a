"""Corpora larger than memory: the LM token cache and the text-record DataModules at scale.

Built from the public corpora of the data folder (`LMLAB_DATA_DIR`): tiny-shakespeare and
Multi30k's training sentences (both sides), **repeated** until each corpus reaches its size,
written as 8 MB files matched by a glob; SST-2's training sentences, repeated, for the records.
Each measure runs in a fresh process of its own (its peak RSS is its own):

- tokenization: the LM cache build (`LMDataModule.prepare_data`, with a saved byte-level BPE
  tokenizer of 8,000 tokens, so no tokenizer is trained) against the `tokenizers` library's own
  `Tokenizer.encode_batch` over the same files' lines, 10,000 lines a batch, the ids written
  to a file, with both cores on (TOKENIZERS_PARALLELISM=true); MB/s of UTF-8 text;
- first step: from a new `LMDataModule`'s `setup` to its first training batch, on the cached
  corpus (block 1024, batch 32);
- memory: peak RSS of setup and 200 training batches, at each corpus size;
- records: peak and final RSS of a `ClassificationDataModule`'s setup on N records of a TSV
  file, and the bytes of its packed examples.

    python -m benchmarks.corpus_scale [--sizes 50 100 200] [--records 1000000]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lstm_throughput import machine

DATA = Path(os.environ.get("LMLAB_DATA_DIR", "../shared/data")).resolve()
FILE_MB = 8


def base_text() -> str:
    """tiny-shakespeare and Multi30k's training sentences (English and German)."""
    parts = [(DATA / "lm" / "tinyshakespeare.txt").read_text(encoding="utf-8")]
    for side in ("en", "de"):
        with gzip.open(DATA / "translation" / "multi30k" / f"train.{side}.gz", "rt") as f:
            parts.append(f.read())
    return "\n".join(parts)


def write_corpus(folder: Path, megabytes: int) -> Path:
    """`megabytes` of the base text, repeated, in files of FILE_MB; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    text = base_text().encode("utf-8")
    per_file = FILE_MB * 2**20
    block = (text * (per_file // len(text) + 1))[:per_file]
    block = block[:block.rfind(b"\n") + 1]  # whole lines
    for index in range(megabytes // FILE_MB):
        (folder / f"part{index:03d}.txt").write_bytes(block)
    return folder


def corpus_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.txt"))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: getrusage's maxrss
    would count the parent's before the exec)."""
    return status_mb("VmHWM")


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM, RssAnon, RssFile ...), in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def lm_module(corpus: Path, cache: Path, run: Path):
    from lmlab.data.lm import LMDataModule
    from lmlab.data.tokenizers import ByteBPETokenizer

    return LMDataModule(ByteBPETokenizer(vocab_size=8000), corpus=None,
                        files=str(corpus / "*.txt"), cache_dir=str(cache), block_size=1024,
                        batch_size=32, load_from=str(run), train_batches=200)


# -- the measures, each run in a process of its own -------------------------------------

def measure_build(corpus: Path, cache: Path, run: Path) -> dict:
    module = lm_module(corpus, cache, run)
    start = time.perf_counter()
    module.prepare_data()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mb_s": corpus_bytes(corpus) / 2**20 / seconds}


def measure_library(corpus: Path, out: Path, run: Path) -> dict:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    start = time.perf_counter()
    with open(out, "wb") as f:
        for path in sorted(corpus.glob("*.txt")):
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            for first in range(0, len(lines), 10_000):
                encoded = tokenizer.encode_batch(lines[first:first + 10_000])
                f.write(np.concatenate([np.asarray(e.ids, np.uint16) for e in encoded])
                        .tobytes())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mb_s": corpus_bytes(corpus) / 2**20 / seconds}


def measure_first_step(corpus: Path, cache: Path, run: Path) -> dict:
    start = time.perf_counter()
    module = lm_module(corpus, cache, run)
    module.setup("fit")
    loader = iter(module.train_dataloader())
    next(loader)
    first = time.perf_counter() - start
    for _ in range(199):
        next(loader)
    return {"first_step_s": first, "peak_rss_mb": peak_rss_mb(),
            "anon_mb": status_mb("RssAnon"), "file_mb": status_mb("RssFile")}


def measure_records(path: Path) -> dict:
    from lmlab.data.classification import ClassificationDataModule
    from lmlab.data.tokenizers import WordTokenizer

    before = current_rss_mb()
    module = ClassificationDataModule(WordTokenizer(max_size=20000), corpus=None,
                                      files={"train": str(path)}, max_length=128)
    start = time.perf_counter()
    module.setup("fit")
    seconds = time.perf_counter() - start
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the records' objects freed
    packed = sum(module.datasets[s].nbytes() for s in module.datasets)
    records = sum(len(module.datasets[s]) for s in module.datasets)
    return {"records": records, "seconds": seconds, "rss_before_mb": before,
            "peak_rss_mb": peak_rss_mb(), "rss_after_mb": current_rss_mb(),
            "packed_mb": packed / 2**20}


def child(kind: str, *args: str) -> dict:
    """Runs one measure in a fresh process and returns what it printed (JSON)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.corpus_scale", "--child", kind,
                           *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_records(path: Path, count: int) -> Path:
    lines = (DATA / "classification" / "sst2" / "train.txt").read_text().splitlines()
    rows = [f"{line.split(' ', 1)[1]}\t{line.split(' ', 1)[0]}\n" for line in lines]
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n")
        for index in range(count):
            f.write(rows[index % len(rows)])
    return path


def save_tokenizer(run: Path) -> None:
    from lmlab.data.tokenizers import ByteBPETokenizer

    run.mkdir(parents=True, exist_ok=True)
    ByteBPETokenizer(vocab_size=8000).fit([base_text()]).save(run / "tokenizer.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        measures = {"build": measure_build, "library": measure_library,
                    "first": measure_first_step, "records": measure_records}
        print(json.dumps(measures[kind](*map(Path, rest))))
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_tokenizer(tmp / "run")
        print("| corpus MB | lmlab cache build MB/s | encode_batch MB/s | ratio | first batch s "
              "| peak RSS MB (setup + 200 batches) | of it, anonymous / file-backed MB |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            corpus = write_corpus(tmp / f"corpus{size}", size)
            library = child("library", str(corpus), str(tmp / "ids.bin"), str(tmp / "run"))
            build = child("build", str(corpus), str(tmp / f"cache{size}"), str(tmp / "run"))
            first = child("first", str(corpus), str(tmp / f"cache{size}"), str(tmp / "run"))
            print(f"| {corpus_bytes(corpus) / 2**20:.0f} | {build['mb_s']:.2f} | "
                  f"{library['mb_s']:.2f} | {build['mb_s'] / library['mb_s']:.2f} | "
                  f"{first['first_step_s']:.2f} | {first['peak_rss_mb']:.0f} | "
                  f"{first['anon_mb']:.0f} / {first['file_mb']:.0f} |", flush=True)
        path = write_records(tmp / "records.tsv", args.records)
        found = child("records", str(path))
        print(f"\nrecords: {found['records']:,} in {found['seconds']:.0f} s; RSS before "
              f"{found['rss_before_mb']:.0f} MB, peak {found['peak_rss_mb']:.0f} MB, after "
              f"{found['rss_after_mb']:.0f} MB; packed examples {found['packed_mb']:.0f} MB")


if __name__ == "__main__":
    main()
