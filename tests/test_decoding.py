"""Greedy and beam search: the faults of popular implementations, each with a test (results
that change with the batch or its padding, beam 1 unlike greedy, a silent length cut-off,
the source or padding counted in the length penalty), and a copy task learnt in the test."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from test_seq2seq_models import BOS, EOS, PAD, batch, tiny

from lmlab.training.build import task_for
from lmlab.generate import GenerateConfig
from lmlab.models.decoding import beam_search, best_tokens, block_repeats, greedy, max_lengths
from lmlab.models.rnn_seq2seq import RNNSeq2Seq
from lmlab.models.transformer_seq2seq import Seq2SeqTransformer
from lmlab.tasks.text_metrics import consensus, one_line
from lmlab.training.runs import run_description

DECODING_NETS = ["transformer", "lstm-luong", "lstm-bahdanau"]


class EosBias:
    """A net whose <eos> logit is moved by `bias`: early or never-ending outputs."""

    def __init__(self, net, bias: float):
        self.net, self.bias = net, bias
        self.pad_id, self.bos_id, self.eos_id = net.pad_id, net.bos_id, net.eos_id
        self.max_length = getattr(net, "max_length", None)
        self.encode, self.reorder = net.encode, net.reorder

    def decode_step(self, tokens, encoded, cache):
        logits, cache = self.net.decode_step(tokens, encoded, cache)
        logits[:, self.eos_id] += self.bias
        return logits, cache


def tokens_of(results):
    return [[h.tokens for h in hyps] for hyps in results]


@pytest.mark.parametrize("name", DECODING_NETS)
def test_beam_1_is_greedy(name):
    net = tiny(name)
    source, _ = batch(lengths=(7, 3, 5, 1))
    found, expected = beam_search(net, source, beam=1), greedy(net, source)
    assert tokens_of(found) == tokens_of(expected)
    for hyps, greedy_hyps in zip(found, expected):
        assert hyps[0].score == pytest.approx(greedy_hyps[0].score, abs=1e-5)


@pytest.mark.parametrize("name", DECODING_NETS)
@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_sentence_alone_and_in_a_padded_batch_decode_alike(name, search):
    net = tiny(name)
    source, _ = batch(lengths=(7, 3, 5, 2))
    decode = (lambda s: greedy(net, s)) if search == "greedy" else \
        (lambda s: beam_search(net, s, beam=4, length_penalty=0.6))
    together = decode(source)
    for i, row in enumerate(source):
        alone = decode(row[row != PAD][None])
        assert tokens_of(alone) == tokens_of(together[i:i + 1])
        assert [h.score for h in alone[0]] == pytest.approx([h.score for h in together[i]],
                                                            abs=1e-5)


@pytest.mark.parametrize("name", DECODING_NETS)
def test_cached_decoding_equals_uncached(name):
    net = tiny(name)
    source, _ = batch()
    assert tokens_of(beam_search(net, source, beam=3)) == \
        tokens_of(beam_search(net, source, beam=3, use_cache=False))
    assert tokens_of(greedy(net, source)) == tokens_of(greedy(net, source, use_cache=False))


@pytest.mark.parametrize("name", DECODING_NETS)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5])
def test_hypotheses_are_sorted_and_scored_by_logprob_over_output_length(name, alpha):
    net = EosBias(tiny(name), 2.0)  # outputs of several lengths
    source, _ = batch(lengths=(7, 3, 5))
    results = beam_search(net, source, beam=4, length_penalty=alpha)
    lengths = set()
    for row, hyps in zip(source, results):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:  # teacher-forced log-probability of <bos> tokens <eos>, alone
            assert h.score == pytest.approx(rescore(net, row, h.tokens) / (len(h.tokens) + 1)
                                            ** alpha, abs=1e-4)
            lengths.add(len(h.tokens))
    assert len(lengths) >= 2


def rescore(net: EosBias, row: torch.Tensor, tokens: list[int]) -> float:
    """Summed log-probability of `tokens` then <eos>, from teacher forcing on the net alone."""
    target = torch.tensor([[BOS, *tokens, EOS]])
    with torch.no_grad():
        logits = net.net(row[row != PAD][None], target[:, :-1])
    logits[..., EOS] += net.bias
    return float(F.log_softmax(logits, -1).gather(2, target[:, 1:, None]).sum())


@pytest.mark.parametrize("name", DECODING_NETS)
def test_min_length_masks_eos_before_it(name):
    net = EosBias(tiny(name), 20.0)  # would stop at once
    source, _ = batch()
    assert [len(hyps[0].tokens) for hyps in beam_search(net, source, beam=3, min_length=0)] \
        == [0, 0, 0]
    for results in (beam_search(net, source, beam=3, min_length=4),
                    greedy(net, source, min_length=4)):
        assert all(len(h.tokens) >= 4 for hyps in results for h in hyps)
        assert [len(hyps[0].tokens) for hyps in results] == [4, 4, 4]


@pytest.mark.parametrize("name", DECODING_NETS)
def test_outputs_stop_at_a_times_source_length_plus_b_with_no_other_cut_off(name):
    net = EosBias(tiny(name), -50.0)  # never ends by itself
    source, _ = batch(lengths=(12, 3, 7))
    for a, b in ((2.0, 11), (0.5, 3)):
        expected = [int(a * n + b) for n in (12, 3, 7)]  # 35 for the first at a=2: past 20
        for results in (beam_search(net, source, beam=2, max_len_a=a, max_len_b=b),
                        greedy(net, source, max_len_a=a, max_len_b=b)):
            assert [len(hyps[0].tokens) for hyps in results] == expected


def repeats(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def masked_tokens(history: list[list[int]], n: int, vocab: int = 10) -> list[list[int]]:
    logp = block_repeats(torch.zeros(len(history), vocab), torch.tensor(history), n)
    return [row.isinf().nonzero().flatten().tolist() for row in logp]


def test_block_repeats_masks_the_tokens_that_would_repeat_an_n_gram():
    history = [[5, 6, 5, 7, 5], [5, 6, 7, 8, 9]]
    assert masked_tokens(history, 2) == [[6, 7], []]  # after 5: 6 and 7 seen; 9 is new
    assert masked_tokens(history, 1) == [[5, 6, 7], [5, 6, 7, 8, 9]]
    assert masked_tokens(history, 0) == [[], []]
    assert masked_tokens([[3, 3]], 2) == [[3]]  # the history exactly n long, overlapping
    assert masked_tokens([[3, 4]], 3) == [[]]  # shorter than n
    assert masked_tokens([[5, 6, 7, 5, 6]], 3) == [[7]]
    assert masked_tokens([[1, 0, 2, 3]], 1, vocab=4) == [[]]  # nothing left: not masked
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be 0"):
        block_repeats(torch.zeros(1, 4), torch.tensor([[1]]), -1)


@pytest.mark.parametrize("name", DECODING_NETS)
def test_no_output_repeats_an_n_gram_when_blocked(name):
    net = EosBias(tiny(name), -50.0)  # long outputs of a random net: they repeat themselves
    source, _ = batch(lengths=(7, 3, 5, 2))
    long = dict(max_len_a=0.0, max_len_b=30)
    free = [hyps[0].tokens for hyps in beam_search(net, source, beam=3, **long)]
    assert any(repeats(tokens, 2) for tokens in free)  # the control: the check can fail
    for results in (beam_search(net, source, beam=3, no_repeat_ngram_size=2, **long),
                    greedy(net, source, no_repeat_ngram_size=2, **long)):
        assert [len(hyps[0].tokens) for hyps in results] == [30] * 4
        assert not any(repeats(h.tokens, 2) for hyps in results for h in hyps)
    blocked = dict(no_repeat_ngram_size=2, **long)
    assert tokens_of(beam_search(net, source, beam=1, **blocked)) == \
        tokens_of(greedy(net, source, **blocked))
    net.bias, blocked = 0.0, dict(no_repeat_ngram_size=2, max_len_a=2.0)  # rows end apart
    for search in (greedy, lambda n, s, **k: beam_search(n, s, beam=3, **k)):
        together = search(net, source, **blocked)
        for i, row in enumerate(source):
            assert tokens_of(search(net, row[row != PAD][None], **blocked)) == \
                tokens_of(together[i:i + 1])


def test_the_length_limit_stays_within_the_position_table():
    net = tiny("transformer")  # max_length 64: <bos> and 63 tokens
    source = torch.full((2, 5), 7)
    assert max_lengths(net, source, 2.3, 100, 1).tolist() == [63, 63]
    assert max_lengths(tiny("lstm-luong"), torch.full((1, 100), 7), 2.3, 0, 1).tolist() == [230]


def test_a_sentence_stops_at_n_finished_hypotheses():
    net = EosBias(tiny("transformer"), 2.0)
    source, _ = batch()
    for n in (1, 2, 3):
        assert [len(h) for h in beam_search(net, source, beam=3, n_finished=n)] == [n] * 3
    more = [len(h) for h in beam_search(net, source, beam=3, n_finished=6)]
    assert max(more) == 6 and min(more) >= 3  # beyond the beam; all 3 beams end at the limit


COPY_VOCAB = 13


def copy_batch(generator: torch.Generator, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources of 3-8 random symbols; targets <bos> source <eos>, right-padded."""
    lengths = torch.randint(3, 9, (n,), generator=generator)
    source = torch.randint(3, COPY_VOCAB, (n, 8), generator=generator)
    source[torch.arange(8) >= lengths[:, None]] = PAD
    target = torch.full((n, 10), PAD)
    target[:, 0], target[:, 1:9] = BOS, source
    target[torch.arange(n), lengths + 1] = EOS
    return source, target


