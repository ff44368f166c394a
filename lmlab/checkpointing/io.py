"""Checkpoint files, written whole and read safely.

- `AtomicCheckpointIO`: a checkpoint is written to a temporary file beside its target,
  flushed to disk and renamed over it, so a crash mid-write leaves the previous one whole.
- `load_checkpoint`: every checkpoint is read with `weights_only=True`, so a file that
  would run code when unpickled is refused, and a corrupt one is a one-line error naming
  the file and the run's other checkpoints.
- `disk_full`: what a full disk left behind, and how to go on.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lmlab.errors import LmlabError

WEIGHTS = "weights.ckpt"
SAFE_WEIGHTS = "weights.safetensors"  # the same tensors, in a format that cannot hold code
WEIGHTS_FILES = (WEIGHTS, SAFE_WEIGHTS)
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint file's content, read without running code (`weights_only=True`);
    with `mmap`, tensors are mapped rather than read (for a look at names and shapes).

    Raises:
        LmlabError: the file is corrupt or truncated, or holds objects other than tensors
            and plain containers (refused: unpickling them could run code).
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle of objects: damage
            operation = re.search(r"Unsupported operand \d+", str(err))
            raise corrupt(path, operation.group(0) if operation else err) from None
        raise LmlabError(refused(path, err)) from None
    except (FileNotFoundError, PermissionError):
        raise  # not damage: its own message is right
    except Exception as err:  # torch reports damage as RuntimeError, OSError, KeyError, ...
        raise corrupt(path, err) from None
    if not isinstance(content, dict):
        raise LmlabError(f"{path} is not a checkpoint (it holds a {type(content).__name__}); "
                         f"{instead(path)}")
    return content


def refused(path, err: pickle.UnpicklingError) -> str:
    """The message for a checkpoint that `weights_only` loading refused."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    what = found.group(1) if found else "objects other than tensors"
    return (f"{path} was refused: it holds Python objects ({what}) whose loading could run "
            f"code; use a checkpoint written by lmlab, or its {SAFE_WEIGHTS}")


def corrupt(path: Path, err: Exception | str) -> LmlabError:
    """The error for a checkpoint that cannot be read: what broke, and what to use instead."""
    if isinstance(err, EOFError):
        err = "it ends where more was expected"
    elif isinstance(err, Exception):
        first = str(err).split(". ")[0].splitlines()[0][:100] if str(err) else "no detail"
        err = f"{type(err).__name__}: {first}"
    return LmlabError(f"{path} is corrupt or truncated ({err}); {instead(path)}")


def instead(path: Path) -> str:
    """Names the run's other checkpoints, for an error about `path`."""
    run_dir = next((p for p in path.parents if (p / ".hydra").is_dir()), path.parent)
    others = [p for p in [*sorted((run_dir / "checkpoints").glob("*.ckpt")),
                          *(run_dir / name for name in WEIGHTS_FILES)]
              if p.is_file() and p.resolve() != path.resolve()]
    if not others:
        return "no other checkpoint was found beside it: retrain, or copy the file again"
    return "use another checkpoint of the run: " + ", ".join(str(p) for p in others)


def disk_full(err: OSError, output_dir: Path) -> str | None:
    """The message for a write that failed because the disk (or a size limit) is full:
    where, and which of the run's checkpoints are still whole; None for other errors."""
    if err.errno not in DISK_FULL:
        return None
    where = err.filename or output_dir
    whole, broken = [], []
    for path in sorted((output_dir / "checkpoints").glob("*.ckpt")):
        try:
            if path.is_file():  # a DeepSpeed folder is taken as it is
                load_checkpoint(path)
            whole.append(path.name)
        except LmlabError:
            broken.append(path.name)
    kept = (f"the checkpoints written before are kept in {output_dir / 'checkpoints'}: "
            f"{', '.join(whole)}" if whole else "no checkpoint was complete before this one")
    lost = f"; incomplete, delete them: {', '.join(broken)}" if broken else ""
    newest = "last.ckpt" if "last.ckpt" in whole else whole[-1] if whole else None
    return (f"no room to write {where} ({err.strerror}): the disk is full or a size limit "
            f"was reached; {kept}{lost}; free space there, or point hydra.run.dir at a disk "
            "with room"
            + (f", and resume with ckpt_path={output_dir / 'checkpoints' / newest}"
               if whole else ""))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its folder, flushes it to disk and
    renames it over the target; then flushes the folder, so the rename survives a power cut.

    Lightning's own writer goes through a temporary file in the system's temp folder and
    `shutil.move`, which copies into the target when that folder is another file system
    (a node-local /tmp), without flushing: a crash then leaves a torn checkpoint. Remote
    paths (`s3://...`) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not *.ckpt: never resumed
        try:
            with open(temp, "wb") as f:
                self.write(f, buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def write(self, file, data: memoryview) -> None:
        file.write(data)
