"""Hostile files and environments through the real entry points: an output folder that
cannot be written, a disk that fills up while checkpointing, a checkpoint of another model,
a corrupt or truncated checkpoint, a vectors file of the wrong width, a checkpoint or run
config that would run code. Each is one line on stderr naming the problem and the fix, exit
status 2 (a user's error), no traceback, and the code of a hostile file never runs.

The end-to-end tests are `slow` (each is a `python -m lmlab...` process in a session of its
own, killed by process group at its timeout); the checks behind them are tested in-process
in the fast layer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import DATA_DIR, ROOT, preloaded
from faults import Payload
from lmlab.checkpointing.weights import (SAFE_WEIGHTS, WEIGHTS, check_fits, read_state_dict,
                                         with_tied_names)
from lmlab.checkpointing.io import load_checkpoint
from lmlab.config.schema import compose
from lmlab.errors import LmlabError
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer
from lmlab.config.safety import check_targets, check_writable

USER_ERROR = 2  # lmlab.config.cli.fail
TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "logger=csv"]
TINY_LM = ["model=gpt_tiny", "data=stdlib_source", "data.tokenizer.vocab_size=300",
           "trainer.max_steps=2", "trainer.max_epochs=-1", "data.train_batches=2",
           "data.val_batches=1", "model.sample_tokens=0"]


class Finished:
    """A finished entry point: status, output, and seconds from start to exit."""

    def __init__(self, status: int | None, stdout: str, stderr: str, seconds: float):
        self.status, self.stdout, self.stderr, self.seconds = status, stdout, stderr, seconds

    def error_line(self) -> str:
        """The one `error:` line, checked: status 2, nothing after it, no traceback."""
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert self.status == USER_ERROR, self.stderr[-3000:]
        assert len(errors) == 1, self.stderr[-3000:]
        assert self.stderr.rstrip().endswith(errors[0]), self.stderr[-3000:]
        assert "Traceback" not in self.stderr and "Traceback" not in self.stdout
        return errors[0]


def entry(module: str, *args: str, timeout: float = 300) -> Finished:
    """Runs `python -m module args` in a process and session of its own (forked from the
    preloaded interpreter), killing its process group at `timeout`."""
    env = {**os.environ, "LMLAB_DATA_DIR": str(DATA_DIR), "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    start = time.monotonic()
    try:
        done = preloaded().run(module, list(args), ROOT, env, timeout)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        status, stdout, stderr = None, expired.output, expired.stderr
    seconds = time.monotonic() - start
    print(f"{module} {' '.join(args)[:80]}: exit {status} after {seconds:.1f} s")
    return Finished(status, stdout, stderr, seconds)


def train(folder: Path, *overrides: str) -> Path:
    done = entry("lmlab.run", f"hydra.run.dir={folder}", *overrides)
    assert done.status == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two classifier runs of different hidden sizes and a language-model run."""
    tmp = tmp_path_factory.mktemp("hostile")
    return {"wide": train(tmp / "wide", *TINY, "trainer.max_epochs=2"),
            "narrow": train(tmp / "narrow", *TINY, "trainer.max_epochs=1",
                            "model.net.hidden_size=32"),
            "lm": train(tmp / "lm", *TINY_LM, f"paths.cache_dir={tmp / 'cache'}")}


def payload_checkpoint(path: Path, marker: Path, source: Path) -> Path:
    """A real checkpoint of `source` with an object that creates `marker` when unpickled."""
    content = torch.load(source, weights_only=True)
    content["hyper_parameters"]["note"] = Payload(str(marker))
    torch.save(content, path)
    return path


def resume(run: Path, checkpoint: Path, tmp: Path, *extra: str) -> Finished:
    """Trains run's config again, resumed from `checkpoint`."""
    changed = {arg.partition("=")[0] for arg in extra}
    saved = [arg for arg in OmegaConf.load(run / ".hydra" / "overrides.yaml")
             if arg.partition("=")[0] not in changed]
    return entry("lmlab.run", *saved, f"hydra.run.dir={tmp / 'resumed'}",
                 f"ckpt_path={checkpoint}", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("name,longer", [("wide", "trainer.max_epochs=3"),
                                         ("lm", "trainer.max_steps=3")])
def test_an_own_checkpoint_resumes_under_weights_only_loading(runs, tmp_path, name, longer):
    # The control of the refusals below: lmlab's checkpoints (hyperparameters, optimizer,
    # schedule, callback state) hold nothing that weights_only loading refuses.
    done = resume(runs[name], runs[name] / "checkpoints" / "last.ckpt", tmp_path, longer)
    assert done.status == 0, done.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in done.stderr + done.stdout


# -- the output folder -------------------------------------------------------------------


@pytest.mark.slow
def test_an_output_folder_under_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = entry("lmlab.run", f"hydra.run.dir={blocker}/run", "debug=fast_dev_run")
    line = done.error_line()
    assert f"cannot write the run's files to {blocker}/run: {blocker} is a file" in line
    assert "set hydra.run.dir to a folder you can write" in line


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway; "
                    "the folder-under-a-file test covers the check")
