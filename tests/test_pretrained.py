"""Hugging Face checkpoints in and out: every family's logits, tokens and greedy text equal
transformers' own on tiny random folders that transformers itself saved; exports load back
in transformers; LoRA trains its adapters alone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hf_folders import CONFIGS, make_folder, transformers
from lmlab.config.checks import check_config
from lmlab.config.schema import compose
from lmlab.data.completions import IGNORE, LOSS_ON, CompletionsDataModule
from lmlab.data.lm import LMDataModule
from lmlab.data.tokenizers import ByteBPETokenizer, PretrainedTokenizer, Tokenizer
from lmlab.errors import ConfigError, LmlabError
from lmlab.export import tokenizer_files
from lmlab.generate import GenerateConfig, generate_from
from lmlab.interop import huggingface
from lmlab.interop.huggingface import PretrainedGPT, UnsupportedCheckpoint, export_folder
from lmlab.models.gpt import GPT
from lmlab.models.lora import add_adapters, merge_adapters
from lmlab.models.sampling import generate
from lmlab.tasks.causal_lm import CausalLMTask
from lmlab.training.runs import find_checkpoint

transformers.logging.set_verbosity_error()
TEXTS = ["def main(argv):\n    return argv[1:]  # <|endoftext|> </s> <s>",
         "Größe Привет 東京 ٱلْعَرَبِيَّة  \t\n\n x", " leading space", ""]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: make_folder(kind, tmp_path_factory.mktemp(kind)) for kind in CONFIGS}


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def ids_of(folder, text: str = TEXTS[0]) -> torch.Tensor:
    return transformers.AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")[
        "input_ids"]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_each_family_gives_the_logits_of_transformers(folders, kind):
    ids = ids_of(folders[kind])
    net = PretrainedGPT(str(folders[kind])).eval()
    with torch.no_grad():
        expected, found = reference(folders[kind])(ids).logits, net(ids)
        # and one token at a time through the key/value cache
        logits, cache = net(ids[:, :5], return_cache=True)
        steps = [logits]
        for t in range(5, ids.size(1)):
            logits, cache = net(ids[:, t:t + 1], cache=cache, return_cache=True)
            steps.append(logits)
    assert (found - expected).abs().max() < 1e-5
    assert (torch.cat(steps, dim=1) - expected).abs().max() < 5e-5  # another sum order


def test_the_switches_follow_each_config(folders):
    llama = PretrainedGPT(str(folders["llama"])).config
    assert (llama.norm, llama.mlp, llama.n_kv_head, llama.tie_embeddings) == \
        ("rmsnorm", "swiglu", 2, False)
    qwen = PretrainedGPT(str(folders["qwen2"])).config
    assert (qwen.bias, qwen.qkv_bias, qwen.tie_embeddings) == (False, True, True)
    assert PretrainedGPT(str(folders["llama3_rope"])).config.rope_scaling["rope_type"] == "llama3"
    assert PretrainedGPT(str(folders["mistral"])).block_size == 128  # its sliding window
    assert PretrainedGPT(str(folders["gpt2"])).config.mlp == "gelu_tanh"


def test_without_the_rotary_rows_permuted_the_llama_logits_differ(folders, monkeypatch):
    """Negative control: the q/k row permutation is what makes the RoPE layouts agree."""
    monkeypatch.setattr(huggingface, "heads_interleaved", lambda x, heads: x)
    ids = ids_of(folders["llama"])
    with torch.no_grad():
        gap = (PretrainedGPT(str(folders["llama"]))(ids) - reference(folders["llama"])(ids).logits)
    assert gap.abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_the_folders_tokenizer_encodes_as_transformers(folders, kind):
    ours = Tokenizer.pretrained(folders[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[kind])
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text


@pytest.mark.parametrize("kind", ["gpt2", "llama3_rope", "qwen2"])
def test_greedy_generate_continues_a_prompt_as_transformers(folders, kind, capsys):
    folder, prompt, n = folders[kind], "def main(", 30
    ids = ids_of(folder, prompt)
    theirs = reference(folder).generate(ids, max_new_tokens=n, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, ids.size(1):]
    net = PretrainedGPT(str(folder)).eval()
    with torch.no_grad():
        ours = torch.cat(list(generate(net, ids, n, temperature=0.0, top_k=None)), dim=1)[0]
    assert ours.tolist() == theirs.tolist()
    assert len(set(theirs.tolist())) > 5  # a continuation, not one token repeated
    generate_from(GenerateConfig(ckpt=str(folder), prompt=prompt, max_new_tokens=n,
                                 temperature=0.0, stop_at_eos=False))  # as eos_token_id=None
    text = transformers.AutoTokenizer.from_pretrained(folder).decode(
        theirs, skip_special_tokens=True)
    assert capsys.readouterr().out == prompt + text


def test_generate_ends_the_text_where_transformers_stops_at_the_end_token(folders, tmp_path,
                                                                          capsys):
    """A copy of the llama folder whose end token is the 8th token of the greedy
    continuation: `lmlab.generate` prints the text before its first occurrence, where
    transformers' greedy generate stops; `stop_at_eos=false` goes on to all 30 tokens."""
    source, prompt, n = folders["llama"], "def main(", 30
    ids = ids_of(source, prompt)
    greedy = reference(source).generate(ids, max_new_tokens=n, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, ids.size(1):]
    end = int(greedy[7])
    folder = tmp_path / "folder"
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(source)
    config["eos_token"] = hf.convert_ids_to_tokens(end)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    stopped = reference(source).generate(ids, max_new_tokens=n, do_sample=False,
                                         eos_token_id=end, pad_token_id=0)[0, ids.size(1):]
    assert int(stopped[-1]) == end and len(stopped) <= 8
    for stop_at_eos, expected in ((True, stopped[:-1]), (False, greedy)):
        generate_from(GenerateConfig(ckpt=str(folder), prompt=prompt, max_new_tokens=n,
                                     temperature=0.0, stop_at_eos=stop_at_eos))
        assert capsys.readouterr().out == prompt + hf.decode(expected, skip_special_tokens=True)


