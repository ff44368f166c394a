"""Every option of every config group composes, passes the checks and instantiates."""

import importlib.util
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import open_dict

from conftest import GPU
from lmlab.training.build import callbacks, loggers, task_for
from lmlab.data.description import DataDescription
from lmlab.data.tokenizers import WordTokenizer
from lmlab.config.schema import CONF_DIR
from lmlab.config.checks import _kind_problems, check_config
from lmlab.errors import ConfigError
from lmlab.parallel.specs import world_size

GROUPS = ["model", "data", "data/tokenizer", "strategy", "precision", "trainer", "logger",
          "callbacks", "paths", "debug", "experiment", "sweep"]
REFUSED = {("strategy", "ddp_spawn")}  # kept to refuse it with the fix (test_cases.py)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted(Path(CONF_DIR, g).glob("*.yaml"))
           if (g, p.stem) not in REFUSED]
CUDA_ONLY = ("gpu", "16-mixed")
PARAMS = [pytest.param(g, o, id=f"{g}={o}", marks=GPU if any(c in o for c in CUDA_ONLY) else ())
          for g, o in OPTIONS]


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert found == set(GROUPS)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from hf_folders import make_folder  # needs transformers

    return make_folder("gpt2", tmp_path_factory.mktemp("hf_gpt2"))


@pytest.mark.parametrize("group,option", PARAMS)
def test_option_composes_and_instantiates(make_cfg, group, option, monkeypatch, request):
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = ["model=gpt_tiny", "data=stdlib_source", "trainer.devices=2"] if option == "tp" else []
    if (group, option) == ("model", "classifier"):  # the group of a net of your own: name one
        extra = ["model.net._target_=lmlab.models.rnn.RNNClassifier"]
    if option in ("hf_causal_lm", "pretrained"):  # a Hugging Face folder's net or tokenizer
        extra = ["model=hf_causal_lm", "data=stdlib_source",
                 f"model.pretrained={request.getfixturevalue('hf_folder')}"]
    cfg = make_cfg(f"{group}={option}", *extra)
    if _kind_problems(cfg):  # an option of another task kind, with its own counterpart
        kind = get_class((cfg.model if group == "model" else cfg.data)._target_).kind
        data, model = COUNTERPARTS[kind]
        cfg = make_cfg(f"{group}={option}", *(data if group == "model" else model))
    if option in ("files", "translation_files", "summarization_files", "completions"):
        with open_dict(cfg):
            cfg.data.files.train = "train.csv"
    if option == "text_files":
        cfg.data.files = "books/*.txt"
    check_config(cfg)
    task = build_task(cfg)
    cfg.monitor, cfg.monitor_mode = task.monitor
    assert instantiate(cfg.data).batch_size == cfg.data.batch_size
    trainer = instantiate(cfg.trainer, callbacks=callbacks(cfg), logger=loggers(cfg))
    assert trainer.max_epochs == cfg.trainer.max_epochs or cfg.trainer.get("fast_dev_run")


COUNTERPARTS = {"lm": (["data=stdlib_source"], ["model=gpt_tiny"]),
                "seq2seq": (["data=stdlib_summaries", "data.joint_vocab=true"],
                            ["model=transformer_tiny"])}
TOKENIZER = WordTokenizer().fit(["a few words make a small vocabulary of some forty tokens "
                                 "or so for every kind of task to be sized by"])


def build_task(cfg):
    """The task of `cfg`, sized by a small word vocabulary and 3 classes."""
    task = task_for(cfg, DataDescription(TOKENIZER, classes=("a", "b", "c"),
                                         task_type="translation"))
    if cfg.data._target_.endswith("ClassificationDataModule"):
        assert task.net.head.out_features == 3
    return task


def test_overrides_reach_the_objects(make_cfg):
    cfg = make_cfg("model.net.hidden_size=32", "model.optimizer.lr=0.01", "data/tokenizer=char",
                   "precision=bf16-mixed", "strategy=cpu", "data.batch_size=8")
    task = instantiate(cfg.model, _partial_=True, num_classes=2,
                       net={"vocab_size": 40, "num_classes": 2, "pad_id": 0})()
    assert task.net.forward_rnn.hidden_size == 32
    assert task.configure_optimizers().param_groups[0]["lr"] == 0.01
    assert type(instantiate(cfg.data).tokenizer_spec).__name__ == "CharTokenizer"
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "bf16-mixed"
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