def test_a_read_only_output_folder_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    done = entry("lmlab.run", f"hydra.run.dir={folder}/run", "debug=fast_dev_run")
    assert "Permission denied; set hydra.run.dir" in done.error_line()


def test_the_folder_check_creates_the_folder_or_names_the_blocking_file(tmp_path):
    check_writable(tmp_path / "a" / "b", "hydra.run.dir")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "f").write_text("")
    with pytest.raises(LmlabError, match=rf"{tmp_path}/f is a file, not a folder; set "
                       "hydra.run.dir"):
        check_writable(tmp_path / "f" / "x" / "y", "hydra.run.dir")


# -- a full disk ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_disk_full_while_checkpointing_keeps_the_earlier_checkpoints(tmp_path):
    run = tmp_path / "run"
    # Epoch 0 writes best and last; in epoch 1 the file size limit fails the real write.
    done = entry("lmlab.run", f"hydra.run.dir={run}", *TINY, "trainer.max_epochs=3",
                 "~trainer.plugins", "+trainer.plugins={_target_: faults.DiskFullAfter, saves: 2}")
    line = done.error_line()
    assert "the disk is full or a size limit was reached" in line
    assert f"kept in {run / 'checkpoints'}: best-epoch00.ckpt, last.ckpt" in line
    assert f"resume with ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["best-epoch00.ckpt", "last.ckpt"]  # no partial file left behind
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0  # whole, readable


# -- checkpoints of another model, corrupt ones ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "evaluate"])
def test_a_checkpoint_of_another_hidden_size_lists_shapes_and_config_keys(runs, tmp_path, how):
    checkpoint = runs["narrow"] / "checkpoints" / "last.ckpt"
    if how == "resume":
        done = resume(runs["wide"], checkpoint, tmp_path)
    else:
        done = entry("lmlab.evaluate", str(runs["wide"]), f"ckpt={checkpoint}")
    line = done.error_line()
    assert f"{checkpoint} does not fit this model: net.forward_rnn." in line
    assert "(128, 32) in the checkpoint, (512, 128) here" in line
    assert "and 5 more" in line  # 9 tensors differ, 4 shown
    assert "its run's config differs in model.net.hidden_size=32 there, 128 here" in line


@pytest.mark.slow
def test_generate_with_a_checkpoint_of_another_size_lists_the_shapes(runs, tmp_path):
    lm = tmp_path / "lm"
    shutil.copytree(runs["lm"], lm)
    state = read_state_dict(lm / WEIGHTS)
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)  # one tensor of another shape
    torch.save({"state_dict": state}, lm / "checkpoints" / "other.ckpt")
    done = entry("lmlab.generate", f"ckpt={lm / 'checkpoints' / 'other.ckpt'}",
                 "max_new_tokens=4")
    line = done.error_line()
    assert f"other.ckpt does not fit this model: {first} (3, 3) in the " \
        "checkpoint, " in line and "and " not in line.split("; ")[0]


@pytest.mark.slow
@pytest.mark.parametrize("damage,how", [("truncated", "resume"), ("garbage", "evaluate"),
                                        ("empty", "generate")])  # each damage: in process below
