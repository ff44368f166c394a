"""Exact resume and atomic checkpoints.

In process: the loader's saved position, the newest checkpoint of a run folder, the config
checks, the random state, the atomic writer. End to end (`slow`): runs killed with SIGKILL
right after a mid-epoch checkpoint, or in the middle of writing one, and resumed with
`resume=auto` in their folder, train step for step as an uninterrupted run does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from conftest import DATA_DIR, ROOT
from test_data import ROWS, BatchRecorder, module, write
from lmlab.data.batching import BucketBatchSampler, ResumableLoader, Skip
from lmlab.data.blocks import RandomOffsets
from lmlab.errors import ConfigError, LmlabError
from lmlab.run import encode_as_trained
from lmlab.checkpointing.io import AtomicCheckpointIO
from lmlab.checkpointing.exact_resume import LastCheckpoint, random_state, set_random_state
from lmlab.checkpointing.resume import checkpoint_to_resume, newest_checkpoint
from lmlab.config.checks import check_config

# --- the loader's position ------------------------------------------------------------------


class Items(torch.utils.data.Dataset):
    """Gives back what the sampler asks for."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, item):
        return item


def bucket_loader(epoch: int) -> ResumableLoader:
    sampler = BucketBatchSampler(list(range(1, 41)), batch_size=4, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return ResumableLoader(Items(), batch_sampler=sampler,
                           collate_fn=lambda items: [i for i, _ in items])


def offsets_loader(epoch: int) -> ResumableLoader:
    sampler = RandomOffsets(num_offsets=1000, num_batches=10, batch_size=4, seed=3)
    sampler.set_epoch(epoch)
    return ResumableLoader(list(range(1000)), batch_size=4, sampler=sampler)


def as_lists(batches) -> list[list[int]]:
    return [[int(i) for i in batch] for batch in batches]


@pytest.mark.parametrize("make", [bucket_loader, offsets_loader], ids=["buckets", "offsets"])
def test_a_loader_resumed_from_its_state_gives_the_batches_after_the_saved_one(make):
    first = make(epoch=2)
    iterator = iter(first)
    trained = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    rest = as_lists(iterator)

    resumed = make(epoch=0)  # a new process: Lightning sets the epoch, then loads the state
    resumed.load_state_dict(state)
    assert as_lists(resumed) == rest
    assert resumed.state_dict() == {"epoch": 2, "batches": len(first)}
    assert as_lists(trained) + rest == as_lists(make(epoch=2))  # the same epoch, whole
    assert as_lists(resumed) == as_lists(make(epoch=2))  # the skip is used once

    unloaded = make(epoch=2)  # negative control: without the state, the epoch starts over
    assert as_lists(unloaded)[0] == as_lists(trained)[0]


def test_a_skip_applies_to_its_own_epoch_only():
    skip = Skip()
    skip.set(epoch=1, batches=5)
    assert skip.take(2) == 0 and skip.take(1) == 0  # taken (and dropped) by epoch 2
    skip.set(epoch=1, batches=5)
    assert skip.take(1) == 5 and skip.take(1) == 0


def test_a_finished_epoch_resumes_at_the_next_ones_start():
    loader = bucket_loader(epoch=1)
    loader.load_state_dict({"epoch": 1, "batches": len(loader)})
    assert as_lists(loader) == as_lists(bucket_loader(epoch=1))


def fit_recording(dm, ckpt_path=None, callbacks=(), accumulate: int = 1) -> BatchRecorder:
    model = BatchRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=2,
                        callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0,
                        accumulate_grad_batches=accumulate)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


class WritesCounted(LastCheckpoint):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.written = []

    def _save_checkpoint(self, trainer, filepath) -> None:
        self.written.append(trainer.global_step)
        super()._save_checkpoint(trainer, filepath)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_last_checkpoint_every_n_steps_is_written_once_a_step_and_never_mid_accumulation(
        tmp_path, accumulate):
    rows = [(f"word{i % 7} more words here", str(i % 3)) for i in range(60)]
    dm = module({"train": write(tmp_path / "train.csv", "csv", rows)})
    last = WritesCounted(dirpath=tmp_path, filename="last", every_n_train_steps=2)
    fit_recording(dm, callbacks=[last], accumulate=accumulate)
    per_epoch = -(-len(dm.train_dataloader()) // accumulate)  # optimizer steps; no validation
    expected = [s for e in range(2) for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1)
                if s % 2 == 0 or s % per_epoch == 0]  # every 2 steps, and each epoch's end
    assert last.written == sorted(set(expected))  # once a step, of its micro-batches the last


