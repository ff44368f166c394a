"""A multi-process run that loses a process: the others stop, non-zero, with one line.

When a rank dies (killed, out of memory, a lost node), gloo's collectives on the others fail
at once ("Connection reset by peer"); when a rank hangs, its peers' next collective fails
after the strategy's `timeout` (conf/strategy/*.yaml). Either way Lightning lets the error
through with a traceback; `peer_lost` turns it into a `PeerLost` (exit status 4) that names
the lost rank where this process can tell (the first process launches the others, and sees
their exit), and stops this process's launched ranks, which could otherwise wait forever.
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import timedelta

import torch.distributed as dist

from lmlab.errors import PeerLost

# How gloo and NCCL word a lost or silent peer (their timeouts name the library: a bare
# "timed out" could be a DataLoader's)
SIGNS = ("connection reset", "connection closed", "broken pipe", "gloo", "nccl")


def timeout(seconds: float) -> timedelta:
    """The strategies' `timeout`: how long a collective waits for every rank before failing."""
    return timedelta(seconds=seconds)


def peer_lost(trainer, error: BaseException) -> PeerLost | None:
    """The one-line error for a collective that failed because a peer is gone or silent,
    or None when `error` is something else."""
    text = str(error)
    if trainer.world_size == 1 or not (isinstance(error, dist.DistError)
                                        or any(s in text.lower() for s in SIGNS)):
        return None
    gone = exited_ranks(trainer)
    if gone:
        who = ", ".join(gone)
    elif os.getppid() == 1 and trainer.global_rank > 0:
        who = "rank 0 (the process that launched this one is gone)"
    else:
        who = "a peer (it exited, or sent nothing within trainer.strategy.timeout)"
    stop_launched_ranks(trainer)
    return PeerLost(f"rank {trainer.global_rank} lost {who}: {reason(text)}; the run stopped. "
                    "Resume from the newest checkpoint of its run folder (resume=auto)")


def reason(text: str) -> str:
    """The first sentence of a collective's error, without the source location."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    return first.split(". ")[0].rstrip(".")


def exited_ranks(trainer, settle: float = 3.0) -> list[str]:
    """The ranks this process launched that have exited, with how. A peer's socket closes
    before its process is reaped: a lost connection waits up to `settle` seconds for that."""
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    deadline = time.monotonic() + settle
    while procs and all(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = []
    for local_rank, proc in enumerate(procs, start=1):
        code = proc.poll()
        if code is not None:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            gone.append(f"rank {trainer.node_rank * trainer.num_devices + local_rank} ({how})")
    return gone


def stop_launched_ranks(trainer) -> None:
    """Kills the ranks this process launched that still run: a hung one would never end."""
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        if proc.poll() is None:
            proc.kill()
