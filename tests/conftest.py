"""Shared fixtures: the real corpora folder, config composition, and a CLI runner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from lmlab.config.schema import compose
from preloaded import Preloaded

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("LMLAB_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_data = pytest.mark.skipif(not (DATA_DIR / "README.md").is_file(),
                                reason=f"the public corpora are not in {DATA_DIR}: set "
                                "LMLAB_DATA_DIR to a folder holding them (docs/guide.md, "
                                "Data, says where each comes from)")
# A file of docs/extending.md: its path in bold code, then its code block.
DOC_FILE = re.compile(r"\*\*`([^`]+)`\*\*\n+```\w*\n(.*?)```", re.S)


def doc_files() -> dict[str, str]:
    """docs/extending.md's files, by their path in the user directory."""
    return dict(DOC_FILE.findall((ROOT / "docs" / "extending.md").read_text()))


def write_doc_files(folder: Path) -> Path:
    """Writes docs/extending.md's files into `folder` (a user directory); returns it."""
    for name, text in doc_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def make_cfg(tmp_path):
    """Composes the run config with overrides, as `python -m lmlab.run` would."""

    def make(*overrides: str):
        cfg = compose(overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(DATA_DIR)
        return cfg

    return make


def run_cli(*args: str, cwd: Path, timeout: int = 300, module: str = "lmlab.run",
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs an lmlab entry point in a fresh process and returns the finished process: forked
    from a preloaded interpreter (`preloaded.py`) when the environment is the session's own,
    else a new interpreter."""
    full_env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "WANDB_MODE": "offline",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    if env is None:
        return preloaded().run(module, list(args), cwd, full_env, timeout)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_entry(*args: str, timeout: float, env: dict | None = None,
              module: str = "lmlab.run") -> tuple[int | None, str]:
    """Runs an lmlab entry point as `lmlab.check_parallel.run_subprocess` does (its own
    session, killed whole at `timeout`), forked from the preloaded interpreter: its exit
    status (None on timeout) and its output, stdout and stderr together."""
    full_env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "WANDB_MODE": "offline",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    try:
        done = preloaded().run(module, list(args), ROOT, full_env, timeout, combined=True)
    except subprocess.TimeoutExpired as expired:
        return None, expired.output
    return done.returncode, done.stdout


_PRELOADED: list[Preloaded] = []


def preloaded() -> Preloaded:
    """This test worker's preloaded interpreter, started on first use with the session's
    environment."""
    if not _PRELOADED:
        _PRELOADED.append(Preloaded({**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR),
                                     "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}))
    return _PRELOADED[0]


def pytest_sessionfinish(session, exitstatus):
    for server in _PRELOADED:
        server.close()
