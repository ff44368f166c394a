"""The first screens a newcomer sees: the default run's console holds no warning, tip or
boilerplate line (they go to run.log), says what data it trains on, and run.log ends with
the final metrics. A resume that changes the run's length says so in one line."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_cli

NOISE = re.compile(r"warn|💡|Tip:|Plugin|no last checkpoint|GPU available|limit_\w+_batches",
                   re.I)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default")
    # the README's command, one epoch of larger batches (6: logged every 5 steps, not 20)
    result = run_cli(f"hydra.run.dir={run_dir}", "trainer.max_epochs=1", "data.batch_size=256",
                     "trainer.log_every_n_steps=5", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout + result.stderr


def test_the_default_runs_console_shows_no_warning_tip_or_boilerplate(default_run):
    _, console = default_run
    assert NOISE.findall(console) == []


def test_what_the_console_leaves_out_is_in_run_log(default_run):
    run_dir, _ = default_run
    log = (run_dir / "run.log").read_text()
    assert "💡 Tip" in log and "GPU available" in log  # negative control of the filter


def test_the_data_is_summed_up_in_one_line(default_run):
    _, console = default_run
    line = re.search(r"data: train ([\d,]+) / val ([\d,]+) / test ([\d,]+) records; "
                     r"vocabulary ([\d,]+); 8 classes \(train: (.*)\)", console)
    assert line, console[-2000:]
    counts = [int(n.replace(",", "")) for n in re.findall(r" ([\d,]+)(?:,|$)", line.group(5))]
    assert sum(counts) == int(line.group(1).replace(",", ""))  # every training example, once


def test_run_log_ends_with_the_final_metrics(default_run):
    run_dir, console = default_run
    log = (run_dir / "run.log").read_text().rstrip()
    tail = log[log.rindex("final metrics:"):]
    acc = float(re.search(r"test/acc\s+([\d.]+)", tail).group(1))
    assert f"{acc:.4f}" in console  # the table the console showed
    assert tail.splitlines()[-1].strip().startswith("throughput/")


@pytest.mark.slow
def test_resuming_with_another_length_says_so(tmp_path):
    common = [f"hydra.run.dir={tmp_path}", "trainer.max_epochs=-1", "data.batch_size=256",
              "trainer.log_every_n_steps=1"]
    assert run_cli(*common, "trainer.max_steps=3", cwd=ROOT).returncode == 0
    resumed = run_cli(*common, "trainer.max_steps=6", "resume=auto", cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resuming with another length: the run was planned for 3 optimizer "
                     r"steps and is now planned for 6", resumed.stdout + resumed.stderr)
    same = run_cli(*common, "trainer.max_steps=6", "resume=auto", cwd=ROOT)
    assert "another length" not in same.stdout + same.stderr  # negative control
