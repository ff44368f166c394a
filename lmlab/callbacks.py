"""Callbacks of lmlab's own."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import warnings

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EMAWeightAveraging, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmlab.errors import NumericalFault, TrialPruned
from lmlab.parallel.memory import live_tensor_bytes

log = logging.getLogger(__name__)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Saves the state when a run is stopped by Ctrl-C (SIGINT) or SIGTERM (a scheduler's
    preemption), says in one line how to resume, and bounds the time to exit: a second
    signal, or `grace` seconds after the first, ends the process at once with status
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM). In training, every rank
    stops after the same step, once its values are logged and a validation due at it has
    run; the saved state resumes with the next step.

    On other errors the state is saved as `OnExceptionCheckpoint` does, except where a save
    could hurt: after a non-finite loss (the last good checkpoint stays the newest) and in
    a multi-process run, whose save would wait for peers that may be gone.

    Args:
        dirpath: the folder of the saved state.
        filename: its name, without `.ckpt`.
        run_dir: the run's folder, for the `resume=auto` form of the hint.
        grace: seconds from the first signal to a forced exit.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted", run_dir: str = ".",
                 grace: float = 300.0):
        super().__init__(dirpath, filename)
        self.run_dir = run_dir
        self.grace = grace
        self.received: signal.Signals | None = None
        self.stopping = False  # training stops after this step (every rank agreed)
        self.training = False
        self._previous: dict[int, object] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.listen()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's own SIGTERM handler, set just before, runs a collective inside the
        # handler, at whatever point each rank is: the ranks' collectives then mismatch and
        # a multi-process run hangs. This one only takes note; the ranks agree in
        # `on_train_batch_end`.
        self.listen()
        self.training = True
        self.last_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self.last_step = trainer.global_step != self.last_step, trainer.global_step
        if not stepped:  # mid-accumulation: stopping here would lose the gradients so far
            return
        stop = self.received is not None
        if trainer.world_size > 1:  # a small collective each step, so that every rank stops here
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.received = self.received or signal.SIGTERM  # it came to another rank only
            self.stopping = True
            stop_after_step(trainer, True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.stopping:  # a validation due at the stopping step runs whole first
            stop_after_step(trainer, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.stopping:
            stop_after_step(trainer, True)

    def stop(self, default: signal.Signals) -> None:
        """Stops training: Lightning saves through `on_exception`, then exits with this status.
        Its way for Ctrl-C (KeyboardInterrupt) would kill the other ranks mid-save."""
        self.received = self.received or default
        raise SIGTERMException(128 + self.received)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.restore()

    def restore(self) -> None:
        """Puts back the handlers this callback replaced (the next job of a sweep, in the
        same process, must not find them)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self.training = False

    def listen(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self.on_signal)
            self._previous.setdefault(signum, previous)

    def on_signal(self, signum: int, frame) -> None:
        """The first signal stops the run at the end of the training step (at once outside
        training): every rank of a multi-process run at the same step. A second signal
        ends the process."""
        if self.received is not None:
            force_exit(f"second signal ({signal.Signals(signum).name}): exiting without "
                       "waiting for the save", self.received)
        self.received = signal.Signals(signum)
        # lmlab's DataLoader workers ignore the signal; one of another loader dies of it, and
        # torch's SIGCHLD handler would fail the step that is finishing
        signal.signal(signal.SIGCHLD, ignore)
        watchdog = threading.Timer(self.grace, force_exit, (
            f"still running {self.grace:g} s after {self.received.name}: exiting without waiting "
            "for the save (raise callbacks.on_exception.grace for longer saves)", self.received))
        watchdog.daemon = True
        watchdog.start()
        if not self.training and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.training:
            self.stop(self.received)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self.received = self.received or (
                signal.SIGTERM if isinstance(exception, SIGTERMException) else signal.SIGINT)
            if threading.current_thread() is threading.main_thread():
                # Lightning ignores Ctrl-C from here on; a second one must still end a stuck save
                signal.signal(signal.SIGINT, self.on_signal)
            super().on_exception(trainer)
            rank_zero_only(say)(resume_hint(self.received, trainer.global_step, self.ckpt_path,
                                            self.run_dir))
        else:
            # a diverged run keeps its last good checkpoint; a pruned trial is over
            if not isinstance(exception, (NumericalFault, TrialPruned)) \
                    and trainer.world_size == 1:
                super().on_exception(trainer)
            self.restore()  # Lightning calls no teardown after a failure