def test_a_corrupt_checkpoint_is_named_with_the_run_s_other_checkpoints(runs, tmp_path,
                                                                         damage, how):
    run = tmp_path / "run"
    shutil.copytree(runs["lm" if how == "generate" else "wide"], run)
    whole = (run / "checkpoints" / "last.ckpt").read_bytes()
    bad = run / "checkpoints" / "copied.ckpt"
    bad.write_bytes({"truncated": whole[:len(whole) // 2], "garbage": os.urandom(4096),
                     "empty": b""}[damage])
    if how == "resume":
        done = resume(runs["wide"], bad, tmp_path)
    elif how == "evaluate":
        done = entry("lmlab.evaluate", str(run), f"ckpt={bad}")
    else:
        done = entry("lmlab.generate", f"ckpt={bad}", "max_new_tokens=4")
    line = done.error_line()
    assert f"{bad} is corrupt or truncated" in line
    assert "use another checkpoint of the run: " in line
    assert str(run / "checkpoints" / "last.ckpt") in line
    assert str(run / SAFE_WEIGHTS) in line


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("damage", ["last 100 bytes cut", "half cut", "empty", "random",
                                    "zip header then random"])
def test_a_damaged_checkpoint_is_named_corrupt_in_process(tmp_path, damage, mmap):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    assert load_checkpoint(path)["state_dict"]["w"].sum() == 1000  # whole, it reads
    whole, noise = path.read_bytes(), torch.randint(0, 256, (4096,),
                                                    generator=torch.Generator().manual_seed(0))
    noise = bytes(noise.to(torch.uint8).tolist())
    path.write_bytes({"last 100 bytes cut": whole[:-100], "half cut": whole[:len(whole) // 2],
                      "empty": b"", "random": noise, "zip header then random": b"PK\x03\x04"
                      + noise}[damage])
    with pytest.raises(LmlabError, match=r"x.ckpt is corrupt or truncated \(.+\); no other "
                       "checkpoint was found"):
        load_checkpoint(path, mmap=mmap)


def test_a_mismatch_lists_a_few_tensors_then_how_many_more(tmp_path):
    module = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    other = torch.nn.Sequential(*[torch.nn.Linear(4, 2) for _ in range(3)])
    check_fits(module, module.state_dict(), tmp_path / "same.ckpt")  # fits: no error
    with pytest.raises(LmlabError) as err:
        check_fits(module, other.state_dict(), tmp_path / "x.ckpt")
    assert str(err.value).startswith(f"{tmp_path}/x.ckpt does not fit this model: 0.weight "
                                     "(2, 4) in the checkpoint, (4, 4) here, 0.bias (2,) in "
                                     "the checkpoint, (4,) here")
    assert "and 2 more;" in str(err.value) and "\n" not in str(err.value)


# -- vectors ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_vectors_line_of_another_width_names_file_line_and_both_widths(tmp_path):
    vectors = tmp_path / "glove.txt"
    vectors.write_text("the 0.1 0.2 0.3 0.4\nof 0.1 0.2 0.3\nand 0.1 0.2 0.3 0.4\n")
    done = entry("lmlab.run", f"hydra.run.dir={tmp_path / 'run'}", "debug=fast_dev_run",
                 f"model.pretrained_vectors={vectors}", "model.net.embed_dim=4")
    line = done.error_line()
    assert f"{vectors}:2: expected 4 values after the word, found 3; fix: set " \
        "model.net.embed_dim to the width of these vectors" in line


# -- code in checkpoints and configs -------------------------------------------------------


def test_the_payload_runs_code_when_loaded_the_unsafe_way(tmp_path):
    # The negative control: without weights_only the payload does run.
    marker = tmp_path / "marker"
    path = tmp_path / "p.ckpt"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(LmlabError, match=r"p.ckpt was refused: it holds Python objects "
                       r"\(io.open\) whose loading could run code"):
        read_state_dict(path)
    with pytest.raises(LmlabError, match="was refused"):
        load_checkpoint(path, mmap=True)  # as a resume's pre-check reads it
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume", "resume-last", "evaluate", "generate"])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(runs, tmp_path,
                                                                               how):
    run = tmp_path / "run"
    shutil.copytree(runs["lm" if how == "generate" else "wide"], run)
    marker = tmp_path / "marker"
    name = "last.ckpt" if how == "resume-last" else "foreign.ckpt"
    path = payload_checkpoint(run / "checkpoints" / name, marker,
                              run / "checkpoints" / "last.ckpt")
    if how == "resume":
        done = resume(runs["wide"], path, tmp_path)
    elif how == "resume-last":  # Lightning's own name: Lightning finds and loads the file
        overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml")
        done = entry("lmlab.run", *overrides, f"hydra.run.dir={run}", "ckpt_path=last")
    elif how == "evaluate":
        done = entry("lmlab.evaluate", str(run), f"ckpt={path}")
    else:
        done = entry("lmlab.generate", f"ckpt={path}", "max_new_tokens=4")
    line = done.error_line()
    assert "was refused: it holds Python objects (io.open) whose loading could run code" in line
    assert not marker.exists()


@pytest.mark.slow
def test_a_run_config_naming_foreign_code_is_refused_before_it_runs(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["wide"], run)
    marker = tmp_path / "marker"
    saved = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved)
    cfg.data.tokenizer = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    OmegaConf.save(cfg, saved)
    done = entry("lmlab.evaluate", str(run))
    assert f"{saved}: data.tokenizer._target_=builtins.open is not a class of lmlab" in \
        done.error_line()
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.exec", "os.system", "subprocess.Popen",
                                    "torch.hub.load", "torch.load", "lmlab.data.lm.publish",
                                    "lmlab.checkpointing.weights.export_weights",
                                    "hydra.utils.call"])
