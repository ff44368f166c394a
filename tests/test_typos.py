"""A misspelled key, option or argument gets the closest existing name, and only a close one."""

from __future__ import annotations

import pytest

from conftest import ROOT, run_cli
from lmlab.config.checks import check_config
from lmlab.config.cli import closest
from lmlab.config.schema import import_object
from lmlab.config.typos import suggestion
from lmlab.errors import ConfigError, LmlabError


@pytest.mark.parametrize("argv,hint", [
    (["model.net.hiden_size=3"], "did you mean model.net.hidden_size=3?"),
    (["trainer.max_step=5"], "did you mean trainer.max_steps=5?"),
    (["seeed=1"], "did you mean seed=1?"),
    (["model=lstmm"], "did you mean model=lstm?"),
    (["data=sst", "model=gru"], "did you mean data=sst2?"),
    (["model=gpt_tiny", "model.net.n_embed=32"], "did you mean model.net.n_embd=32?"),
])
def test_a_typo_at_compose_time_gets_the_closest_name(argv, hint):
    assert suggestion(argv).startswith(hint)


@pytest.mark.parametrize("argv", [["model.net.zzz=1"], ["model.net.hidden_size=3"]])
def test_nothing_is_suggested_for_a_far_name_or_a_command_line_that_composes(argv):
    assert suggestion(argv) is None


def test_an_option_not_found_says_where_an_option_of_ones_own_is_looked_for(tmp_path):
    far = suggestion(["model=textcnn"])
    assert "did you mean" not in far and "user_dir=FOLDER" in far
    assert "conf/model/textcnn.yaml" in far
    close = suggestion(["model=lstmm"])
    assert close.startswith("did you mean model=lstm? ") and "user_dir=FOLDER" in close
    given = suggestion([f"user_dir={tmp_path}", "model=textcnn"])
    assert given == f"There is no {tmp_path}/conf/model/textcnn.yaml."


def test_the_run_command_prints_the_hint_after_hydras_message(tmp_path):
    result = run_cli(f"hydra.run.dir={tmp_path}", "model.net.hiden_size=3", cwd=ROOT)
    assert result.returncode == 1
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("hint: did you mean model.net.hidden_size=3? (Hydra's `+")


def test_an_unrelated_argument_name_is_not_offered(make_cfg):
    # hidden_size and kernel_sizes share "_size": difflib's default cutoff offered one
    # for the other; a net that takes neither is told what it does take
    assert closest("hidden_size", ["kernel_sizes", "channels"]) is None
    assert closest("hiden_size", ["hidden_size", "channels"]) == "hidden_size"
    assert closest("dpp", ["fsdp", "ddp"]) == "ddp"  # one slip in a short name
    assert closest("fdsp", ["ddp", "fsdp"]) == "fsdp"  # two neighbours swapped
    cfg = make_cfg("+model.net.kernel_sizes=[3]")
    with pytest.raises(ConfigError, match=r"no argument 'kernel_sizes'; it takes vocab_size"):
        check_config(cfg)


@pytest.mark.parametrize("target,why", [
    ("cnn.TextCNN", "ModuleNotFoundError: No module named 'cnn'"),
    ("TextCNN", "names no module"),
    ("lmlab.models.rnn.NoSuchNet", "has no attribute 'NoSuchNet'"),
])
def test_a_target_that_does_not_import_is_one_error_naming_it(target, why):
    with pytest.raises(LmlabError, match="user_dir=") as raised:
        import_object(target)
    assert f"cannot import {target!r}" in str(raised.value) and why in str(raised.value)