def stop_after_step(trainer, stop: bool) -> None:
    """Has Lightning stop training after the current step, once the step's values are
    logged and a validation due at it has run, or not. Lightning 2.6's loops stop there on
    `trainer.received_sigterm` (raising `SIGTERMException`; its evaluation loop stops a
    running validation on it too, hence the pause during one); its only setter is its own
    SIGTERM handler, which this callback replaces: the flag is set directly (a private
    attribute, checked against 2.6.6). Stopped anywhere earlier, the step's `train/loss`
    would never be logged, and a validation due at it would never run, not even on resume."""
    trainer._signal_connector.received_sigterm = stop


def resume_hint(received: signal.Signals, step: int, checkpoint: str, run_dir: str) -> str:
    """The one line an interrupted run ends with."""
    return (f"stopped by {received.name} at step {step}; the state is saved to {checkpoint}. "
            f"Resume with the same command and hydra.run.dir={run_dir} resume=auto, "
            f"or with ckpt_path={checkpoint}")


def ignore(signum: int, frame) -> None:
    """A handler that does nothing (SIG_DFL in its place would be reported, as a race, when
    the signal is already pending)."""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def force_exit(message: str, received: signal.Signals) -> None:
    """Ends the process now, from any thread, with the status a shell gives for `received`."""
    print(message, file=sys.stderr, flush=True)
    os._exit(128 + received)


class NumericalGuard(Callback):
    """Checks every optimizer step's loss and gradients before the step is taken: a
    non-finite one stops the run (or, with `non_finite=skip`, skips the step), so the
    weights, and every checkpoint written after, stay finite. Optionally skips the step of
    a loss spike: a loss above `spike_factor` times its running mean.

    One sync with the device per step (the values are read on the host to decide), and one
    small all-reduce in multi-process runs, so that every rank decides alike. Skipped steps
    are logged as `train/skipped_steps`. Under fp16 mixed precision the gradients are not
    checked: the gradient scaler skips their overflows itself. DeepSpeed keeps its gradients
    out of the parameters: only the loss is checked there.

    Args:
        non_finite: `stop` (exit with status 3, naming the step) or `skip` the step.
        spike_factor: skip the step when the loss exceeds this multiple of its running mean
            (null: never).
        spike_decay: the running mean's decay per step (0.99: about the last 100 steps).
        spike_warmup: steps to average before a spike can be skipped.
    """

    def __init__(self, non_finite: str = "stop", spike_factor: float | None = None,
                 spike_decay: float = 0.99, spike_warmup: int = 20):
        if non_finite not in ("stop", "skip"):
            raise ValueError(f"non_finite must be stop or skip, not {non_finite!r}")
        self.non_finite = non_finite
        self.spike_factor = spike_factor
        self.spike_decay = spike_decay
        self.spike_warmup = spike_warmup
        self.loss: torch.Tensor | None = None
        self.mean: float | None = None
        self.seen = 0
        self.skipped = 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss  # accumulated batches

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.loss is None:
            return
        grads = [] if has_scaler(trainer) else local_grads(pl_module)
        stats = torch.stack([self.loss, squared_norm(grads, self.loss)])
        if trainer.world_size > 1:
            stats = trainer.strategy.reduce(stats, reduce_op="sum") / trainer.world_size
        loss, grad_norm = stats.tolist()  # the one sync: the decision is taken on the host
        self.loss = None
        fault = self.fault(loss, grad_norm)
        if fault and fault != "spike" and self.non_finite == "stop":
            raise NumericalFault(non_finite_message(trainer, fault))
        if fault:
            optimizer.zero_grad(set_to_none=True)  # optimizers step no parameter without a gradient
            self.skipped += 1
            log.warning("step %d skipped: %s", trainer.global_step, fault)
        else:
            self.seen += 1
            self.mean = loss if self.mean is None else \
                self.spike_decay * self.mean + (1 - self.spike_decay) * loss
        # `self.log` costs ~1 ms: only on the steps an lmlab task writes
        if self.skipped and getattr(pl_module, "writes_logs", lambda: True)():
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def fault(self, loss: float, grad_norm: float) -> str | None:
        """What is wrong with this step, if anything."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return "a gradient is not finite"
        if self.spike_factor is not None and self.seen >= self.spike_warmup \
                and loss > self.spike_factor * self.mean:
            return "spike"
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.mean, self.seen, self.skipped = (state_dict["mean"], state_dict["seen"],
                                              state_dict["skipped"])


def has_scaler(trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def local_grads(pl_module) -> list[torch.Tensor]:
    """This rank's gradients (its shard's, under FSDP)."""
    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def squared_norm(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The sum of the squared gradients (NaN or inf with any non-finite one)."""
    if not grads:
        return torch.zeros((), device=like.device)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().square().sum().to(like.device)


