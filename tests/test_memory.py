"""The dry run's memory estimate against what training really holds.

Each test measures the bytes of every live tensor just before the second optimizer step
(the `TensorMemory` callback), when gradients and optimizer state are both alive, against
the estimate's parameters + gradients + optimizer state.
"""

import re

import pytest
import torch
from hydra.utils import instantiate

from conftest import ROOT
from lmlab.training.build import build_task
from lmlab.training.callbacks.memory import TensorMemory
from lmlab.parallel.memory import activation_bytes, estimate, live_tensor_bytes, local_batch
from test_parallel import run_isolated

STATE = ("parameters", "gradients", "optimizer")
GPT = ["model=gpt_tiny", "data=text_files", "data/tokenizer=char", "model.net.n_embd=64",
       "model.net.n_layer=2", "model.sample_tokens=0", "trainer.max_steps=2",
       "trainer.max_epochs=-1", "data.train_batches=2", "data.val_batches=1",
       "data.batch_size=4", "callbacks=none", "logger=none"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few KB of real text: this package's own source."""
    path = tmp_path_factory.mktemp("text") / "source.txt"
    path.write_text("".join(p.read_text() for p in sorted((ROOT / "lmlab").glob("*.py"))))
    return path


def estimated_state(cfg) -> float:
    data = instantiate(cfg.data)
    data.setup("fit")
    batch = local_batch(next(iter(data.train_dataloader())), cfg.data.batch_size)
    memory = estimate(cfg, build_task(cfg, data), batch)
    return sum(memory[part] for part in STATE)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_one_process_holds_what_the_estimate_says(make_cfg, text_file, tmp_path, precision):
    cfg = make_cfg(*GPT, f"data.files={text_file}", f"paths.cache_dir={tmp_path}",
                   "strategy=cpu", f"precision={precision}")
    data = instantiate(cfg.data)
    data.setup("fit")
    before = live_tensor_bytes()  # the data's, and whatever earlier tests left alive
    task, memory = build_task(cfg, data), TensorMemory()
    trainer = instantiate(cfg.trainer, callbacks=[memory], logger=False,
                          enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    measured = memory.bytes - before
    assert measured == pytest.approx(estimated_state(cfg), rel=0.05)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero2"])
def test_two_sharded_processes_hold_what_the_estimate_says(make_cfg, text_file, tmp_path,
                                                           strategy):
    overrides = [*GPT, f"data.files={text_file}", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu"]
    # 900 s: on a fresh machine the first DeepSpeed run compiles its CPU Adam first
    output = run_isolated(tmp_path / "run", *overrides,
                          "+callbacks.memory._target_=lmlab.training.callbacks.memory.TensorMemory",
                          timeout=900)
    measured = [float(m) * 2**20 for m in
                re.findall(r"live tensor memory on rank \d: ([\d.]+) MiB", output)]
    assert len(measured) == 2
    estimated = estimated_state(make_cfg(*overrides))
    assert max(measured) == pytest.approx(estimated, rel=0.1)


def test_activations_grow_with_the_batch(make_cfg):
    cfg = make_cfg("model=gpt_tiny", "data=stdlib_source")
    task = instantiate(cfg.model, _partial_=True, net={"vocab_size": 64})()
    small, large = ({"tokens": torch.randint(64, (b, 16)), "targets": torch.randint(64, (b, 16))}
                    for b in (2, 8))
    assert activation_bytes(task, large) == pytest.approx(4 * activation_bytes(task, small),
                                                          rel=0.05)
