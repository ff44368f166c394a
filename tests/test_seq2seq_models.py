"""The encoder-decoder nets: masks, caches, beams' reordering, what they declare for the
parallel strategies. Tiny random nets on CPU."""

import fnmatch
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import GPU
from lmlab.models.attention import Attention
from lmlab.models.decoding import beam_search
from lmlab.models.rnn_seq2seq import RNNSeq2Seq
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 23, 19
NETS = {
    "transformer": dict(cls=Seq2SeqTransformer, d_model=16, n_head=2, n_encoder_layers=2,
                        n_decoder_layers=2, d_ff=32, max_length=64, share_embeddings=False),
    "transformer-joint-learned-relu": dict(cls=Seq2SeqTransformer, d_model=16, n_head=4,
                                           n_encoder_layers=1, n_decoder_layers=2, d_ff=24,
                                           positions="learned", activation="relu",
                                           share_embeddings=True),
    "transformer-copy": dict(cls=Seq2SeqTransformer, d_model=16, n_head=2, n_encoder_layers=1,
                             n_decoder_layers=2, d_ff=24, share_embeddings=True, copy=True),
    "lstm-luong": dict(cls=RNNSeq2Seq, embed_dim=12, hidden_size=16, num_layers=2),
    "lstm-bahdanau": dict(cls=RNNSeq2Seq, embed_dim=12, hidden_size=16, num_layers=1,
                          attention="bahdanau"),
}


def tiny(name: str, seed: int = 0):
    """A random net in eval mode, its weights spread enough that decoding has no near-ties."""
    torch.manual_seed(seed)
    args = dict(NETS[name])
    cls = args.pop("cls")
    joint = args.get("share_embeddings", False)
    net = cls(TGT_VOCAB if joint else SRC_VOCAB, TGT_VOCAB, PAD, BOS, EOS, dropout=0.0, **args)
    if cls is RNNSeq2Seq:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(6)
    return net.eval()


