"""A moving average of the weights (`callbacks=ema`).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import EMAWeightAveraging


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
