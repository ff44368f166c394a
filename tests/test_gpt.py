import pytest
import torch
import torch.nn.functional as F

from lmlab.models.attention import KeyValueBuffer
from lmlab.models.gpt import GPT
from lmlab.models.output_layer import OutputLayer, decoding
from lmlab.models.rnn_lm import RNNLanguageModel
from lmlab.models.sampling import filter_logits, generate
from lmlab.tasks.causal_lm import parameter_groups
from lmlab.tasks.schedules import warmup_cosine, warmup_inverse_sqrt

VOCAB = 37


def tiny(**kwargs) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPT(**{**args, **kwargs}).eval()


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_shapes_and_tied_embeddings(positions):
    model = tiny(positions=positions)
    assert model(torch.randint(VOCAB, (3, 10))).shape == (3, 10, VOCAB)
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_future_tokens_do_not_change_past_logits(positions):
    model = tiny(positions=positions)
    tokens = torch.randint(VOCAB, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    torch.testing.assert_close(model(tokens)[:, :7], model(changed)[:, :7])
    assert not torch.allclose(model(tokens)[:, 7:], model(changed)[:, 7:])


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_forward_equals_full_forward(positions):
    model = tiny(positions=positions)
    tokens = torch.randint(VOCAB, (2, 12))
    _, cache = model(tokens[:, :5], return_cache=True)
    chunk, cache = model(tokens[:, 5:9], cache=cache, return_cache=True)  # several at once
    last, _ = model(tokens[:, 9:], cache=cache, return_cache=True)
    torch.testing.assert_close(torch.cat([chunk, last], 1), model(tokens)[:, 5:], atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("model", [tiny(), tiny(positions="rope"),
                                   RNNLanguageModel(VOCAB, 8, 16).eval()],
                         ids=["gpt", "gpt-rope", "lstm"])
def test_greedy_generation_with_cache_equals_without(model):
    prompt = torch.randint(VOCAB, (1, 3), generator=torch.Generator().manual_seed(1))
    steps = 30  # past the GPT's block of 16: the window slides
    with_cache = torch.cat(list(generate(model, prompt, steps, temperature=0)), 1)
    without = torch.cat(list(generate(model, prompt, steps, temperature=0, use_cache=False)), 1)
    assert with_cache.tolist() == without.tolist()


def test_seeded_sampling_repeats():
    model = tiny()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [torch.cat(list(generate(model, prompt, 20, temperature=1.0, top_k=10,
                                    generator=torch.Generator().manual_seed(7))), 1)
            for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()


def test_top_k_keeps_the_k_highest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.75
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]
    everything = torch.isfinite(filter_logits(probs.log(), top_p=1.0))
    assert everything.all()


def test_one_batch_overfits():
    model = tiny().train()
    tokens = torch.randint(VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = tiny()
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    matrices = ("q.weight", "k.weight", "v.weight", "proj.weight", "fc.weight")
    assert decayed and all(n.endswith(matrices) for n in decayed)
    assert {"wte.weight", "wpe.weight", "ln_f.weight"} <= {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = warmup_cosine(optimizer, warmup_steps=100, total_steps=2000, min_lr_ratio=0.1)
    lrs = []
    for _ in range(2100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] < 2e-5 and lrs[100] == pytest.approx(1e-3)
    assert lrs[1050] == pytest.approx(0.55e-3, rel=1e-2)
    assert lrs[2000] == pytest.approx(1e-4) and lrs[2099] == pytest.approx(1e-4)


def test_context_longer_than_the_block_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_small_has_124m_parameters():
    model = GPT(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    assert round(model.num_parameters() / 1e6) == 124


def test_checkpoints_of_the_fused_qkv_projection_still_load():
    model = tiny()
    state = model.state_dict()
    for layer in range(len(model.blocks)):
        prefix = f"blocks.{layer}.attn."
        for kind in ("weight", "bias"):
            state[f"{prefix}qkv.{kind}"] = torch.cat([state.pop(f"{prefix}{n}.{kind}")
                                                     for n in "qkv"])
    fresh = tiny(positions="learned").eval()
    torch.nn.init.zeros_(fresh.blocks[0].attn.q.weight)  # differs until loaded
    fresh.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(fresh(tokens), model(tokens))


def test_warmup_inverse_sqrt_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = warmup_inverse_sqrt(optimizer, warmup_steps=100).lr_lambdas[0]
    assert factor(0) < factor(50) < factor(99) <= 1.0
    assert factor(100) == pytest.approx(1.0) and factor(400) == pytest.approx(0.5)


def test_the_cache_is_written_in_place_and_holds_what_concatenation_gives():
    """100 steps of one position: the buffers are replaced only when full (doubling), not
    at each step as torch.cat would; the keys and values are the concatenated ones."""
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 3, 1, 4, generator=generator) for _ in range(101)]
    buffer = KeyValueBuffer.holding(parts[0], -parts[0], room=2)
    places = {buffer.keys.data_ptr()}
    for part in parts[1:]:
        keys, values = buffer.append(part, -part)
        places.add(buffer.keys.data_ptr())
    assert len(places) <= 7  # 2, 4, 8, ..., 128 positions
    torch.testing.assert_close(keys, torch.cat(parts, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(buffer[1], -torch.cat(parts, dim=2), rtol=0, atol=0)
    rows = buffer.select_rows(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(rows[0], torch.cat(parts, dim=2)[[1, 1, 0]], rtol=0, atol=0)


def test_the_output_layer_decodes_as_nn_linear_and_follows_its_weight():
    """Within a decoding, a step multiplies by a transposed copy of the weight; against
    `F.linear` of the weight as it is, through in-place changes between decodings, with and
    without a bias. Negative control: the first decoding's copy, kept, goes stale."""
    torch.manual_seed(0)
    for bias in (False, True):
        layer = OutputLayer(16, 50, bias=bias).eval()
        step, block = torch.randn(3, 1, 16), torch.randn(3, 4, 16)
        kept = []
        with torch.no_grad():
            for change in (lambda m: None, lambda m: m.weight.mul_(-2.0),
                           lambda m: m.weight.data.add_(1.0),
                           lambda m: m.load_state_dict({**m.state_dict(),
                                                        "weight": torch.randn(50, 16)})):
                change(layer)
                with decoding(layer):
                    for x in (step, block):
                        torch.testing.assert_close(layer(x),
                                                   F.linear(x, layer.weight, layer.bias),
                                                   rtol=1e-5, atol=1e-5)
                    kept.append(layer.transposed)
            assert layer.transposed is None and not layer.decoding_now  # dropped after
            assert kept[0] is not None
            assert not torch.allclose(step @ kept[0], F.linear(step, layer.weight), atol=1e-3)
        with decoding(layer):  # gradients on: nn.Linear's forward, gradients as ever
            (layer(step) ** 2).sum().backward()
        assert layer.weight.grad is not None and layer.transposed is None
