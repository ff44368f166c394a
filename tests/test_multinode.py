"""Two nodes over TCP on this machine: the same global batches give the same losses as one
process. Each "node" is a torchrun (or a process with SLURM's variables) of one rank on
127.0.0.1; both share one run folder and one token cache, as nodes on a shared file system
do, and both are started together, each in a session of its own with a hard timeout.
"""

import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import DATA_DIR, ROOT
from lmlab.config.checks import check_config
from lmlab.config.schema import compose
from lmlab.errors import ConfigError
from lmlab.check_parallel import RUN, compare, plain_sgd, run_strategy, run_subprocess, val_losses

TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 4
# A language model, so that the token cache is built by both nodes at once.
LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=500",
      "data.train_batches=15", "data.val_batches=4", "model.sample_tokens=16",
      "trainer.enable_progress_bar=false"]
TWO_NODES = ["strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2",
             f"trainer.max_steps={STEPS}", *RUN, *plain_sgd(1.0), *LM, "data.batch_size=12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(commands: list[list[str]], envs: list[dict], timeout: float = 400) -> None:
    """Starts every node's command at once; each must exit 0 within `timeout`."""
    with ThreadPoolExecutor(len(commands)) as pool:
        runs = [pool.submit(run_subprocess, c, timeout, cwd=ROOT, env=e)
                for c, e in zip(commands, envs)]
        results = [r.result() for r in runs]
    for node, (status, output) in enumerate(results):
        assert status is not None, f"node {node} timed out:\n{output[-3000:]}"
        assert status == 0, f"node {node}:\n{output[-3000:]}"


def environment(**extra: str) -> dict:
    return {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", **extra}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The loss curve of the same steps in one process."""
    root = tmp_path_factory.mktemp("one_node")
    return run_strategy("cpu", 1, STEPS, [*plain_sgd(1.0), *LM, "data.batch_size=12",
                                          f"paths.cache_dir={root}/cache"],
                        root / "run", timeout=300)[0]


def check_same_curve(one_process: list[float], run_dir: Path) -> None:
    curves = {"one process": one_process, "two nodes": val_losses(run_dir)}
    assert compare(curves, tolerance=1e-4, min_change=0.01) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_nodes_train_as_one_process(tmp_path, one_process):
    port = free_port()
    common = [*TWO_NODES, f"hydra.run.dir={tmp_path / 'run'}",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    commands = [[str(TORCHRUN), "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
                 "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "lmlab.run",
                 *common] for rank in (0, 1)]
    run_nodes(commands, [environment(), environment()])
    check_same_curve(one_process, tmp_path / "run")
    log = (tmp_path / "run" / "run.log").read_text()
    assert "on rank 0" in log and "on rank 1" in log  # both nodes trained
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and caches[0].is_dir()  # one published cache, no stray copies


@pytest.mark.slow
@pytest.mark.distributed
def test_two_slurm_tasks_train_as_one_process(tmp_path, one_process):
    """The ranks as `srun` starts them on two nodes: Lightning's SLURM environment reads
    them from SLURM_* variables (no torchrun, no relaunch)."""
    common = [*TWO_NODES, f"hydra.run.dir={tmp_path / 'run'}",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    command = [sys.executable, "-m", "lmlab.run", *common]
    port = free_port()
    envs = [environment(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank),
                        SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_NAME="lmlab",
                        SLURM_JOB_ID="4242",
                        SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))
            for rank in (0, 1)]
    run_nodes([command, command], envs)
    check_same_curve(one_process, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.distributed
def test_the_comparison_catches_a_run_that_is_not_data_parallel(one_process, tmp_path):
    """Negative control: one process at half the global batch (what a node that trained
    alone on its share would see) leaves the curve of the full batch."""
    half = run_strategy("cpu", 1, STEPS, [*plain_sgd(1.0), *LM, "data.batch_size=6",
                                          f"paths.cache_dir={tmp_path}/cache"],
                        tmp_path / "run", timeout=300)[0]
    assert compare({"one process": one_process, "half batch": half}, tolerance=1e-4)


def layout_problems(monkeypatch, **slurm: str) -> list[str]:
    """The pre-flight problems of the two-node run as a SLURM job of this layout sees it."""
    for name, value in {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "lmlab", **slurm}.items():
        monkeypatch.setenv(name, value)
    cfg = compose(TWO_NODES)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.data_dir = "outputs/x", str(DATA_DIR)
    try:
        check_config(cfg)
    except ConfigError as err:
        return err.problems
    return []


def test_preflight_accepts_two_nodes_and_refuses_a_layout_that_is_not_the_jobs(monkeypatch):
    assert layout_problems(monkeypatch, SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1") == []
    assert layout_problems(monkeypatch, SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2") == [
        "trainer.devices=1 but the SLURM job has --ntasks-per-node=2 (one task a device); "
        "set trainer.devices=2",
        "trainer.num_nodes=2 but the SLURM job has --nodes=1 (one task a device); "
        "set trainer.num_nodes=1"]
