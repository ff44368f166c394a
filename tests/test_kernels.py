"""The `kernels` node: torch's attention-kernel switch as the run sets it, and put back."""

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from conftest import GPU
from lmlab import run
from lmlab.training.build import build
from lmlab.evaluate import trainer_for_test
from lmlab.training.runs import load_run_config
from lmlab.training.kernels import DEFAULT_NODE, Kernels, kernels_of
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer

SHORT_RUN = ("model=transformer_tiny", "data=stdlib_summaries", "data.tokenizer.vocab_size=300",
             "strategy=cpu", "logger=none", "trainer.max_epochs=1",
             "trainer.limit_train_batches=2", "trainer.limit_val_batches=0",
             "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")


class SwitchProbe(Callback):
    """Reads torch's cuDNN-attention switch while the model trains and tests."""

    def __init__(self, fail: bool = False):
        self.fail, self.seen = fail, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["fit"] = torch.backends.cuda.cudnn_sdp_enabled()
        if self.fail:
            raise RuntimeError("stopped on purpose")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        self.seen["test"] = torch.backends.cuda.cudnn_sdp_enabled()


@pytest.fixture
def switch():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("allowed", [False, True])
def test_the_run_trains_and_tests_with_the_configured_switch_and_puts_it_back(
        make_cfg, switch, allowed):
    torch.backends.cuda.enable_cudnn_sdp(not allowed)  # the process's own setting, opposite
    cfg = make_cfg(*SHORT_RUN, f"kernels.cudnn_attention={allowed}")
    data, task, trainer = build(cfg)
    probe = SwitchProbe()
    trainer.callbacks.append(probe)
    trainer.fit(task, datamodule=data)
    run.test_best(trainer, cfg, data)  # a fresh task, tested by the same trainer
    assert probe.seen == {"fit": allowed, "test": allowed}
    assert torch.backends.cuda.cudnn_sdp_enabled() is (not allowed)


def test_a_failed_run_puts_the_switch_back(make_cfg, switch):
    torch.backends.cuda.enable_cudnn_sdp(True)
    data, task, trainer = build(make_cfg(*SHORT_RUN))
    trainer.callbacks.append(SwitchProbe(fail=True))
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(task, datamodule=data)
    assert torch.backends.cuda.cudnn_sdp_enabled() is True


@pytest.mark.parametrize("allowed", [False, True])
def test_evaluate_tests_with_the_runs_kernel_choices(make_cfg, tmp_path, allowed):
    trainer = trainer_for_test(make_cfg(f"kernels.cudnn_attention={allowed}"), tmp_path)
    assert [c.cudnn_attention for c in trainer.callbacks if isinstance(c, Kernels)] == [allowed]


def test_cudnn_attention_is_off_by_default_and_for_runs_saved_without_the_node(make_cfg):
    assert kernels_of(make_cfg()).cudnn_attention is False
    assert kernels_of(OmegaConf.create({"model": {}})).cudnn_attention is False


def test_the_default_node_for_old_runs_is_the_configs(make_cfg):
    assert OmegaConf.to_container(make_cfg().kernels) == DEFAULT_NODE


def test_a_run_saved_without_the_node_can_set_it_in_evaluate(make_cfg, tmp_path):
    saved = OmegaConf.create(OmegaConf.to_container(make_cfg()))
    del saved["kernels"]
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(saved, tmp_path / ".hydra" / "config.yaml")
    cfg = load_run_config(tmp_path, ["kernels.cudnn_attention=true"])
    assert kernels_of(cfg).cudnn_attention is True


def test_apply_sets_the_switch_in_this_process(switch):
    torch.backends.cuda.enable_cudnn_sdp(True)
    Kernels(cudnn_attention=False).apply()
    assert torch.backends.cuda.cudnn_sdp_enabled() is False


def attention_ops(lengths: tuple[int, ...]) -> set[str]:
    """The attention ops a small transformer runs, forward and backward, on CUDA in bf16,
    for batches of these source lengths."""
    torch.manual_seed(0)
    net = Seq2SeqTransformer(40, 40, 0, 1, 2, d_model=128, n_head=2, n_encoder_layers=1,
                             n_decoder_layers=1, d_ff=128).cuda()
    with torch.profiler.profile() as profile, torch.autocast("cuda", dtype=torch.bfloat16):
        for length in lengths:
            source = torch.randint(3, 40, (4, length), device="cuda")
            net(source, source[:, :length // 2]).float().sum().backward()
    return {event.name for event in profile.events() if "attention" in event.name}


@pytest.mark.parametrize("lengths", [pytest.param((7, 12, 30), marks=GPU)])
def test_attention_on_cuda_runs_without_cudnn_by_default(switch, lengths):
    """Batches of new lengths, as bucketing makes them: with cuDNN attention allowed the
    profile shows its kernel (the control), with the default it does not."""
    Kernels(cudnn_attention=True).apply()
    if not [name for name in attention_ops(lengths) if "cudnn" in name]:
        pytest.skip("torch does not pick cuDNN attention on this GPU: nothing to turn off")
    kernels_of(OmegaConf.create({})).apply()
    used = attention_ops(lengths)
    assert used  # the profile sees attention ops
    assert not [name for name in used if "cudnn" in name]