SWITCHES = {
    "gpt2 layout, exact gelu": dict(positions="learned"),
    "gpt2 layout, tanh gelu, wide mlp": dict(positions="learned", mlp="gelu_tanh", mlp_hidden=80),
    "llama, gqa, untied": dict(positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48,
                               n_kv_head=2, bias=False, tie_embeddings=False),
    "qwen2, q/k/v biases, tied": dict(positions="rope", norm="rmsnorm", mlp="swiglu",
                                      bias=False, qkv_bias=True, rope_base=1e6),
    "llama 3 rope scaling": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("switches", list(SWITCHES))
def test_an_exported_net_loads_in_transformers_with_the_same_logits(tmp_path, switches):
    torch.manual_seed(0)
    net = GPT(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=32,
              **SWITCHES[switches]).eval()
    for p in net.parameters():  # biases and norms away from their init, to be compared
        p.data.add_(0.1 * torch.randn_like(p))
    export_folder(net, {}, tmp_path, {})
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (reference(tmp_path)(ids).logits - net(ids)).abs().max() < 1e-5
        back = PretrainedGPT(str(tmp_path)).eval()  # and back in
        assert (back(ids) - net(ids)).abs().max() < 1e-6


def test_an_exported_lmlab_tokenizer_encodes_the_same_in_transformers(tmp_path):
    tokenizer = ByteBPETokenizer(vocab_size=300).fit(TEXTS * 20)
    for name, text in tokenizer_files(tokenizer).items():
        (tmp_path / name).write_text(text)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert theirs.eos_token == "<eos>" and theirs.pad_token == "<pad>"


def test_a_net_of_no_transformers_layout_is_refused_in_one_line(tmp_path):
    net = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, positions="rope")
    with pytest.raises(UnsupportedCheckpoint, match="model.net.norm=layernorm has no "
                       "counterpart in transformers' Llama"):
        export_folder(net, {}, tmp_path, {})
    assert not list(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize("change, named", [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"mlp_bias": True}, "attention_bias=false with mlp_bias=true"),
])
def test_an_unsupported_checkpoint_is_named_in_one_line(folders, tmp_path, change, named):
    config = {**json.loads((folders["llama"] / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpoint, match=named.replace("(", r"\(")):
        PretrainedGPT(str(tmp_path), load_weights=False)


def moved(net, base) -> list[str]:
    """The names of `net`'s non-adapter parameters that differ from `base`'s."""
    start = {k.replace(".parametrizations.weight.original", ".weight"): v
             for k, v in base.state_dict().items()}
    return [name for name, value in net.state_dict().items()
            if "lora_" not in name and "scale" not in name
            and not torch.equal(value, start[name.replace(".parametrizations.weight.original",
                                                          ".weight")])]


def train_a_few_steps(net, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        logits = net(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_trains_the_adapters_alone_and_merges_as_base_plus_scaled_ba(folders, tmp_path):
    folder = str(folders["llama"])
    base, net = PretrainedGPT(folder), PretrainedGPT(folder)
    adapted = add_adapters(net, rank=4, alpha=8.0, targets=["q", "v"])
    assert adapted == [f"blocks.{i}.attn.{n}" for i in range(2) for n in "qv"]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    train_a_few_steps(net)
    assert moved(net, base) == []
    layer = net.blocks[0].attn.q.parametrizations.weight
    a, b = layer[0].lora_a.detach(), layer[0].lora_b.detach()
    assert b.abs().max() > 0  # the adapter trained
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        adapted_logits = net(ids)
        merge_adapters(net)
        assert (net(ids) - adapted_logits).abs().max() < 1e-5
    by_hand = base.blocks[0].attn.q.weight + (8.0 / 4) * b @ a
    assert torch.allclose(net.blocks[0].attn.q.weight, by_hand, atol=1e-6)
    export_folder(net, {}, tmp_path, {})  # the merged export is what transformers runs
    with torch.no_grad():  # merging rounds W + BA once: another sum order than the adapter's
        assert (reference(tmp_path)(ids).logits - adapted_logits).abs().max() < 5e-5


def test_the_base_check_fails_when_the_base_weights_move(folders):
    """Negative control of the LoRA test: a net trained whole is caught."""
    folder = str(folders["llama"])
    base, net = PretrainedGPT(folder), PretrainedGPT(folder)
    train_a_few_steps(net)
    assert len(moved(net, base)) > 10


def test_lora_targets_that_match_no_layer_or_a_tied_one_are_named(folders):
    net = PretrainedGPT(str(folders["qwen2"]))  # tied embeddings
    with pytest.raises(LmlabError, match="model.lora.targets: fc matches no linear layer of "
                       "PretrainedGPT; its linear layers are gate, k, lm_head, proj, q, up, v"):
        add_adapters(net, 4, 8.0, ["q", "fc"])  # fc: GPT-2's MLP, not a SwiGLU's
    with pytest.raises(LmlabError, match="lm_head's weight is tied to another module's"):
        add_adapters(net, 4, 8.0, ["lm_head"])
    assert all(p.requires_grad for p in net.parameters())  # refused before freezing


def test_a_file_cut_short_is_named_not_read(folders, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folders["llama"] / name).read_bytes())
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[:-1000])
    with pytest.raises(LmlabError, match="model.safetensors is cut short: tensor "
                       r"model\.\S+ has \d+ of its \d+ bytes"):
        PretrainedGPT(str(tmp_path))


def test_an_export_refuses_a_folder_that_holds_files(tmp_path):
    net = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(LmlabError, match="is not empty"):
        export_folder(net, {}, tmp_path, {})


def test_q_k_v_without_the_biases_of_the_rest_is_refused_by_export(tmp_path):
    net = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, positions="rope",
              norm="rmsnorm", mlp="swiglu", bias=True, qkv_bias=False)
    with pytest.raises(UnsupportedCheckpoint, match="model.net.qkv_bias=false with bias=true"):
        export_folder(net, {}, tmp_path, {})


def completions_data(folder, tmp_path, loss_on: str, **kwargs):
    records = [{"prompt": f"What does {name} do?\n", "completion": f"It {verb} things."}
               for name, verb in [("len", "counts"), ("sorted", "orders"), ("sum", "adds"),
                                  ("max", "picks"), ("zip", "pairs"), ("map", "applies")] * 3]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = CompletionsDataModule(PretrainedTokenizer(str(folder)), files={"train": str(path)},
                                 loss_on=loss_on, batch_size=4, **kwargs)
    data.setup()
    return data


def test_completion_targets_score_the_completion_and_the_end_token_alone(folders, tmp_path):
    data = completions_data(folders["llama"], tmp_path, "completion")
    batch = data.collate([data.datasets["train"][i] | {"weight": 1.0} for i in range(3)])
    tokenizer = data.tokenizer
    for row in range(3):
        tokens, targets = batch["tokens"][row], batch["targets"][row]
        scored = targets[targets != IGNORE].tolist()
        text = tokenizer.hf.decode(tokens[:batch["lengths"][row]].tolist() + scored[-1:],
                                   skip_special_tokens=False)
        prompt, completion = text.split("?\n")
        assert tokenizer.decode(scored) == completion.removesuffix("</s>").strip()
        assert scored[-1] == tokenizer.eos_id  # the model learns to stop
        assert tokens[0] == tokenizer.bos_id  # the prompt is framed as transformers frames it
    everything = completions_data(folders["llama"], tmp_path, "all")
    batch = everything.collate([everything.datasets["train"][0] | {"weight": 1.0}])
    assert (batch["targets"] != IGNORE).sum() == batch["lengths"][0]  # every next token


def test_padding_to_a_multiple_adds_unscored_positions_alone(folders, tmp_path):
    """data.pad_to_multiple (the tensor-parallel ranks, for sequence parallelism): inputs a
    multiple of 4 long, the same targets and lengths before the added padding, same loss."""
    batches = {m: completions_data(folders["gpt2"], tmp_path, "completion", pad_to_multiple=m)
               for m in (1, 4)}
    plain, padded = [next(iter(d.train_dataloader())) for d in batches.values()]
    width = plain["tokens"].size(1)
    assert padded["tokens"].size(1) % 4 == 0 and padded["tokens"].size(1) - width in (1, 2, 3)
    assert torch.equal(padded["targets"][:, :width], plain["targets"])
    assert (padded["targets"][:, width:] == IGNORE).all()
    assert torch.equal(padded["lengths"], plain["lengths"])
    task = CausalLMTask(PretrainedGPT(str(folders["gpt2"])), optimizer=torch.optim.SGD).eval()
    with torch.no_grad():
        assert task.step(padded, "val") == pytest.approx(float(task.step(plain, "val")),
                                                          rel=1e-6)
    capped = completions_data(folders["gpt2"], tmp_path, "completion", pad_to_multiple=4,
                              max_length=width + 1)  # never padded beyond the model's context
    assert next(iter(capped.train_dataloader()))["tokens"].size(1) == width + 1


@pytest.mark.parametrize("loss_on", LOSS_ON)
def test_the_task_loss_is_transformers_loss_with_the_prompt_masked(folders, tmp_path, loss_on):
    """The reference: transformers' own causal-LM loss, given labels that are -100 on the
    prompt (and padding): the mean over the scored tokens of the whole batch."""
    folder = folders["gpt2"]
    data = completions_data(folder, tmp_path, loss_on)
    batch = next(iter(data.train_dataloader()))
    task = CausalLMTask(PretrainedGPT(str(folder)), optimizer=torch.optim.SGD).eval()
    with torch.no_grad():
        ours = task.step(batch, "val")
        full = torch.cat([batch["tokens"], batch["targets"][:, -1:]], dim=1)
        labels = torch.cat([torch.full_like(batch["targets"][:, :1], IGNORE),
                            batch["targets"]], dim=1)
        theirs = reference(folder)(full.clamp(min=0), labels=labels).loss
    assert ours == pytest.approx(float(theirs), rel=1e-5)
    if loss_on == "completion":  # negative control: scoring the prompt too gives another loss
        unmasked = labels.clone()
        unmasked[:, 1:] = torch.where(full[:, 1:] >= 0, full[:, 1:], IGNORE)
        keep = torch.arange(full.size(1))[None, :] <= batch["lengths"][:, None]
        with torch.no_grad():
            other = reference(folder)(full.clamp(min=0),
                                      labels=unmasked.masked_fill(~keep, IGNORE)).loss
        assert abs(float(other) - float(ours)) > 1e-3


def test_lora_under_tensor_parallelism_is_refused_before_the_run(folders):
    cfg = compose(["model=hf_causal_lm", f"model.pretrained={folders['llama']}",
                   "data=stdlib_source", "strategy=tp", "trainer.devices=2", "model.lora.rank=4"])
    with pytest.raises(ConfigError, match="model.lora.rank=4 with tensor parallelism"):
        check_config(cfg)
    check_config(compose(["model=hf_causal_lm", f"model.pretrained={folders['llama']}",
                          "data=stdlib_source", "strategy=fsdp2", "trainer.devices=2",
                          "model.lora.rank=4"]))


def test_a_sharded_folder_imports_as_the_whole_one(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2"]())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (PretrainedGPT(str(tmp_path))(ids) - model.eval()(ids).logits).abs().max() < 1e-5
    # the commands name the file that holds the weights' names (not a missing
    # model.safetensors)
    assert find_checkpoint(tmp_path, None, str) == tmp_path / "model.safetensors.index.json"


def test_the_lm_corpus_of_a_pretrained_tokenizer_is_running_text(folders, tmp_path):
    """The token cache holds the text's tokens alone: a Llama tokenizer's <s> starts a
    prompt, not every piece of a corpus."""
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x\n" * 400)
    data = LMDataModule(PretrainedTokenizer(str(folders["llama"])), corpus=None,
                        files=str(text), cache_dir=str(tmp_path / "cache"), block_size=16)
    data.setup()
    ids = np.asarray(data.splits["train"])
    assert data.tokenizer.bos_id not in ids
    plain = transformers.AutoTokenizer.from_pretrained(folders["llama"])(
        "def f(x):\n    return x\n" * 4, add_special_tokens=False)["input_ids"][:12]
    assert ids[:12].tolist() == plain


def test_a_limit_shorter_than_a_prompt_leaves_nothing_scored_and_says_so(folders, tmp_path,
                                                                        caplog):
    """The edge of `max_length`: a Cyrillic prompt longer than the limit keeps no completion
    token (counted in a warning); a record within it keeps its completion and end token."""
    records = [{"prompt": "Что делает функция len? " * 8, "completion": "Считает."},
               {"prompt": "Что?", "completion": "Ничего."}] * 6
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    data = CompletionsDataModule(PretrainedTokenizer(str(folders["qwen2"])),
                                 files={"train": str(path)}, max_length=24, batch_size=4,
                                 val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level("WARNING"):
        data.setup()
    assert "keep no completion token within data.max_length=24" in caplog.text
    examples = [data.datasets["train"][i] for i in range(len(data.datasets["train"]))]
    scored = sorted(ex["scored"] for ex in examples)
    assert scored[0] == 0
    short = data.tokenizer.encode_batch(["Ничего."], special_tokens=False)[0]
    assert scored[-1] == len(short) + 1  # the completion and the end token
    batch = data.collate([ex | {"weight": 1.0} for ex in examples])
    assert int((batch["targets"] != IGNORE).sum()) == sum(scored)
