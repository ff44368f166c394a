"""Compares finished runs without W&B at hand: a table of the config keys that differ
between them, their best and final metric, test metrics, throughput and wall time, sorted
by the metric; and a PNG of their curves.

    python -m lmlab.compare outputs/<date>/<time> outputs/2026-01-01/12-00-00
    python -m lmlab.compare outputs/<date>/<time> --metric val/ppl --format csv

Without --metric the runs are sorted by their own monitored metric (the one that picked
their best checkpoint), or else by a metric they all logged.

A path is a run folder of `lmlab.run` (it holds `.hydra/config.yaml`; its curves come from
`csv/metrics.csv`, its test metrics and throughput from `metrics.json`), a W&B offline run
(a folder holding a `.wandb` file), or a folder whose subfolders are runs (a sweep).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lmlab.config.cli import fail
from lmlab.config.schema import flatten, monitor_mode
from lmlab.errors import LmlabError
from lmlab.tracking import wandb_offline

TRAIN_CURVE = "train/loss"


@dataclass
class Run:
    """What a finished run left behind, whoever wrote it."""

    name: str
    config: dict[str, object]  # flattened: "model.optimizer.lr" -> 0.001
    curves: dict[str, list[tuple[int, float]]]  # metric -> (step, value), in step order
    final: dict[str, float] = field(default_factory=dict)  # test metrics, last values
    throughput: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    monitor: str | None = None  # the metric that picked its best checkpoint, if known


def find_runs(paths: list[str]) -> list[Run]:
    """The runs at `paths`: run folders, W&B offline runs, or folders of them.

    Raises:
        LmlabError: a path that does not exist or holds no run.
    """
    runs = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise LmlabError(f"{text}: no such file or folder")
        found = [read_run(path)] if is_run(path) else \
            [read_run(p) for p in sorted(path.iterdir()) if p.is_dir() and is_run(p)]
        if not found:
            raise LmlabError(f"{text} is not a run: it has no .hydra/config.yaml, no .wandb "
                             "file, and no subfolder that does; give a run folder of "
                             "lmlab.run, a W&B offline run folder, or a sweep folder")
        runs += found
    return runs


def is_run(path: Path) -> bool:
    return path.is_dir() and ((path / ".hydra" / "config.yaml").is_file()
                              or wandb_file(path) is not None)


def read_run(path: Path) -> Run:
    if (path / ".hydra" / "config.yaml").is_file():
        return read_lmlab_run(path)
    return read_wandb_run(path)


def read_lmlab_run(path: Path) -> Run:
    """A run folder of `lmlab.run`: config as composed (interpolations as written, so that
    the run's own paths compare equal), curves from its CSV log, results from metrics.json."""
    config = flatten(OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"),
                                            resolve=False))
    metrics_csv = path / "csv" / "metrics.csv"
    curves = read_csv_curves(metrics_csv) if metrics_csv.is_file() else {}
    results = path / "metrics.json"
    saved = json.loads(results.read_text()) if results.is_file() else {}
    metrics = saved.get("metrics") or {}
    final = {k: v for k, v in metrics.items() if not k.startswith("best ")}
    started = (path / ".hydra" / "config.yaml").stat().st_mtime  # written as the run starts
    wall = results.stat().st_mtime - started if results.is_file() else None
    # metrics.json names the monitored metric ("best val/acc") once there was one to pick by
    best = next((k.removeprefix("best ") for k in metrics if k.startswith("best ")), None)
    monitor = best or config.get("monitor")
    return Run(str(path), config, curves, final, saved.get("throughput") or {}, wall, monitor)


def read_csv_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    curves.setdefault(name, []).append((step, float(value)))
    return curves


def wandb_file(path: Path) -> Path | None:
    """The `.wandb` log of a W&B offline run folder (`wandb/offline-run-*`)."""
    found = sorted(path.glob("*.wandb"))
    return found[0] if found else None


def read_wandb_run(path: Path) -> Run:
    """A W&B offline run, from its `.wandb` log (read by `lmlab.tracking.wandb_offline`)."""
    run = wandb_offline.read_run(path)
    root = str(path.parent.parent)  # the lmlab run folder that holds wandb/
    config = {k: v for k, v in flatten(run.config).items()
              if not (isinstance(v, str) and root in v)}  # the run's own paths always differ
    curves: dict[str, list[tuple[int, float]]] = {}
    for item in run.history:
        step = int(item.get("trainer/global_step", item.get("_step", 0)))
        for name, value in item.items():
            if not name.startswith("_") and name not in ("epoch", "trainer/global_step") \
                    and isinstance(value, (int, float)):
                curves.setdefault(name, []).append((step, float(value)))
    values = run.summary
    final = {k: float(v) for k, v in values.items() if k.startswith("test/")}
    speed = {k.removeprefix("perf/"): float(v) for k, v in values.items()
             if k.startswith("perf/")}  # the last logged, not the run's averages
    return Run(str(path), config, curves, final, speed, values.get("_runtime"),
               config.get("monitor"))


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({k for run in runs for k in run.config})
    missing = object()
    return [k for k in keys if len({repr(run.config.get(k, missing)) for run in runs}) > 1]


