"""Multi-process training on CPU (gloo): the same global batches give the same model.

Each run is a subprocess in its own session with a hard timeout, killed by process group,
since DDP inside the pytest process would re-run the test session.
"""

import csv
import math
import os
import socket
from contextlib import nullcontext
from itertools import product

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, run_cli, run_entry
from lmlab.check_parallel import (check, compare, differing_hypotheses, plain_sgd)
from lmlab.errors import LmlabError

# Plain SGD at a constant rate: unlike Adam's, its update scales with the gradient, so a
# reduction that sums over ranks instead of averaging shows in the loss.
COMMON = ["trainer.max_steps=15", "trainer.max_epochs=-1", "callbacks=none",
          "model.net.dropout=0.0", "trainer.limit_val_batches=0", "data.batch_size=64",
          *plain_sgd(5.0)]
CHECK_DATA = ["data.batch_size=64", "trainer.limit_val_batches=2"]
LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=500",
      "trainer.max_steps=15", "trainer.max_epochs=-1", "data.train_batches=15",
      "data.val_batches=4", "model.sample_tokens=16", *plain_sgd(1.0)]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def run_isolated(run_dir, *overrides, timeout=300):
    env = {"OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    status, output = run_entry(f"hydra.run.dir={run_dir}", *overrides, timeout=timeout,
                               env=env)
    assert status is not None, f"run timed out after {timeout} s:\n{output[-3000:]}"
    assert status == 0, output[-3000:]
    return output


