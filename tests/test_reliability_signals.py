"""Faults injected into real runs: a signal (preemption, Ctrl-C), a non-finite loss, a loss
spike, a rank that dies or hangs. Each run is `python -m lmlab.run` in a session of its own,
with a hard timeout that detects a hang; the time from the fault to the exit is printed
(docs/reliability.md records it), never asserted."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import DATA_DIR, ROOT
from faults import ScaleOutputAt
from lmlab.training.callbacks.numerics import NumericalGuard
from lmlab.data.batching import ResumableLoader
from lmlab.errors import NumericalFault

HARD_TIMEOUT = 240  # seconds from the fault to the exit, past which the run is called hung
LONG_RUN = ["trainer.max_epochs=50", "logger=csv", "trainer.limit_val_batches=2"]
FAULT = "+callbacks.fault._target_=faults."


class Run:
    """A `python -m lmlab.run` in a session of its own, its output in RUN.out.txt."""

    def __init__(self, run_dir, *overrides: str):
        self.dir = run_dir
        self.output = run_dir.parent / f"{run_dir.name}.out.txt"
        env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1",
               "WANDB_MODE": "offline",
               "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                              os.environ.get("PYTHONPATH", "")])}
        args = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={run_dir}", *overrides]
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, path, timeout: float = 600) -> None:  # a first DeepSpeed run compiles
        deadline = time.time() + timeout
        while not path.exists() and time.time() < deadline and self.process.poll() is None:
            time.sleep(0.2)
        assert path.exists(), f"{path} never appeared:\n{self.text()[-3000:]}"

    def signal(self, signum: signal.Signals) -> None:
        os.killpg(self.process.pid, signum)  # every process of the run, as SLURM does

    def wait(self, since: float | None = None, label: str = "") -> int:
        """The exit status; prints the seconds from `since` to the exit."""
        try:
            self.process.wait(timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run hung: no exit {HARD_TIMEOUT} s on:\n{self.text()[-3000:]}")
        if since is not None:
            print(f"\n{label}: exit status {self.process.returncode}, "
                  f"{time.time() - since:.1f} s after the fault")
        return self.process.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def text(self) -> str:
        return self.output.read_text()


def stop_mid_training(run: Run, signum: signal.Signals, label: str) -> int:
    """Waits for the first checkpoint, lets the run train on, signals every process."""
    try:
        run.wait_for(run.dir / "checkpoints" / "last.ckpt")
        time.sleep(1.0)  # so the signal lands mid-epoch, or mid-save
        sent = time.time()
        run.signal(signum)
        return run.wait(sent, label)
    finally:
        run.kill()


def assert_resumable(checkpoint) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] > 0
    assert all(torch.isfinite(w).all() for w in state["state_dict"].values()
               if w.is_floating_point())
    return state


# -- preemption and Ctrl-C -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_the_state_says_how_to_resume_and_exits_143(tmp_path, workers):
    # with DataLoader workers, which SIGTERM kills too, torch failed the step: exit 1, no save
    run = Run(tmp_path / "run", "strategy=cpu", *LONG_RUN, f"data.num_workers={workers}")
    label = f"SIGTERM, one process, {workers} data workers"
    assert stop_mid_training(run, signal.SIGTERM, label) == 143
    saved = run.dir / "checkpoints" / "interrupted.ckpt"
    assert_resumable(saved)
    assert "stopped by SIGTERM at step" in run.text()
    assert f"hydra.run.dir={run.dir} resume=auto, or with ckpt_path={saved}" in run.text()
    assert "Traceback" not in run.text()


class WorkerHandlers(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)]


def test_data_workers_leave_sigterm_and_ctrl_c_to_the_main_process():
    # killed by the signal, a worker failed the step the main process was finishing
    loader = ResumableLoader(WorkerHandlers(), batch_size=None, num_workers=1)
    assert list(loader) == [[True, True], [True, True]]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_to_every_rank_saves_once_and_exits_143(tmp_path, strategy):
    # Lightning's own SIGTERM handler runs a collective inside the handler: with every
    # rank signalled, the ranks' collectives mismatched and this run hung (> 120 s)
    run = Run(tmp_path / "run", f"strategy={strategy}", "trainer.devices=2", *LONG_RUN)
    assert stop_mid_training(run, signal.SIGTERM, f"SIGTERM, {strategy} x2") == 143
    state = assert_resumable(run.dir / "checkpoints" / "interrupted.ckpt")
    assert run.text().count("stopped by SIGTERM at step") == 1  # rank 0 says it
    # every rank's random state, so that the resumed run draws the same dropout masks
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("ExactResume"))
    assert len(saved["ranks"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["second signal", "grace"])
def test_a_stuck_save_still_ends_the_run(tmp_path, how):
    stuck = [f"{FAULT}StuckSave"]
    grace = ["callbacks.on_exception.grace=10"] if how == "grace" else []
    run = Run(tmp_path / "run", "strategy=cpu", *LONG_RUN, *stuck, *grace)
    try:
        run.wait_for(run.dir / "checkpoints" / "last.ckpt")
        run.signal(signal.SIGTERM)  # the interrupted.ckpt save never ends
        sent = time.time()
        if how == "second signal":
            run.wait_for(run.dir / "save-started")
            run.signal(signal.SIGTERM)
        assert run.wait(sent, f"stuck save, {how}") == 143
    finally:
        run.kill()
    expected = "second signal (SIGTERM)" if how == "second signal" else "still running 10 s"
    assert expected in run.text()


# -- numerical faults ----------------------------------------------------------------------

NAN_AT_12 = [f"{FAULT}ScaleOutputAt", "+callbacks.fault.step=12",
             "+callbacks.fault.factor=nan", "trainer.max_epochs=1", "trainer.val_check_interval=5",
             "trainer.limit_val_batches=2", "logger=csv", "strategy=cpu"]


@pytest.mark.slow
def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = Run(tmp_path / "run", *NAN_AT_12)
    assert run.wait() == 3
    assert "error: the loss is nan at step 12 (epoch 0)" in run.text()
    assert "learning rate too high" in run.text() and "fp16" in run.text()
    assert "Traceback" not in run.text()
    checkpoints = run.dir / "checkpoints"
    assert assert_resumable(checkpoints / "last.ckpt")["global_step"] == 10
    assert not (checkpoints / "interrupted.ckpt").exists()


@pytest.mark.slow
def test_without_the_guard_the_nan_reaches_the_checkpoints(tmp_path):
    # the negative control: the same fault, the check off
    run = Run(tmp_path / "run", *NAN_AT_12, "callbacks.numerics=null")
    assert run.wait() == 0
    state = torch.load(run.dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] > 12
    assert not all(torch.isfinite(w).all() for w in state["state_dict"].values()
                   if w.is_floating_point())


class Regression(L.LightningModule):
    """y = 2x, with Adam: its per-parameter step count counts the steps taken."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return nn.functional.mse_loss(self.net(x), 2 * x.sum(1, keepdim=True))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator()
                                                          .manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(*callbacks, model: Regression | None = None, steps: int = 12) -> Regression:
    model = model or Regression()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                 for c in callbacks),
                        enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model)
    return model