def batch(seed: int = 0, lengths=(7, 3, 5), target_lengths=(6, 4, 2), vocab=TGT_VOCAB):
    """A right-padded source (B, S) and target input (B, T) (<bos> first), both ragged."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    target = torch.randint(3, vocab, (len(lengths), max(target_lengths)), generator=g)
    target[:, 0] = BOS
    for i, (s, t) in enumerate(zip(lengths, target_lengths)):
        source[i, s:] = PAD
        target[i, t:] = PAD
    return source, target


def test_shapes_and_tied_embeddings():
    for name in NETS:
        net = tiny(name)
        source, target = batch(vocab=min(SRC_VOCAB, TGT_VOCAB))
        assert net(source, target).shape == (3, target.size(1), TGT_VOCAB)
        assert net.lm_head.weight is net.tgt_embed.weight
        joint = NETS[name].get("share_embeddings", False)
        assert (net.src_embed is net.tgt_embed) == joint


def test_the_copying_net_gives_log_probabilities_that_can_only_copy_when_the_gate_says_so():
    net = tiny("transformer-copy")
    source, target = batch(vocab=TGT_VOCAB)
    logp = net(source, target)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(()), atol=1e-5)  # normalized
    with torch.no_grad():
        net.copier.gate.bias.fill_(-50.0)  # all to the copy distribution
        p = net(source, target).exp()
    for row, ids in enumerate(source):
        held = torch.zeros(TGT_VOCAB, dtype=torch.bool)
        held[ids[ids != PAD]] = True
        assert torch.allclose(p[row][:, held].sum(-1), torch.ones(()), atol=1e-5)
        assert p[row][:, ~held].max() < 1e-6  # never an id the source lacks, nor padding
    with torch.no_grad():
        net.copier.gate.bias.fill_(50.0)  # negative control: the vocabulary alone
        assert net(source, target).exp()[0][:, PAD].max() > 1e-6


def test_copy_needs_one_joint_vocabulary():
    with pytest.raises(ValueError, match="copy needs one joint vocabulary"):
        Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, PAD, BOS, EOS, share_embeddings=False,
                           copy=True)


@pytest.mark.parametrize("name", NETS)
def test_padding_never_changes_the_logits(name):
    net = tiny(name)
    source, target = batch()
    together = net(source, target)
    for i in range(len(source)):
        s, t = int((source[i] != PAD).sum()), int((target[i] != PAD).sum())
        alone = net(source[i:i + 1, :s], target[i:i + 1, :t])
        torch.testing.assert_close(together[i:i + 1, :t], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NETS)
def test_the_decoder_never_sees_the_future(name):
    net = tiny(name)
    source, target = batch(lengths=(6, 6), target_lengths=(8, 8))
    changed = target.clone()
    changed[:, 5] = (changed[:, 5] + 1 - 3) % (TGT_VOCAB - 3) + 3
    before, after = net(source, target), net(source, changed)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("name", NETS)
def test_the_decoder_reads_the_source(name):
    net = tiny(name)
    source, target = batch(lengths=(6, 6), target_lengths=(5, 5))
    changed = source.clone()
    changed[:, 4] = (changed[:, 4] + 1 - 3) % (SRC_VOCAB - 3) + 3
    assert not torch.allclose(net(source, target), net(changed, target))


@pytest.mark.parametrize("name", NETS)
def test_cached_steps_equal_teacher_forcing(name):
    net = tiny(name)
    source, target = batch(target_lengths=(6, 6, 6))
    forced = net(source, target)
    encoded, cache = net.encode(source), None
    for t in range(target.size(1)):
        logits, cache = net.decode_step(target[:, t:t + 1], encoded, cache)
        torch.testing.assert_close(logits, forced[:, t], atol=1e-5, rtol=1e-5)
    prefix, _ = net.decode_step(target, net.encode(source), None)  # a whole prefix at once
    torch.testing.assert_close(prefix, forced[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NETS)
def test_reorder_moves_rows_of_the_memory_and_the_cache(name):
    net = tiny(name)
    source, target = batch(target_lengths=(4, 4, 4))
    encoded = net.encode(source)
    _, cache = net.decode_step(target[:, :3], encoded, None)
    order = torch.tensor([2, 0, 0, 1])
    moved_encoded, moved_cache = net.reorder(encoded, cache, order)
    logits, _ = net.decode_step(target[order, 3:], moved_encoded, moved_cache)
    torch.testing.assert_close(logits, net(source, target)[order, 3], atol=1e-5, rtol=1e-5)


def test_cross_attention_computes_the_memory_keys_once():
    torch.manual_seed(0)
    attention = Attention(8, 2, cross=True).eval()
    x, memory = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    first, kv = attention(x, memory, key_mask=mask)
    again, kv_again = attention(x, None, key_mask=mask, cache=kv)  # memory not needed now
    torch.testing.assert_close(first, again)
    assert kv_again[0] is kv[0]
    alone, _ = attention(x[1:], memory[1:, :2])  # the masked keys count for nothing
    torch.testing.assert_close(first[1:], alone)


def test_the_parallel_declarations_cover_every_attention_and_mlp():
    net = tiny("transformer")
    names = [n for n, _ in net.named_modules()]
    plan = net.tensor_parallel_plan
    for pattern in plan:
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    split = {n for n in names if any(fnmatch.fnmatch(n, p) for p in plan)}
    layers = {n for n in names if n.endswith(("attn.q", "attn.k", "attn.v", "attn.proj",
                                              "mlp.fc", "mlp.proj"))}
    assert split == layers and any(".cross_attn." in n for n in split)
    for name in ("transformer", "lstm-luong"):
        net = tiny(name)
        kinds = {type(m) for m in net.modules()}
        assert len(net.block_classes) == 2 and set(net.block_classes) <= kinds


def test_a_joint_vocabulary_needs_equal_sizes():
    for cls in (Seq2SeqTransformer, RNNSeq2Seq):
        with pytest.raises(ValueError, match="share_embeddings"):
            cls(30, 20, PAD, BOS, EOS, share_embeddings=True)


def test_sequences_longer_than_the_position_table_are_refused():
    net = tiny("transformer")
    with pytest.raises(ValueError, match="max_length 64"):
        net.encode(torch.full((1, 65), 5))


@pytest.mark.parametrize("name", ["lstm-luong", "lstm-bahdanau"])
def test_the_first_recurrent_state_is_contiguous_as_cudnn_needs(name):
    """cuDNN's LSTM refuses a non-contiguous state ("rnn: cx is not contiguous"), where the
    CPU's takes it: checked here on the CPU, and run on CUDA below."""
    net = tiny(name)
    state = net.initial_state(net.encode(batch()[0]))
    assert state["h"].is_contiguous() and state["c"].is_contiguous()


