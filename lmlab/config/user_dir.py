"""A user directory: a researcher's own nets, DataModules, tasks and configs, used without
editing lmlab (as fairseq's `--user-dir`).

    python -m lmlab.run user_dir=~/mine model=textcnn

- Its Python modules become importable: the folder goes first on `sys.path`, and on
  `PYTHONPATH` for the processes a run starts (DDP ranks, data workers). A path edit is the
  point here: the folder is the user's, and no install step should stand between an idea
  and its first run.
- Its `conf/`, if any, joins Hydra's config search path, after lmlab's own `conf/`: its
  `model/`, `data/`, `experiment/` ... options are chosen like lmlab's.
- The run records it (`user_dir` in `.hydra/config.yaml`), and the commands that rebuild a
  saved run (`evaluate`, `generate`, `predict`) trust the `_target_`s of its modules, and no
  others from outside lmlab (`lmlab.config.safety`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from lmlab.errors import LmlabError

KEY = "user_dir"


def activate(folder: str | Path) -> Path:
    """Makes the modules of `folder` importable in this process and the ones it starts.

    Returns:
        The folder's absolute path.

    Raises:
        LmlabError: the folder does not exist.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise LmlabError(f"{KEY}={folder}: no such folder; give the folder that holds your "
                         "modules (and, optionally, their conf/)")
    entry = str(path)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if entry not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([entry, *filter(None, paths)])
    return path


def modules(folder: str | Path) -> tuple[str, ...]:
    """The top-level modules of `folder`: its `.py` files and its folders of Python files."""
    path = Path(folder)
    found = {p.stem for p in path.glob("*.py")}
    found |= {p.name for p in path.iterdir() if p.is_dir() and p.name.isidentifier()
              and any(p.glob("*.py"))}
    return tuple(sorted(found))


def holds(folder: Path, target: str) -> bool:
    """Whether the top-level module of `target` is a file of `folder` (found, not imported),
    and not of this Python installation, which a folder named as a user directory might
    hold: a run folder naming `user_dir=/usr/lib/python3` must not make `os.system` a
    trusted target."""
    top = target.split(".")[0]
    if top not in modules(folder):
        return False
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.origin:
        return False
    origin = Path(spec.origin).resolve()
    installation = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    return origin.is_relative_to(folder) and not any(origin.is_relative_to(p)
                                                     for p in installation)


def with_user_dir(argv: list[str]) -> list[str]:
    """`argv` of `python -m lmlab.run` with its `user_dir=` made absolute and activated, and
    its `conf/` added to Hydra's search path; unchanged without `user_dir=`."""
    given = [a for a in argv if a.startswith(f"{KEY}=")]
    if not given:
        return argv
    folder = activate(given[-1].partition("=")[2])
    argv = [a for a in argv if not a.startswith(f"{KEY}=")] + [f"{KEY}={folder}"]
    conf = folder / "conf"
    if conf.is_dir() and not any(a.startswith("hydra.searchpath=") for a in argv):
        argv.append(f"hydra.searchpath=[file://{conf}]")
    return argv


def moved_to(folder: str | None) -> list[str]:
    """The override of a saved run's config (`lmlab.training.runs.load_run_config`) that
    points the run at its user directory's new place; none for None."""
    return [] if folder is None else [f"{KEY}={folder}"]