def test_unknown_key_on_the_command_line_fails_at_compose_time(make_cfg):
    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        make_cfg("model.net.hiden_size=64")


def test_unknown_group_option_lists_the_available_ones(make_cfg):
    with pytest.raises(ConfigCompositionException, match="(?s)Could not find 'model/lstmm'.*lstm"):
        make_cfg("model=lstmm")


def test_wrong_type_of_top_level_key_fails_at_compose_time(make_cfg):
    with pytest.raises(ConfigCompositionException, match="seed"):
        make_cfg("seed=forty-two")


def test_added_unknown_argument_is_caught_with_a_suggestion(make_cfg):
    cfg = make_cfg("+model.net.hiden_size=64", "+trainer.max_epoch=3")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "model.net.hiden_size" in message and "did you mean 'hidden_size'" in message
    assert "trainer.max_epoch" in message and "did you mean 'max_epochs'" in message


@pytest.mark.parametrize("strategy,typo,meant", [
    ("fsdp", "sharding_stratgy", "sharding_strategy"),
    ("deepspeed_zero2", "offload_optimiser", "offload_optimizer")])
def test_typo_in_a_strategy_factory_argument_is_caught(make_cfg, strategy, typo, meant):
    forwarded = ["+trainer.strategy.limit_all_gathers=true"] if strategy == "fsdp" else []
    cfg = make_cfg(f"strategy={strategy}", f"+trainer.strategy.{typo}=true", *forwarded)
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'") as err:
        check_config(cfg)
    assert len(err.value.problems) == 1  # FSDP's own arguments pass


def test_all_problems_are_reported_together(make_cfg):
    cfg = make_cfg("strategy=gpu", "trainer.precision=16-mixed", "data.batch_size=63",
                   "trainer.devices=2")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    problems = err.value.problems
    assert any("CUDA is not available" in p and "strategy=cpu" in p for p in problems)
    assert any("data.batch_size=63" in p and "multiple of 2" in p for p in problems)


def test_language_model_on_classification_data_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="CausalLMTask.*needs lm data"):
        check_config(make_cfg("model=gpt_tiny", "data=sst2"))


def test_fsdp2_needs_a_number_of_devices(make_cfg):
    with pytest.raises(ConfigError, match="trainer.devices=N"):
        check_config(make_cfg("strategy=fsdp2", "trainer.devices=auto"))


def test_tensor_parallel_problems_are_reported_with_their_fixes(make_cfg):
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("strategy=tp", "trainer.devices=3"))  # the LSTM: no plan
    problems = err.value.problems
    assert any("not a multiple of trainer.strategy.tensor_parallel_size=2" in p for p in problems)
    assert any("tensor_parallel_plan" in p and "strategy=fsdp2" in p for p in problems)
    with pytest.raises(ConfigError, match="n_head=3 does not split"):
        check_config(make_cfg("strategy=tp", "trainer.devices=2", "model=gpt_tiny",
                              "data=stdlib_source", "model.net.n_head=3", "model.net.n_embd=96"))
    with pytest.raises(ConfigError, match="n_kv_head=1 does not split"):  # grouped-query
        check_config(make_cfg("strategy=tp", "trainer.devices=2", "model=gpt_tiny",
                              "data=stdlib_source", "model.net.n_kv_head=1"))


def test_the_tensor_parallel_switches_are_refused_where_they_cannot_split(make_cfg):
    split = ["strategy=tp", "trainer.devices=2", "trainer.strategy.sequence_parallel=true",
             "trainer.strategy.loss_parallel=true"]
    with pytest.raises(ConfigError) as err:  # the seq2seq plan has no norms or output role
        check_config(make_cfg(*split, "model=transformer_tiny", "data=multi30k"))
    assert [p.split("=")[0] for p in err.value.problems] == \
        ["trainer.strategy.sequence_parallel", "trainer.strategy.loss_parallel"]
    with pytest.raises(ConfigError, match="data.block_size=63 does not split"):
        check_config(make_cfg(*split, "model=gpt_tiny", "data=stdlib_source",
                              "model.net.block_size=63"))
    with pytest.raises(ConfigError, match="model.net.dropout=0.2: each rank would drop"):
        check_config(make_cfg(*split, "model=gpt_baby", "data=stdlib_source"))
    with pytest.raises(ConfigError) as err:  # nothing to split among
        check_config(make_cfg(*split, "model=gpt_tiny", "data=stdlib_source",
                              "trainer.strategy.tensor_parallel_size=1"))
    assert len(err.value.problems) == 2 and "tensor_parallel_size=1" in err.value.problems[0]
    check_config(make_cfg(*split, "model=gpt_tiny", "data=stdlib_source"))