def adam_steps(model: Regression) -> int:
    (optimizer,) = [model.trainer.optimizers[0]]
    return int(next(iter(optimizer.state.values()))["step"])


@pytest.mark.parametrize("factor,skip,expected", [
    (100.0, 3.0, 1),   # a spike 100x the loss: skipped
    (100.0, None, 0),  # the negative control: spike skipping off
    (1.0, 3.0, 0),     # no spike: nothing skipped
])
def test_the_spike_skip_skips_an_injected_spike(factor, skip, expected):
    guard = NumericalGuard(spike_factor=skip, spike_warmup=4)
    model = fit(guard, ScaleOutputAt(step=8, factor=factor))
    assert guard.skipped == expected
    assert adam_steps(model) == 12 - expected


def test_a_non_finite_loss_is_skipped_when_so_configured():
    guard = NumericalGuard(non_finite="skip")
    model = fit(guard, ScaleOutputAt(step=5, factor=math.nan))
    assert guard.skipped == 1 and adam_steps(model) == 11
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_infinite_loss_stops_the_run_as_the_next_step_begins_naming_its_step():
    model = Regression()
    with pytest.raises(NumericalFault, match="at step 5"):
        fit(NumericalGuard(), ScaleOutputAt(step=5, factor=math.inf), model=model)
    assert model.trainer.global_step == 6  # read without a host sync, one step later