@pytest.mark.parametrize("workers", [0, 1])
def test_lightning_resumes_the_loader_mid_epoch(tmp_path, workers):
    train = str(write(tmp_path / "train.csv", "csv", ROWS * 2))
    make = lambda: module({"train": train}, num_workers=workers)  # noqa: E731
    whole = fit_recording(make())
    assert len(whole.seen[0]) > 5
    steps = len(whole.seen[0]) + 3  # three batches into the second epoch
    mid = ModelCheckpoint(tmp_path, "mid", every_n_train_steps=steps, save_top_k=1)
    assert fit_recording(make(), callbacks=[mid]).seen == whole.seen
    resumed = fit_recording(make(), ckpt_path=tmp_path / "mid.ckpt")
    assert list(resumed.seen) == [1]
    assert resumed.seen[1] == whole.seen[1][3:]


# --- which checkpoint -----------------------------------------------------------------------


def write_checkpoint(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))


def test_resume_auto_takes_the_newest_checkpoint_of_the_run_folder(make_cfg):
    cfg = make_cfg("resume=auto")
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert checkpoint_to_resume(cfg) is None  # nothing yet: start afresh
    write_checkpoint(folder / "best-epoch00.ckpt", 1000)
    write_checkpoint(folder / "last.ckpt", 2000)
    write_checkpoint(folder / ".last.ckpt.123.tmp", 3000)  # a write that never finished
    assert checkpoint_to_resume(cfg) == str(folder / "last.ckpt")
    write_checkpoint(folder / "interrupted.ckpt", 2500)
    assert newest_checkpoint(folder) == folder / "interrupted.ckpt"


def test_ckpt_path_last_is_this_runs_newest_and_an_error_without_one(make_cfg):
    cfg = make_cfg("ckpt_path=last")
    with pytest.raises(LmlabError, match="ckpt_path=last: no checkpoint in .*hydra.run.dir"):
        checkpoint_to_resume(cfg)
    write_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", 1000)
    assert checkpoint_to_resume(cfg).endswith("checkpoints/last.ckpt")
    assert checkpoint_to_resume(make_cfg("ckpt_path=/some/file.ckpt")) == "/some/file.ckpt"


def test_resume_values_are_checked_before_the_run(make_cfg):
    with pytest.raises(ConfigError, match="resume=yes is not an option; use resume=auto"):
        check_config(make_cfg("resume=yes"))
    with pytest.raises(ConfigError, match="both say where to resume from"):
        check_config(make_cfg("resume=auto", "ckpt_path=last"))
    check_config(make_cfg("resume=auto"))


# --- random state and atomic writes ---------------------------------------------------------


def draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def test_the_saved_random_state_replays_the_same_draws(tmp_path):
    torch.save(random_state(), tmp_path / "state.pt")
    first = draws()
    set_random_state(torch.load(tmp_path / "state.pt", weights_only=True))  # as checkpoints load
    assert draws() == first
    assert draws() != first  # negative control: the generators move on


