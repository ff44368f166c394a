"""model.compile=true: the net compiled in place, the same losses as the eager run, and a
strategy it cannot work under refused before the run."""

from __future__ import annotations

import pytest

from lmlab.config.checks import check_config
from lmlab.errors import ConfigError
from test_parallel import run_isolated, final_test_metrics

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "data.batch_size=64", "callbacks=none", "logger=csv"]


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2"])
def test_compile_is_refused_where_it_cannot_work(make_cfg, strategy):
    cfg = make_cfg("model=gpt_tiny", "data=stdlib_source", "model.compile=true",
                   f"strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="model.compile=true does not work"):
        check_config(cfg)


def test_compile_is_accepted_under_fsdp2_and_ddp(make_cfg):
    for strategy in ("fsdp2", "ddp"):
        check_config(make_cfg("model=gpt_tiny", "data=stdlib_source", "model.compile=true",
                              f"strategy={strategy}", "trainer.devices=2",
                              "trainer.accelerator=cpu"))


def test_the_task_compiles_its_net_in_place_and_keeps_its_parameter_names(make_cfg):
    from test_config import build_task

    task = build_task(make_cfg("model.compile=true", "model.compile_mode=reduce-overhead"))
    names = list(task.state_dict())
    task.configure_model()
    assert task.net._compiled_call_impl is not None
    assert list(task.state_dict()) == names  # checkpoints stay loadable either way


@pytest.mark.slow
def test_a_compiled_run_trains_and_tests_as_the_eager_one(tmp_path):
    run_isolated(tmp_path / "eager", "strategy=cpu", *TINY)
    run_isolated(tmp_path / "compiled", "strategy=cpu", "model.compile=true", *TINY,
                 timeout=600)
    eager, compiled = (final_test_metrics(tmp_path / name) for name in ("eager", "compiled"))
    # the fused kernels round differently: the loss agrees to 1e-4, and a barely trained
    # net's near-tied classes may flip (accuracy is not compared)
    assert compiled["test/loss"] == pytest.approx(eager["test/loss"], rel=1e-4)
