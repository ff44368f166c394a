"""Evaluates a finished run on one device, with the tokenizer and labels it saved.

    python -m lmlab.evaluate outputs/2026-01-01/12-00-00  # best, else last, else weights
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=last data.batch_size=256
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=weights   # the portable file

A dotted `key=value` overrides the run's saved config (`+key=value` adds a key it lacks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoints import SAFE_WEIGHTS, WEIGHTS
from lmlab.build import load_task
from lmlab.cli import convert, did_you_mean, fail, parse_known_args, report, unknown_key
from lmlab.errors import LmlabError
from lmlab.kernels import DEFAULT_NODE, kernels_of
from lmlab.safety import check_targets

USAGE = ("python -m lmlab.evaluate RUN_DIR [ckpt=best|last|weights|PATH] "
         "[data.batch_size=N ...]")
NAMES = ("best", "last", "weights")  # the checkpoints of a run, in the order the default tries


@dataclass
class EvaluateArgs:
    """Arguments of `python -m lmlab.evaluate`, after the run folder."""

    run_dir: str  # the folder `python -m lmlab.run` printed as `run files`
    ckpt: str | None = None  # best, last, weights or a path; null: best, else last, else weights


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The saved config of a run, with its paths pointed back at `run_dir` and
    `overrides` (`key=value`, see `override`) applied."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise LmlabError(f"{run_dir} is not an lmlab run folder (no .hydra/config.yaml); "
                         "pass the folder that `python -m lmlab.run` printed as `run files`")
    cfg = OmegaConf.load(saved)
    check_targets(cfg, saved)  # a run folder may come from elsewhere
    cfg.paths.output_dir = str(run_dir)
    cfg.setdefault("kernels", DEFAULT_NODE)  # a run saved before the node: its defaults
    for arg in overrides:
        override(cfg, arg)
    return cfg


def override(cfg: DictConfig, arg: str) -> None:
    """Sets `key=value` in an untyped saved config, typed by the value it replaces: a string
    keeps the text exactly, a number or boolean is converted; a null value, or a key added
    with `+key=value`, is read as null, true/false or a number when it looks like one.

    Raises:
        LmlabError: an unknown key (with the closest one), a group of keys or a list, or a
            value of the wrong type.
    """
    key, _, text = arg.partition("=")
    add, key = key.startswith("+"), key.lstrip("+")
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        raise LmlabError(f"the run's config has no group of keys {parent_key!r}\nusage: {USAGE}")
    if leaf not in parent and not add:
        hint = did_you_mean(leaf, list(parent), f"{parent_key}." if parent_key else "")
        raise LmlabError(f"the run's config has no key {key!r}{hint}; add one with "
                         f"+{key}=...\nusage: {USAGE}")
    current = OmegaConf.to_container(parent, resolve=False).get(leaf)
    if isinstance(current, dict):
        raise LmlabError(f"{key} is a group of keys; set one of them, as {key}.NAME=VALUE")
    if isinstance(current, list):
        raise LmlabError(f"{key} holds a list, which the command line of evaluate does not set")
    parent[leaf] = _read(key, text, current)


def _read(key: str, text: str, current: object) -> object:
    if current is None:  # no type to go by
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"null": None, "true": True, "false": False}.get(text, text)
    return convert(key, text, type(current))


def run_checkpoints(run_dir: Path) -> dict[str, Path]:
    """The checkpoints `run_dir` holds (files, or DeepSpeed folders), by name, in the order
    the default tries them; `weights` is `weights.ckpt`, else `weights.safetensors`."""
    folder = run_dir / "checkpoints"
    best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)  # newest last
    weights = run_dir / WEIGHTS
    paths = {"best": best[-1] if best else None, "last": folder / "last.ckpt",
             "weights": weights if weights.exists() else run_dir / SAFE_WEIGHTS}
    return {name: path for name, path in paths.items() if path and path.exists()}


def find_checkpoint(run_dir: Path, ckpt: str | None,
                    command: Callable[[str | None, Path | None], str]) -> Path:
    """The checkpoint `ckpt` names in `run_dir`: `best`, `last`, `weights` or a path; None
    takes the best, else the last, else `weights.ckpt`, and says which on stderr.

    Args:
        run_dir: the run's folder.
        ckpt: a name, a path, or None.
        command: the command line that uses the checkpoint of a name and path (None, None:
            the default one), shown when `ckpt` is absent.

    Raises:
        LmlabError: `ckpt` does not exist; names the checkpoints there are, with the command.
    """
    found = run_checkpoints(run_dir)
    if not ckpt and found:
        name, path = next(iter(found.items()))
        skipped = " or ".join(NAMES[:NAMES.index(name)])
        sys.stderr.write(f"checkpoint: {path} ({name}"
                         + (f"; the run has no {skipped} checkpoint)\n" if skipped else ")\n"))
        return path
    path = found.get(ckpt) if ckpt in NAMES else Path(ckpt) if ckpt else None
    if path is not None and path.exists():
        return path
    if not found:
        raise LmlabError(f"{run_dir} holds no checkpoint (no checkpoints/best-*.ckpt, "
                         f"checkpoints/last.ckpt or {WEIGHTS}): it stopped before saving one")
    missing = f"no {ckpt} checkpoint in {run_dir}" if ckpt in NAMES else f"{ckpt} does not exist"
    there = ", ".join(str(p.relative_to(run_dir)) for p in found.values())
    name, path = next(iter(found.items()))
    raise LmlabError(f"{missing}; the run has {there}: run `{command(name, path)}`, or "
                     f"`{command(None, None)}` for the best, else the last, else {WEIGHTS}")


def evaluate(run_dir: str | Path, ckpt: str | None = None, overrides: list[str] = ()) -> dict:
    """Tests a run's checkpoint (see `find_checkpoint`) and returns the test metrics."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    checkpoint = find_checkpoint(run_dir, ckpt, lambda name, _: f"python -m lmlab.evaluate "
                                 f"{run_dir}" + (f" ckpt={name}" if name else ""))
    data = instantiate(cfg.data, load_from=str(run_dir))
    data.setup("test")
    task = load_task(cfg, data, checkpoint)
    metrics = trainer_for_test(cfg, run_dir).test(task, datamodule=data, verbose=False)[0]
    report(metrics, run_dir, str(checkpoint))
    return metrics


def trainer_for_test(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """One device of the run's accelerator and precision, with the run's kernel choices; a
    seq2seq test writes its hypotheses under RUN/evaluate."""
    return L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                     precision=cfg.trainer.get("precision", "32-true"), logger=False,
                     enable_checkpointing=False, callbacks=[kernels_of(cfg)],
                     default_root_dir=str(run_dir / "evaluate"))


def main(argv: list[str]) -> None:
    try:
        args, overrides = parse_known_args(EvaluateArgs, argv, USAGE, positional=("run_dir",))
        plain = next((a for a in overrides if "." not in a.partition("=")[0]), None)
        if plain is not None:  # neither an option of evaluate nor a key of the run's config
            raise unknown_key(plain.partition("=")[0], EvaluateArgs, USAGE)
        evaluate(args.run_dir, args.ckpt, overrides)
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