@pytest.mark.parametrize("cls, args, steps", [
    (Seq2SeqTransformer, dict(d_model=32, n_head=2, n_encoder_layers=2, n_decoder_layers=2,
                              d_ff=64), 500),
    (Seq2SeqTransformer, dict(d_model=32, n_head=2, n_encoder_layers=1, n_decoder_layers=1,
                              d_ff=64, share_embeddings=True, copy=True), 300),
    (RNNSeq2Seq, dict(embed_dim=32, hidden_size=64), 600),
], ids=["transformer", "transformer-copy", "lstm"])
def test_a_net_trained_to_copy_decodes_the_copy(cls, args, steps):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = cls(COPY_VOCAB, COPY_VOCAB, PAD, BOS, EOS, dropout=0.0, **args)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(steps):  # ~8 s each; 15 or 16 of 16 copies over training seeds 0-2
        source, target = copy_batch(generator)
        logits = net(source, target[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    source, _ = copy_batch(torch.Generator().manual_seed(1), 16)
    copies = [row[row != PAD].tolist() for row in source]
    for results in (beam_search(net, source, beam=3), greedy(net, source)):
        assert sum(hyps[0].tokens == copy for hyps, copy in zip(results, copies)) >= 14


class CountingSteps(EosBias):
    """Counts the decoder's steps (an early <eos>, so the search could stop at once)."""

    def __init__(self, net):
        super().__init__(net, bias=50.0)
        self.calls = 0

    def decode_step(self, tokens, encoded, cache):
        self.calls += 1
        return super().decode_step(tokens, encoded, cache)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_fixed_number_of_steps_changes_no_output(search):
    """What sharded strategies need: every rank runs the decoder as often as the others."""
    decode = greedy if search == "greedy" else (lambda n, s, **k: beam_search(n, s, 3, **k))
    source, _ = batch(lengths=(7, 3, 5, 2))
    free, fixed = CountingSteps(tiny("transformer")), CountingSteps(tiny("transformer"))
    expected, found = decode(free, source), decode(fixed, source, steps=25)
    assert tokens_of(found) == tokens_of(expected)
    assert free.calls < 25 and fixed.calls == 25


def test_too_few_fixed_steps_are_refused():
    source, _ = batch(lengths=(7, 3))
    with pytest.raises(ValueError, match="steps=2 is fewer than"):
        greedy(tiny("transformer"), source, steps=2)


def test_a_chooser_picks_which_hypothesis_is_output():
    net = tiny("transformer")
    source, _ = batch(lengths=(7, 3, 5))
    found = beam_search(net, source, beam=3)
    last = best_tokens(net, source, beam=3, choose=lambda hypotheses: len(hypotheses) - 1)
    assert last == [hypotheses[-1].tokens for hypotheses in found]
    assert best_tokens(net, source, beam=3) == [hypotheses[0].tokens for hypotheses in found]
    assert last != best_tokens(net, source, beam=3)


def task_and_data(make_cfg, data: str, mbr: bool):
    cfg = make_cfg("model=transformer_tiny", f"data={data}", "data.batch_size=8",
                   "data.tokenizer.vocab_size=300", f"model.mbr={mbr}")
    module = instantiate(cfg.data)
    module.setup("fit")
    torch.manual_seed(0)
    return cfg, task_for(cfg, module.describe()).eval(), module


@pytest.mark.parametrize("mbr", [True, False])
def test_the_task_outputs_the_consensus_of_its_beam_with_mbr(make_cfg, mbr):
    _, task, data = task_and_data(make_cfg, "stdlib_summaries", mbr)
    source = next(iter(data.val_dataloader()))["source"]
    found = beam_search(task.net, source, beam=4, **task.search)
    tokenizer = data.describe().target_tokenizer
    picked = [consensus([tokenizer.decode(h.tokens) for h in hyps], "rouge") for hyps in found]
    assert any(picked)  # some sentence's consensus is not its best-scored hypothesis
    expected = [hyps[i if mbr else 0].tokens for hyps, i in zip(found, picked)]
    assert task.decode(source, beam=4) == expected


@pytest.mark.parametrize("data,metric", [("stdlib_summaries", "rouge"), ("multi30k", "bleu")])
def test_a_run_rebuilt_from_its_folder_scores_by_its_datas_metric(make_cfg, tmp_path, data,
                                                                  metric):
    cfg, task, module = task_and_data(make_cfg, data, True)
    assert task.metric == metric
    module.save(tmp_path)  # what a run folder keeps; generate and evaluate rebuild from it
    rebuilt = task_for(cfg, run_description(tmp_path, cfg))
    assert (rebuilt.metric, rebuilt.stem, rebuilt.mbr) == (metric, task.stem, True)


def test_generate_keeps_the_users_max_length_or_names_both_limits():
    """Round 2 case: `generate max_length=3` on a run with `min_length=6` wrote 6 tokens."""
    from lmlab.errors import LmlabError
    from lmlab.generate import check_limits, search_changes
    from lmlab.tasks.seq2seq import Seq2SeqTask

    args = GenerateConfig(ckpt="", max_length=3)
    run = Seq2SeqTask(tiny("transformer"), torch.optim.SGD, min_length=6, beam=1)
    with pytest.raises(LmlabError, match=r"max_length=3 is below min_length=6 \(the run's\)"):
        check_limits(run, args)
    args.min_length = 2
    changed = Seq2SeqTask(tiny("transformer"), torch.optim.SGD, beam=1, **search_changes(args))
    check_limits(changed, args)
    source, _ = batch()
    assert max(len(t) for t in changed.decode(source, beam=1)) <= 3  # tokens before <eos>


class CountsEncodings(torch.nn.Module):
    """A net's wrapper that counts `encode` calls; `shares`: whether its forward takes the
    encoder output (False: a net of one's own with the older signature)."""

    def __init__(self, net, shares: bool):
        super().__init__()
        self.inner, self.calls = net, 0
        for name in ("pad_id", "bos_id", "eos_id", "decode_step", "reorder", "max_length"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))
        self.forward = self.shared_forward if shares else self.own_forward

    def encode(self, source):
        self.calls += 1
        return self.inner.encode(source)

    def shared_forward(self, source, target_in, encoded=None):
        return self.inner(source, target_in, encoded=encoded or self.encode(source))

    def own_forward(self, source, target_in):
        return self.inner(source, target_in, encoded=self.encode(source))


@pytest.mark.parametrize("shares", [True, False], ids=["shared", "a net without encoded="])
def test_a_validation_step_runs_the_encoder_once(make_cfg, shares):
    _, task, data = task_and_data(make_cfg, "stdlib_summaries", False)
    batch = next(iter(data.val_dataloader()))
    expected = task.decode(batch["source"], task.beams["val"])
    task.net = CountsEncodings(task.net, shares)
    task.hypotheses["val"] = []
    with torch.no_grad():
        task.step(batch, "val")
    assert task.net.calls == (1 if shares else 2)
    expected = [one_line(task.tokenizer.decode(t)) for t in expected]
    assert dict(task.hypotheses["val"]) == dict(zip(batch["index"].tolist(), expected))


@pytest.mark.parametrize("name", ["transformer", "transformer-joint-learned-relu"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_beams_reading_one_memory_row_find_what_beams_with_copies_find(name, use_cache):
    """A sentence's beams read its encoder output (and cross-attention keys and values)
    together; with a copy for each beam (the net told it shares nothing) the hypotheses and
    scores are the same, sentences finishing at different steps included."""
    net = tiny(name)
    assert net.beams_share_memory
    source, _ = batch(lengths=(7, 3, 5, 1, 6))
    settings = dict(beam=4, max_len_a=0.8, max_len_b=2, use_cache=use_cache)
    shared = beam_search(net, source, **settings)
    net.beams_share_memory = False
    copied = beam_search(net, source, **settings)
    assert [[h.tokens for h in hyps] for hyps in shared] == \
        [[h.tokens for h in hyps] for hyps in copied]
    for ours, theirs in zip(shared, copied):
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-5)
    assert len({len(hyps[0].tokens) for hyps in shared}) > 1  # sentences end apart


def test_a_copying_net_gives_each_beam_its_memory():
    assert not tiny("transformer-copy").beams_share_memory
