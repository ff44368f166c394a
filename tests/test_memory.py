"""The dry run's memory estimate follows each strategy's sharding."""

import pytest
import torch
from hydra.utils import instantiate

from lmlab.memory import activation_bytes, estimate, parameter_counts

STATE = ("parameters", "gradients", "optimizer")


@pytest.fixture
def gpt_estimate(make_cfg):
    def run(*overrides, dp=2, tp=1):
        cfg = make_cfg("model=gpt_tiny", "data=stdlib_source", *overrides)
        task = instantiate(cfg.model, _partial_=True, net={"vocab_size": 64})()
        batch = {"tokens": torch.randint(64, (4, 16)), "targets": torch.randint(64, (4, 16))}
        return estimate(cfg, task, batch, dp, tp), task
    return run


def test_sharded_strategies_divide_what_they_shard(gpt_estimate):
    ddp, task = gpt_estimate("strategy=ddp")
    params = sum(p.numel() for p in task.parameters()) * 4
    assert ddp["parameters"] == ddp["gradients"] == params and ddp["optimizer"] == 2 * params
    fsdp2, _ = gpt_estimate("strategy=fsdp2")
    assert all(fsdp2[part] == ddp[part] / 2 for part in STATE)
    zero1, _ = gpt_estimate("strategy=deepspeed_zero1")
    assert zero1["parameters"] == zero1["gradients"] == params
    assert zero1["optimizer"] == 3 * params / 2  # two moments and the float32 master, halved
    grad_op, _ = gpt_estimate("strategy=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP")
    assert grad_op["parameters"] == params and grad_op["gradients"] == params / 2


def test_zero3_counts_its_bucket_and_offload_moves_state_to_cpu(gpt_estimate):
    zero3, task = gpt_estimate("strategy=deepspeed_zero3",
                               "trainer.strategy.reduce_bucket_size=1000")
    assert zero3["buffers"] == 4000
    offload, _ = gpt_estimate("strategy=deepspeed_zero3_offload")
    assert offload["parameters"] == offload["optimizer"] == 0
    assert offload["cpu_offloaded"] == zero3["parameters"] + zero3["optimizer"]


def test_half_precision_halves_weights_and_activations(gpt_estimate):
    full, _ = gpt_estimate("strategy=ddp")
    half, _ = gpt_estimate("strategy=ddp", "precision=bf16-true")
    assert half["parameters"] == full["parameters"] / 2
    assert half["activations"] == full["activations"] / 2


def test_tensor_parallel_splits_only_the_planned_layers(gpt_estimate):
    tp, task = gpt_estimate("strategy=tp", "trainer.devices=2", dp=1, tp=2)
    total, split = parameter_counts(task.net, 2)
    assert 0 < split < total  # blocks split; embeddings and norms replicated
    assert tp["parameters"] == (total - split + split / 2) * 4


def test_activations_grow_with_the_batch(make_cfg):
    cfg = make_cfg("model=gpt_tiny", "data=stdlib_source")
    task = instantiate(cfg.model, _partial_=True, net={"vocab_size": 64})()
    small, large = ({"tokens": torch.randint(64, (b, 16)), "targets": torch.randint(64, (b, 16))}
                    for b in (2, 8))
    assert activation_bytes(task, large) == pytest.approx(4 * activation_bytes(task, small),
                                                          rel=0.05)
