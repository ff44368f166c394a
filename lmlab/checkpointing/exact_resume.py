"""What it takes to continue a run exactly, in the checkpoints and as they are restored.

- `LastCheckpoint`: `last.ckpt` at every validation and, optionally, every N training
  steps, never just before a validation.
- `ExactResume`: the random generators of every rank, saved with each checkpoint and set
  back when training resumes, so that dropout draws the masks it would have drawn; and a
  checkpoint written at an epoch's end restored as the next epoch's start.

The data order is saved by the training DataLoader itself
(`lmlab.data.batching.ResumableLoader`).
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` for `last.ckpt`, also written every
    `every_n_train_steps` training steps when that is set (Lightning's own option of that
    name would stop the writes at validation), except before a validation: the write after
    it holds its results (early stopping's count, the best score), and a newest checkpoint
    written before it would resume past it (Lightning, which skips a second save at one
    step, would not write the one after it either). Uses ModelCheckpoint's private save
    methods (Lightning 2.6.6): its public options cannot ask for writes every N steps and
    at every validation together.

    Args:
        every_n_train_steps: write mid-epoch every this many steps; None: only at validation
            (or at the end of an epoch without one).
        **kwargs: `ModelCheckpoint`'s arguments.
    """

    passes_to = (ModelCheckpoint,)

    def __init__(self, every_n_train_steps: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.every_steps = every_n_train_steps or 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning's own check skips a step already saved (the rest of its micro-batches)
        if not self.every_steps or trainer.global_step % self.every_steps \
                or self._should_skip_saving_checkpoint(trainer) \
                or validation_follows(trainer):  # written after it, with its results
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def validation_follows(trainer) -> bool:
    """Whether a validation runs right after this training batch (an epoch's end, every
    `val_check_interval`, time-based ones included), as Lightning's epoch loop decides it
    (`_should_check_val_fx`, private: it holds the rule and its inputs; checked against
    2.6.6). A checkpoint written before that validation would, as the newest, resume past
    it: a kill during the validation would lose it."""
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


def random_state() -> dict[str, Any]:
    """The state of every random generator this process draws from, in types that
    `torch.load(..., weights_only=True)` reads."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(Callback):
    """Saves every rank's random generators with each checkpoint (Lightning saves none) and,
    when training resumes, sets them back, so dropout draws the masks it would have drawn.

    They are set back when training starts, after the sanity check, which may draw from
    them. Then too the training loader gets its saved position if Lightning has not given
    it yet: Lightning does so only when it builds the loader after reading the checkpoint,
    and a schedule that asks `trainer.estimated_stepping_batches` builds it before."""

    def __init__(self):
        self.loaded: list[dict] | None = None
        self.trainer = None
        self.resumed = False  # until the first training batch after a checkpoint is restored

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Every rank builds a checkpoint's state (rank 0 writes it), so the ranks' states
        # are gathered; not on the way out of a failure, which another rank may not share.
        # A signal's stop is shared: every rank raises it at the same step (callbacks.py).
        states = [random_state()]
        failing = self.trainer is not None and self.trainer.interrupted \
            and not isinstance(sys.exc_info()[1], SIGTERMException)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and not failing:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, random_state())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict["ranks"]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        start_next_epoch(checkpoint)
        self.resumed = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.resumed and pl_module.automatic_optimization:
            # The loggers' step counts the batches that took an optimizer step: the global
            # step, with one optimizer. Lightning 2.6 restores it one ahead where a resumed
            # epoch loop first takes a step without a batch (restarted after a validation, it
            # looks for one due before its next batch, finds it run and skips it): every later
            # value would be logged one step late. Set from the global step here (a private
            # attribute: no public one holds the loggers' step; checked against 2.6.6).
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        self.resumed = False

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.fit_loop._load_combined_loader_states()  # a no-op once Lightning has done it
        if self.loaded:
            if len(self.loaded) != trainer.world_size:
                log.warning("the checkpoint holds the random state of %d processes and this run "
                            "has %d: dropout will not draw the same masks",
                            len(self.loaded), trainer.world_size)
            set_random_state(self.loaded[min(trainer.global_rank, len(self.loaded) - 1)])
            self.loaded = None


def start_next_epoch(checkpoint: dict[str, Any]) -> None:
    """Rewrites the loop state of a checkpoint written at an epoch's end (after its
    validation) into that of the next epoch's start, before Lightning restores it.

    Lightning 2.6 restores such a checkpoint in two ways. Bounded by epochs, it starts the
    next epoch. Bounded by steps (`max_epochs=-1`), it "restarts" the finished epoch
    (`_FitLoop.restarting` is always true there), counts that epoch twice and so sets the
    samplers one epoch ahead, and logs every later value one step late: the curve departs
    from the uninterrupted run's. The next epoch's start, a state that Lightning restores
    alike under both bounds, is the same point of training: nothing is left to do of the
    finished epoch. The progress counters rewritten are those of Lightning 2.6's
    checkpoints (`loops.fit_loop`), checked against 2.6.6. A checkpoint written elsewhere
    is left as it is.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return
    # processed: the epoch's batches ran; completed: its end hooks too. The totals, as the
    # `current` counters lag after Lightning's own restart at an epoch's start.
    done = epochs["total"]
    at_epoch_end = done["ready"] == done["started"] == done["processed"] \
        and done["completed"] in (done["processed"] - 1, done["processed"])
    if not (at_epoch_end and batches.get("is_last_batch")):
        return
    for counts in (epochs["total"], epochs["current"]):  # finished; the next one made ready
        counts["started"] = counts["completed"] = counts["processed"]
        counts["ready"] = counts["processed"] + 1
    batches["current"] = dict.fromkeys(batches["current"], 0)  # no batch of it yet
    batches["is_last_batch"] = False
