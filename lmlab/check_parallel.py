"""Strategy equivalence: the same seeded steps give the same losses under every strategy.

    python -m lmlab.check_parallel strategies=[cpu,ddp,fsdp,fsdp2,deepspeed_zero2]
    python -m lmlab.check_parallel model=gpt_tiny data=stdlib_source lr=1 \\
        strategies=[cpu,ddp,fsdp2,tp,deepspeed_zero3] steps=20 tolerance=1e-4

Each strategy trains `steps` steps as `python -m lmlab.run` in a process group of its own
(with `devices` processes, except `cpu` and `gpu`), from the same seed, with dropout off,
on the same global batches in the same order: lmlab's DataModules split each global batch
among the ranks. Training uses plain SGD at a constant learning rate `lr`, not the model's
optimizer: Adam's update hardly depends on the gradient's scale, so a strategy that sums
gradients over ranks instead of averaging them would pass under Adam. After every step the
validation loss (`val_batches` batches, averaged over every rank's examples) is printed
side by side, and the check fails (exit 2) if any strategy's differs from the first one's
by more than `tolerance`, relative, if a loss is not finite, or if the first one's loss
never moved `min_change` away from its first value (then no strategy could be told apart).
Where the model decodes in validation (sequence to sequence), the last validation's
hypotheses must also be the first strategy's, line for line but for `hypothesis_tolerance`
of them (a near-tie of a barely trained net tipped by a sum added up in another order).
Any other `key=value` is passed to every run.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.config.cli import did_you_mean, fail, parse_known_args
from lmlab.errors import LmlabError

STRATEGY_CONFIGS = Path(__file__).resolve().parent.parent / "conf" / "strategy"
SINGLE = ("cpu", "gpu", "auto")


def plain_sgd(lr: float) -> list[str]:
    """Overrides that train with SGD at a constant learning rate `lr`."""
    return ["~model.optimizer", f"+model.optimizer={{_target_:torch.optim.SGD,_partial_:true,"
            f"lr:{lr}}}", "model.scheduler=null"]


RUN = ["trainer.max_epochs=-1", "callbacks=none", "logger=csv", "trainer.val_check_interval=1",
       "++trainer.check_val_every_n_epoch=null", "++model.net.dropout=0.0",
       "++trainer.num_sanity_val_steps=0"]


def run_subprocess(command: list[str], timeout: float, **kwargs) -> tuple[int, str]:
    """Runs `command` in a session of its own; on timeout kills its whole process group.
    Returns the exit status (None on timeout) and the combined output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, **kwargs)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output


