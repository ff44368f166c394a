"""Evaluates a finished run on one device, with the tokenizer and labels it saved.

    python -m lmlab.evaluate outputs/2026-01-01/12-00-00                # best checkpoint
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=last data.batch_size=256
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=weights   # the portable file
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoints import WEIGHTS
from lmlab.errors import LmlabError
from lmlab.run import fail, load_task, report


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The saved config of a run, with its paths pointed back at `run_dir`."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise LmlabError(f"{run_dir} is not an lmlab run folder (no .hydra/config.yaml); "
                         "pass the folder that `python -m lmlab.run` printed as `run files`")
    cfg = OmegaConf.load(saved)
    cfg.paths.output_dir = str(run_dir)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))


def find_checkpoint(run_dir: Path, ckpt: str) -> Path:
    """`best`, `last`, `weights` (the run's portable file), or a path, to a checkpoint
    (a file, or a DeepSpeed folder)."""
    folder = run_dir / "checkpoints"
    candidates = {"best": sorted(folder.glob("best-*.ckpt")), "last": [folder / "last.ckpt"],
                  "weights": [run_dir / WEIGHTS]}
    paths = candidates.get(ckpt, [Path(ckpt)])
    if not paths or not paths[-1].exists():
        raise LmlabError(f"no {ckpt} checkpoint in {run_dir}; pass ckpt=best, ckpt=last, "
                         "ckpt=weights or a path")
    return paths[-1]


def evaluate(run_dir: str | Path, ckpt: str = "best", overrides: list[str] = ()) -> dict:
    """Tests a run's checkpoint and returns the test metrics."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    data = instantiate(cfg.data, load_from=str(run_dir))
    data.setup("test")
    checkpoint = find_checkpoint(run_dir, ckpt)
    task = load_task(cfg, data, checkpoint)
    trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                        precision=cfg.trainer.get("precision", "32-true"), logger=False,
                        enable_checkpointing=False)
    metrics = trainer.test(task, datamodule=data, verbose=False)[0]
    report(metrics, run_dir, str(checkpoint))
    return metrics


def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        fail("usage: python -m lmlab.evaluate RUN_DIR [ckpt=best|last|PATH] [key=value ...]")
    ckpt = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("ckpt=")), "best")
    overrides = [a for a in argv[1:] if not a.startswith("ckpt=")]
    try:
        evaluate(argv[0], ckpt, overrides)
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
