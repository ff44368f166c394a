"""Evaluates a finished run on one device, with the tokenizer and labels it saved.

    python -m lmlab.evaluate outputs/2026-01-01/12-00-00  # best, else last, else weights
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=last data.batch_size=256
    python -m lmlab.evaluate outputs/2026-01-01/12-00-00 ckpt=weights   # the portable file

A dotted `key=value` overrides the run's saved config (`+key=value` adds a key it lacks).

What it finds goes to RUN/evaluate/: `metrics.json` (the test metrics and the checkpoint
tested); for a classifier `predictions.tsv` (each test text, its gold and predicted labels and
the predicted label's probability; a backslash, tab or line break in a text written `\\\\`,
`\\t`, `\\n`), `confusion.tsv` (counts, a row per gold label, a column per predicted one) and
`confusion.png`; for another task with a `predict` method `predictions.tsv` of each test text
and what it predicts; for a sequence-to-sequence run the hypotheses, under `hypotheses/`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities import move_data_to_device
from omegaconf import DictConfig

from lmlab.config.cli import fail, parse_known_args, report, unknown_key
from lmlab.data.records import text_of
from lmlab.config.user_dir import moved_to
from lmlab.errors import LmlabError
from lmlab.predict import tsv
from lmlab.interop.huggingface import is_pretrained_folder
from lmlab.training.build import built, load_task
from lmlab.training.runs import find_checkpoint, load_run_config
from lmlab.training.kernels import kernels_of

USAGE = ("python -m lmlab.evaluate RUN_DIR [ckpt=best|last|weights|PATH] "
         "[data.batch_size=N ...]")


@dataclass
class EvaluateArgs:
    """Arguments of `python -m lmlab.evaluate`, after the run folder."""

    run_dir: str  # the folder `python -m lmlab.run` printed as `run files`
    ckpt: str | None = None  # best, last, weights or a path; null: best, else last, else weights
    user_dir: str | None = None  # where the run's user directory is now, if it moved


def evaluate(run_dir: str | Path, ckpt: str | None = None, overrides: list[str] = ()) -> dict:
    """Tests a run's checkpoint (see `find_checkpoint`), writes what it found under
    RUN/evaluate/ (see the module's docstring) and returns the test metrics."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    checkpoint = find_checkpoint(run_dir, ckpt, lambda name, _: f"python -m lmlab.evaluate "
                                 f"{run_dir}" + (f" ckpt={name}" if name else ""))
    data = built(cfg.data, **({} if is_pretrained_folder(run_dir) else {"load_from": str(run_dir)}))
    data.setup("test")
    task = load_task(cfg, data, checkpoint)
    trainer = trainer_for_test(cfg, run_dir)
    metrics = trainer.test(task, datamodule=data, verbose=False)[0]
    folder = run_dir / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "metrics.json"]
    written[0].write_text(json.dumps({"metrics": metrics, "checkpoint": str(checkpoint)},
                                     indent=1))
    if callable(getattr(task, "predict", None)):  # a classifier's, or a task of one's own
        written += write_predictions(folder, task.kind, data,
                                     *predictions_on_test(trainer, task, data))
    written += [p for p in [folder / "hypotheses"] if p.is_dir()]  # a seq2seq task's
    report(metrics, run_dir, str(checkpoint))
    for path in written:
        print(f"written:    {path}")
    return metrics


def trainer_for_test(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """One device of the run's accelerator and precision, with the run's kernel choices; a
    seq2seq test writes its hypotheses under RUN/evaluate."""
    return L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1,
                     precision=cfg.trainer.get("precision", "32-true"), logger=False,
                     enable_checkpointing=False, callbacks=[kernels_of(cfg)],
                     default_root_dir=str(run_dir / "evaluate"))


def predictions_on_test(trainer: L.Trainer, task, data) -> tuple[list[str], list[dict]]:
    """Each test example's text and what `task.predict` gives for it, in the split's order.
    The task predicts on the test's own batches, on the trainer's device and in its
    precision, so a classifier's accuracy over them is the test's."""
    loader = data.test_dataloader()
    order = [index for items in loader.batch_sampler for index, _ in items]
    device = trainer.strategy.root_device
    found = []
    task.to(device).eval()  # Lightning moved it back to the CPU after the test
    with torch.inference_mode(), trainer.precision_plugin.predict_step_context():
        for batch in loader:
            found += task.predict(move_data_to_device(batch, device))
    rows = dict(zip(order, found))
    # The DataModule keeps the test split's token ids, not its texts: read its records again
    # (seeded, so the same split in the same order).
    records = data._read_splits()["test"]
    fields = next(iter(data.texts.values()))  # the text of a classifier's examples
    texts = [text_of(record, fields) for record in records]
    return texts, [rows[index] for index in range(len(texts))]


def write_predictions(folder: Path, kind: str, data, texts: list[str],
                      rows: list[dict]) -> list[Path]:
    """Writes `predictions.tsv` into `folder`: each text and what the task predicts for it
    (a classifier's: see `write_classifications`)."""
    if kind == "classification":
        gold = data.datasets["test"].column("labels").tolist()
        return write_classifications(folder, texts, gold, rows, tuple(data.labels))
    path = folder / "predictions.tsv"
    path.write_text(tsv(["text", *rows[0]], [[text, *row.values()]
                                              for text, row in zip(texts, rows)]),
                    encoding="utf-8")
    return [path]


def write_classifications(folder: Path, texts: list[str], gold: list[int], rows: list[dict],
                          classes: tuple[str, ...]) -> list[Path]:
    """Writes a classifier's `predictions.tsv` (text, gold and predicted labels, the
    predicted one's probability), `confusion.tsv` and `confusion.png` into `folder`, from
    the gold label ids and the rows of `ClassificationTask.predict`."""
    index = {label: i for i, label in enumerate(classes)}
    predicted = torch.tensor([index[row["label"]] for row in rows])
    table = [[text, classes[g], row["label"], row["probability"]]
             for text, g, row in zip(texts, gold, rows)]
    paths = [folder / name for name in ("predictions.tsv", "confusion.tsv", "confusion.png")]
    paths[0].write_text(tsv(["text", "gold", "predicted", "probability"], table),
                        encoding="utf-8")
    counts = confusion(torch.tensor(gold), predicted, len(classes))
    paths[1].write_text(tsv(["gold/predicted", *classes],
                            [[label, *row] for label, row in zip(classes, counts.tolist())]),
                        encoding="utf-8")
    plot_confusion(counts, classes, paths[2])
    return paths


def confusion(gold: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """(C, C) counts of the examples of each gold class (rows) given each predicted class."""
    flat = torch.bincount(gold * classes + predicted, minlength=classes * classes)
    return flat.reshape(classes, classes)


def plot_confusion(counts: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    """The confusion matrix as a PNG: shades by the share of each gold row, and the counts."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    size = 2 + 0.5 * len(classes)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the gold label")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(classes) <= 30:  # past that the numbers no longer fit their cells
        for (g, p), count in zip(((g, p) for g in ticks for p in ticks), counts.flatten()):
            ax.text(p, g, int(count), ha="center", va="center", fontsize="small",
                    color="white" if shares[g, p] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    try:
        args, overrides = parse_known_args(EvaluateArgs, argv, USAGE, positional=("run_dir",))
        plain = next((a for a in overrides if "." not in a.partition("=")[0]), None)
        if plain is not None:  # neither an option of evaluate nor a key of the run's config
            raise unknown_key(plain.partition("=")[0], EvaluateArgs, USAGE)
        evaluate(args.run_dir, args.ckpt, [*overrides, *moved_to(args.user_dir)])
    except LmlabError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