def test_tensor_parallel_mesh_is_devices_over_tp(make_cfg):
    cfg = make_cfg("strategy=tp", "trainer.devices=4", "model=gpt_tiny", "data=stdlib_source")
    check_config(cfg)
    strategy = instantiate(cfg.trainer.strategy)
    assert (strategy._tensor_parallel_size, strategy._data_parallel_size) == (2, 2)


def test_missing_deepspeed_and_offload_on_cpu_are_refused(make_cfg, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed.*\[deepspeed\]"):
        check_config(make_cfg("strategy=deepspeed_zero2", "trainer.accelerator=cpu"))
    with pytest.raises(ConfigError, match="cpu_offload=true needs a GPU"):
        check_config(make_cfg("strategy=fsdp", "trainer.strategy.cpu_offload=true",
                              "trainer.accelerator=cpu"))


def test_half_precision_on_cpu_is_refused_with_the_fix(make_cfg):
    cfg = make_cfg("strategy=cpu", "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match="precision=bf16-mixed"):
        check_config(cfg)


@pytest.mark.parametrize("overrides", [["data=sst2"], ["data=tinyshakespeare", "model=gpt_tiny"]])
def test_missing_corpus_points_at_the_data_dir_setting(make_cfg, tmp_path, overrides):
    cfg = make_cfg(*overrides)
    cfg.paths.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="LMLAB_DATA_DIR"):
        check_config(cfg)


@pytest.mark.parametrize("devices,nodes,expected", [(1, 1, 1), (4, 1, 4), (2, 2, 4),
                                                    ("0,1", 1, 2), ([0, 1, 2], 1, 3)])
def test_world_size(make_cfg, devices, nodes, expected):
    cfg = make_cfg("strategy=cpu")
    cfg.trainer.devices, cfg.trainer.num_nodes = devices, nodes
    assert world_size(cfg.trainer) == expected


def test_seq2seq_nets_are_checked_against_their_data(make_cfg):
    with pytest.raises(ConfigError, match="needs one joint vocabulary"):
        check_config(make_cfg("model=transformer_small", "data=stdlib_summaries"))
    with pytest.raises(ConfigError, match="max_source_length=600 is longer than the model's"):
        check_config(make_cfg("model=transformer_small", "data=stdlib_summaries",
                              "data.joint_vocab=true", "data.max_source_length=600"))
    with pytest.raises(ConfigError, match="copy=true copies source ids as output ids"):
        check_config(make_cfg("model=transformer_tiny", "data=stdlib_summaries",
                              "model.net.copy=true"))
    with pytest.raises(ConfigError, match="no_repeat_ngram_size=-2: set 0"):
        check_config(make_cfg("model=lstm_attn", "data=stdlib_summaries",
                              "model.no_repeat_ngram_size=-2"))
    check_config(make_cfg("model=transformer_small", "data=stdlib_summaries",
                          "data.joint_vocab=true"))


def test_every_target_of_the_configs_may_be_loaded_from_a_saved_run():
    """A run folder's saved config is instantiated only through lmlab.config.safety's allow-list,
    so every `_target_` lmlab's own configs name must be on it (hydra's sweepers and
    launchers excepted: they are never instantiated from a run folder)."""
    from lmlab.config.safety import allowed
    named = {line.split("_target_:")[1].split("#")[0].strip()
             for path in Path(CONF_DIR).rglob("*.yaml") if "hydra" not in path.parts
             for line in path.read_text().splitlines()
             if "_target_:" in line and not line.lstrip().startswith("#")}
    named -= {"???"}  # a net the user's own model option names (conf/model/classifier.yaml)
    assert len(named) > 20
    assert [t for t in sorted(named) if not allowed(t)] == []
    assert not allowed("os.system")  # negative control