@pytest.mark.parametrize("guard", [True, False])
def test_no_checkpoint_holds_the_weights_of_a_non_finite_step(tmp_path, guard):
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1,
                            filename="{step}")
    callbacks = [NumericalGuard()] * guard + [saves, ScaleOutputAt(step=5, factor=math.nan)]
    try:
        fit(*callbacks)
    except NumericalFault:
        pass
    steps = {int(p.stem.split("=")[1]): torch.load(p, weights_only=True)["state_dict"]
             for p in tmp_path.glob("step=*.ckpt")}
    finite = {step: all(torch.isfinite(w).all() for w in state.values())
              for step, state in steps.items()}
    if guard:
        assert sorted(finite) == [1, 2, 3, 4, 5] and all(finite.values())
    else:  # the negative control: the checkpoints after step 5 hold NaN weights
        assert not finite[6] and not finite[12]


# -- a rank that dies or hangs -------------------------------------------------------------

def stop_a_rank(tmp_path, strategy: str, how: str, rank: int = 1, timeout: int = 1800):
    mark = tmp_path / "stopped"
    run = Run(tmp_path / "run", f"strategy={strategy}", "trainer.devices=2", *LONG_RUN,
              f"{FAULT}StopRankAt", "+callbacks.fault.step=5", f"+callbacks.fault.rank={rank}",
              f"+callbacks.fault.how={how}", f"+callbacks.fault.mark={mark}",
              f"trainer.strategy.timeout.seconds={timeout}")
    try:
        run.wait_for(mark)
        status = run.wait(mark.stat().st_mtime, f"rank {rank} {how}s, {strategy}")
        deadline = time.time() + HARD_TIMEOUT
        while live_members(run.process.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = live_members(run.process.pid)  # a rank that outlives the run hangs
        print(f"all ranks gone {time.time() - mark.stat().st_mtime:.1f} s after the fault")
    finally:
        run.kill()
    assert not left, f"processes left running: {left}\n{run.text()[-3000:]}"
    return run, status


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", [  # fsdp connects as ddp
    "ddp", pytest.param("deepspeed_zero2", marks=pytest.mark.xfail(
        strict=False, reason="1 run in 6 here: the launching rank 0 was SIGKILLed 0.2 s after "
        "rank 1 died, before it could exit 4 (a race not yet found)"))])
def test_when_a_rank_dies_the_others_exit_4_naming_it(tmp_path, strategy):
    run, status = stop_a_rank(tmp_path, strategy, "die")
    assert status == 4
    assert "error: rank 0 lost rank 1 (killed by SIGKILL)" in run.text()
    assert "Traceback" not in run.text()


@pytest.mark.slow
@pytest.mark.distributed
def test_when_rank_0_dies_the_other_exits_4(tmp_path):
    run, status = stop_a_rank(tmp_path, "ddp", "die", rank=0)
    assert status == -signal.SIGKILL  # the launching process is rank 0; rank 1 ended too
    assert "error: rank 1 lost" in run.text()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hung_rank_fails_its_peers_after_the_collective_timeout(tmp_path):
    run, status = stop_a_rank(tmp_path, "ddp", "hang", timeout=30)
    assert status == 4
    assert "error: rank 0 lost a peer (it exited, or sent nothing within" in run.text()


def live_members(group: int) -> list[int]:
    """The processes of a process group that still run (zombies left out)."""
    live = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(entry))
    return live
