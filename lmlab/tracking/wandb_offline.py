"""Reads W&B runs recorded offline (`WANDB_MODE=offline`): config, history and summary.

wandb has no Python reader for the `.wandb` file of an offline run; its command line
prints the file's records as JSON lines (`wandb leet inspect --json RUN`), which this
module reads and folds into one `OfflineRun`:

    from lmlab.tracking.wandb_offline import offline_runs, read_run
    for path in offline_runs("outputs/2024-06-01/12-00-00"):
        run = read_run(path)
        print(run.id, run.group, run.config["model"]["optimizer"]["lr"], run.summary["val/loss"])
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


@dataclass
class OfflineRun:
    """One offline W&B run, as its `.wandb` file records it."""

    path: Path  # the offline-run-* folder
    id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    resumed: bool = False  # started with an id to continue
    config: dict[str, Any] = field(default_factory=dict)  # the last value of every key
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per W&B step
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of every metric
    exit_code: int | None = None  # None: the run did not finish

    def metric(self, name: str) -> list[tuple[int, float]]:
        """(W&B step, value) of every history row that has `name`."""
        return [(row["_step"], row[name]) for row in self.history if name in row]


def offline_runs(folder: str | Path) -> list[Path]:
    """The offline-run-* folders under `folder` (a run folder, its `wandb/` folder, or a
    sweep's folder: searched recursively), oldest first."""
    folder = Path(folder)
    found = [p.parent for p in folder.rglob("offline-run-*/run-*.wandb")]
    return sorted(set(found), key=lambda p: (p.name.split("-")[2], str(p)))


def records(path: str | Path, timeout: float = 120) -> list[dict[str, Any]]:
    """The records of an offline run (its folder or its `.wandb` file), in order, as
    `wandb leet inspect --json` prints them."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise LmlabError(f"reading the W&B run {path} took over {timeout} s") from err
    if done.returncode:
        raise LmlabError(f"cannot read the W&B run {path} (is wandb >= 0.31 installed?): "
                         f"{done.stderr.strip()[-500:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def read_run(path: str | Path) -> OfflineRun:
    """The offline run at `path` (its folder or `.wandb` file), with config, history and
    summary folded from its records."""
    path = Path(path)
    run = OfflineRun(path=path if path.is_dir() else path.parent)
    for record in records(path):
        kind = record["type"]
        body = record.get(kind) or {}
        if kind == "run":
            _read_header(run, body)
        elif kind == "config":
            _update(run.config, body)
        elif kind == "history":
            run.history.append(body.get("item", {}))
        elif kind == "summary":
            _update(run.summary, body)
        elif kind == "exit":
            run.exit_code = body.get("exit_code", 0)
    run.config.pop("_wandb", None)
    return run


def _read_header(run: OfflineRun, body: dict) -> None:
    run.id, run.project = body.get("run_id", ""), body.get("project", "")
    run.name, run.group = body.get("display_name", ""), body.get("run_group", "")
    run.job_type, run.tags = body.get("job_type", ""), list(body.get("tags", []))
    run.resumed = bool(body.get("resume"))
    _update(run.config, body.get("config", {}))


def _update(target: dict, body: dict) -> None:
    """Applies a record's `update` and `remove` (W&B's own bookkeeping keys, `_runtime`,
    `_wandb.runtime`, are summary entries like the others)."""
    target.update(body.get("update", {}))
    for key in body.get("remove", {}):
        target.pop(key, None)
