"""Checks on what comes from outside the project before it is used: the `_target_`s of a
saved run config, and the folder a run writes to.

A run folder may come from elsewhere (shared, downloaded), and `lmlab.evaluate`,
`lmlab.generate` and `lmlab.predict` instantiate its saved `.hydra/config.yaml`: a
`_target_` there is code that runs. Only lmlab's own classes, its schedules and strategy
factories, the optimizers, modules and Lightning objects a config may name, and the modules
of the user directory the run was made with (`lmlab.config.user_dir`) are allowed.
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.config import user_dir
from lmlab.config.cli import fail
from lmlab.errors import LmlabError

# Classes from these modules may be instantiated from a saved config ...
CLASS_MODULES = ("lmlab.", "torch.optim.", "torch.nn.", "lightning.pytorch.",
                 "deepspeed.ops.")
# ... and functions from these (the schedules, strategy factories, collective timeout and
# progress bar that configs name).
FUNCTION_MODULES = ("lmlab.tasks.schedules.", "lmlab.parallel.strategies.",
                    "lmlab.parallel.failures.", "lmlab.training.callbacks.progress.")


def check_targets(cfg: DictConfig, source: Path) -> None:
    """Refuses a config that names a `_target_` other than the allowed ones, before any
    is imported; a run made with a user directory activates it first (its modules are
    allowed, and must be importable to rebuild the run).

    Raises:
        LmlabError: naming the key, the target and the file it came from; or a recorded
            user directory that is gone.
    """
    folder = cfg.get(user_dir.KEY)
    if folder is not None:
        if not Path(folder).is_dir():
            raise LmlabError(f"{source}: the run was made with {user_dir.KEY}={folder}, which "
                             "is not there; put the folder back at that path, or give its "
                             f"new place with {user_dir.KEY}=FOLDER (its modules define the "
                             "run's model or data)")
        folder = user_dir.activate(folder)
    for key, target in targets(OmegaConf.to_container(cfg, resolve=False)):
        if not allowed(str(target)) and not (folder and user_dir.holds(folder, str(target))):
            raise LmlabError(f"{source}: {key}={target} is not a class of lmlab, torch.optim, "
                             "torch.nn or Lightning, nor of the run's user directory; refused, "
                             "since instantiating it could run any code: use a run folder "
                             "written by lmlab, or fix the key")


def targets(node, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every `_target_` in a plain container."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, value in items:
        if key == "_target_":
            found.append((f"{prefix}{key}", value))
        else:
            found += targets(value, f"{prefix}{key}.")
    return found


def allowed(target: str) -> bool:
    """Whether `target` names an allowed class or function; imports only allowed modules."""
    if not target.startswith(CLASS_MODULES + FUNCTION_MODULES):
        return False
    try:
        obj = get_object(target)
    except Exception:  # not importable: instantiating it would fail with its own message
        return True
    if inspect.isclass(obj):
        return target.startswith(CLASS_MODULES)
    return target.startswith(FUNCTION_MODULES) and inspect.isfunction(obj)


def check_writable(folder: Path, key: str) -> None:
    """Creates `folder` and a file in it, as the run will.

    Raises:
        LmlabError: naming the folder, why it cannot be written, and the key to change.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        blocking = next((p for p in [folder, *folder.parents] if p.exists()), folder)
        why = f"{blocking} is a file, not a folder" if not blocking.is_dir() \
            else err.strerror or str(err)
        raise LmlabError(f"cannot write the run's files to {folder}: {why}; set {key} to a "
                         "folder you can write (e.g. under outputs/)") from None


class OutputFolderCheck(Callback):
    """A Hydra callback: checks that the run (or sweep) folder can be written before Hydra
    creates it, so that a bad one is a one-line error rather than Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            check_writable(Path(str(OmegaConf.select(config, key))), key)
        except LmlabError as err:
            fail(str(err))