def default_metric(runs: list[Run]) -> str:
    """The runs' own monitored metric, where one of them logged it; else a metric every run
    logged whose direction its name tells (validation ones first, then the training loss).

    Raises:
        LmlabError: the runs share no such metric.
    """
    for name in dict.fromkeys(run.monitor for run in runs if run.monitor):
        if any(name in run.curves for run in runs):
            return name
    shared = set.intersection(*(set(run.curves) for run in runs))
    known = sorted((m for m in shared if monitor_mode(m)),
                   key=lambda m: (not m.startswith("val/"), m != TRAIN_CURVE, m))
    if not known:
        logged = sorted({k for run in runs for k in run.curves})
        raise LmlabError("the runs share no metric to compare them by; they logged: "
                         f"{', '.join(logged) or 'nothing'}; pass --metric NAME")
    return known[0]


def best_and_final(run: Run, metric: str, mode: str) -> tuple[float | None, float | None]:
    values = [v for _, v in run.curves.get(metric, []) if not math.isnan(v)]
    if not values:
        return None, None
    return (min(values) if mode == "min" else max(values)), values[-1]


def table(runs: list[Run], metric: str, mode: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows, best run first."""
    keys = differing_keys(runs)
    tests = sorted({k for run in runs for k in run.final})
    scored = [(best_and_final(run, metric, mode), run) for run in runs]
    sign = 1 if mode == "min" else -1
    scored.sort(key=lambda s: (s[0][0] is None, sign * (s[0][0] or 0.0)))
    header = ["run", *keys, f"best {metric}", f"final {metric}", *tests, "tokens/s", "mfu",
              "wall s"]
    rows = []
    for (best, final), run in scored:
        rows.append([run.name, *(show(run.config.get(k)) for k in keys), show(best),
                     show(final), *(show(run.final.get(k)) for k in tests),
                     show(run.throughput.get("tokens_per_s")), show(run.throughput.get("mfu")),
                     show(run.wall_s)])
    return header, rows


def show(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def comma_separated(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows([header, *rows])
    return out.getvalue().rstrip("\n")


def plot(runs: list[Run], metric: str, path: Path) -> Path:
    """Each run's training loss and `metric` against the step, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [m for m in dict.fromkeys([TRAIN_CURVE, metric])]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    labels = run_labels(runs)
    for ax, name in zip(axes[0], names):
        for run, label in zip(runs, labels):
            points = run.curves.get(name, [])
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_labels(runs: list[Run]) -> list[str]:
    """Each run labelled by its differing keys (`model.optimizer.lr=0.003`), else its folder."""
    keys = differing_keys(runs)
    if not keys or len(keys) > 3:
        return [Path(run.name).name or run.name for run in runs]
    return [", ".join(f"{k}={show(run.config.get(k))}" for k in keys) for run in runs]


def beside(paths: list[str]) -> Path:
    """The folder that holds every path: their common folder (a single run folder or sweep
    folder itself)."""
    folders = [Path(p).resolve() for p in paths]
    return Path(os.path.commonpath([p if p.is_dir() else p.parent for p in folders]))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmlab.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, W&B offline runs, sweep folders")
    parser.add_argument("--metric", help="sorts the runs (default: their monitored metric, "
                        "else one they all logged)")
    parser.add_argument("--mode", choices=("min", "max"),
                        help="whether lower or higher is better (default: from the name)")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--out", help="the plot's file (default: compare.png in the folder "
                        "that holds the compared runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.metric and not (args.mode or monitor_mode(args.metric)):
            raise LmlabError(f"--metric {args.metric}: cannot tell whether higher or lower is "
                             "better; add --mode min or --mode max")
        runs = find_runs(args.paths)
        metric = args.metric or default_metric(runs)
        mode = args.mode or monitor_mode(metric)
        if mode is None:  # a monitored metric of the runs', whose name does not say
            raise LmlabError(f"the runs' metric {metric}: cannot tell whether higher or lower "
                             "is better; add --mode min or --mode max")
        if not any(metric in run.curves for run in runs):
            known = sorted({k for run in runs for k in run.curves})
            raise LmlabError(f"no run logged {metric}; they logged: {', '.join(known)}")
        header, rows = table(runs, metric, mode)
        print(markdown(header, rows) if args.format == "md" else comma_separated(header, rows))
        out = Path(args.out) if args.out else beside(args.paths) / "compare.png"
        print(f"plot: {plot(runs, metric, out)}")
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
