"""Multi-process jobs of a Hydra sweep, each run once, in a process of its own.

Lightning starts the other ranks by re-running the command line, which under a sweep would
make every rank run the whole sweep again (a Hydra and Lightning bug). A multi-process job
is therefore run as a single run of its own, with exactly its overrides and folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lmlab.errors import LmlabError
from lmlab.parallel.specs import world_size


def needs_own_process(cfg: DictConfig) -> bool:
    """A multi-process job of a sweep."""
    return HydraConfig.get().mode == RunMode.MULTIRUN and world_size(cfg.trainer) > 1


def run_in_own_process(extra: list[str] = ()) -> float | None:
    """Runs this sweep job as `python -m lmlab.run` with its overrides (and `extra` ones)
    and output folder; its ranks are then relaunched from that command. Returns its
    objective."""
    job = HydraConfig.get()
    output_dir = Path(job.runtime.output_dir)
    command = [sys.executable, "-m", "lmlab.run", *job.overrides.task, *extra, "hydra.mode=RUN",
               f"hydra.run.dir={output_dir}", "hydra.output_subdir=null"]
    done = subprocess.run(command, cwd=hydra.utils.get_original_cwd())
    if done.returncode:
        raise LmlabError(f"sweep job {job.job.num} failed (exit {done.returncode}); its log "
                         f"is {output_dir / 'run.log'}")
    return json.loads((output_dir / "metrics.json").read_text())["objective"]