class FailingWrite(AtomicCheckpointIO):
    """Raises halfway through writing, as a full disk or a crash would stop it."""

    def write(self, file, data) -> None:
        file.write(data[:len(data) // 2])
        raise OSError("disk full")


def test_a_failed_write_leaves_the_previous_checkpoint_whole_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="disk full"):
        FailingWrite().save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    buffer = io.BytesIO()  # negative control: the same failure writing in place
    torch.save({"global_step": 2, "w": torch.zeros(1000)}, buffer)
    with open(path, "wb") as f, pytest.raises(OSError):
        FailingWrite().write(f, buffer.getbuffer())
    with pytest.raises(RuntimeError, match="zip archive"):
        torch.load(path, weights_only=True)


# --- end to end: killed runs resumed --------------------------------------------------------

EVERY = 4  # steps between mid-epoch checkpoints: it divides the epoch of 8 steps
KILL = 13  # killed as step 14 begins: the newest checkpoint is step 12's, mid-epoch 1
COMMON = ["trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
          f"callbacks.last_checkpoint.every_n_train_steps={EVERY}", "resume=auto"]
BOUNDS = {"epochs": ["trainer.max_epochs=3"],
          "steps": ["trainer.max_epochs=-1", "trainer.max_steps=24"]}
# Every way a run ends mid-way, in order along one run (epochs of 8 steps, validation after
# steps 7, 15 and 23), each resumed by the next: killed as the epoch's last step begins, as
# the next epoch's first step begins (right after the validation), and as its second
# begins; SIGTERM during an epoch's last step (it and its validation finish first); killed
# mid-epoch.
EDGES = [["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=7"],
         ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=8"],
         ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=9"],
         ["+callbacks.sig._target_=faults.SignalAtStep", "+callbacks.sig.step=15"],
         ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=21"]]
# Early stopping that never stops these runs, but whose count of validations without
# progress (by 10) counts every validation after the first: a resume that lost one shows.
STOPPING = ["callbacks=early_stopping", "monitor=val/loss", "callbacks.early_stopping.patience=5",
            "+callbacks.early_stopping.min_delta=10"]
TASKS = {  # each with dropout, so the random state matters
    "classifier": ["trainer.limit_train_batches=8"],
    "gpt": ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=300",
            "data.train_batches=8", "data.val_batches=2", "model.net.dropout=0.1",
            "model.sample_tokens=0"],
    "seq2seq": ["model=transformer_tiny", "data=stdlib_summaries", "model.net.dropout=0.1",
                "trainer.limit_train_batches=8", "model.beam=1"],
}
LAYOUTS = {"one": [], "ddp": ["strategy=ddp", "trainer.devices=2"]}


def launch(run_dir: Path, overrides: list[str], cache: Path) -> subprocess.Popen:
    """`python -m lmlab.run` in a session of its own, its output in files beside the folder
    (never a pipe that could fill up and block it), `tests/` importable for the faults."""
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={cache}", *overrides]
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "a") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def run_ok(run_dir: Path, overrides: list[str], cache: Path) -> None:
    status = finish(launch(run_dir, overrides, cache))
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert status == 0, log[-3000:]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Train loss by step; where a killed run logged a step that its resumed run trained
    again, the later row (the resumed run's) counts."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"])
                for row in csv.DictReader(f) if row.get("train/loss")}


def kill_and_resume(run_dir: Path, overrides: list[str], cache: Path,
                    fault: list[str]) -> tuple[int, float]:
    """Runs with `fault` until it dies, then resumes it (resume=auto, same folder);
    returns the killed run's exit status and seconds from its newest checkpoint to its exit."""
    status = finish(launch(run_dir, [*overrides, *fault], cache))
    exited = time.time()
    newest = newest_checkpoint(run_dir / "checkpoints")
    seconds = exited - newest.stat().st_mtime
    run_ok(run_dir, overrides, cache)
    return status, seconds


KILL_AT = ["+callbacks.kill._target_=faults.KillAtStep", f"+callbacks.kill.step={KILL}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier_curve(tmp_path_factory, cache):
    """An uninterrupted classifier run (resume=auto with no checkpoint yet: from scratch)."""
    run_dir = tmp_path_factory.mktemp("classifier") / "run"
    run_ok(run_dir, [*COMMON, *TASKS["classifier"]], cache)
    return train_losses(run_dir)


def assert_same_curve(resumed: dict[int, float], uninterrupted: dict[int, float],
                      steps: int = 16) -> None:
    assert sorted(resumed) == sorted(uninterrupted) == list(range(steps))
    assert [resumed[s] for s in sorted(resumed)] == \
        pytest.approx([uninterrupted[s] for s in sorted(uninterrupted)], rel=1e-6, abs=1e-7)


def val_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["val/loss"])
                for row in csv.DictReader(f) if row.get("val/loss")}