@pytest.mark.parametrize("name", [pytest.param(name, marks=GPU)
                                  for name in ("lstm-luong", "lstm-bahdanau")])
def test_the_recurrent_net_trains_and_decodes_on_cuda(name):
    net = tiny(name).cuda()
    source, target = (t.cuda() for t in batch())
    net.train()
    net(source, target).sum().backward()
    found = beam_search(net.eval(), source, beam=2, max_len_b=4)
    assert len(found) == len(source)


def test_each_encoder_direction_reads_its_own_side():
    net = tiny("lstm-luong")
    source, _ = batch(lengths=(6, 6))
    changed = source.clone()
    changed[:, 2] = (changed[:, 2] + 1 - 3) % (SRC_VOCAB - 3) + 3
    embed = net.src_embed
    (before, final), (after, final_after) = (net.encoder(embed(s), (s != PAD).sum(1))
                                             for s in (source, changed))
    half = net.hidden_size
    torch.testing.assert_close(before[:, :2, :half], after[:, :2, :half])  # left to right
    torch.testing.assert_close(before[:, 3:, half:], after[:, 3:, half:])  # right to left
    assert not torch.allclose(before[:, 2:, :half], after[:, 2:, :half])
    assert not torch.allclose(before[:, :3, half:], after[:, :3, half:])
    assert not torch.allclose(final[:, :half], final_after[:, :half])  # both final states saw it
    assert not torch.allclose(final[:, half:], final_after[:, half:])


def tensor_parallel_worker(rank: int, port: int) -> None:
    """Rank `rank` of 2: the plan-split transformer gives the unsplit one's logits and beams."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmlab.parallel.sharding import split_layers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = tiny("transformer")
        source, target = batch()
        expected, expected_beams = net(source, target), beam_search(net, source, beam=3)
        split_layers(net, init_device_mesh("cpu", (2,)))
        assert net.decoder_blocks[0].cross_attn.k.weight.to_local().shape == (8, 16)
        torch.testing.assert_close(net(source, target), expected, atol=1e-5, rtol=1e-5)
        beams = beam_search(net, source, beam=3)
        assert [[h.tokens for h in b] for b in beams] == \
            [[h.tokens for h in b] for b in expected_beams]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_tensor_parallel_plan_splits_self_and_cross_attention_by_heads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(tensor_parallel_worker, args=(port,), nprocs=2)


def dense_copy_mixture(copier, x, logits, memory, mask, source):
    """The pointer-generator of See et al. as written there: p = g * softmax(logits) +
    (1 - g) * the attention added up per vocabulary id (scatter_add), then log p."""
    scores = copier.query(x) @ memory.transpose(1, 2) / x.size(-1) ** 0.5
    attention = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    gate = torch.sigmoid(copier.gate(torch.cat([x, attention @ memory], -1)))
    ids = source[:, None, :].expand(-1, x.size(1), -1)
    copy = torch.zeros_like(logits).scatter_add(-1, ids, attention)
    return (gate * logits.softmax(-1) + (1 - gate) * copy).log()


def test_the_copier_gradient_is_the_dense_mixtures_for_repeated_and_padded_ids():
    """Round 2 case: id 3 three times in a source, target 3; and padding with label
    smoothing. `scatter` of duplicated ids gave three times the reference's gradient."""
    torch.manual_seed(0)
    net = tiny("transformer-copy")
    copier, d = net.copier, 16
    source = torch.tensor([[3, 5, 3, 7, 3, PAD, PAD], [4, 4, 6, 8, 9, 10, 11]])
    mask = source != PAD
    inputs = [torch.randn(2, 4, d), torch.randn(2, 4, TGT_VOCAB), torch.randn(2, 7, d)]
    target = torch.tensor([[3, 5, 3, 7], [4, 6, 4, 12]])
    grads = []
    for output in (copier, lambda *a: dense_copy_mixture(copier, *a)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        copier.zero_grad()
        logp = output(leaves[0], leaves[1], leaves[2], mask, source)
        loss = torch.nn.functional.cross_entropy(logp.transpose(1, 2), target,
                                                 label_smoothing=0.1)
        loss.backward()
        grads.append([t.grad for t in leaves] + [p.grad.clone() for p in copier.parameters()])
        grads[-1].append(logp.detach())
    ours, reference = grads
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-4)
