"""The `kernels` node: torch's attention-kernel switch as the run sets it, and put back."""

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from conftest import GPU
from lmlab.build import build
from lmlab.kernels import Kernels, kernels_of
from lmlab.models.seq2seq import Seq2SeqTransformer

SHORT_RUN = ("model=transformer_tiny", "data=stdlib_summaries", "data.tokenizer.vocab_size=300",
             "strategy=cpu", "logger=none", "trainer.max_epochs=1",
             "trainer.limit_train_batches=2", "trainer.limit_val_batches=0",
             "trainer.enable_progress_bar=false")


class SwitchProbe(Callback):
    """Reads torch's cuDNN-attention switch while the model trains."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen = torch.backends.cuda.cudnn_sdp_enabled()


@pytest.fixture
def switch():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("allowed", [False, True])
def test_the_run_trains_with_the_configured_switch_and_puts_it_back(make_cfg, switch, allowed):
    torch.backends.cuda.enable_cudnn_sdp(not allowed)  # the process's own setting, opposite
    data, task, trainer = build(make_cfg(*SHORT_RUN, f"kernels.cudnn_attention={allowed}"))
    probe = SwitchProbe()
    trainer.callbacks.append(probe)
    trainer.fit(task, datamodule=data)
    assert probe.seen is allowed
    assert torch.backends.cuda.cudnn_sdp_enabled() is (not allowed)


def test_cudnn_attention_is_off_by_default_and_for_runs_saved_without_the_node(make_cfg):
    assert kernels_of(make_cfg()).cudnn_attention is False
    assert kernels_of(OmegaConf.create({"model": {}})).cudnn_attention is False


def test_apply_sets_the_switch_in_this_process(switch):
    torch.backends.cuda.enable_cudnn_sdp(True)
    Kernels(cudnn_attention=False).apply()
    assert torch.backends.cuda.cudnn_sdp_enabled() is False


@pytest.mark.parametrize("lengths", [pytest.param((7, 12, 30), marks=GPU)])
def test_attention_on_cuda_runs_without_cudnn_by_default(switch, lengths):
    """Batches of new lengths, as bucketing makes them, train and decode with no cuDNN
    attention kernel: the default switch reaches the kernel choice."""
    kernels_of(OmegaConf.create({})).apply()
    net = Seq2SeqTransformer(40, 40, 0, 1, 2, d_model=64, n_head=2, n_encoder_layers=1,
                             n_decoder_layers=1, d_ff=64).cuda()
    with torch.profiler.profile() as profile, torch.autocast("cuda", dtype=torch.bfloat16):
        for length in lengths:
            source = torch.randint(3, 40, (4, length), device="cuda")
            net(source, source[:, :length // 2]).float().sum().backward()
    names = {event.name for event in profile.events()}
    assert any("attention" in name for name in names)  # the profile sees attention ops
    assert not [name for name in names if "cudnn_attention" in name]
