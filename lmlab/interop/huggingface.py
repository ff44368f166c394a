"""Hugging Face causal-LM folders in and out: GPT-2 and the Llama family (Llama, Mistral,
Qwen2) as lmlab's own `GPT`.

A folder is what `save_pretrained` writes: `config.json`, `model.safetensors` (or shards
with `model.safetensors.index.json`) and `tokenizer.json`. Importing builds lmlab's net from
the config and copies the tensors into it one at a time, so every strategy, compile and the
key/value cache apply, and memory holds one copy of the weights (plus the tensor in hand).
Exporting writes the same files from a GPT of a layout transformers knows.

Two layouts differ beyond names: GPT-2 stores its linear layers transposed (`Conv1D`) with
q, k and v fused, and the Llama family rotates the two halves of each head (`rotate_half`)
where lmlab rotates interleaved channel pairs; the rows of q and k are permuted to match,
which leaves every attention score unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmlab.errors import LmlabError
from lmlab.models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)
GPT2_TYPES = ("gpt2",)
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
INDEX = "model.safetensors.index.json"
# the RoPE scalings lmlab builds, and the settings each reads
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}


class UnsupportedCheckpoint(LmlabError):
    """A folder, or a net, whose setting has no counterpart on the other side."""


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model folder (not an lmlab run)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "run_info.json").is_file()


def weights_file(folder: str | Path) -> Path:
    """The file that names a folder's weights: the shards' index, else `model.safetensors`."""
    folder = Path(folder)
    return folder / INDEX if (folder / INDEX).is_file() else folder / "model.safetensors"


def read_config(folder: str | Path) -> dict:
    """The `config.json` of a folder (or that file itself, as a run keeps a copy)."""
    path = Path(folder) if str(folder).endswith(".json") else Path(folder) / "config.json"
    if not path.is_file():
        raise LmlabError(f"{folder} has no config.json; model.pretrained takes a Hugging Face "
                         "model folder (config.json, model.safetensors, tokenizer.json)")
    return json.loads(path.read_text())


def gpt_arguments(hf: dict) -> dict:
    """`GPT` constructor arguments for a transformers `config.json`.

    Raises:
        UnsupportedCheckpoint: naming the `model_type` or setting lmlab cannot build.
    """
    kind = hf.get("model_type")
    if kind in GPT2_TYPES:
        return gpt2_arguments(hf)
    if kind in LLAMA_TYPES:
        return llama_arguments(hf)
    raise UnsupportedCheckpoint(f"model_type {kind!r} is not supported; lmlab imports "
                                f"{', '.join(GPT2_TYPES + LLAMA_TYPES)}")


def refuse_unless(condition: bool, setting: str) -> None:
    if not condition:
        raise UnsupportedCheckpoint(f"the checkpoint's {setting} is not supported")


def gpt2_arguments(hf: dict) -> dict:
    activation = hf.get("activation_function", "gelu_new")
    refuse_unless(activation in GPT2_ACTIVATIONS, f"activation_function={activation!r}")
    refuse_unless(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
    refuse_unless(not hf.get("scale_attn_by_inverse_layer_idx"),
                  "scale_attn_by_inverse_layer_idx=true")
    refuse_unless(hf.get("tie_word_embeddings", True), "tie_word_embeddings=false (GPT-2)")
    return dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                mlp_hidden=hf.get("n_inner"), mlp=GPT2_ACTIVATIONS[activation],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, positions="learned")


def llama_arguments(hf: dict) -> dict:
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    refuse_unless(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r}")
    refuse_unless(hf.get("head_dim") in (None, width // heads),
                  f"head_dim={hf.get('head_dim')} (not hidden_size / num_attention_heads)")
    rope = rope_settings(hf)
    refuse_unless(rope.get("partial_rotary_factor", 1.0) == 1.0,
                  f"partial_rotary_factor={rope.get('partial_rotary_factor')}")
    kind = rope.get("rope_type", "default")
    refuse_unless(kind in ROPE_KEYS, f"RoPE scaling rope_type={kind!r} (lmlab builds "
                  f"{', '.join(ROPE_KEYS)})")
    qwen = hf["model_type"] == "qwen2"
    attention_bias, mlp_bias = hf.get("attention_bias", qwen), hf.get("mlp_bias", False)
    refuse_unless(qwen or attention_bias == mlp_bias,
                  f"attention_bias={str(attention_bias).lower()} with "
                  f"mlp_bias={str(mlp_bias).lower()}")
    refuse_unless(not (qwen and hf.get("use_sliding_window")), "use_sliding_window=true")
    context = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if hf["model_type"] == "mistral" else None
    if window and window < context:  # within the window, sliding attention is full attention
        log.info("block_size %d: the checkpoint's sliding window", window)
        context = window
    scaling = {"rope_type": kind, **{k: rope.get(k, hf["max_position_embeddings"])
                                     for k in ROPE_KEYS[kind]}} if kind != "default" else None
    return dict(vocab_size=hf["vocab_size"], block_size=context,
                n_layer=hf["num_hidden_layers"], n_head=heads,
                n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width,
                mlp_hidden=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope",
                rope_base=rope.get("rope_theta", 10_000.0), rope_scaling=scaling,
                bias=bool(mlp_bias) and not qwen, qkv_bias=bool(attention_bias),
                tie_embeddings=hf.get("tie_word_embeddings", False))


def rope_settings(hf: dict) -> dict:
    """RoPE's settings in either config format: transformers 5's `rope_parameters`, or 4's
    top-level `rope_theta` with `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "type" in rope:
        rope.setdefault("rope_type", rope["type"])
    rope.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    return rope


class PretrainedGPT(GPT):
    """lmlab's `GPT` in the shape of a Hugging Face folder's `config.json`, holding its
    weights (the net of `model=hf_causal_lm`).

    Args:
        folder: the Hugging Face model folder (or, with `load_weights=false`, its
            `config.json` alone).
        vocab_size: the tokenizer's vocabulary (from the data); at most the embedding's rows.
        dropout: on attention weights, residual branches and embeddings (checkpoints declare
            none for fine-tuning; 0 by default).
        load_weights: copy the folder's weights in (false: the shape alone, for a run whose
            own checkpoint supplies them).
    """

    def __init__(self, folder: str, vocab_size: int | None = None, dropout: float = 0.0,
                 load_weights: bool = True):
        arguments = gpt_arguments(read_config(folder))
        rows = arguments["vocab_size"]
        if vocab_size is not None and vocab_size > rows:
            raise LmlabError(f"the tokenizer has {vocab_size} tokens but {folder}'s embedding "
                             f"only {rows} rows; use the folder's own tokenizer.json")
        super().__init__(**arguments, dropout=dropout)
        self.folder = folder
        if load_weights:
            copy_weights(self, folder)


def copy_weights(net: GPT, folder: str | Path) -> None:
    """Copies a folder's tensors into `net`, each converted on its way in.

    Raises:
        LmlabError: a tensor is missing, left over, or of another shape.
    """
    expected = {name for name, _ in net.state_dict().items()}
    params = dict(net.state_dict(keep_vars=True))
    reader = TensorReader(folder)
    for name, tensor in import_tensors(net.config, reader):
        if name not in params or params[name].shape != tensor.shape:
            raise LmlabError(f"{folder}: tensor {name} of shape {tuple(tensor.shape)} does "
                             "not fit the net its config.json describes")
        with torch.no_grad():
            params[name].copy_(tensor)
        expected.discard(name)
    left = reader.unread()
    if net.config.tie_embeddings:
        expected.discard("lm_head.weight")  # the embedding itself
    if expected or left:
        raise LmlabError(f"{folder}: missing {sorted(expected)[:3]}, unused {sorted(left)[:3]}")


class TensorReader:
    """A folder's safetensors file(s), read one tensor at a time into memory of its own.

    Plain file reads rather than `safetensors.safe_open`, which maps the whole file: every
    page it touched would count in the process's resident memory beside the copies made
    from it, so a whole import would hold the weights twice. Names may carry the wrapper's
    prefix (`transformer.`, `model.`) or not.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        found = weights_file(folder)
        if found.name == INDEX:
            files = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        elif found.is_file():
            files = [found.name]
        else:
            raise LmlabError(f"{folder} holds neither model.safetensors nor {INDEX}; save the "
                             "model with save_pretrained (safetensors is its default)")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            with open(folder / name, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self.where.update({key: (folder / name, 8 + size, entry)
                               for key, entry in header.items()})
        self.read: set[str] = set()

    def key(self, name: str, prefix: str) -> str | None:
        return next((k for k in (prefix + name, name) if k in self.where), None)

    def get(self, name: str, prefix: str) -> torch.Tensor:
        key = self.key(name, prefix)
        if key is None:
            raise LmlabError(f"the checkpoint has no tensor {prefix + name}")
        self.read.add(key)
        path, start, entry = self.where[key]
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise UnsupportedCheckpoint(f"{path}: tensor {key} is {entry['dtype']}; lmlab "
                                        f"reads {', '.join(DTYPES)} (not quantized weights)")
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        with open(path, "rb") as f:
            f.seek(start + begin)
            read = f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()[:end - begin])
        if read != end - begin or tensor.numel() * tensor.element_size() != end - begin:
            raise LmlabError(f"{path} is cut short: tensor {key} has {read} of its "
                             f"{end - begin} bytes; download or save the file again")
        return tensor.float()

    def has(self, name: str, prefix: str) -> bool:
        return self.key(name, prefix) is not None

    def unread(self) -> set[str]:
        ignored = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers
        return {k for k in self.where if k not in self.read and not k.endswith(ignored)}


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64}


def heads_interleaved(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from rotate-half order (each head's first half, then second) to
    lmlab's interleaved pairs."""
    return x.reshape(heads, 2, -1, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def heads_halved(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `heads_interleaved`."""
    return x.reshape(heads, -1, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def import_tensors(config: GPTConfig, reader: TensorReader
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """lmlab's (name, tensor) pairs, read from the checkpoint."""
    if config.positions == "learned":
        yield from gpt2_import(config, reader)
    else:
        yield from llama_import(config, reader)


def gpt2_import(config: GPTConfig, reader: TensorReader):
    def get(name):
        return reader.get(name, "transformer.")

    yield "wte.weight", get("wte.weight")
    yield "wpe.weight", get("wpe.weight")
    for i in range(config.n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for norm in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                yield f"{ours}{norm}.{kind}", get(f"{hf}{norm}.{kind}")
        qkv_weight, qkv_bias = get(f"{hf}attn.c_attn.weight").t(), get(f"{hf}attn.c_attn.bias")
        for name, w, b in zip("qkv", qkv_weight.chunk(3), qkv_bias.chunk(3)):
            yield f"{ours}attn.{name}.weight", w
            yield f"{ours}attn.{name}.bias", b
        for theirs, mine in (("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                             ("mlp.c_proj", "mlp.proj")):
            yield f"{ours}{mine}.weight", get(f"{hf}{theirs}.weight").t()
            yield f"{ours}{mine}.bias", get(f"{hf}{theirs}.bias")
    yield "ln_f.weight", get("ln_f.weight")
    yield "ln_f.bias", get("ln_f.bias")


LLAMA_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
               "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
               "attn.v": "self_attn.v_proj", "attn.proj": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}


def llama_import(config: GPTConfig, reader: TensorReader):
    def get(name):
        return reader.get(name, "model.")

    heads = {"attn.q": config.n_head, "attn.k": config.n_kv_head or config.n_head}
    yield "wte.weight", get("embed_tokens.weight")
    for i in range(config.n_layer):
        for mine, theirs in LLAMA_NAMES.items():
            for kind in ("weight", "bias"):
                name = f"layers.{i}.{theirs}.{kind}"
                if kind == "bias" and not reader.has(name, "model."):
                    continue
                tensor = get(name)
                if mine in heads:
                    tensor = heads_interleaved(tensor, heads[mine])
                yield f"blocks.{i}.{mine}.{kind}", tensor
    yield "ln_f.weight", get("norm.weight")
    if not config.tie_embeddings:
        yield "lm_head.weight", reader.get("lm_head.weight", "")


# -- export ---------------------------------------------------------------------------------


def hf_config(config: GPTConfig) -> dict:
    """The transformers `config.json` of a GPT: GPT-2's layout or Llama's (Qwen2's with
    biases on q/k/v alone).

    Raises:
        UnsupportedCheckpoint: naming the first setting neither layout has.
    """
    if config.positions == "learned":
        return gpt2_config(config)
    return llama_config(config)


def refuse_export(condition: bool, setting: str, layout: str) -> None:
    if not condition:
        raise UnsupportedCheckpoint(f"model.net.{setting} has no counterpart in transformers' "
                                    f"{layout} layout; such a run cannot be exported")


def gpt2_config(config: GPTConfig) -> dict:
    layout = "GPT-2 (positions=learned)"
    refuse_export(config.norm == "layernorm", f"norm={config.norm}", layout)
    refuse_export(config.mlp in ("gelu", "gelu_tanh"), f"mlp={config.mlp}", layout)
    refuse_export(config.bias, "bias=false", layout)
    refuse_export(config.qkv_bias in (None, True), "qkv_bias=false", layout)
    refuse_export(config.n_kv_head in (None, config.n_head), f"n_kv_head={config.n_kv_head}",
                  layout)
    refuse_export(config.tie_embeddings, "tie_embeddings=false", layout)
    activation = {"gelu": "gelu", "gelu_tanh": "gelu_new"}[config.mlp]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_inner": config.mlp_hidden, "activation_function": activation,
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": True,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def llama_config(config: GPTConfig) -> dict:
    layout = "Llama (positions=rope)"
    refuse_export(config.norm == "rmsnorm", f"norm={config.norm}", layout)
    refuse_export(config.mlp == "swiglu", f"mlp={config.mlp}", layout)
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    refuse_export(qkv_bias or not config.bias, "qkv_bias=false with bias=true", layout)
    qwen = qkv_bias and not config.bias
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_base}
    return {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama", "vocab_size": config.vocab_size,
            "max_position_embeddings": config.block_size, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head or config.n_head,
            "hidden_size": config.n_embd, "intermediate_size": config.hidden,
            "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
            "head_dim": config.n_embd // config.n_head,
            "rope_parameters": rope, "rope_theta": config.rope_base,
            "rope_scaling": rope if config.rope_scaling else None,
            "attention_bias": bool(config.bias or qkv_bias), "mlp_bias": bool(config.bias),
            "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0}


def export_tensors(net: GPT) -> dict[str, torch.Tensor]:
    """The net's tensors under transformers' names and layout."""
    state = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    if net.config.positions == "learned":
        return gpt2_export(net.config, state)
    return llama_export(net.config, state)


def gpt2_export(config: GPTConfig, state: dict) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": state["wte.weight"],
           "transformer.wpe.weight": state["wpe.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"],
           "transformer.ln_f.bias": state["ln_f.bias"]}
    for i in range(config.n_layer):
        hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for norm in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                out[f"{hf}{norm}.{kind}"] = state[f"{ours}{norm}.{kind}"]
        out[f"{hf}attn.c_attn.weight"] = torch.cat(
            [state[f"{ours}attn.{n}.weight"] for n in "qkv"]).t()
        out[f"{hf}attn.c_attn.bias"] = torch.cat([state[f"{ours}attn.{n}.bias"] for n in "qkv"])
        for theirs, mine in (("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                             ("mlp.c_proj", "mlp.proj")):
            out[f"{hf}{theirs}.weight"] = state[f"{ours}{mine}.weight"].t()
            out[f"{hf}{theirs}.bias"] = state[f"{ours}{mine}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def llama_export(config: GPTConfig, state: dict) -> dict[str, torch.Tensor]:
    heads = {"attn.q": config.n_head, "attn.k": config.n_kv_head or config.n_head}
    out = {"model.embed_tokens.weight": state["wte.weight"],
           "model.norm.weight": state["ln_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        for mine, theirs in LLAMA_NAMES.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"blocks.{i}.{mine}.{kind}")
                if tensor is None:
                    continue
                if mine in heads:
                    tensor = heads_halved(tensor, heads[mine])
                out[f"model.layers.{i}.{theirs}.{kind}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def export_folder(net: GPT, tokenizer_files: dict[str, str], out: str | Path,
                  specials: dict[str, int | None]) -> Path:
    """Writes a Hugging Face folder: config.json, model.safetensors and the tokenizer's files
    (`tokenizer_files`: name to text); `specials`: the bos/eos/pad token ids."""
    config = hf_config(net.config)  # refuses before anything is written
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LmlabError(f"out={out} is not empty: its files (an older model's shards, ...) "
                         "would mix with the export; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config.update({f"{role}_token_id": i for role, i in specials.items()}, dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(export_tensors(net), out / "model.safetensors", metadata={"format": "pt"})
    for name, text in tokenizer_files.items():
        (out / name).write_text(text)
    return out
