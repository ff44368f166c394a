"""`callbacks=ema`: Lightning's moving average of the weights, as lmlab's runs use it."""

from pathlib import Path

import pytest
import torch

from lmlab.build import build
from lmlab.config import check_config
from lmlab.errors import ConfigError

SHORT_RUN = ("callbacks=ema", "strategy=cpu", "logger=none", "trainer.max_epochs=2",
             "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
             "trainer.enable_progress_bar=false")


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_checkpoints_hold_the_average_and_the_run_ends_with_it(make_cfg, decay):
    """decay 0 is the negative control: the average is the last step's weights."""
    cfg = make_cfg(*SHORT_RUN, f"callbacks.ema.decay={decay}")
    data, task, trainer = build(cfg)
    trainer.fit(task, datamodule=data)
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
                       weights_only=True)
    average, trained = saved["state_dict"], saved["current_model_state"]
    differ = [name for name in average if not torch.equal(average[name], trained[name])]
    assert bool(differ) == (decay > 0), differ
    for name, value in task.state_dict().items():  # the model now holds the last average
        torch.testing.assert_close(value, average[name])


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "deepspeed_zero2", "tp"])
def test_a_sharded_strategy_is_refused(make_cfg, strategy):
    cfg = make_cfg("callbacks=ema", f"strategy={strategy}", "trainer.devices=2",
                   "model=gpt_tiny", "data=stdlib_source")
    with pytest.raises(ConfigError, match="callbacks.ema averages whole copies.*strategy=ddp"):
        check_config(cfg)


def test_one_device_and_ddp_are_accepted(make_cfg):
    for strategy in ("cpu", "ddp"):
        check_config(make_cfg("callbacks=ema", f"strategy={strategy}", "trainer.devices=2"
                              if strategy == "ddp" else "trainer.devices=1"))
