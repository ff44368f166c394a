"""Fine-tuning a Hugging Face folder by config, as users run it: the same losses under
several processes as under one, LoRA's files, the export command, and the import's memory.
Every run is a subprocess with a hard timeout."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, run_entry
from hf_folders import make_folder, transformers
from lmlab.check_parallel import check, run_subprocess
from lmlab.training.runs import load_run

pytestmark = pytest.mark.slow
FINE_TUNE = ["model=hf_causal_lm", "data=stdlib_source", "data.block_size=32",
             "data.batch_size=8", "data.train_batches=8", "model.sample_tokens=8",
             "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_folder("llama", tmp_path_factory.mktemp("llama"))


def run(run_dir, *overrides, timeout=300):
    status, output = run_entry(f"hydra.run.dir={run_dir}", *overrides, timeout=timeout,
                               env={"OMP_NUM_THREADS": "1"})
    assert status == 0, output[-3000:]
    return output


@pytest.mark.distributed
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fine_tuning_under_several_processes_gives_one_process_losses(llama, tmp_path, lora):
    """ddp, fsdp2 and (whole nets: LoRA is refused there) tensor parallelism over the
    folder's grouped-query attention and SwiGLU, 2 processes each."""
    overrides = [*FINE_TUNE, f"model.pretrained={llama}", f"paths.cache_dir={tmp_path}",
                 "data.val_batches=2"] + (["model.lora.rank=4"] if lora else [])
    strategies = ["cpu", "ddp", "fsdp2"] + ([] if lora else ["tp"])
    curves = check(strategies, steps=6, overrides=overrides, lr=0.5, tolerance=1e-4,
                   timeout=300)
    assert all(len(curve) == 6 for curve in curves.values())


def test_a_lora_run_saves_its_adapters_and_exports_merged_weights(llama, tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, *FINE_TUNE, f"model.pretrained={llama}", f"paths.cache_dir={tmp_path}",
        "model.lora.rank=4", "model.lora.targets=[q,v,proj]", "model.optimizer.lr=1e-2",
        "trainer.max_steps=8", "data.val_batches=2", "logger=csv")
    adapters = load_file(run_dir / "adapters.safetensors")
    assert adapters and all(("lora_" in k or k.endswith(".scale")) for k in adapters)
    # per layer, A (4, in) and B (out, 4) of q (64 -> 64), v (64 -> 32 over 2 kv heads),
    # attn.proj (64 -> 64) and mlp.proj (96 -> 64); two layers
    per_layer = (4 * 64 + 64 * 4) + (4 * 64 + 32 * 4) + (4 * 64 + 64 * 4) + (4 * 96 + 64 * 4)
    assert sum(v.numel() for k, v in adapters.items() if "lora_" in k) == 2 * per_layer
    merged = torch.load(run_dir / "weights.ckpt", weights_only=True)["state_dict"]
    assert not any("parametrizations" in k for k in merged)
    out = tmp_path / "exported"
    exported = run_cli(str(run_dir), f"out={out}", module="lmlab.export", cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-2000:]
    task, data, _ = load_run(str(run_dir), "test")
    ids = torch.tensor([data.tokenizer.encode("def f(x):\n    return x")])
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reference(ids).logits - task.net(ids)).abs().max() < 1e-5
        base = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
        assert (base(ids).logits - task.net(ids)).abs().max() > 1e-3  # the adapters count


def test_a_gpt_run_exports_and_loads_in_transformers(tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, "model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=400",
        "model.net.positions=rope", "model.net.norm=rmsnorm", "model.net.mlp=swiglu",
        "model.net.bias=false", f"paths.cache_dir={tmp_path}", "trainer.max_steps=5",
        "data.val_batches=2", "model.sample_tokens=8")
    out = tmp_path / "exported"
    exported = run_cli(str(run_dir), f"out={out}", module="lmlab.export", cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-2000:]
    task, data, _ = load_run(str(run_dir), "test")
    text = "import os\n\n\ndef main():\n    return os.sep"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == data.tokenizer.encode(text)
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        assert (logits - task.net(ids)).abs().max() < 1e-5


def test_a_layout_without_a_transformers_counterpart_is_refused_by_export(tmp_path):
    run_dir = tmp_path / "run"
    run(run_dir, "model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=400",
        "model.net.positions=rope", f"paths.cache_dir={tmp_path}", "trainer.max_steps=2",
        "data.val_batches=1", "model.sample_tokens=0")
    exported = run_cli(str(run_dir), f"out={tmp_path / 'x'}", module="lmlab.export", cwd=ROOT)
    assert exported.returncode != 0
    assert exported.stderr.strip().splitlines()[-1] == (
        "error: model.net.norm=layernorm has no counterpart in transformers' Llama "
        "(positions=rope) layout; such a run cannot be exported")


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's (this test process,
# which held a GPT-2 in memory) at the fork
MEASURE = """
import sys
from lmlab.interop.huggingface import PretrainedGPT
def kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024
before = kib("VmRSS:")
PretrainedGPT(sys.argv[1])
print(kib("VmHWM:") - before)
"""


def test_importing_a_gpt2_small_folder_holds_the_weights_about_once(tmp_path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").stat().st_size
    status, output = run_subprocess([sys.executable, "-c", MEASURE, str(tmp_path)], 300)
    assert status == 0, output[-2000:]
    grown = int(output.strip().splitlines()[-1])
    assert grown < 1.5 * weights, f"peak grew by {grown / weights:.2f}x the weights"


def test_a_fine_tuned_run_outlives_its_pretrained_folder(llama, tmp_path):
    """The run keeps the folder's config.json: evaluate and export rebuild the net from it,
    and take the weights from the run's checkpoint, with the folder gone."""
    folder, run_dir = tmp_path / "base", tmp_path / "run"
    shutil.copytree(llama, folder)
    run(run_dir, *FINE_TUNE, f"model.pretrained={folder}", f"paths.cache_dir={tmp_path}",
        "trainer.max_steps=2", "data.val_batches=1")
    shutil.rmtree(folder)
    for module, args in (("lmlab.evaluate", [str(run_dir)]),
                         ("lmlab.export", [str(run_dir), f"out={tmp_path / 'out'}"])):
        done = run_cli(*args, module=module, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("change, command, message", [
    ({"model_type": "phi3"}, "run", "model_type 'phi3' is not supported"),
    ({"model_type": "phi3"}, "generate", "model_type 'phi3' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "evaluate", "rope_type='yarn'"),
    ({}, "run data.loss_on=completions", "data.loss_on='completions'"),
])
def test_a_bad_folder_or_setting_is_one_line_from_every_command(llama, tmp_path, change,
                                                                 command, message):
    folder = tmp_path / "folder"
    shutil.copytree(llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    name, *extra = command.split()
    args = {"run": ["model=hf_causal_lm", f"model.pretrained={folder}",
                    "data=completions" if extra else "data=stdlib_source",
                    f"hydra.run.dir={tmp_path / 'run'}", *extra]
            + (["data.files.train=x.jsonl"] if extra else []),
            "generate": [f"ckpt={folder}", "prompt=x"], "evaluate": [str(folder)]}[name]
    done = run_cli(*args, module=f"lmlab.{name}", cwd=ROOT)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
