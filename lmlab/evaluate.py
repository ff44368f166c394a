"""Evaluates a finished run on one device, with the tokenizer and labels it saved.

    python -m lmlab.evaluate outputs/2026-01-01/12-00-00  # best, else last, else weights
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=last data.batch_size=256
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=weights   # the portable file

A dotted `key=value` overrides the run's saved config (`+key=value` adds a key it lacks).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lmlab.config.cli import fail, parse_known_args, report, unknown_key
from lmlab.errors import LmlabError
from lmlab.training.build import load_task
from lmlab.training.runs import find_checkpoint, load_run_config
from lmlab.training.kernels import kernels_of

USAGE = ("python -m lmlab.evaluate RUN_DIR [ckpt=best|last|weights|PATH] "
         "[data.batch_size=N ...]")


@dataclass
class EvaluateArgs:
    """Arguments of `python -m lmlab.evaluate`, after the run folder."""

    run_dir: str  # the folder `python -m lmlab.run` printed as `run files`
    ckpt: str | None = None  # best, last, weights or a path; null: best, else last, else weights


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