def what_it_kept(run_dir: Path) -> dict:
    """Early stopping's state in the last checkpoint, the best checkpoint and its score."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["callbacks"]
    stopping = next(v for k, v in state.items() if k.startswith("EarlyStopping"))
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {"stopping": {k: float(v) if torch.is_tensor(v) else v for k, v in stopping.items()},
            "best": sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")),
            "metrics": metrics}


@pytest.mark.slow
@pytest.mark.parametrize("task,bound,layout", [
    # each task and each bound, as the experiments bound them (LMs by steps); the GPT's
    # run under DDP
    ("classifier", "epochs", "one"), ("classifier", "steps", "one"), ("seq2seq", "epochs", "one"),
    pytest.param("gpt", "steps", "ddp", marks=pytest.mark.distributed)])
def test_a_run_stopped_at_every_edge_of_an_epoch_resumes_as_the_uninterrupted_run(
        tmp_path, cache, task, bound, layout):
    """Round 2: a step-bounded run resumed after an epoch's end trained an extra step; a
    step checkpoint on an epoch's last step lost that epoch's validation; the step that
    received SIGTERM was never logged. Each stop of EDGES in turn, then the run's end."""
    overrides = [*COMMON, *TASKS[task], *BOUNDS[bound], *LAYOUTS[layout], *STOPPING]
    run_ok(tmp_path / "uninterrupted", overrides, cache)
    statuses = [finish(launch(tmp_path / "stopped", [*overrides, *edge], cache))
                for edge in EDGES]
    run_ok(tmp_path / "stopped", overrides, cache)
    log = (tmp_path / "stopped.log").read_text()
    assert statuses == [-signal.SIGKILL] * 3 + [143, -signal.SIGKILL], log[-3000:]
    assert_same_curve(train_losses(tmp_path / "stopped"), train_losses(tmp_path / "uninterrupted"),
                      steps=24)
    uninterrupted = val_losses(tmp_path / "uninterrupted")
    assert sorted(uninterrupted) == [7, 15, 23]
    assert val_losses(tmp_path / "stopped") == pytest.approx(uninterrupted, rel=1e-6)
    assert what_it_kept(tmp_path / "stopped") == what_it_kept(tmp_path / "uninterrupted")


@pytest.mark.slow
@pytest.mark.parametrize("forget", ["ForgetDataOrder", "ForgetRandomState"])
def test_without_the_data_order_or_the_random_state_the_trajectory_departs(
        tmp_path, cache, classifier_curve, forget):
    """Negative controls: each saved piece is needed for the check above to pass."""
    overrides = [*COMMON, *TASKS["classifier"]]
    fault = [*KILL_AT, f"+callbacks.forget._target_=faults.{forget}"]
    kill_and_resume(tmp_path / "killed", overrides, cache, fault)
    resumed = train_losses(tmp_path / "killed")
    assert [resumed[s] for s in range(12)] == [classifier_curve[s] for s in range(12)]
    with pytest.raises(AssertionError):
        assert_same_curve(resumed, classifier_curve)


def kill_mid_write(run_dir: Path, io: str, cache: Path) -> tuple[int, float]:
    """Starts a run whose checkpoint of step 12 stalls halfway through its write, and
    SIGKILLs it (its whole process group) then; returns its status and seconds to exit."""
    marker = run_dir.parent / f"{run_dir.name}.stalled"
    stall = [f"trainer.plugins._target_=faults.{io}", "+trainer.plugins.step=12",
             f"+trainer.plugins.marker={marker}"]
    process = launch(run_dir, [*COMMON, *TASKS["classifier"], *stall], cache)
    try:
        deadline = time.time() + 600
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        killed = time.time()
        os.killpg(process.pid, signal.SIGKILL)
        status = finish(process, timeout=120)
        return status, time.time() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes(
        tmp_path, cache, classifier_curve, record_property):
    run_dir = tmp_path / "run"
    status, seconds = kill_mid_write(run_dir, "StallingCheckpointIO", cache)
    record_property("exit", status)
    record_property("seconds_to_exit", round(seconds, 2))
    print(f"killed mid-write: exit {status}, {seconds:.2f} s from SIGKILL to exit")
    assert status == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 12 - EVERY  # the one before
    assert list((run_dir / "checkpoints").glob(".last.ckpt.*.tmp"))  # the torn one, aside
    run_ok(run_dir, [*COMMON, *TASKS["classifier"]], cache)
    assert_same_curve(train_losses(run_dir), classifier_curve)


