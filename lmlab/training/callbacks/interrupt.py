"""Stopping a run on Ctrl-C or SIGTERM: saved, resumable, and never hung.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmlab.errors import NumericalFault, TrialPruned
from lmlab.training.callbacks.numerics import NumericalGuard

log = logging.getLogger(__name__)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Saves the state when a run is stopped by Ctrl-C (SIGINT) or SIGTERM (a scheduler's
    preemption), says in one line how to resume, and bounds the time to exit: a second
    signal, or `grace` seconds after the first, ends the process at once with status
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM). In training, every rank
    stops after the same step, once its values are logged and a validation due at it has
    run; the saved state resumes with the next step. In a multi-process run the ranks agree
    through `NumericalGuard`'s one collective a step, read a step later (the step after the
    signal's), or, without it, through a collective of their own each step.

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
        if trainer.world_size > 1:
            if any(isinstance(c, NumericalGuard) for c in trainer.callbacks):
                return  # its one collective a step carries the signal: read a step later
            # else a collective of its own, and a host sync, so that every rank stops here
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.agree(trainer)

    def agree(self, trainer) -> None:
        """Stops training after the current step, on every rank alike."""
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