def test_targets_that_run_code_are_refused(tmp_path, target):
    cfg = OmegaConf.create({"model": {"net": {"_target_": target}}})
    with pytest.raises(LmlabError, match=rf"model.net._target_={target} is not a class"):
        check_targets(cfg, tmp_path / "config.yaml")


@pytest.mark.parametrize("overrides", [[], ["experiment=sst2_lstm"], ["model=gpt_tiny",
                         "data=stdlib_source", "strategy=deepspeed_zero2"],
                         ["model=transformer_tiny", "data=multi30k", "strategy=fsdp"],
                         ["model=lstm_attn", "data=stdlib_summaries", "logger=csv_wandb",
                          "callbacks=early_stopping"]])
def test_every_target_the_configs_name_is_allowed(tmp_path, overrides):
    cfg = compose(overrides)
    check_targets(cfg, tmp_path / "config.yaml")  # no error


# -- weights.safetensors -------------------------------------------------------------------


@pytest.mark.slow
def test_every_run_writes_weights_safetensors_that_evaluate_and_generate_load(runs, tmp_path):
    for run in runs.values():
        plain, safe = read_state_dict(run / WEIGHTS), read_state_dict(run / SAFE_WEIGHTS)
        assert plain.keys() == safe.keys()
        assert all(torch.equal(plain[k], safe[k]) for k in plain)
        with safe_open(run / SAFE_WEIGHTS, "pt") as f:
            meta = f.metadata()
        assert OmegaConf.create(meta["config"]).model == \
            OmegaConf.load(run / ".hydra" / "config.yaml").model
        assert json.loads(meta["tokenizer"]) == json.loads((run / "tokenizer.json").read_text())
    evaluated = {name: entry("lmlab.evaluate", str(runs["wide"]), f"ckpt={runs['wide'] / name}")
                 for name in (WEIGHTS, SAFE_WEIGHTS)}
    assert all(done.status == 0 for done in evaluated.values())
    tables = [done.stdout.split("test metrics")[-1].split("run files:")[0]
              for done in evaluated.values()]
    assert "test/acc" in tables[0] and tables[0] == tables[1]  # the same metrics
    generated = [entry("lmlab.generate", f"ckpt={runs['lm'] / name}", "prompt=def ",
                       "max_new_tokens=16", "seed=3")
                 for name in (WEIGHTS, SAFE_WEIGHTS)]
    assert all(done.status == 0 for done in generated)
    assert generated[0].stdout == generated[1].stdout  # the same sample from the same weights
    assert generated[0].stdout.startswith("def ") and len(generated[0].stdout) > len("def ")


def test_a_run_with_only_weights_safetensors_is_evaluated_from_it(tmp_path):
    from lmlab.training.runs import run_checkpoints
    (tmp_path / SAFE_WEIGHTS).write_bytes(b"")
    assert run_checkpoints(tmp_path) == {"weights": tmp_path / SAFE_WEIGHTS}
    (tmp_path / WEIGHTS).write_bytes(b"")
    assert run_checkpoints(tmp_path) == {"weights": tmp_path / WEIGHTS}


def test_a_state_dict_missing_a_tied_name_gets_it_from_its_twin():
    # DeepSpeed's consolidation of a ZeRO checkpoint dropped net.src_embed.weight of a
    # transformer whose source, target and output embeddings are one matrix
    net = Seq2SeqTransformer(50, 50, 0, 1, 2, d_model=16, n_head=2, n_encoder_layers=1,
                             n_decoder_layers=1, d_ff=16, share_embeddings=True)
    state = {k: v for k, v in net.state_dict().items() if k != "src_embed.weight"}
    with pytest.raises(LmlabError, match="src_embed.weight missing"):
        check_fits(net, state, Path("x.ckpt"))  # the negative control
    completed = with_tied_names(state, net)
    check_fits(net, completed, Path("x.ckpt"))
    assert completed["src_embed.weight"] is state["tgt_embed.weight"]