@pytest.mark.slow
def test_writing_in_place_leaves_a_torn_checkpoint(tmp_path, cache):
    """Negative control: the same kill against a writer that writes in place."""
    run_dir = tmp_path / "run"
    status, seconds = kill_mid_write(run_dir, "TornCheckpointIO", cache)
    print(f"killed mid-write in place: exit {status}, {seconds:.2f} s from SIGKILL to exit")
    with pytest.raises(RuntimeError, match="zip archive"):
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


# --- which tokenizer a run that starts from weights encodes with ------------------------------


def test_weights_of_a_run_folder_bring_its_tokenizer(make_cfg, tmp_path):
    (tmp_path / "old" / ".hydra").mkdir(parents=True)
    (tmp_path / "old" / ".hydra" / "config.yaml").write_text("{}")
    cfg = make_cfg("data=stdlib_summaries")
    encode_as_trained(cfg, tmp_path / "old" / "checkpoints" / "last.ckpt")
    assert cfg.data.load_from == str(tmp_path / "old")
    named = make_cfg("data=stdlib_summaries", "+data.load_from=elsewhere")
    encode_as_trained(named, tmp_path / "old" / "weights.ckpt")
    assert named.data.load_from == "elsewhere"  # a named folder stays


def test_weights_outside_a_run_folder_are_named_in_a_warning(make_cfg, tmp_path, caplog):
    cfg = make_cfg("data=stdlib_summaries")
    encode_as_trained(cfg, tmp_path / "weights.ckpt")
    assert "load_from" not in cfg.data
    assert f"{tmp_path / 'weights.ckpt'} lies in no run folder" in caplog.text


@pytest.mark.parametrize("kind", ["weights.ckpt", "weights.safetensors"])
def test_loose_weights_bring_the_tokenizer_they_carry(make_cfg, tmp_path, kind):
    """Round 2: a weights file outside its run folder fitted a fresh tokenizer (other ids)."""
    from safetensors.torch import save_file

    files = {"source_tokenizer.json": '{"a": 1}', "target_tokenizer.json": '{"b": 2}'}
    loose = tmp_path / "copied" / kind
    loose.parent.mkdir()
    if kind == "weights.ckpt":
        torch.save({"state_dict": {"w": torch.ones(1)}, "data_files": files}, loose)
    else:
        save_file({"w": torch.ones(1)}, loose, metadata={"data_files": json.dumps(files)})
    cfg = make_cfg("data=stdlib_summaries")
    encode_as_trained(cfg, loose)
    run_dir = Path(cfg.paths.output_dir)
    assert cfg.data.load_from == str(run_dir)
    assert {name: (run_dir / name).read_text() for name in files} == files


@pytest.mark.slow
def test_fine_tuning_loose_weights_keeps_their_character_ids(tmp_path):
    """Round 2 case: a char LM trained on A, its weights.ckpt copied out of the run folder,
    fine-tuned on B of as many distinct characters: B got a tokenizer of its own."""
    (tmp_path / "a.txt").write_text("abc abc\n" * 300)
    (tmp_path / "b.txt").write_text("nop nop\n" * 300)
    common = ["model=gpt_tiny", "data=text_files", "data/tokenizer=char", "trainer.max_steps=2",
              "trainer.max_epochs=-1", "data.train_batches=2", "data.val_batches=1",
              "model.sample_tokens=0", "trainer.limit_test_batches=1",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    run_ok(tmp_path / "first", [*common, f"data.files={tmp_path / 'a.txt'}"], tmp_path)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "weights.ckpt").write_bytes(
        (tmp_path / "first" / "weights.ckpt").read_bytes())
    run_ok(tmp_path / "tuned", [*common, f"data.files={tmp_path / 'b.txt'}",
                                f"ckpt_path={tmp_path / 'copy' / 'weights.ckpt'}"], tmp_path)
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == \
        (tmp_path / "first" / "tokenizer.json").read_text()