def non_finite_message(trainer, fault: str) -> str:
    """Names the step, the likely causes, and the newest checkpoint of finite weights."""
    saved = [path for c in trainer.checkpoint_callbacks
             for path in (getattr(c, "best_model_path", ""), getattr(c, "last_model_path", ""))
             if path and os.path.isfile(path)]
    kept = f"the newest checkpoint, {max(saved, key=os.path.getmtime)}, holds finite weights" \
        if saved else "no checkpoint was written yet"
    return (f"{fault} at step {trainer.global_step} (epoch {trainer.current_epoch}); the run "
            f"stopped before the optimizer step and {kept}. Likely causes: a learning rate "
            "too high (model.optimizer.lr, or warm-up), fp16 overflow (precision=bf16-mixed "
            "or 32-true), or bad values in the data; trainer.gradient_clip_val limits spikes, "
            "and callbacks.numerics.non_finite=skip skips such steps instead")


class TensorMemory(Callback):
    """Logs, per rank, the bytes of all live tensors just before the second optimizer step,
    when parameters, gradients and optimizer state (as the strategy shards them) are all
    alive; plus the batch. Add it with `+callbacks.memory._target_=lmlab.callbacks.TensorMemory`
    and train at least two steps."""

    def __init__(self):
        self.bytes = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            self.bytes = live_tensor_bytes()
            log.info("live tensor memory on rank %d: %.3f MiB before the second step",
                     trainer.global_rank, self.bytes / 2**20)


class MovingAverage(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights (`callbacks=ema`): validation,
    checkpoints and the test use the average; a resumed run continues it.

    Lightning swaps the average into the model for each validation and back after it; a run
    stopped during validation (Ctrl-C, SIGTERM, an error) is swapped back here before its
    state is saved, so that the saved training weights are the trained ones. Lightning's
    warning that it cannot shard a task that overrides `configure_model` (lmlab's tasks do,
    for strategy=fsdp2) is dropped: the config check keeps it off sharded strategies.

    Args: those of `lightning.pytorch.callbacks.EMAWeightAveraging` (`decay`,
    `update_every_n_steps`, `update_starting_at_step`, `update_starting_at_epoch`, ...).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.swapped = False  # the model holds the average, the average the trained weights

    def setup(self, trainer, pl_module, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging")
            super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self.swapped = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.swapped:  # checkpoint callbacks run after this one (Lightning orders them last)
            self._swap_models(pl_module)
            self.swapped = False