def final_test_metrics(run_dir) -> dict[str, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("test/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("test/")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process runs to compare against, made once: {"lstm": dir, "gpt": dir}."""
    root = tmp_path_factory.mktemp("one")
    run_isolated(root / "lstm", "strategy=cpu", *COMMON)
    run_isolated(root / "gpt", "strategy=cpu", *LM, f"paths.cache_dir={root / 'cache'}")
    return {"lstm": root / "lstm", "gpt": root / "gpt"}


def test_sgd_moves_the_language_model_the_equivalence_tests_compare(one_process):
    gpt = final_test_metrics(one_process["gpt"])
    assert gpt["test/loss"] < 0.9 * math.log(500)  # the untrained loss of 500 tokens


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2"])
def test_two_processes_train_the_same_model_as_one(tmp_path, one_process, strategy):
    output = run_isolated(tmp_path, f"strategy={strategy}", "trainer.devices=2",
                          "trainer.accelerator=cpu", *COMMON)
    assert "MEMBER: 2/2" in output  # both processes joined
    one, two = final_test_metrics(one_process["lstm"]), final_test_metrics(tmp_path)
    assert one["test/loss"] == pytest.approx(two["test/loss"], rel=1e-3)
    assert one["test/acc"] == pytest.approx(two["test/acc"], abs=1 / 189)  # one example at most


SPLIT_SEQUENCE = ["trainer.strategy.sequence_parallel=true", "trainer.strategy.loss_parallel=true"]


@pytest.mark.parametrize("strategy,devices,sharded,switches", [
    ("fsdp2", 2, "tensor parallel over 1 ranks, FSDP2 over 2", []),
    ("tp", 2, "tensor parallel over 2 ranks, FSDP2 over 1", []),
    ("tp", 4, "tensor parallel over 2 ranks (sequence parallel, loss parallel), FSDP2 over 2",
     SPLIT_SEQUENCE),
    ("fsdp", 2, None, []),
    ("deepspeed_zero3", 2, None, []),
], ids=["fsdp2", "tp", "tp2xdp2_sequence_loss_parallel", "fsdp", "deepspeed_zero3"])
def test_sharded_language_model_matches_one_process_and_loads_on_one(
        tmp_path, one_process, strategy, devices, sharded, switches):
    output = run_isolated(tmp_path, f"strategy={strategy}", f"trainer.devices={devices}",
                          "trainer.accelerator=cpu", *LM, f"paths.cache_dir={tmp_path / 'c'}",
                          *switches)
    assert sharded is None or sharded in output
    sampled = "sample at step 15" in (tmp_path / "run.log").read_text()  # in the loop
    assert sampled == (not switches)  # a decoding step's one token does not split
    one, many = final_test_metrics(one_process["gpt"]), final_test_metrics(tmp_path)
    assert one["test/loss"] == pytest.approx(many["test/loss"], rel=1e-4)  # from weights.ckpt
    if strategy.startswith("deepspeed"):  # its per-rank folder, consolidated, on one device
        evaluated = run_cli(str(tmp_path), "ckpt=best", module="lmlab.evaluate", cwd=ROOT)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert f"{many['test/loss']:.4f}" in evaluated.stdout


def test_resuming_under_another_strategy_carries_the_weights_with_a_warning(tmp_path,
                                                                           one_process):
    final = one_process["lstm"] / "checkpoints" / "final.ckpt"  # written by strategy=cpu
    output = run_isolated(tmp_path, "strategy=fsdp2", "trainer.devices=2",
                          "trainer.accelerator=cpu", *COMMON, *plain_sgd(0.0),
                          f"ckpt_path={final}")
    assert "only its weights carry over" in output and "optimizer state" in output
    resumed, source = final_test_metrics(tmp_path), final_test_metrics(one_process["lstm"])
    assert resumed["test/loss"] == pytest.approx(source["test/loss"], rel=1e-5)  # lr 0: as saved


def test_the_design_card_command_runs_four_processes(tmp_path):
    output = run_isolated(tmp_path, "model=lstm", "strategy=ddp", "trainer.devices=4",
                          "debug=fast_dev_run")
    assert "distributed_backend=gloo" in output
    assert "Starting with 4 processes" in output or "MEMBER: 4/4" in output
    assert "test/acc" in output


def rank_fingerprints(job_dir) -> dict[int, str]:
    """The config fingerprint each rank logged: rank 0 in run.log, rank r in its own log."""
    found = {}
    for log in job_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            if " on rank " in line and "- config " in line:
                digest, rank = line.split("- config ")[1].split(" on rank ")
                found[int(rank)] = digest
    return found


@pytest.mark.parametrize("sweep", [
    ["hydra.mode=MULTIRUN", "model.optimizer.lr=1e-3,3e-3", "debug=fast_dev_run"],
    ["sweep=lstm_optuna", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1",
     "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "logger=none"],
], ids=["basic", "optuna"])
def test_sweep_with_ddp_runs_each_job_once_with_one_config_on_every_rank(tmp_path, sweep):
    run_isolated(tmp_path / "unused", f"hydra.sweep.dir={tmp_path / 'sweep'}", *sweep,
                 "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", timeout=400)
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]  # no job run twice, no stray folders
    fingerprints = [rank_fingerprints(j) for j in jobs]
    for ranks in fingerprints:
        assert set(ranks) == {0, 1} and ranks[0] == ranks[1]  # both ranks, one config
    assert fingerprints[0][0] != fingerprints[1][0]  # the two jobs differ
    for job in jobs:
        assert (job / "metrics.json").is_file() and (job / ".hydra" / "config.yaml").is_file()


def test_check_parallel_agrees_and_catches_a_gradient_summed_over_ranks(capsys, monkeypatch):
    curves = check(["cpu", "ddp"], steps=4, overrides=CHECK_DATA, lr=3.0)
    assert len(set(curves["cpu"])) == 4  # one loss per step, each after a weight update
    assert "agree within" in capsys.readouterr().out
    # The negative control: the same check, with DDP's gradients doubled after reduction.
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    doubled = ["+callbacks.fault._target_=faults.ScaleGradients", "+callbacks.fault.factor=2"]
    with pytest.raises(LmlabError, match="ddp: step 0 loss"):
        check(["cpu", "ddp"], steps=4, overrides=[*CHECK_DATA, *doubled], lr=3.0)


def test_differing_hypotheses_are_named_with_the_first_line_that_differs():
    one = ["a man rides", "two dogs"]
    assert differing_hypotheses({"cpu": one, "fsdp": list(one), "lm": None} | {"x": one}) == \
        ["lm: no hypotheses, cpu 2"]
    assert differing_hypotheses({"cpu": one, "tp": ["a man rides", "two cats"]}) == \
        ["tp: 1 of 2 hypotheses differ from cpu's, the first at line 2: 'two cats' against "
         "'two dogs'"]
    many = [f"line {i}" for i in range(100)]
    tipped = many[:99] + ["a near-tie"]  # one line in 100: within the 2% allowed
    assert differing_hypotheses({"cpu": many, "fsdp": tipped}) == []
    assert differing_hypotheses({"cpu": many, "fsdp": tipped[:97] + ["x"] * 3})  # three
    assert differing_hypotheses({"cpu": None, "ddp": None}) == []  # a model that decodes none


def test_compare_flags_a_shifted_curve_a_flat_one_and_a_non_finite_loss():
    curves = {"cpu": [2.0, 1.9, 1.8], "off": [2.02, 1.919, 1.818]}
    assert [p.split(":")[0] for p in compare(curves, 1e-3)] == ["off"] * 3
    assert "moved by 0.05% only" in compare({"cpu": [2.0, 2.001]}, 1e-3, 0.01)[0]
    assert compare({"cpu": [2.0, 1.5], "ddp": [2.0, float("nan")]}, 1e-3) == \
        ["ddp: step 1 loss nan"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "tp"])
def test_activation_checkpointing_keeps_the_losses_of_one_process(tmp_path, one_process,
                                                                  strategy):
    """Recomputed blocks (`model.activation_checkpointing=true`) under each strategy that
    takes them, against one process that keeps its activations."""
    run_isolated(tmp_path, f"strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu",
                 *LM, f"paths.cache_dir={tmp_path / 'c'}", "model.activation_checkpointing=true")
    one, many = final_test_metrics(one_process["gpt"]), final_test_metrics(tmp_path)
    assert one["test/loss"] == pytest.approx(many["test/loss"], rel=1e-4)


def test_fsdp2_at_bf16_mixed_gives_one_process_losses():
    """FSDP2 gathers parameters and computes in bfloat16 and reduces gradients in float32
    (`lmlab.parallel.sharding.mixed_precision`); one process runs Lightning's autocast."""
    check(["cpu", "fsdp2"], steps=6, lr=1.0, tolerance=1e-3, timeout=300,
          overrides=["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=500",
                     "precision=bf16-mixed", "model.sample_tokens=0"])


def sharding_worker(rank: int, port: int, reshard: bool, found) -> None:
    """Rank `rank` of 2: a GPT sharded at bf16-mixed; what its first block's q layer computes
    with, and whether its parameters stay gathered after the forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lmlab.models.gpt import GPT
    from lmlab.parallel.sharding import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel",
                                                                "tensor_parallel"))
        shard(net, mesh, "bf16-mixed", reshard_after_forward=reshard)
        q = net.blocks[0].attn.q
        seen = []
        q.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
        net(torch.randint(0, 50, (2, 8))).float().sum()
        if rank == 0:
            found["dtype"] = str(seen[0])
            found["sharded after forward"] = isinstance(q.weight, DTensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_computes_in_half_and_reshards_as_told(reshard):
    found = mp.Manager().dict()
    mp.spawn(sharding_worker, args=(free_port(), reshard, found), nprocs=2)
    assert found["dtype"] == "torch.bfloat16"
    assert found["sharded after forward"] == reshard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GPTS = {"gpt2": {"vocab_size": 51, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16},
        "llama": {"vocab_size": 51, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 16,
                  "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2,
                  "tie_embeddings": False, "bias": False}}


def split_gpt_worker(rank: int, port: int, found) -> None:
    """Rank `rank` of 2: each GPT layout under each pair of switches against an unsplit
    copy of its weights; then the negative control, the embedding untied from the output
    layer when both are split."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmlab.parallel import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    try:
        for case in product(GPTS, *[(False, True)] * 2):
            found[case] = differing_gradients(mesh, *case)
        sharding.tied_parameters = lambda net: []
        found["ties lost"] = differing_gradients(mesh, "gpt2", False, True)
    finally:
        dist.destroy_process_group()


def differing_gradients(mesh, layout: str, sequence: bool, vocabulary: bool) -> list[str]:
    """The parameters whose gradients differ from the unsplit net's; the per-token losses (a
    padded batch, 51 = an uneven vocabulary) and the cached decoding's logits must agree."""
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel

    from lmlab.models.gpt import GPT
    from lmlab.parallel.sharding import split_layers, whole

    torch.manual_seed(0)
    split, whole_net = GPT(**GPTS[layout]), GPT(**GPTS[layout])
    whole_net.load_state_dict(split.state_dict())
    tokens, targets = torch.randint(0, 51, (3, 16)), torch.randint(0, 51, (3, 16))
    targets[0, :5] = -100  # a prompt or padding
    expected = F.cross_entropy(whole_net(tokens).transpose(1, 2), targets, ignore_index=-100,
                               reduction="none")
    expected.mean().backward()
    split_layers(split, mesh, sequence, vocabulary)
    with loss_parallel() if vocabulary else nullcontext():
        losses = whole(F.cross_entropy(split(tokens).transpose(1, 2), targets,
                                       ignore_index=-100, reduction="none"))
        losses.mean().backward()
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the key/value cache: a prompt, then one token at a time
        steps = [tokens[:, :6]] + ([] if sequence else [tokens[:, 6:7], tokens[:, 7:8]])
        cache = reference = None
        for step in steps:
            logits, cache = split(step, cache=cache, return_cache=True)
            expected, reference = whole_net(step, cache=reference, return_cache=True)
            torch.testing.assert_close(whole(logits), expected, atol=1e-5, rtol=1e-5)
    return [name for name, p in whole_net.named_parameters()
            if not torch.allclose(whole(split.get_parameter(name).grad), p.grad,
                                  atol=1e-5, rtol=1e-4)]


def test_sequence_and_loss_parallel_give_the_unsplit_losses_and_gradients():
    """torchtitan's layout on lmlab's plan roles, for a GPT-2 and a Llama layout."""
    found = mp.Manager().dict()
    mp.spawn(split_gpt_worker, args=(free_port(), found), nprocs=2)
    assert len(found) == 9
    assert found.pop("ties lost") == ["wte.weight"]  # the negative control
    assert not {case: names for case, names in found.items() if names}
