"""The token cache of language-modelling corpora: text cut into splits at line ends,
tokenized piece by piece into one token file a split, written in a folder of this host's
own and published in one rename (so every process of a run, on every node, sees a whole
cache or none).

A build records its progress after every batch of pieces (`progress.json`: pieces done, each
token file's length, the counts so far), so a build that was interrupted resumes where that
record ends, on the next start on the same host; a lock keeps two processes of one host
from building the same cache at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, TransferSpeedColumn

from lmlab.data.tokenizers import Tokenizer

CHUNK_CHARS = 1 << 20  # text is tokenized in pieces of about 1 MB, cut at line ends
FORMAT = 4  # the cache layout's version, part of its key: bump it when the layout or the
# encoding changes (3: special-token names in text stay text; 4: keyed by the files' paths,
# sizes and times, not their text)
SPLITS = ("train", "val", "test")
PIECES_A_BATCH = 16  # pieces given to the tokenizer at once: enough to keep every core busy


def cut_at_lines(pieces: Iterable[str], cuts: Sequence[int]) -> Iterator[tuple[int, str]]:
    """Cuts a stream of text pieces, each beginning a line, into consecutive parts.

    Part i + 1 begins at the first line start at or after character `cuts[i]` of the
    stream, so no line is shared by two parts.

    Args:
        pieces: the text, in order.
        cuts: ascending character positions.

    Returns:
        (part index, text) pairs in stream order; a part may get no text.
    """
    part, seen = 0, 0
    for piece in pieces:
        start = 0
        while part < len(cuts) and cuts[part] - seen <= len(piece):
            at = _line_start(piece, max(cuts[part] - seen, start))
            if at > start:
                yield part, piece[start:at]
            part, start = part + 1, at
        if start < len(piece):
            yield part, piece[start:]
        seen += len(piece)


def _line_start(piece: str, position: int) -> int:
    """The first line start at or after `position` (the piece's end counts as one)."""
    if position == 0 or piece[position - 1] == "\n":
        return position
    newline = piece.find("\n", position)
    return len(piece) if newline < 0 else newline + 1


def private_name(name: str) -> str:
    """A name for this process's copy of `name` while it is written: with the host, since
    processes of two nodes on a shared file system may have the same id."""
    return f"{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def host_name(name: str) -> str:
    """A name for this host's copy of `name` while it is built (kept across restarts)."""
    return f"{name}.{socket.gethostname()}.partial"


@contextlib.contextmanager
def building(folder: Path) -> Iterator[Path]:
    """Holds this host's lock on building into `folder`'s parent (the cache folder itself is
    locked: no lock file is left behind) and yields the folder to build in, with what an
    interrupted build left there; the caller builds, unless `folder` exists by the time the
    lock is held (another process built it meanwhile)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(host_name(folder.name))
    lock = os.open(folder.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            partial.mkdir(exist_ok=True)
        yield partial
    finally:
        os.close(lock)  # releases the lock


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None] | None]:
    """A bar of `total` characters on a terminal's stderr, and the function that advances
    it; None elsewhere (a log file, a test, a batch job's output)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (*Progress.get_default_columns(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda characters: bar.advance(task, characters)


def publish(tmp: Path, folder: Path) -> None:
    """Moves a finished folder into place in one rename, so readers see all of it or none.
    Another process building the same folder may have won the race: its copy is as good."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise


def write_tokens(tokenizer: Tokenizer, parts: Iterable[tuple[int, str]], folder: Path,
                 batch: int = PIECES_A_BATCH,
                 advance: Callable[[int], None] | None = None) -> dict:
    """Encodes each (split index, text) piece into `folder/SPLIT.bin`; returns the layout
    (format, dtype) and each split's characters and tokens. Pieces are encoded `batch` at a
    time by the `tokenizers` library's `encode_batch`, which spreads them over the cores;
    each piece is encoded whole, as alone, so the ids do not depend on `batch`. A piece is
    running text, not a sequence's start: a pretrained tokenizer's `<s>` is not added to it.

    Resumes from `folder/progress.json` when an earlier call left one: the pieces it had
    done are skipped (read, not encoded) and each token file is cut back to what it held.
    `advance(characters)` is told of every piece done (a progress bar)."""
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    progress = folder / "progress.json"
    done = json.loads(progress.read_text()) if progress.is_file() else \
        {"pieces": 0, "bytes": {split: 0 for split in SPLITS},
         "splits": {split: {"chars": 0, "tokens": 0} for split in SPLITS}}
    counts, pieces = done["splits"], iter(parts)
    for _, text in itertools.islice(pieces, done["pieces"]):
        if advance:
            advance(len(text))
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_at(folder / f"{split}.bin", done["bytes"][split]))
                 for split in SPLITS]
        for chunk in batched(pieces, batch):
            encoded = tokenizer.encode_batch([text for _, text in chunk], special_tokens=False)
            for (part, text), ids in zip(chunk, encoded):
                files[part].write(np.asarray(ids, dtype=dtype).tobytes())
                count = counts[SPLITS[part]]
                count["chars"] += len(text)
                count["tokens"] += len(ids)
                if advance:
                    advance(len(text))
            for f in files:
                f.flush()
            done["pieces"] += len(chunk)
            done["bytes"] = {split: f.tell() for split, f in zip(SPLITS, files)}
            write_json(progress, done)
    progress.unlink()
    return {"format": FORMAT, "dtype": np.dtype(dtype).name, "splits": counts}


def open_at(path: Path, length: int):
    """`path` opened for writing after its first `length` bytes (what the progress record
    vouches for); what follows them is dropped."""
    f = open(path, "r+b" if path.exists() else "wb")
    f.truncate(length)
    f.seek(length)
    return f


def write_json(path: Path, content: dict) -> None:
    """Writes `path` whole or not at all (a rename over the old one)."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def files_key(paths: Iterable[Path]) -> str:
    """What identifies a corpus's files without reading them: each one's absolute path,
    size and modification time (a file rewritten in place gets a new time)."""
    lines = []
    for path in paths:
        stat = Path(path).stat()
        lines.append(f"{Path(path).resolve()} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(lines)
