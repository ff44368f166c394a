"""`python -m lmlab.compare`: the keys that differ and only those, sorting by the metric's
direction, the plot, the readers of run folders, sweeps and W&B offline runs, and one-line
errors for what is not a run."""

import csv
import io

import pytest

from conftest import ROOT, run_cli
from lmlab.compare import Run, default_metric, differing_keys, find_runs, flatten, main, table
from lmlab.errors import LmlabError


def fake_run(name: str, lr: float, losses: list[float], seed: int = 42) -> Run:
    """A run as the readers return it (the readers themselves are tested on real runs)."""
    config = flatten({"seed": seed, "model": {"optimizer": {"lr": lr}, "hidden_size": 16}})
    curves = {"val/loss": list(enumerate(losses)), "val/acc": list(enumerate(losses))}
    return Run(name, config, curves)


def test_only_differing_keys_are_shown():
    runs = [fake_run("a", 1e-3, [2.0, 1.5]), fake_run("b", 3e-3, [2.0, 1.2])]
    assert differing_keys(runs) == ["model.optimizer.lr"]
    runs.append(fake_run("c", 1e-3, [2.0], seed=7))  # negative control: now seed differs too
    assert differing_keys(runs) == ["model.optimizer.lr", "seed"]


def test_sorted_by_the_metric_direction():
    runs = [fake_run("a", 1e-3, [2.0, 1.5]), fake_run("b", 3e-3, [2.0, 1.2, 1.3]),
            fake_run("c", 1e-2, [])]
    header, rows = table(runs, "val/loss", "min")
    assert [r[0] for r in rows] == ["b", "a", "c"]  # the run without the metric last
    assert rows[0][header.index("best val/loss")] == "1.2"
    assert rows[0][header.index("final val/loss")] == "1.3"
    _, rows = table(runs, "val/acc", "max")
    assert [r[0] for r in rows] == ["a", "b", "c"]


def test_without_metric_the_runs_own_monitor_else_a_metric_they_share():
    runs = [fake_run("a", 1e-3, [2.0]), fake_run("b", 3e-3, [1.0])]
    runs[0].monitor = runs[1].monitor = "val/acc"
    assert default_metric(runs) == "val/acc"
    for run in runs:  # Round 2 case: runs shorter than an epoch logged no validation
        run.curves = {"train/loss": [(0, 2.0)], "perf/tokens_per_s": [(0, 9.0)]}
    assert default_metric(runs) == "train/loss"
    runs[1].curves = {"val/bleu": [(0, 1.0)]}
    with pytest.raises(LmlabError, match="share no metric"):
        default_metric(runs)


def test_paths_that_are_not_runs_are_refused(tmp_path):
    with pytest.raises(LmlabError, match="no such file"):
        find_runs([str(tmp_path / "missing")])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(LmlabError, match="is not a run"):
        find_runs([str(tmp_path / "empty")])


def test_command_line_errors_are_one_line(tmp_path, capsys):
    for argv in ([str(tmp_path)], [str(tmp_path), "--metric", "val/score"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert "--mode" in err  # the metric whose direction is unknown says how to give it


TINY = ["trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.log_every_n_steps=2", "logger=csv_wandb"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiny real runs of the default classifier that differ in learning rate only."""
    folder = tmp_path_factory.mktemp("sweep")
    for lr in ("0.001", "0.003"):
        result = run_cli(f"hydra.run.dir={folder / lr}", *TINY, f"model.optimizer.lr={lr}",
                         f"callbacks.throughput.cpu_peak_file={folder / 'peak.json'}", cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    return folder


def compare(*args: str):
    result = run_cli(*args, module="lmlab.compare", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1:]


@pytest.mark.slow
def test_compare_two_runs_prints_the_differing_key_and_writes_the_plot(sweep, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    stdout = compare(str(sweep / "0.001"), str(sweep / "0.003"), "--out", str(out))
    header, rows = markdown_rows(stdout)
    assert "model.optimizer.lr" in header
    assert not any(k in header for k in ("seed", "model.net.hidden_size", "trainer.max_epochs"))
    assert sorted(r[header.index("model.optimizer.lr")] for r in rows) == ["0.001", "0.003"]
    best = [float(r[header.index("best val/acc")]) for r in rows]  # the runs' monitor
    assert best == sorted(best, reverse=True)  # an accuracy: highest first
    assert all(float(r[header.index("tokens/s")]) > 0 and r[header.index("test/acc")]
               for r in rows)
    assert f"plot: {out}" in stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_a_sweep_folder_and_w_and_b_offline_runs(sweep, tmp_path):
    out = str(tmp_path / "plot.png")
    stdout = compare(str(sweep), "--metric", "val/acc", "--format", "csv", "--out", out)
    rows = list(csv.DictReader(io.StringIO(stdout.split("plot:")[0])))
    assert len(rows) == 2 and set(rows[0]) >= {"model.optimizer.lr", "best val/acc"}
    from_csv = {r["model.optimizer.lr"]: float(r["best val/acc"]) for r in rows}
    offline = [str(next((sweep / lr / "wandb").glob("offline-run-*"))) for lr in ("0.001", "0.003")]
    stdout = compare(*offline, "--metric", "val/acc", "--format", "csv", "--out", out)
    rows = list(csv.DictReader(io.StringIO(stdout.split("plot:")[0])))
    assert [k for k in rows[0] if "." in k and "/" not in k] == ["model.optimizer.lr"]
    from_wandb = {r["model.optimizer.lr"]: float(r["best val/acc"]) for r in rows}
    assert from_wandb == pytest.approx(from_csv, abs=1e-4)


@pytest.mark.slow
def test_runs_without_validation_compare_by_a_shared_metric(tmp_path):
    """Round 2 case: two 10-step classifier runs, no --metric: "no run logged val/loss"."""
    for lr in ("0.001", "0.003"):
        result = run_cli(f"hydra.run.dir={tmp_path / lr}", "trainer.max_steps=10",
                         "trainer.log_every_n_steps=2", "trainer.limit_test_batches=2",
                         f"model.optimizer.lr={lr}", cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    header, rows = markdown_rows(compare(str(tmp_path / "0.001"), str(tmp_path / "0.003"),
                                         "--out", str(tmp_path / "c.png")))
    assert "best train/loss" in header and len(rows) == 2
