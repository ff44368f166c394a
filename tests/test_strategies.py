"""The strategy factories: the model's declared units, and the CPU twins of GPU strategies."""

from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                          ModelParallelStrategy)

from lmlab.models.gpt import Block
from lmlab.parallel.sharding import keeps_shards
from lmlab.parallel.strategies import CPUDeepSpeedStrategy, CPUFSDPStrategy, deepspeed, fsdp


def wrapped_classes(policy) -> set:
    return set(policy._module_classes)


def test_fsdp_wraps_and_checkpoints_the_declared_block_class():
    strategy = fsdp("cpu", "lmlab.models.gpt.GPT", activation_checkpointing=True,
                    sharding_strategy="SHARD_GRAD_OP")
    assert type(strategy) is CPUFSDPStrategy and isinstance(strategy, FSDPStrategy)
    assert wrapped_classes(strategy.kwargs["auto_wrap_policy"]) == {Block}
    assert wrapped_classes(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]) == {Block}
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"


def test_a_model_without_blocks_is_one_fsdp_unit():
    strategy = fsdp("cpu", "lmlab.models.rnn.RNNClassifier", activation_checkpointing=True)
    assert "auto_wrap_policy" not in strategy.kwargs
    assert not strategy._activation_checkpointing_kwargs


def test_deepspeed_on_cpu_is_the_stock_strategy_minus_its_guards():
    strategy = deepspeed("cpu", any_optimizer=True, stage=3, offload_optimizer=True)
    assert type(strategy) is CPUDeepSpeedStrategy and isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in deepspeed("cpu", stage=2).config


def test_only_strategies_that_keep_parameters_sharded_decode_in_lockstep():
    """Under these, every forward gathers parameters collectively, so the ranks' decoders
    must take as many steps as the slowest; under DDP and ZeRO 1-2 each rank decodes alone."""
    sharded = [fsdp("cpu", "lmlab.models.gpt.GPT"), ModelParallelStrategy(),
               deepspeed("cpu", stage=3)]
    alone = [DDPStrategy(), deepspeed("cpu", stage=1), deepspeed("cpu", stage=2), None]
    assert [keeps_shards(s) for s in sharded] == [True] * 3
    assert [keeps_shards(s) for s in alone] == [False] * 4
