"""The strategy factories: the model's declared units, and the CPU twins of GPU strategies."""

import copy

import pytest
import torch
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy,
                                          ModelParallelStrategy)

from lmlab.models.gpt import GPT, Block
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer
from lmlab.parallel.sharding import checkpoint_blocks, keeps_shards
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


def saved_activations(forward) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `forward()`'s output."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = forward().float().logsumexp(-1).mean()
    loss.backward()
    return sum(t.numel() * t.element_size() for t in kept)


@pytest.mark.parametrize("kind", ["gpt", "transformer"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_fewer_activations(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        net = GPT(vocab_size=50, block_size=32, n_layer=3, n_head=4, n_embd=32, dropout=0.1)
        inputs = (torch.randint(0, 50, (4, 32)),)
    else:
        net = Seq2SeqTransformer(50, 50, 0, 1, 2, d_model=32, n_head=4, n_encoder_layers=2,
                                 n_decoder_layers=2, d_ff=64, dropout=0.1)
        inputs = (torch.randint(3, 50, (4, 20)), torch.randint(3, 50, (4, 16)))
    plain, recomputing = net, copy.deepcopy(net)
    assert checkpoint_blocks(recomputing) == (3 if kind == "gpt" else 4)
    assert list(recomputing.state_dict()) == list(plain.state_dict())  # names unchanged
    kept = {}
    for name, model in (("plain", plain), ("recomputing", recomputing)):
        torch.manual_seed(1)  # the same dropout masks, replayed by the recomputation
        kept[name] = saved_activations(lambda m=model: m(*inputs))
    for p, q in zip(plain.parameters(), recomputing.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)
    assert kept["recomputing"] < 0.5 * kept["plain"]


def test_a_net_without_blocks_is_refused_activation_checkpointing():
    from lmlab.models.rnn import RNNClassifier
    from lmlab.tasks.classification import ClassificationTask

    with pytest.raises(ValueError, match="RNNClassifier declares no block classes"):
        ClassificationTask(RNNClassifier(20, 2), 2, optimizer=torch.optim.SGD,
                           activation_checkpointing=True)


def test_adam_is_fused_on_cuda_unless_the_config_chose_its_implementation():
    from functools import partial

    from lmlab.tasks.base import fused_where_supported

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_where_supported(partial(torch.optim.AdamW, lr=1e-3), cuda) == {"fused": True}
    assert fused_where_supported(partial(torch.optim.Adam), cuda) == {"fused": True}
    assert fused_where_supported(partial(torch.optim.AdamW, foreach=False), cuda) == {}
    assert fused_where_supported(partial(torch.optim.AdamW), cpu) == {}
    assert fused_where_supported(partial(torch.optim.SGD, lr=0.1), cuda) == {}


def test_batches_are_pinned_only_for_a_cuda_device():
    from types import SimpleNamespace

    from lmlab.data.batching import ShardedDataModule

    data = ShardedDataModule()
    assert not data.pin_memory()  # no trainer yet
    for device, pinned in (("cuda", True), ("cpu", False)):
        data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert data.pin_memory() == pinned
