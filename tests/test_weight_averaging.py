"""`callbacks=ema`: Lightning's moving average of the weights, as lmlab's runs use it."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from lmlab.training.build import build
from lmlab.training.callbacks.ema import MovingAverage
from lmlab.checkpointing.weights import export_weights
from lmlab.config.checks import check_config
from lmlab.errors import ConfigError

SHORT_RUN = ("callbacks=ema", "callbacks.ema.decay=0.9", "strategy=cpu", "logger=none",
             "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
             "trainer.enable_progress_bar=false")


def fit(cfg, resume: str | None = None):
    L.seed_everything(cfg.seed, workers=True)
    data, task, trainer = build(cfg, resume)
    trainer.fit(task, datamodule=data, ckpt_path=resume, weights_only=True)
    return task, trainer


def saved(cfg, name: str = "last") -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / f"{name}.ckpt",
                      weights_only=True)


def differing(a: dict, b: dict) -> list[str]:
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_checkpoints_and_exported_weights_hold_the_average(make_cfg, decay):
    """decay 0 is the negative control: the average is the last step's weights."""
    cfg = make_cfg(*SHORT_RUN, "trainer.max_epochs=2", f"callbacks.ema.decay={decay}")
    task, trainer = fit(cfg)
    state = saved(cfg)
    average, trained = state["state_dict"], state["current_model_state"]
    assert bool(differing(average, trained)) == (decay > 0)
    for name, value in task.state_dict().items():  # the model ends the run with the average
        torch.testing.assert_close(value, average[name])
    output = Path(cfg.paths.output_dir)
    exported = torch.load(export_weights(trainer, output / "checkpoints" / "last.ckpt", output,
                                         OmegaConf.to_yaml(cfg)), weights_only=True)
    assert not differing(average, exported["state_dict"])


def test_a_resumed_run_continues_the_average(make_cfg, tmp_path):
    straight = make_cfg(*SHORT_RUN, "trainer.max_epochs=2")
    fit(straight)
    halves = make_cfg(*SHORT_RUN, "trainer.max_epochs=1")
    halves.paths.output_dir = str(tmp_path / "halves")
    fit(halves)
    halves.trainer.max_epochs = 2
    fit(halves, str(Path(halves.paths.output_dir) / "checkpoints" / "last.ckpt"))
    whole, resumed = saved(straight), saved(halves)
    for key in ("state_dict", "current_model_state"):  # the average, the trained weights
        assert not differing(whole[key], resumed[key]), key


class StopInValidation(Callback):
    """Sends the run a SIGTERM in the second validation, and keeps what the model holds."""

    def __init__(self):
        self.model_held = None

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.current_epoch == 1:
            self.model_held = {k: v.clone() for k, v in pl_module.state_dict().items()}
            raise SIGTERMException(143)


def test_a_run_stopped_in_validation_saves_the_trained_weights_as_trained(make_cfg):
    cfg = make_cfg(*SHORT_RUN, "trainer.max_epochs=3", "+trainer.num_sanity_val_steps=0")
    data, task, trainer = build(cfg)
    stop = StopInValidation()
    trainer.callbacks.insert(0, stop)
    with pytest.raises(SystemExit):
        trainer.fit(task, datamodule=data)
    state = saved(cfg, "interrupted")
    average = next(c for c in trainer.callbacks if isinstance(c, MovingAverage))
    assert not average.swapped
    assert not differing(stop.model_held, state["state_dict"])  # the model held the average
    assert differing(state["state_dict"], state["current_model_state"])
    for name, value in task.state_dict().items():  # swapped back: the trained weights
        torch.testing.assert_close(value, state["current_model_state"][name])


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "deepspeed_zero2", "tp"])
def test_a_strategy_that_wraps_the_parameters_is_refused(make_cfg, strategy):
    cfg = make_cfg("callbacks=ema", f"strategy={strategy}", "trainer.devices=2",
                   "model=gpt_tiny", "data=stdlib_source")
    with pytest.raises(ConfigError, match=r"callbacks.ema averages .* use strategy=ddp"):
        check_config(cfg)


def test_half_precision_weights_are_refused(make_cfg):
    cfg = make_cfg("callbacks=ema", "strategy=cpu", "precision=bf16-true")
    with pytest.raises(ConfigError, match="use precision=bf16-mixed"):
        check_config(cfg)


@pytest.mark.parametrize("overrides", [["strategy=cpu", "precision=bf16-mixed"],
                                       ["strategy=ddp", "trainer.devices=2"]])
def test_one_device_and_ddp_are_accepted(make_cfg, overrides):
    check_config(make_cfg("callbacks=ema", *overrides))