def val_losses(run_dir: Path) -> list[float]:
    """The validation loss after each step of a run (a mean over every rank's examples)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]


def run_strategy(strategy: str, devices: int, steps: int, overrides: list[str],
                 run_dir: Path, timeout: float) -> tuple[list[float], list[str] | None]:
    """The validation losses of a run under `strategy`, and the hypotheses its last
    validation decoded (None for a model that decodes none)."""
    layout = [] if strategy in SINGLE else [f"trainer.devices={devices}"]
    command = [sys.executable, "-m", "lmlab.run", f"strategy={strategy}", *layout,
               f"trainer.max_steps={steps}", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    status, output = run_subprocess(command, timeout)
    if status != 0:
        raise LmlabError(f"strategy={strategy} failed ({'timed out' if status is None else status})"
                         f":\n{output[-2000:]}")
    decoded = run_dir / "hypotheses" / "val.hyp.txt"
    return val_losses(run_dir), decoded.read_text().splitlines() if decoded.is_file() else None


def differing_hypotheses(decoded: dict[str, list[str] | None], tolerance: float = 0.02
                         ) -> list[str]:
    """Where a strategy's decoded hypotheses are not the first strategy's, in more than
    `tolerance` of the lines: the last bit of a sum that a sharded strategy adds up in
    another order can tip a near-tie of a barely trained net's search (one line in 145
    seen); a wrong gather or shard changes most lines."""
    reference_name, reference = next(iter(decoded.items()))
    problems = []
    for name, lines in decoded.items():
        if reference is None or lines == reference:
            continue
        if lines is None or len(lines) != len(reference):
            problems.append(f"{name}: {'no' if lines is None else len(lines)} hypotheses, "
                            f"{reference_name} {len(reference)}")
            continue
        differ = [i for i, (a, b) in enumerate(zip(lines, reference)) if a != b]
        if len(differ) > tolerance * len(lines):
            problems.append(f"{name}: {len(differ)} of {len(lines)} hypotheses differ from "
                            f"{reference_name}'s, the first at line {differ[0] + 1}: "
                            f"{lines[differ[0]]!r} against {reference[differ[0]]!r}")
    return problems


def compare(curves: dict[str, list[float]], tolerance: float, min_change: float = 0.0
            ) -> list[str]:
    """Where a strategy's loss curve leaves the first one's by more than `tolerance`, and
    whether the first one moved by at least `min_change` (relative) at all."""
    reference_name, reference = next(iter(curves.items()))
    problems = []
    change = max((abs(loss - reference[0]) for loss in reference), default=0.0)
    change /= abs(reference[0]) if reference else 1.0
    problems += [f"{name}: step {step} loss {loss}" for name, curve in curves.items()
                 for step, loss in enumerate(curve) if not math.isfinite(loss)]
    if change < min_change:
        problems.append(f"{reference_name}: the loss moved by {change:.2%} only, too little "
                        "to tell strategies apart; raise steps= or lr=")
    for name, curve in curves.items():
        if len(curve) != len(reference):
            problems.append(f"{name}: {len(curve)} steps logged, {reference_name} "
                            f"{len(reference)}")
        problems += [f"{name}: step {step} loss {loss:.6f}, {reference_name} {expected:.6f}"
                     for step, (loss, expected) in enumerate(zip(curve, reference))
                     if abs(loss - expected) > tolerance * abs(expected)]
    return problems


def show(curves: dict[str, list[float]]) -> None:
    table = Table(title="validation loss after each training step")
    table.add_column("step", justify="right")
    for name in curves:
        table.add_column(name, justify="right")
    for step, losses in enumerate(zip(*curves.values())):
        table.add_row(str(step), *(f"{loss:.6f}" for loss in losses))
    Console().print(table)


def check(strategies: list[str], steps: int = 10, devices: int = 2, tolerance: float = 1e-3,
          overrides: list[str] = (), timeout: float = 600, lr: float = 3.0,
          min_change: float = 0.01, hypothesis_tolerance: float = 0.02
          ) -> dict[str, list[float]]:
    overrides = [*plain_sgd(lr), *overrides]
    with tempfile.TemporaryDirectory(prefix="lmlab-check-") as root:
        runs = {s: run_strategy(s, devices, steps, overrides, Path(root) / s, timeout)
                for s in strategies}
    curves = {s: losses for s, (losses, _) in runs.items()}
    show(curves)
    problems = compare(curves, tolerance, min_change)
    problems += differing_hypotheses({s: decoded for s, (_, decoded) in runs.items()},
                                     hypothesis_tolerance)
    if problems:
        raise LmlabError(f"the strategies disagree (losses: relative tolerance {tolerance}):"
                         "\n  " + "\n  ".join(problems))
    decoding = " and decode the same hypotheses" if next(iter(runs.values()))[1] else ""
    Console().print(f"all {len(strategies)} strategies agree within {tolerance} over {steps} "
                    f"steps{decoding}", highlight=False)
    return curves


USAGE = ("python -m lmlab.check_parallel strategies=[cpu,ddp,...] [steps=N] [devices=N] "
         "[tolerance=X] [timeout=SECONDS] [val_batches=N] [lr=LR] [min_change=X] "
         "[hypothesis_tolerance=X] [key=value ...]")


@dataclass
class CheckArgs:
    """Options of `python -m lmlab.check_parallel`; any other key=value goes to every run."""

    strategies: list[str] = field(default_factory=lambda: ["cpu", "ddp"])  # the first: reference
    steps: int = 10  # training steps of each run
    devices: int = 2  # processes of each multi-process strategy
    tolerance: float = 1e-3  # relative difference allowed from the first strategy's loss
    timeout: float = 600  # seconds allowed to each run
    val_batches: int = 4  # validation batches after each step
    lr: float = 3.0  # plain SGD's constant learning rate (the LSTM needs a large one to move)
    min_change: float = 0.01  # how far the first strategy's loss must move at least
    hypothesis_tolerance: float = 0.02  # the share of decoded lines that may differ (near-ties)


def parse(argv: list[str]) -> dict:
    """The keyword arguments of `check` for a command line (see `USAGE`).

    Raises:
        LmlabError: an option with a value of the wrong type, or an unknown strategy.
    """
    args, overrides = parse_known_args(CheckArgs, argv, USAGE)
    if not args.strategies:
        raise LmlabError(f"strategies=[] names no strategy\nusage: {USAGE}")
    known = sorted(p.stem for p in STRATEGY_CONFIGS.glob("*.yaml"))
    for name in args.strategies:
        if name not in known:  # found now, not after the runs before it
            raise LmlabError(f"strategies: no strategy {name!r}{did_you_mean(name, known)}; "
                             f"the strategies are {', '.join(known)}")
    return {"strategies": args.strategies, "steps": args.steps, "devices": args.devices,
            "tolerance": args.tolerance, "timeout": args.timeout, "lr": args.lr,
            "min_change": args.min_change, "hypothesis_tolerance": args.hypothesis_tolerance,
            "overrides": [f"trainer.limit_val_batches={args.val_batches}", *overrides]}


def main(argv: list[str]) -> None:
    try:
        check(**parse(argv))
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
