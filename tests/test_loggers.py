"""Loggers: the options and their combinations, W&B runs that follow resumes and sweeps and
only start on global rank zero, what a run records about itself, and secrets kept out of
every file a run writes. W&B runs are real, offline, read back with lmlab.tracking.wandb_offline."""

import json
import os
import re
import secrets
import sys

import pytest
import torch
from lightning.fabric.loggers.logger import _DummyExperiment
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from lmlab.training.build import loggers
from lmlab.check_parallel import run_subprocess
from lmlab.training.dry_run import dry_run
from lmlab.errors import LmlabError
from lmlab.tracking.loggers import WandbLogger
from lmlab.tracking.wandb_identity import override_tags, resumed_wandb_id, shorten_tag
from lmlab.config.redact import REDACTED, is_secret_name, redact, redact_yaml_files, secret_values
from lmlab.tracking.run_info import RANK_VARIABLES, git_state, launched_as_rank_zero
from lmlab.tracking.wandb_offline import offline_runs, read_run

FEW_BATCHES = ["trainer.max_epochs=1", "trainer.limit_train_batches=3",
               "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def run(run_dir, *overrides, env=None):
    result = run_cli(f"hydra.run.dir={run_dir}", *overrides, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("option,names", [
    ("csv", ["csv"]), ("wandb", ["wandb"]), ("tensorboard", ["tensorboard"]), ("none", []),
    ("csv_wandb", ["csv", "wandb"]), ("csv_tensorboard", ["csv", "tensorboard"]),
    ("[csv,wandb,tensorboard]", ["csv", "wandb", "tensorboard"]),
])
def test_logger_options_and_lists_compose_and_instantiate(make_cfg, option, names):
    cfg = make_cfg(f"logger={option}")
    assert sorted(cfg.logger or {}) == sorted(names)
    kinds = {type(x).__name__ for x in loggers(cfg) or []}
    assert kinds == {{"csv": "CSVLogger", "wandb": "WandbLogger",
                      "tensorboard": "TensorBoardLogger"}[n] for n in names}


def test_wandb_keys_are_constructor_arguments(make_cfg):
    cfg = make_cfg("logger=wandb", "logger.wandb.entity=team", "logger.wandb.group=g1",
                   "logger.wandb.job_type=eval", "logger.wandb.mode=disabled", "tags=[a,b]")
    init = loggers(cfg)[0]._wandb_init
    assert (init["entity"], init["group"], init["job_type"], init["mode"]) == \
        ("team", "g1", "eval", "disabled")
    assert init["tags"][:2] == ["a", "b"] and re.fullmatch(r"[a-z0-9]{8}", init["id"])
    assert "mode" not in loggers(make_cfg("logger=wandb"))[0]._wandb_init  # WANDB_MODE decides


def test_a_wrong_wandb_mode_is_a_message():
    with pytest.raises(LmlabError, match="logger.wandb.mode=onlin is not a W&B mode"):
        WandbLogger(mode="onlin")


@pytest.mark.parametrize("name,secret", [
    ("WANDB_API_KEY", True), ("hf_token", True), ("api_key", True), ("db.password", True),
    ("clientSecret", True), ("HF_TOKEN", True),
    ("tokenizer", False), ("max_new_tokens", False), ("sample_tokens", False),
    ("monitor", False), ("target_tokenizer", False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_redaction_of_keys_overrides_urls_and_known_values():
    config = {"extra": {"hf_token": "abc123xyz"}, "data": {
        "url": "https://user:hunter22@host/x.csv?sig=zz9&token=qq8", "tokenizer": {"max_size": 5}},
        "note": "the token abc123xyz again", "overrides": ["+extra.hf_token=abc123xyz", "seed=1"]}
    cleaned = redact(config, secret_values(config, environ={}))
    text = json.dumps(cleaned)
    assert "abc123xyz" not in text and "hunter22" not in text and "zz9" not in text \
        and "qq8" not in text
    assert cleaned["extra"]["hf_token"] == REDACTED
    assert cleaned["data"]["tokenizer"] == {"max_size": 5} and "seed=1" in cleaned["overrides"]
    assert cleaned["data"]["url"].startswith("https://user:<redacted>@host/x.csv?sig=<redacted>")
    # negative control: without the known value, the free text keeps it
    assert "abc123xyz" in json.dumps(redact(config["note"], set()))


def test_a_dry_run_prints_the_config_without_its_secrets(make_cfg, capsys):
    dry_run(make_cfg("+extra.hf_token=abc123xyz", "+extra.note=kept"))
    printed = capsys.readouterr().out
    assert "hf_token: <redacted>" in printed and "note: kept" in printed
    assert "abc123xyz" not in printed


def test_hydra_files_are_rewritten_without_secrets(tmp_path):
    path = tmp_path / "overrides.yaml"
    OmegaConf.save(OmegaConf.create(["+extra.hf_token=abc123xyz", "seed=3"]), path)
    untouched = tmp_path / "config.yaml"
    untouched.write_text("seed: 3  # a comment that stays\n")
    redact_yaml_files([path, untouched], secret_values(environ={}))
    assert OmegaConf.load(path) == ["+extra.hf_token=<redacted>", "seed=3"]
    assert "a comment that stays" in untouched.read_text()


def test_tags_are_the_overrides_in_at_most_64_characters():
    assert override_tags(["model.optimizer.lr=0.003", "logger=wandb", "+extra.hf_token=x",
                          "logger.wandb.group=g", "+trainer.max_steps=5"]) == \
        ["model.optimizer.lr=0.003", "trainer.max_steps=5"]
    long = "model.net.some_rather_long_parameter_name.and_another_level=0.003"
    assert len(long) > 64 and shorten_tag(long) == \
        "…net.some_rather_long_parameter_name.and_another_level=0.003"  # the least cut
    value = "data.files=" + "x" * 80
    assert len(shorten_tag(value)) == 64 and shorten_tag(value).startswith("…files=xxx")
    assert shorten_tag("seed=1") == "seed=1"


def test_a_resume_finds_the_wandb_id_in_the_checkpoint_or_its_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run_info.json").write_text(json.dumps({"wandb": {"id": "folder01"}}))
    with_id, without = run_dir / "checkpoints" / "a.ckpt", run_dir / "checkpoints" / "b.ckpt"
    torch.save({"state_dict": {}, "wandb_id": "ckpt0001"}, with_id)
    torch.save({"state_dict": {}}, without)
    assert resumed_wandb_id(str(with_id), tmp_path / "elsewhere") == "ckpt0001"
    assert resumed_wandb_id(str(without), tmp_path / "elsewhere") == "folder01"
    assert resumed_wandb_id("last", run_dir) == "folder01"
    assert resumed_wandb_id(None, run_dir) is None
    (run_dir / "run_info.json").unlink()
    assert resumed_wandb_id(str(without), tmp_path / "elsewhere") is None


def test_git_state_of_the_checkout_and_unknown_without_one(tmp_path, monkeypatch):
    state = git_state(ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_state(ROOT) == {"commit": "unknown", "dirty": "unknown"}


@pytest.mark.slow
def test_offline_run_records_config_metrics_machine_and_no_secret(tmp_path):
    wandb_key, hf_token = secrets.token_hex(16), secrets.token_hex(16)
    run_dir = tmp_path / "run"
    run(run_dir, "logger=[csv,wandb,tensorboard]", *FEW_BATCHES, "task_name=secretcheck",
        f"+extra.hf_token={hf_token}", env={"WANDB_API_KEY": wandb_key})
    [path] = offline_runs(run_dir)
    wb = read_run(path)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert wb.id == info["wandb"]["id"] and wb.exit_code == 0 and wb.name == "secretcheck"
    assert wb.config["model"]["net"]["hidden_size"] == 128
    assert wb.config["git"] == info["git"] and wb.config["versions"]["torch"] == torch.__version__
    assert wb.config["machine"]["world_size"] == 1 and wb.config["extra"]["hf_token"] == REDACTED
    assert [step for step, _ in wb.metric("val/loss")] and "test/acc" in wb.summary
    assert info["machine"]["hostname"] and info["versions"]["lightning"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert "val/loss" in events.Tags()["scalars"]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any(p.suffix == ".ckpt" for p in written)
    for secret in (wandb_key, hf_token):
        assert not [p for p in written if secret.encode() in p.read_bytes()], secret
    # negative control: the same search finds what the run did write
    assert [p for p in written if p.suffix == ".wandb" and b"secretcheck" in p.read_bytes()]


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_step_axis(tmp_path):
    run(tmp_path, "logger=csv_wandb", *FEW_BATCHES)
    last = tmp_path / "checkpoints" / "last.ckpt"
    first_id = torch.load(last, map_location="cpu", weights_only=True)["wandb_id"]
    result = run(tmp_path, "logger=csv_wandb", *FEW_BATCHES, "trainer.max_epochs=2",
                 f"ckpt_path={last}")
    first, resumed = [read_run(p) for p in offline_runs(tmp_path)]
    assert first.id == resumed.id == first_id and resumed.resumed
    last_step = max(row["_step"] for row in first.history)
    trained = [row for row in resumed.history if "train/loss" in row or "train/acc" in row]
    assert min(row["_step"] for row in resumed.history) >= last_step
    assert trained and min(row["trainer/global_step"] for row in trained) > 3
    assert "monotonically" not in result.stdout + result.stderr


@pytest.mark.slow
def test_wandb_steps_of_a_resumed_offline_run_follow_the_trainer(tmp_path):
    """The logger's own check, with Lightning's WandbLogger as the negative control: W&B
    numbers a resumed offline run's steps from 0 again."""
    code = ("import sys; from lmlab.tracking.loggers import WandbLogger\n"
            "from lightning.pytorch.loggers import WandbLogger as Plain\n"
            "for cls, id, step in [(WandbLogger, 'ours0001', 0), (WandbLogger, 'ours0001', 7),\n"
            "                      (Plain, 'plain001', 0), (Plain, 'plain001', 7)]:\n"
            "    logger = cls(save_dir=sys.argv[1], id=id, project='p', mode='offline')\n"
            "    logger.log_metrics({'loss': 1.0}, step=step)\n"
            "    logger.experiment.finish()\n")
    status, output = run_subprocess([sys.executable, "-c", code, str(tmp_path)], timeout=300)
    assert status == 0, output[-3000:]
    runs = [read_run(p) for p in offline_runs(tmp_path)]
    steps = {(r.id, r.history[0]["trainer/global_step"]): r.history[0]["_step"] for r in runs}
    assert steps[("ours0001", 7)] == 7
    assert steps[("plain001", 7)] == 0  # the step axis of the resumed run went back


@pytest.mark.slow
def test_the_jobs_of_a_multirun_share_a_group_and_carry_their_overrides(tmp_path):
    result = run_cli("-m", f"hydra.sweep.dir={tmp_path}", "logger=wandb", *FEW_BATCHES,
                     "model.optimizer.lr=0.001,0.003", cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = [read_run(p) for p in offline_runs(tmp_path)]
    assert len(jobs) == 2 and jobs[0].id != jobs[1].id
    assert jobs[0].group == jobs[1].group == f"train-{tmp_path.parent.name}_{tmp_path.name}"
    assert sorted(tag for job in jobs for tag in job.tags if tag.startswith("model.")) == \
        ["model.optimizer.lr=0.001", "model.optimizer.lr=0.003"]
    assert {job.config["model"]["optimizer"]["lr"] for job in jobs} == {0.001, 0.003}


@pytest.mark.slow
@pytest.mark.distributed
def test_only_global_rank_zero_creates_a_wandb_run_under_ddp(tmp_path):
    command = [sys.executable, "-m", "lmlab.run", f"hydra.run.dir={tmp_path}",
               "strategy=ddp", "trainer.devices=2", "logger=wandb", *FEW_BATCHES]
    env = {**os.environ, "WANDB_MODE": "offline"}
    status, output = run_subprocess(command, timeout=600, cwd=ROOT, env=env)
    assert status == 0, output[-3000:]
    [path] = offline_runs(tmp_path)
    wb = read_run(path)
    assert wb.config["machine"]["world_size"] == 2 and "val/loss" in wb.summary
    assert "test/acc" in wb.summary
    assert "monotonically" not in output
    assert json.loads((tmp_path / "run_info.json").read_text())["wandb"]["id"] == wb.id


@pytest.mark.slow
@pytest.mark.distributed
def test_a_multi_process_sweep_job_keeps_its_sweep_group(tmp_path):
    """Such a job runs in a process of its own (lmlab.training.sweeps), which is not a multirun."""
    command = [sys.executable, "-m", "lmlab.run", "-m", f"hydra.sweep.dir={tmp_path}",
               "strategy=ddp", "trainer.devices=2", "logger=wandb", *FEW_BATCHES,
               "model.optimizer.lr=0.002"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    status, output = run_subprocess(command, timeout=600, cwd=ROOT, env=env)
    assert status == 0, output[-3000:]
    [path] = offline_runs(tmp_path)
    wb = read_run(path)
    assert wb.group == f"train-{tmp_path.parent.name}_{tmp_path.name}"
    assert "model.optimizer.lr=0.002" in wb.tags and not [t for t in wb.tags if "group" in t]


@pytest.mark.parametrize("variable", ["NODE_RANK", "LOCAL_RANK", "RANK", "SLURM_PROCID"])
def test_no_wandb_run_outside_global_rank_zero_even_before_ranks_are_set(tmp_path, monkeypatch,
                                                                          variable):
    """The first process of the second node has rank_zero_only.rank 0 until the strategy
    sets ranks up: its logger must not start a run then either."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launched_as_rank_zero()  # negative control: this process alone would start one
    monkeypatch.setenv(variable, "1")
    assert not launched_as_rank_zero()
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline")
    assert isinstance(logger.experiment, _DummyExperiment)
    logger.log_hyperparams({"a": 1})
    assert not (tmp_path / "wandb").exists()


def test_instantiated_loggers_write_into_the_run_folder(make_cfg):
    cfg = make_cfg("logger=csv_tensorboard")
    found = {type(x).__name__: x for x in loggers(cfg)}
    assert found["TensorBoardLogger"].log_dir.rstrip("/") == f"{cfg.paths.output_dir}/tensorboard"
