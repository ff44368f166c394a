"""What a default training step waits for: one asynchronous all-reduce (the numerical check's
values and the stop signal, together), and no host read of the step's own values; the
previous step's values are read as the next begins, when they have arrived.

Counted by `probes.SyncCounter` in step 5 (not a logged one) of two CPU processes. The
optimizer's reads of its step counts (host tensors on every device) are left out. Before
this layout a step issued two collectives (the check's all-reduce, and the stop signal's
own) and read its loss and gradient norm on the host at once: `docs/benchmarks.md`.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from test_parallel import run_isolated

COMMON = ["trainer.max_steps=8", "trainer.max_epochs=-1", f"user_dir={ROOT / 'tests'}",
          "+callbacks.sync._target_=probes.SyncCounter"]


def counts(tmp_path, *overrides) -> dict:
    folder = tmp_path / "counts"
    folder.mkdir()
    run_isolated(tmp_path / "run", *COMMON, f"+callbacks.sync.folder={folder}", *overrides)
    return {path.stem: json.loads(path.read_text()) for path in folder.glob("rank*.json")}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_default_step_of_two_processes_issues_one_collective_and_reads_nothing_of_its_own(
        tmp_path):
    found = counts(tmp_path, "strategy=ddp", "trainer.devices=2")
    assert sorted(found) == ["rank0", "rank1"]
    for rank in found.values():
        assert rank["collectives"] == ["all_reduce"]
        assert [r for r in rank["host_reads"] if r != "item optimizer"] == []
        assert rank["late_reads"] == 1


@pytest.mark.slow
def test_skipping_steps_reads_each_step_at_once(tmp_path):
    # the negative control: skip must decide before the step, so it reads the step's values
    found = counts(tmp_path, "strategy=cpu", "callbacks.numerics.non_finite=skip")
    reads = [r for r in found["rank0"]["host_reads"] if r != "item optimizer"]
    assert reads == ["this step's values"] and found["rank0"]["late_reads"] == 0
